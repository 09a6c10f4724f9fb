"""The penalty inside transformers.Trainer and trl.SFTTrainer."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from helpers import make_model
from lalora_curv.adapter import find_lora_modules
from lalora_curv.hf import LaloraTrainer, PenaltyMixin
from lalora_curv.toy import random_batches

pytest.importorskip("accelerate")


def examples(n=8, seq_len=10, seed=0, vocab=48):
    (b,) = random_batches(1, n, seq_len, vocab, seed=seed, pad_fraction=0.0, prompt_fraction=0.3)
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


def setup():
    model = make_model(dtype=torch.float32, init_B_std=0.0)
    source = random_batches(2, 3, 10, 48, seed=1)
    prec = lc.fit_precision(model, source, structure="kfac", progress=False)
    with torch.no_grad():  # move off the mode, so the penalty has a gradient
        for h in find_lora_modules(model).values():
            h.lora_B.weight.normal_(0, 0.05)
    return model, prec


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


def adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_adds_lam_times_penalty_gradient_once_per_step(tmp_path):
    """One SGD step with and without the penalty differ by exactly -lr * lam * grad(penalty),
    under gradient accumulation over two micro-batches."""
    lam, lr = 7.0, 0.1
    with_pen, prec = setup()
    without, _ = setup()
    params = prec.adapter_params(with_pen)
    penalty = prec.penalty(with_pen)
    raw = torch.autograd.grad(penalty, list(params.values()), allow_unused=True)
    grads = {
        k: torch.zeros_like(p) if g is None else g
        for (k, p), g in zip(params.items(), raw, strict=True)
    }  # lora_A: zero at B0 = 0
    names = {id(p): n for n, p in with_pen.named_parameters()}
    data = examples()
    for model, strength in ((with_pen, lam), (without, 0.0)):
        LaloraTrainer(
            model=model,
            args=args(tmp_path, learning_rate=lr),
            train_dataset=data,
            precision=prec,
            lam=strength,
        ).train()
    a, b = adapter(with_pen), adapter(without)
    for key, p in params.items():
        n = names[id(p)]
        torch.testing.assert_close(a[n] - b[n], -lr * lam * grads[key], rtol=1e-4, atol=1e-7)


def test_trainer_logs_the_penalty_of_the_thin_loop(tmp_path):
    model, prec = setup()
    expected = float(prec.penalty(model).detach())
    trainer = LaloraTrainer(
        model=model,
        args=args(tmp_path, max_steps=2),
        train_dataset=examples(),
        precision=prec,
        lam=3.0,
    )
    trainer.train()
    logged = [r for r in trainer.state.log_history if "penalty" in r]
    assert len(logged) == 2 and logged[0]["lam"] == 3.0
    assert logged[0]["penalty"] == pytest.approx(expected, rel=1e-6)  # same state, same value
    assert "loss" in logged[0]  # the NLL, logged on its own


def test_trainer_with_gradient_checkpointing_and_bf16(tmp_path):
    model, prec = setup()
    trainer = LaloraTrainer(
        model=model,
        train_dataset=examples(),
        precision=prec,
        lam=3.0,
        args=args(
            tmp_path,
            max_steps=2,
            bf16=True,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            optim="adamw_torch",
        ),
    )
    trainer.train()
    logged = [r for r in trainer.state.log_history if "penalty" in r]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(r["penalty"])) for r in logged)
    assert logged[-1]["penalty"] != logged[0]["penalty"]
    assert all(torch.isfinite(p).all() for p in adapter(model).values())


def test_trainer_rejects_bad_setups(tmp_path):
    model, prec = setup()
    with pytest.raises(lc.LaloraError, match="lam must be >= 0"):
        LaloraTrainer(
            model=model, args=args(tmp_path), train_dataset=examples(), precision=prec, lam=-1.0
        )
    other = make_model(dtype=torch.float32, r=5)
    with pytest.raises(lc.AdapterMismatchError, match="rank"):
        LaloraTrainer(
            model=other, args=args(tmp_path), train_dataset=examples(), precision=prec, lam=1.0
        )


def test_sft_trainer_adds_the_penalty_gradient(tmp_path):
    """TRL's SFTTrainer with the mixin: one SGD step with and without the penalty differ by
    exactly -lr * lam * grad(penalty)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    class LaloraSFTTrainer(PenaltyMixin, trl.SFTTrainer):
        pass

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(
            models.WordLevel({f"t{i}": i for i in range(48)}, unk_token="t0")
        ),
        pad_token="t0",
        eos_token="t1",
    )
    data = Dataset.from_list([{"input_ids": e["input_ids"].tolist()} for e in examples()])
    lam, lr = 7.0, 0.1
    with_pen, prec = setup()
    without, _ = setup()
    params = prec.adapter_params(with_pen)
    raw = torch.autograd.grad(prec.penalty(with_pen), list(params.values()), allow_unused=True)
    grads = {
        k: torch.zeros_like(p) if g is None else g
        for (k, p), g in zip(params.items(), raw, strict=True)
    }
    names = {id(p): n for n, p in with_pen.named_parameters()}
    for model, strength in ((with_pen, lam), (without, 0.0)):
        config = trl.SFTConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=1,
            logging_steps=1,
            learning_rate=lr,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=0,
        )
        trainer = LaloraSFTTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tok,
            precision=prec,
            lam=strength,
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        )
        trainer.train()
    a, b = adapter(with_pen), adapter(without)
    for key, p in params.items():
        n = names[id(p)]
        torch.testing.assert_close(a[n] - b[n], -lr * lam * grads[key], rtol=1e-4, atol=1e-7)
    assert next(r for r in trainer.state.log_history if "penalty" in r)["penalty"] > 0


