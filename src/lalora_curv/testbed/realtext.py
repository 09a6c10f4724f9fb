r"""The real-text scenario: a tiny Llama pretrained on the real source texts, tuned on GSM8K.

Accuracies of a model this small on HellaSwag, WinoGrande, ARC-Challenge and GSM8K sit at
chance (zero for GSM8K), so learning and forgetting are measured as per-token negative
log-likelihood (NLL) of held-out text instead:

``NLL = -(1 / N) * sum_{(i, t) : y_it != -100} log p(y_it | x_i,<t)``, with ``N`` the number of
supervised tokens (padding and prompts carry label -100).

The texts, the tokenizer and the NLL are :mod:`lalora_curv.testbed.realtext_data`'s: source
text (forgetting) is HellaSwag, WinoGrande and ARC-Challenge with the correct answer in place,
target text (learning) GSM8K's worked solutions. A Llama of a few million parameters is
pretrained on packed blocks of the source training texts (and GSM8K's training questions);
cached like :func:`lalora_curv.testbed.model.pretrained`, keyed by every setting and the
sha256 of every data file read, and shipped (:data:`SHIPPED`) for the default settings.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import lalora_curv as lc
from lalora_curv.strength import Strength
from lalora_curv.tasks.data import TaskDataError
from lalora_curv.tasks.formatting import make_batches
from lalora_curv.testbed.experiment import ALL_LINEAR
from lalora_curv.testbed.finetune import Penalty
from lalora_curv.testbed.finetune import finetune as run_finetune
from lalora_curv.testbed.model import Pretraining, cached
from lalora_curv.testbed.realtext_data import (
    SOURCES,
    RealText,
    text_batches,
    token_nll,
    train_bpe,
    wrap_tokenizer,
)

PRETRAIN = {
    "vocab": 4096,
    "hidden": 192,
    "layers": 6,
    "heads": 6,
    "mlp": 512,
    "block": 256,
    "steps": 2200,
    "batch": 16,
    "lr": 2e-3,
    "weight_decay": 0.1,
    "gsm8k_questions": True,  # the target's training *questions* (never an answer)
    "val_fraction": 0.02,  # blocks held out of pretraining, for its validation curve
    "val_every": 200,
}
"""The shipped model's settings (:data:`SHIPPED`): a 4.2M-parameter Llama pretrained in about
35 minutes on 2 CPU cores, on the source training texts and the GSM8K training questions."""

#: the pretrained real-text model shipped with the package (from_pretrained-loadable), made by
#: ``benchmarks/pretrain_realtext.py`` with :data:`PRETRAIN`; its ``pretraining.json`` records
#: the settings, the data hashes and the validation curve
SHIPPED = Path(__file__).resolve().parent / "realtext_model"


# --- pretraining --------------------------------------------------------------------------------


def pretrained(
    data: RealText, settings: dict | None = None, seed: int = 0, progress: bool = True
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """``(model, tokenizer)`` pretrained on ``data``'s source training texts.

    With the default settings and seed on the data the shipped model was trained on, that model
    (:data:`SHIPPED`) is loaded; otherwise the model is pretrained once and cached on disk.
    """
    cfg = {**PRETRAIN, **(settings or {}), "seed": seed, "data": data.fingerprint()}
    shipped = shipped_settings()
    if shipped is not None and shipped["settings"] == cfg:
        return load_shipped()
    return cached("realtext", cfg, lambda: pretrain(data, cfg, progress)[:2])


def shipped_settings() -> dict[str, Any] | None:
    """The shipped model's ``pretraining.json`` (None when the package has no model)."""
    path = SHIPPED / "pretraining.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_shipped() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The shipped real-text model and tokenizer, loaded with ``from_pretrained``."""
    if shipped_settings() is None:
        raise TaskDataError(f"{SHIPPED}: the shipped real-text model is missing")
    model = LlamaForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32)
    return model.eval(), PreTrainedTokenizerFast.from_pretrained(SHIPPED)


