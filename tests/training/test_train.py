"""The thin training loop: its objective, its errors, its log and an exact resume after a kill."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lalora_curv as lc
from helpers import TESTS, adapter_state, make_batches, make_model, train_setup
from lalora_curv.strength import Strength
from lalora_curv.train import TrainingError, latest_checkpoint


def test_objective_matches_a_hand_written_reference():
    """mean of micro-batch NLLs / K + lam * penalty once per step, AdamW, linear schedule,
    clipping: the loop and a literal transcription end bit-identical."""
    lam, lr, steps, accum = 3.0, 1e-2, 3, 2
    model, target, prec = train_setup()
    ref, _, _ = train_setup()
    lc.train(
        model,
        target,
        prec,
        lam,
        lr=lr,
        max_steps=steps,
        grad_accum_steps=accum,
        warmup_steps=1,
        max_grad_norm=0.5,
        progress=False,
        seed=3,
    )

    torch.manual_seed(3)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / 1 if s < 1 else max(0.0, 1 - (s - 1) / (steps - 1))
    )
    ref.train()
    micro = 0
    for _ in range(steps):
        for k in range(accum):
            loss = ref(**target[micro % len(target)]).loss / accum
            if k == accum - 1:  # once per step, in the last micro-batch's backward
                loss = loss + lam * prec.penalty(ref)
            loss.backward()
            micro += 1
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    got, want = adapter_state(model), adapter_state(ref)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert float(prec.penalty(model).detach()) > 0


def test_penalty_restrains_drift():
    free, target, prec = train_setup()
    held, _, _ = train_setup()
    lc.train(free, target, prec, 0.0, lr=1e-2, max_steps=6, progress=False)
    lc.train(held, target, prec, 1e4, lr=1e-2, max_steps=6, progress=False)
    assert float(prec.penalty(held).detach()) < 0.5 * float(prec.penalty(free).detach())


def test_log_has_nll_and_penalty_separately(tmp_path):
    model, target, prec = train_setup()
    evals = []
    records = lc.train(
        model,
        target,
        prec,
        2.0,
        max_steps=4,
        log_file=tmp_path / "log.jsonl",
        eval_fn=lambda m, step: evals.append(step) or {"score": step * 1.0},
        eval_every=2,
        progress=False,
    )
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == records
    steps = [r for r in lines if "nll" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["loss"] == pytest.approx(r["nll"] + 2.0 * r["penalty"]) for r in steps)
    assert steps[0]["penalty"] == 0.0 and steps[-1]["penalty"] > 0  # starts at the mode
    assert evals == [2, 4] and [r["eval/score"] for r in lines if "eval/score" in r] == [2, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lam": -1.0}, "lam must be >= 0"),
        ({"lam": 1.0, "precision": None}, "lam > 0 needs a precision"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"schedule": "step"}, "unknown schedule"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"resume": True}, "need a checkpoint_dir"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        # the values a careless call passes: each named, none a silently odd run
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),  # would never learn
        ({"max_grad_norm": -1.0}, "max_grad_norm must be > 0"),  # would climb the loss
        ({"checkpoint_every": -1, "checkpoint_dir": "x"}, "checkpoint_every must be >= 1"),
        ({"eval_every": -1}, "eval_every must be >= 1"),
        ({"eval_every": 0}, "eval_every must be >= 1"),
        ({"lam": "1e3"}, "lam must be a number"),
        ({"lam": float("inf")}, "lam must be finite"),
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"seed": "abc"}, "seed must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"grad_accum_steps": True}, "grad_accum_steps must be an integer"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"resume": "yes"}, "resume must be False, True or 'force'"),
        ({"progress": "no"}, "progress must be True or False"),
        ({"eval_fn": 3}, "eval_fn must be callable"),
        ({"lam": Strength.budget(1e-3, start_lam=1.0), "precision": None}, "needs a precision"),
        ({"adapter_name": ""}, "adapter_name must be a non-empty string"),
    ],
)
def test_bad_arguments(kwargs, message):
    model, target, prec = train_setup()
    kw = {"precision": prec, "lam": 1.0, "progress": False, **kwargs}
    with pytest.raises(TrainingError, match=message):
        lc.train(model, target, kw.pop("precision"), kw.pop("lam"), **kw)


def test_mismatching_precision_fails_before_training():
    model, target, _ = train_setup()
    other = make_model(dtype=torch.float32, r=5)
    prec = lc.fit_precision(other, make_batches(1), structure="kfac", progress=False)
    before = adapter_state(model)
    with pytest.raises(lc.AdapterMismatchError, match="rank 3"):
        lc.train(model, target, prec, 1.0, max_steps=2, progress=False)
    assert all(torch.equal(before[n], p) for n, p in adapter_state(model).items())


def test_nan_loss_raises_and_never_updates():
    model, target, prec = train_setup()
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.weight[0] = float("nan")
    bad = [{**b, "input_ids": b["input_ids"].clone().fill_(0)} for b in target]
    before = adapter_state(model)
    with pytest.raises(TrainingError, match="step 1: the target NLL of batch 0 is nan"):
        lc.train(model, bad, prec, 1.0, max_steps=2, progress=False)
    assert all(torch.equal(before[n], p) for n, p in adapter_state(model).items())


def test_all_masked_batch_is_skipped(caplog):
    model, target, prec = train_setup()
    masked = {**target[0], "labels": torch.full_like(target[0]["labels"], -100)}
    records = lc.train(
        model, [masked, target[1]], prec, 1.0, max_steps=2, grad_accum_steps=2, progress=False
    )
    assert "has no supervised token; skipped" in caplog.text
    assert [r["skipped_batches"] for r in records] == [1, 1]
    assert all(torch.isfinite(p).all() for p in adapter_state(model).values())


SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from helpers import make_batches, make_model
    import lalora_curv as lc
    model = make_model(dtype=torch.float32, init_B_std=0.0, dropout=0.1)
    source, target = make_batches(2, seed=1), make_batches(4, seed=2)
    prec = lc.fit_precision(model, source, structure="kfac", progress=False)
    kill_at = int(sys.argv[2])

    def maybe_die(m, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like a lost machine
        return {{}}

    lc.train(model, target, prec, 5.0, lr=1e-2, max_steps=7, grad_accum_steps=2,
             checkpoint_dir=sys.argv[1], checkpoint_every=2, resume=True, seed=11,
             eval_fn=maybe_die, eval_every=1, progress=False)
""")


