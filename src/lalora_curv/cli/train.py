r"""``lalora-curv train``: stage 2, fine-tune the adapter on the target with ``lam * penalty``.

Per optimizer step :func:`lalora_curv.train` minimises the target NLL plus
:math:`\lambda (\theta-\mu)^\top P (\theta-\mu)`, with ``P`` and ``mu`` from the precision
artifact (``--precision``; none, or ``lam = 0``: plain LoRA). Start from the adapter init that
``fit`` saved, so that ``theta = mu`` at step 0; an adapter whose init differs from ``mu`` is
re-based onto (K-FAC family, merged-diag) or refused (diag, ekfac).

Run directory::

    OUT/config.yaml      the resolved arguments
    OUT/metrics.jsonl    lc.train's log: one line per optimizer step (nll, penalty, loss, lr)
    OUT/checkpoints/     atomic checkpoints (with --checkpoint_every; --resume continues)
    OUT/adapter/         the trained adapter, peft format (PeftModel.from_pretrained) on the
                         original base model (a PiSSA/OLoRA/MiLoRA init: converted by peft to
                         a plain LoRA of rank 2r, s (B A - B0 A0))
    OUT/adapter_init/    the init of a PiSSA/OLoRA/MiLoRA adapter (on its residual base)
    OUT/training.png     target NLL and penalty per step

Methods: LALoRA with any precision structure (``--precision``, ``--lam``; EWC on the merged
update is a merged-kfac/merged-diag precision), plain LoRA (``--lam 0``), MIGU
(``--migu_threshold``), PiSSA/OLoRA/MiLoRA inits (``--init``), alone or combined with a
penalty (a K-FAC-family precision fitted at the default init is re-based onto them: at their
non-zero ``B0`` its ``A`` and cross blocks carry curvature).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch

import lalora_curv as lc
from lalora_curv import checks
from lalora_curv.baselines import migu
from lalora_curv.cli._model import (
    ADAPTER_DIR,
    Dtype,
    Quantization,
    check_tasks,
    dataset_sources,
    load_base,
    resolve_precision,
    task_batches,
    with_adapter,
)
from lalora_curv.cli._run import CliError, RunDir, save_adapter
from lalora_curv.plotting import SKIPPED, pyplot, save_figure
from lalora_curv.train_checks import check_train_arguments

EXAMPLES = """examples:
  lalora-curv train --model ./llama --adapter runs/fit-kfac --precision runs/fit-kfac \\
      --lam 1000 --data_dir ../shared/data --limit 2000 --max_steps 500 --out runs/train-kfac
  lalora-curv train --model ./llama --adapter runs/fit-kfac --lam 0 --out runs/train-lora
  lalora-curv train --model ./llama --init pissa --precision runs/fit-kfac --lam 1000 \\
      --out runs/train-pissa-kfac
  lalora-curv train --model ./llama --adapter runs/fit-kfac --migu_threshold 0.7 --out runs/migu
  lalora-curv train --config runs/train-kfac/config.yaml --lam 100 --out runs/train-kfac-100