def packed_blocks(texts: Sequence[str], tokenizer, block: int, seed: int) -> Tensor:
    """The texts in a seeded order as one stream ``EOS t1 EOS t2 EOS ...`` cut into blocks."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    stream = [eos]
    for i in order:
        stream += tokenizer(texts[i], add_special_tokens=False)["input_ids"] + [eos]
    n = len(stream) // block
    if n == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one block of {block}")
    return torch.tensor(stream[: n * block]).view(n, block)


def pretraining_texts(data: RealText, cfg: dict) -> list[str]:
    """The source training texts, and the GSM8K training questions if ``cfg`` says so."""
    texts = [t for task in SOURCES for t in data.train[task]]
    if cfg.get("gsm8k_questions"):
        texts += [prompt for prompt, _ in data.target_train]
    return texts


def pretrain(data: RealText, cfg: dict, progress: bool = True):
    """Train the tokenizer and the model (AdamW, one-cycle schedule, random packed blocks).

    A ``val_fraction`` of the packed blocks is held out; every ``val_every`` steps its
    per-token NLL is measured and the best model is kept. Returns ``(model, tokenizer,
    report)``, the report holding the validation curve and the kept step.
    """
    if cfg["steps"] < 4:
        raise ValueError(f"pretraining needs at least 4 steps, got {cfg['steps']}")
    texts = pretraining_texts(data, cfg)
    source = [t for task in SOURCES for t in data.train[task]]
    tok = wrap_tokenizer(train_bpe(source + [p + a for p, a in data.target_train], cfg["vocab"]))
    run = Pretraining(tok, cfg, max_positions=1024, attention="sdpa")
    blocks = packed_blocks(texts, tok, cfg["block"], cfg["seed"])
    n_val = int(len(blocks) * cfg.get("val_fraction", 0.0))
    val, blocks = blocks[:n_val], blocks[n_val:]
    val_batches = [
        {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b}
        for b in (val.split(cfg["batch"]) if n_val else [])
    ]
    gen = torch.Generator().manual_seed(cfg["seed"])
    curve: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None

    def validate(step: int) -> None:
        nonlocal best
        if not val_batches:
            return
        total, count = token_nll(run.model, val_batches)
        curve.append({"step": step, "val_nll": total / count})
        if best is None or total / count < best[0]:
            state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
            best = (total / count, step, state)

    bar = tqdm(
        range(1, cfg["steps"] + 1),
        disable=not progress,
        desc="pretraining the real-text model",
        unit="step",
    )
    for step in bar:
        ids = blocks[torch.randint(len(blocks), (cfg["batch"],), generator=gen)]
        loss = run.step(input_ids=ids, labels=ids)
        bar.set_postfix(nll=f"{loss.item():.3f}", refresh=False)
        if cfg.get("val_every") and (step % cfg["val_every"] == 0 or step == cfg["steps"]):
            validate(step)
            if curve and curve[-1]["step"] == step:
                bar.write(f"step {step}: validation NLL {curve[-1]['val_nll']:.4f}")
    if best is not None:
        run.model.load_state_dict(best[2])
    report = {
        "validation": curve,
        "kept_step": best[1] if best is not None else cfg["steps"],
        "val_blocks": n_val,
        "train_blocks": len(blocks),
    }
    return run.model.eval(), tok, report


# --- learning and forgetting --------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    tok,
    data: RealText,
    batch_size: int = 32,
    max_length: int = 256,
    split: str = "test",
) -> dict[str, Any]:
    """Per-token NLL of the held-out source text and of the GSM8K answers.

    The source text per task and pooled over all their tokens, the GSM8K answers given their
    questions; on the ``"test"`` or ``"val"`` split.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    texts_of, target = (
        (data.eval, data.target_test)
        if split == "test"
        else (
            data.val,
            data.target_val,
        )
    )
    if not target or not all(texts_of.values()):
        raise ValueError(f"the data has no {split!r} split (RealText(val_sample=...))")
    source, total, count = {}, 0.0, 0
    for task in SOURCES:
        texts = sorted(texts_of[task], key=len)  # less padding; the sums ignore order
        s, n = token_nll(model, text_batches(texts, tok, batch_size, max_length))
        source[task] = s / n
        total, count = total + s, count + n
    pairs = sorted(target, key=lambda pa: len(pa[0]) + len(pa[1]))
    s, n = token_nll(model, make_batches(pairs, tok, batch_size=batch_size, max_length=max_length))
    return {"source": source, "source_all": total / count, "target": s / n, "target_tokens": n}