def test_penalty_only_on_training_logs(tmp_path):
    model, prec = setup()
    trainer = LaloraTrainer(
        model=model,
        train_dataset=examples(),
        eval_dataset=examples(4),
        precision=prec,
        lam=1.0,
        args=args(tmp_path, max_steps=4, logging_steps=4, eval_steps=2, eval_strategy="steps"),
    )
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    trains = [r for r in trainer.state.log_history if "loss" in r]
    assert evals and all("penalty" not in r for r in evals)
    assert len(trains) == 1 and "penalty" in trains[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": "1e3"}, "lam must be a number"),
        ({"lam": -1.0}, "lam must be >= 0"),
        ({"lam": float("nan")}, "lam must be finite"),
        ({"adapter_name": ""}, "adapter_name must be a non-empty string"),
        ({"precision": "runs/fit", "lam": 1.0}, "precision must be a lalora_curv Precision"),
    ],
)
def test_mixin_arguments_are_checked_before_the_trainer_starts(kwargs, message):
    from lalora_curv.hf import PenaltyMixin

    class Base:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the Trainer must not be built with bad arguments")

    class Trainer(PenaltyMixin, Base):
        pass

    with pytest.raises(lc.LaloraError, match=message):
        Trainer(**kwargs)


def test_the_mixin_takes_every_strength_the_thin_loop_takes(tmp_path):
    """A relative strength is c over the precision's mean eigenvalue; under a source-NLL
    budget lambda follows the thin loop's update rule from each step's penalty."""
    from transformers import TrainerCallback

    model, prec = setup()
    trainer = LaloraTrainer(
        model=model, args=args(tmp_path), train_dataset=examples(), precision=prec,
        lam=lc.Strength.relative(0.2),
    )  # fmt: skip
    assert trainer.lam == pytest.approx(0.2 / (prec.trace() / prec.num_params))

    seen: list[tuple[float, float]] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((kwargs["model"] is not None and budgeted.lam, budgeted._budget_step[1]))

    budget = lc.Strength.budget(1e-6, start_lam=5.0, rate=0.3)
    model, prec = setup()
    budgeted = LaloraTrainer(
        model=model, args=args(tmp_path, max_steps=4, gradient_accumulation_steps=1),
        train_dataset=examples(), precision=prec, lam=budget, callbacks=[Record()],
    )  # fmt: skip
    budgeted.train()
    lams, pens = [x[0] for x in seen], [x[1] for x in seen]
    assert len(lams) == 4 and lams[0] == 5.0
    for k in range(1, 4):
        assert lams[k] == pytest.approx(budget.next_lam(lams[k - 1], pens[k - 1], prec), rel=1e-12)
    assert lams[-1] > lams[0]  # the penalty exceeded the tiny budget: lambda rose