def run_script(tmp_path: Path, ckpt: Path, kill_at: int) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    return subprocess.run(
        [sys.executable, str(script), str(ckpt), str(kill_at)], capture_output=True, text=True
    )


@pytest.mark.slow  # three fresh Python processes, each importing torch and fitting
def test_killed_run_resumes_bit_identical(tmp_path):
    full = run_script(tmp_path, tmp_path / "full", kill_at=-1)
    assert full.returncode == 0, full.stderr
    killed = run_script(tmp_path, tmp_path / "killed", kill_at=5)
    assert killed.returncode == -9  # really killed
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-4"
    assert not [p for p in os.listdir(tmp_path / "killed") if p.startswith(".")]
    resumed = run_script(tmp_path, tmp_path / "killed", kill_at=-1)
    assert resumed.returncode == 0, resumed.stderr
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoint-7" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoint-7" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_autocast_on_the_cpu():
    model, target, prec = train_setup()
    records = lc.train(
        model, target, prec, 2.0, max_steps=2, mixed_precision="bf16", progress=False
    )
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(p.dtype == torch.float32 for p in adapter_state(model).values())


def test_non_finite_penalty_raises():
    model, target, prec = train_setup()
    prec.grad_cov[next(iter(prec.modules))][0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match="step 1: the penalty is nan"):
        lc.train(model, target, prec, 1.0, max_steps=2, progress=False)