def measure(
    model: nn.Module, tok, data: RealText, max_length: int = 256, validation: bool = False
) -> dict[str, Any]:
    """:func:`evaluate` on the test split, with the validation split's under ``"val"``."""
    result = evaluate(model, tok, data, max_length=max_length)
    if validation:
        result["val"] = evaluate(model, tok, data, max_length=max_length, split="val")
    return result


class RealTextScenario:
    """The real-text scenario as a :class:`~lalora_curv.testbed.finetune.Scenario`.

    Measured by the token NLLs of :func:`measure` (with the validation split's under
    ``"val"`` when ``validation``); trained on ``steps * batch_size`` GSM8K training pairs drawn
    with the run's seed; the curvature fitted per source task on ``fit_texts`` of its texts, or
    on the base model's own samples (:func:`source_precision`).
    """

    def __init__(
        self, data: RealText, tok, fit_texts: int, batch_size: int, max_length: int,
        validation: bool,
    ) -> None:  # fmt: skip
        self.data, self.tok, self.fit_texts = data, tok, fit_texts
        self.batch_size, self.max_length, self.validation = batch_size, max_length, validation

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """:func:`measure`: source and GSM8K NLLs (nats per token)."""
        return measure(model, self.tok, self.data, self.max_length, self.validation)

    def train_batches(self, steps: int, seed: int) -> list[dict[str, Tensor]]:
        """``steps * batch_size`` GSM8K training pairs drawn with ``seed``, batched."""
        target = self.data.target_train
        pairs = random.Random(seed).sample(target, min(steps * self.batch_size, len(target)))
        return make_batches(pairs, self.tok, batch_size=self.batch_size, max_length=self.max_length)

    def source_precision(self, model: nn.Module, penalty: Penalty, seed: int) -> lc.Precision:
        """:func:`source_precision` on ``penalty.source`` (``"texts"``, ``"self-generated"``)."""
        return source_precision(
            model,
            self.tok,
            self.data,
            structure=penalty.structure,
            estimator=penalty.estimator,
            mc_samples=penalty.mc_samples,
            source=penalty.source,
            fit_texts=self.fit_texts,
            max_length=self.max_length,
            seed=seed,
        )