"""


def _matching_precision(prec: lc.Precision, peft_model, path) -> lc.Precision:
    """``prec`` with its mode at the adapter's current weights (re-based if it must be).

    A K-FAC-family or merged-diag precision moves onto another adapter of the same base
    model (another rank, alpha, seed); a diag or ekfac precision must match exactly.
    """
    fitted = prec.metadata.get("base_model", {}).get("name_or_path", "another model")
    mismatch = f"--precision {path} does not fit this model's adapter (fitted on {fitted})"
    try:
        params = prec.adapter_params(peft_model)
        same = all(
            torch.equal(p.detach().to("cpu", prec.dtype), prec.mode[n]) for n, p in params.items()
        )
    except lc.AdapterMismatchError as e:
        if not prec.rebasable:
            raise CliError(f"{mismatch}: {e}") from None
        same = False
    if same:
        return prec
    if not prec.rebasable:
        raise CliError(
            f"--precision {path}: its mode mu is not the adapter's initial weights, and a "
            f"{prec.structure!r} precision cannot be re-based; start from the adapter init "
            "that fit saved (--adapter FIT_RUN)"
        )
    try:
        rebased = prec.rebase(peft_model)
    except lc.LaloraError as e:
        raise CliError(f"{mismatch}: {e}") from None
    print(f"the adapter differs from the precision's mode: re-based {path} onto it")
    return rebased


def _strength(lam: float, c: float | None, budget: float | None, rate: float) -> lc.Strength:
    """The one strength --lam, --c and --source_nll_budget describe."""
    if c is not None and lam != 0.0:
        raise CliError("give --lam or --c, not both")
    if budget is not None:
        return lc.Strength.budget(budget, start_lam=lam or None, start_c=c, rate=rate)
    return lc.Strength.relative(c) if c is not None else lc.Strength.fixed(lam)


def _warn_other_base(prec: lc.Precision, peft_model, model: str) -> None:
    fitted = prec.metadata.get("base_model", {}).get("name_or_path")
    here = getattr(getattr(peft_model, "config", None), "name_or_path", None)
    if fitted and here and fitted != here:
        print(
            f"note: the precision was fitted on base model {fitted!r}, this run loads {model!r}; "
            "the shapes match, make sure it is the same model"
        )


def train(
    model: str,
    out: str = "runs/train",
    adapter: str | None = None,
    r: int = 16,
    lora_alpha: float = 32.0,
    target_modules: str | list[str] = "q_proj,v_proj",
    lora_dropout: float = 0.0,
    init: Literal["default", "pissa", "olora", "milora"] = "default",
    precision: str | None = None,
    lam: float = 0.0,
    c: float | None = None,
    source_nll_budget: float | None = None,
    budget_rate: float = 0.02,
    migu_threshold: float | None = None,
    task: str = "gsm8k",
    data_dir: str | None = None,
    split: Literal["train", "eval"] = "train",
    limit: int | None = None,
    batch_size: int = 4,
    max_length: int = 512,
    lr: float = 5e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: Literal["linear", "cosine", "constant"] = "linear",
    max_steps: int | None = None,
    epochs: int = 1,
    grad_accum_steps: int = 1,
    max_grad_norm: float | None = 1.0,
    mixed_precision: Literal["bf16", "fp16"] | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    seed: int = 0,
    dtype: Dtype = "float32",
    device: str = "auto",
    progress: bool = True,
    dataset: str | None = None,
    dataset_split: str = "train",
    dataset_config: str | None = None,
    packing: bool = False,
    quantization: Quantization | None = None,
) -> list[dict]:
    """Fine-tune a LoRA adapter on the target task with the Laplace penalty lam * r(theta).

    Args:
        model: local path or hub id of a causal LM (the one the precision was fitted on).
        out: run directory.
        adapter: the adapter to start from: a peft adapter directory, or a fit run (its
            adapter_init, the precision's mode); without it a new adapter is made from r,
            lora_alpha, target_modules, lora_dropout and seed.
        r: LoRA rank of a new adapter.
        lora_alpha: LoRA alpha of a new adapter.
        target_modules: layers a new adapter adapts, comma-separated or a YAML list.
        lora_dropout: LoRA dropout of a new adapter.
        init: init of a new adapter: peft's default (B = 0), pissa, olora (peft) or milora.
        precision: a precision artifact, or a fit run (its precision/sum); none: plain LoRA.
        lam: penalty strength lambda >= 0 (with --source_nll_budget: its start).
        c: instead of --lam, a relative strength: lambda = c / the precision's mean
            eigenvalue (dimensionless: one range serves every structure and estimator).
        source_nll_budget: adapt lambda each step so that the projected rise of the mean
            source NLL, penalty / 2, stays near this many nats per token (starting from
            --lam, or from --c).
        budget_rate: the budget's log-step: lambda changes by at most exp(rate) per step.
        migu_threshold: train with MIGU's gradient mask at this quantile (0.7 in its paper);
            null: off.
        task: the target task.
        data_dir: local task files in the original schemas (default: the Hugging Face hub).
        split: records to train on.
        limit: the first N records (null: all), shuffled with the seed.
        batch_size: sequences per micro-batch.
        max_length: tokens per sequence.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        schedule: learning-rate schedule after warm-up.
        max_steps: optimizer steps (default: epochs passes over the data).
        epochs: passes over the data when max_steps is not set.
        grad_accum_steps: micro-batches per optimizer step.
        max_grad_norm: gradient clipping (null: off).
        mixed_precision: autocast dtype (null: off).
        checkpoint_every: an atomic checkpoint every N steps (and at the end) in checkpoints/.
        resume: continue from the latest checkpoint in OUT/checkpoints.
        seed: seed of a new adapter, the data order and dropout.
        dtype: model weights' dtype.
        device: "auto" (CUDA if available), "cpu", "cuda", ...
        progress: progress bar.
        dataset: instead of --task, your own target data: a .jsonl/.json/.parquet/.csv file,
            a folder of them, or a hub id, with "text", "prompt"+"completion" or "messages"
            examples (docs/your-data.md), shuffled with the seed.
        dataset_split: the split of a hub dataset.
        dataset_config: the configuration of a hub dataset.
        packing: pack the examples into rows of --max_length tokens instead of padding them.
        quantization: load the base in 4bit or 8bit (QLoRA, bitsandbytes), as it was fitted.

    Returns:
        lc.train's log records.
    """
    # every refusal before --out (perhaps an earlier run) is touched: an earlier run's
    # config.yaml, metrics.jsonl and adapters stay as they were
    config = dict(locals())
    strength = _check_options(config)
    prec_path = resolve_precision(precision) if precision is not None else None
    try:
        prec = lc.load_precision(prec_path) if prec_path is not None else None
    except lc.ArtifactError as e:
        raise CliError(f"--precision {precision}: {e}") from None
    base, tokenizer = load_base(model, dtype, device, quantization)
    batches = _target_batches(config, tokenizer)
    peft_model = with_adapter(
        base, adapter, r, lora_alpha, target_modules, lora_dropout, seed, init
    )
    if prec is not None:
        _warn_other_base(prec, peft_model, model)
        prec = _matching_precision(prec, peft_model, prec_path)
    train_options = dict(
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        schedule=schedule,
        max_steps=max_steps,
        epochs=epochs,
        grad_accum_steps=grad_accum_steps,
        max_grad_norm=max_grad_norm,
        mixed_precision=mixed_precision,
        checkpoint_every=checkpoint_every,
        resume=resume,
        seed=seed,
        progress=progress,
    )
    try:
        check_train_arguments(
            batches,
            prec,
            strength,
            {
                **train_options,
                "eval_fn": None,
                "eval_every": None,
                "checkpoint_dir": "checkpoints",
                "adapter_name": "default",
            },
        )
    except lc.TrainingError as e:
        raise CliError(f"--{e}") from None
    run = RunDir("train", out, config, fresh_metrics=not resume)
    initial = save_adapter(peft_model, run / "adapter_init") if init != "default" else None
    guard = migu(peft_model, migu_threshold) if migu_threshold is not None else nullcontext()
    with guard:
        records = lc.train(
            peft_model,
            batches,
            prec,
            strength,
            log_file=run.metrics_file,
            checkpoint_dir=run / "checkpoints",
            **train_options,
        )
    adapter_dir = save_adapter(peft_model, run / ADAPTER_DIR, initial=initial)
    steps = [r for r in records if r.get("nll") is not None]
    if steps:
        print(
            f"target NLL {steps[0]['nll']:.4f} -> {steps[-1]['nll']:.4f} over {len(steps)} steps; "
            f"penalty {steps[0]['penalty']:.4e} -> {steps[-1]['penalty']:.4e} "
            f"(lam {steps[0]['lam']:g} -> {steps[-1]['lam']:g})"
        )
    plot = _plot(run.metrics_file, run / "training.png")
    if plot is None and pyplot() is None:
        print(SKIPPED)
    print(f"adapter (peft format): {adapter_dir}")
    print(
        f"run directory: {run.path} (config.yaml, metrics.jsonl{', training.png' if plot else ''})"
    )
    return records


def _check_options(o: dict) -> lc.Strength:
    """The options a run can be refused for before any loading, checked; the strength."""
    try:
        checks.number("--migu_threshold", o["migu_threshold"], 0.0, optional=True)
        for name, minimum, optional in (
            ("limit", 1, True),
            ("batch_size", 1, False),
            ("max_length", 2, False),
            ("r", 1, False),
        ):
            checks.integer(f"--{name}", o[name], minimum, optional=optional)
    except lc.LaloraError as e:
        raise CliError(str(e)) from None
    try:
        strength = _strength(o["lam"], o["c"], o["source_nll_budget"], o["budget_rate"])
    except CliError:
        raise
    except lc.LaloraError as e:
        raise CliError(f"--{e}") from None
    if strength.active and o["precision"] is None:
        raise CliError(
            "--lam > 0 (or --c, --source_nll_budget) needs --precision (a precision artifact "
            "or a fit run)"
        )
    if o["migu_threshold"] is not None and not o["migu_threshold"] < 1:
        raise CliError(f"--migu_threshold must be in [0, 1), got {o['migu_threshold']}")
    if o["init"] != "default" and o["adapter"] is not None:
        raise CliError(
            f"--init {o['init']} makes a new adapter; it cannot be combined with --adapter"
        )
    if o["data_dir"] is not None and not Path(o["data_dir"]).is_dir():
        raise CliError(f"--data_dir {o['data_dir']}: no such folder")
    if o["dataset"] is None:
        check_tasks([o["task"]], "--task")
    return strength


def _target_batches(o: dict, tokenizer) -> list[dict]:
    """The target's supervised batches: a paper task (``--task``) or ``--dataset``."""
    if o["dataset"] is None:
        task = o["task"]
        return task_batches(
            [task], tokenizer, o["data_dir"], o["split"], o["limit"], o["batch_size"],
            o["max_length"], o["seed"], "--task",
        )[task]  # fmt: skip
    sources = dataset_sources(
        [o["dataset"]], tokenizer, o["dataset_split"], o["dataset_config"], o["limit"],
        o["batch_size"], o["max_length"], o["packing"], shuffle_seed=o["seed"],
    )  # fmt: skip
    return next(iter(sources.values()))


def _plot(log_file, path):
    """Target NLL and penalty per optimizer step, from the whole log (a resumed run too)."""
    plt = pyplot()
    if plt is None:  # plotting is optional (extra "bench")
        return None
    rows = [json.loads(line) for line in open(log_file, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if r.get("nll") is not None]
    if not rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    a.plot([r["step"] for r in rows], [r["nll"] for r in rows], marker=".")
    a.set_xlabel("optimizer step")
    a.set_ylabel("target NLL")
    b.plot([r["step"] for r in rows], [r["penalty"] for r in rows], marker=".", color="C1")
    b.set_xlabel("optimizer step")
    b.set_ylabel(r"penalty $(\theta-\mu)^\top P(\theta-\mu)$")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