def test_logged_learning_rate_is_the_one_used():
    model, target, prec = train_setup()
    records = lc.train(
        model,
        target,
        prec,
        1.0,
        lr=1.0,
        warmup_steps=2,
        max_steps=4,
        schedule="linear",
        progress=False,
    )
    assert [r["lr"] for r in records] == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_non_finite_gradient_raises_before_the_update():
    model, target, prec = train_setup()
    first = next(p for p in model.parameters() if p.requires_grad)
    first.register_hook(lambda g: g * float("inf"))
    before = adapter_state(model)
    with pytest.raises(TrainingError, match=r"gradient norm is (inf|nan)"):
        lc.train(model, target, prec, 1.0, max_steps=2, progress=False)
    assert all(torch.equal(before[n], p) for n, p in adapter_state(model).items())


def test_fp16_with_loss_scaling_on_the_cpu():
    model, target, prec = train_setup()
    records = lc.train(
        model, target, prec, 1.0, max_steps=2, mixed_precision="fp16", progress=False
    )
    assert len(records) == 2 and all(torch.isfinite(p).all() for p in adapter_state(model).values())


def test_input_errors_are_named():
    model, target, prec = train_setup()
    loader = torch.utils.data.DataLoader(target, batch_size=None)
    with pytest.raises(TrainingError, match="materialise a DataLoader"):
        lc.train(model, loader, prec, 1.0, progress=False)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in target]
    with pytest.raises(TrainingError, match="batch 0 has no 'labels'"):
        lc.train(model, no_labels, prec, 1.0, progress=False)