def finetune(
    model: nn.Module,
    tok,
    data: RealText,
    *,
    precision_structure: str | None = None,
    scope: str = "all",
    strength: float | Strength = 0.0,
    source: str = "texts",
    estimator: str = "mc",
    mc_samples: int = 1,
    fit_texts: int = 128,
    steps: int = 200,
    lr: float = 2e-3,
    rank: int = 8,
    targets: tuple[str, ...] = ALL_LINEAR,
    batch_size: int = 8,
    max_length: int = 256,
    before: dict[str, Any] | None = None,
    eval_every: int | None = None,
    validation: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """LoRA on GSM8K train, optionally with a penalty towards the init.

    :func:`lalora_curv.testbed.finetune.finetune` on :class:`RealTextScenario`, summarised.
    ``precision_structure`` names the penalty: a curvature structure, fitted per source task on
    ``fit_texts`` seeded training texts of that task (the model's own pretraining text), the
    three pooled; with ``source="self-generated"`` it is fitted instead on the base model's own
    unconditional samples (:func:`lalora_curv.self_generated_batches`, up to ``max_length``
    tokens) holding as many supervised tokens as those texts. ``"isotropic"`` (``scope``
    ``"all"`` or ``"lora_B"``) and ``"merged-isotropic"`` are the data-free L2 controls
    (:func:`lalora_curv.isotropic_precision`). ``strength``: a number (``lambda``) or a
    :class:`~lalora_curv.strength.Strength` (``Strength.relative(c)``: the same mean eigenvalue
    ``c`` of ``lambda P`` for every structure).
    ``before`` skips measuring the untouched model again; ``validation`` measures the
    validation split too (under ``"val"`` of each measurement). Returns the NLLs before and
    after, ``source_increase`` (pooled source NLL after minus before: forgetting),
    ``target_decrease`` (GSM8K NLL before minus after: learning) and, with ``eval_every``, the
    ``trajectory`` of checkpoints every ``eval_every`` steps (the run's own early-stopping
    front; its last entry is ``after``).
    """
    if source not in ("texts", "self-generated"):
        raise ValueError(f"source must be 'texts' or 'self-generated', got {source!r}")
    run = run_finetune(
        model,
        RealTextScenario(data, tok, fit_texts, batch_size, max_length, validation),
        penalty=None
        if precision_structure is None
        else Penalty(
            precision_structure,
            strength,
            scope=scope,
            source=source,
            estimator=estimator,
            mc_samples=mc_samples,
        ),
        lr=lr,
        steps=steps,
        rank=rank,
        targets=targets,
        eval_every=eval_every,
        before=before,
        seed=seed,
        progress=progress,
    )
    before, after = run.before, run.after
    steps_logged = [r for r in run.log if "penalty" in r]
    result = {
        "before": before,
        "after": after,
        "source_increase": after["source_all"] - before["source_all"],
        "target_decrease": before["target"] - after["target"],
        "final_penalty": steps_logged[-1]["penalty"] if steps_logged else None,
        "penalty_at": run.penalty_at if run.precision is not None else {},
        "lam_applied": run.lam,
        "mean_curvature": run.mean_curvature,
        "source_tokens": run.source_tokens,
    }
    if eval_every:
        result["trajectory"] = run.trajectory
    return result


def source_precision(
    model: nn.Module,
    tok,
    data: RealText,
    *,
    structure: str,
    estimator: str = "mc",
    mc_samples: int = 1,
    source: str = "texts",
    fit_texts: int = 128,
    max_length: int = 256,
    seed: int = 0,
) -> lc.Precision:
    """The curvature precision of ``model``'s adapter at its init.

    Fitted on ``fit_texts`` seeded training texts per source task
    (:func:`lalora_curv.fit_pooled_precision`: one precision per task, pooled), or on as many
    supervised tokens of the model's own samples (``source="self-generated"``).
    """
    fit = dict(
        structure=structure,
        estimator=estimator,
        mc_samples=mc_samples if estimator == "mc" else 1,
        progress=False,
        seed=seed,
    )
    fit_rng = random.Random(f"fit-{seed}")  # apart: every method trains on the same pairs
    per_task = {}
    for task in SOURCES:
        texts = fit_rng.sample(data.train[task], min(fit_texts, len(data.train[task])))
        per_task[task] = text_batches(texts, tok, batch_size=16, max_length=max_length)
    if source == "texts":
        return lc.fit_pooled_precision(model, per_task, **fit)
    tokens = sum(int((b["labels"] != -100).sum()) for bs in per_task.values() for b in bs)
    num = 32
    while True:  # the fewest sequences (doubling) that reach the token count
        sampled = lc.self_generated_batches(
            model, tok, num, max_length, seed=seed, batch_size=16, progress=False
        )
        if sampled.provenance["supervised_tokens"] >= tokens:
            break
        num *= 2
    return lc.fit_precision(model, sampled.first_tokens(tokens), **fit)