def test_resume_checks_and_finished_runs(tmp_path):
    model, target, prec = train_setup()
    lc.train(model, target, prec, 1.0, max_steps=2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(TrainingError, match="grad_accum_steps=1 there, 2 now"):
        lc.train(
            model,
            target,
            prec,
            1.0,
            max_steps=4,
            grad_accum_steps=2,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    assert (
        lc.train(
            model,
            target,
            prec,
            1.0,
            max_steps=2,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
        == []
    )  # already done: nothing re-run
    (tmp_path / "checkpoint-final").mkdir()  # foreign names are ignored, not fatal
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_a_step_with_only_masked_batches_logs_no_nll():
    model, target, prec = train_setup()
    masked = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in target[:2]]
    records = lc.train(model, masked, prec, 1.0, max_steps=1, grad_accum_steps=2, progress=False)
    assert records[0]["nll"] is None and records[0]["loss"] is None
    json.dumps(records)  # still valid JSON


def test_source_nll_budget_follows_its_update_rule_and_binds():
    """lam_{t+1} = lam_t exp(eta clip(pen_t / (2 eps) - 1, -1, 1)) from the logged penalties,
    and the projected source-NLL increase pen / 2 ends near the budget while unconstrained
    training overshoots it many times; a larger budget lets the adapter move further."""
    eps, eta = 1e-4, 0.2
    free, target, prec = train_setup()
    lc.train(free, target, None, 0.0, lr=1e-2, max_steps=60, progress=False)
    free_q = 0.5 * float(prec.penalty(free).detach())
    assert free_q > 10 * eps
    ends = []
    for budget in (eps, 4 * eps):
        model, _, _ = train_setup()
        records = lc.train(
            model,
            target,
            prec,
            Strength.budget(budget, start_lam=1.0, rate=eta),
            lr=1e-2,
            max_steps=60,
            progress=False,
        )
        for a, b in itertools.pairwise(records):
            excess = min(1.0, max(-1.0, a["penalty"] / (2 * budget) - 1))
            assert b["lam"] == pytest.approx(a["lam"] * math.exp(eta * excess), rel=1e-12)
        ends.append(0.5 * float(prec.penalty(model).detach()))
        assert ends[-1] < 2.5 * budget, (ends[-1], budget)
    assert ends[1] > ends[0]


def test_budget_lambda_survives_a_resume(tmp_path):
    kw = dict(lr=1e-2, schedule="constant", progress=False)
    budget = Strength.budget(1e-3, start_lam=1.0, rate=0.2)
    whole, target, prec = train_setup()
    full = lc.train(whole, target, prec, budget, max_steps=8, **kw)
    part, _, _ = train_setup()
    lc.train(part, target, prec, budget, max_steps=4, checkpoint_dir=tmp_path, **kw)
    rest = lc.train(
        part, target, prec, budget, max_steps=8, checkpoint_dir=tmp_path, resume=True, **kw
    )
    assert [r["lam"] for r in rest] == [r["lam"] for r in full[4:]]
    assert len({r["lam"] for r in full}) == 8  # lambda moved every step
    for n, p in adapter_state(whole).items():
        assert torch.equal(p, adapter_state(part)[n]), n


def test_budget_reads_a_scaled_precision_in_its_own_units_and_refuses_non_token_fishers():
    """(2 P, lam0 / 2) trains exactly like (P, lam0): the projected rise is penalty / (2 scale),
    so lambda halves in lockstep; sequence-level or squared-batch-gradient precisions are
    refused (their penalty is not in nats per token)."""
    kw = dict(lr=1e-2, max_steps=5, progress=False)
    a, target, prec = train_setup()
    b, _, _ = train_setup()
    ra = lc.train(a, target, prec, Strength.budget(1e-4, start_lam=1.0, rate=0.2), **kw)
    rb = lc.train(b, target, prec * 2.0, Strength.budget(1e-4, start_lam=0.5, rate=0.2), **kw)
    for x, y in zip(ra, rb, strict=True):
        assert y["lam"] == pytest.approx(x["lam"] / 2, rel=1e-9)
        assert y["penalty"] == pytest.approx(2 * x["penalty"], rel=1e-5, abs=1e-12)
    seq = lc.fit_precision(
        a, make_batches(1), structure="diag", granularity="sequence", progress=False
    )
    with pytest.raises(TrainingError, match="per-token Fisher"):
        lc.train(a, target, seq, Strength.budget(1e-4, start_lam=1.0), **kw)


def test_resuming_with_a_new_fixed_lambda_uses_it(tmp_path):
    model, target, prec = train_setup()
    lc.train(model, target, prec, 1.0, max_steps=2, checkpoint_dir=tmp_path, progress=False)
    rest = lc.train(
        model,
        target,
        prec,
        1000.0,
        max_steps=4,
        checkpoint_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert [r["lam"] for r in rest] == [1000.0, 1000.0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Strength.budget(0.1), "needs a start lam > 0"),
        (lambda: Strength.budget(-0.1, start_lam=1.0), "source_nll_budget must be > 0"),
        (lambda: Strength.budget(0.1, start_lam=1.0, rate=0.0), "budget_rate must be > 0"),
        (lambda: Strength.relative(-1.0), "c must be >= 0"),
        (lambda: Strength.fixed("1e3"), "lam must be a number"),
        (lambda: Strength("soft", 1.0), "unknown strength kind"),
    ],
)
def test_strength_arguments_are_checked(make, message):
    with pytest.raises(lc.LaloraError, match=message):
        make()


def test_a_relative_strength_is_c_over_the_mean_eigenvalue():
    """Strength.relative(c) trains exactly as lam = c / (tr(P) / num_params)."""
    a, target, prec = train_setup()
    b, _, _ = train_setup()
    c = 0.3
    lam = c / (prec.trace() / prec.num_params)
    ra = lc.train(a, target, prec, Strength.relative(c), lr=1e-2, max_steps=3, progress=False)
    rb = lc.train(b, target, prec, lam, lr=1e-2, max_steps=3, progress=False)
    assert [r["lam"] for r in ra] == pytest.approx([lam] * 3, rel=1e-12)
    for x, y in zip(ra, rb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-9)
