"""Stage 2 of LALoRA: fine-tune the adapter on target data with the Laplace penalty.

``train`` is one readable loop (AdamW, warm-up + schedule, gradient accumulation, clipping,
autocast, evaluation callback, JSON-lines log, atomic checkpoints, exact resume). Per optimizer
step it minimises

.. math:: \\frac1K \\sum_{k=1}^{K} \\overline{\\text{NLL}}_k + \\lambda\\,(\\theta-\\mu)^\\top P(\\theta-\\mu)

over ``K`` accumulated micro-batches (each NLL the model's mean over its supervised tokens).
The penalty does not depend on the batch, so it is computed and back-propagated once per
optimizer step, not once per micro-batch.

Instead of a fixed ``lambda``, a *source-NLL budget* ``epsilon`` (nats per source token) can
set it: the precision is the mean Fisher per source token, so to second order the fine-tuned
adapter raises the mean source NLL by ``q = (theta-mu)^T P (theta-mu) / 2``. Training then
solves ``min NLL_target  s.t.  q <= epsilon`` by multiplicative dual ascent on ``lambda``:

.. math:: \\lambda_{t+1} = \\lambda_t \\exp\\big(\\eta\\, \\mathrm{clip}(q_t/\\epsilon - 1, -1, 1)\\big).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lalora_curv.batches import supervised_mask
from lalora_curv.checkpoint import (
    COMPLETE_FILE,
    STATE_FILE,
    latest_checkpoint,
    load_adapter,
    save_checkpoint,
    set_rng_state,
)
from lalora_curv.distributed import barrier, is_main_process, reduce_scalar
from lalora_curv.errors import LaloraError
from lalora_curv.precision import Precision

logger = logging.getLogger("lalora_curv")


class TrainingError(LaloraError):
    """Training cannot go on (a non-finite loss or penalty, bad arguments)."""


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # cosine

    return f


def train(
    model: nn.Module,
    train_batches: Sequence[Mapping[str, Tensor]],
    precision: Precision | None = None,
    lam: float = 0.0,
    *,
    lr: float = 5e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "linear",
    max_steps: int | None = None,
    epochs: int = 1,
    grad_accum_steps: int = 1,
    max_grad_norm: float | None = 1.0,
    mixed_precision: str | None = None,
    eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    eval_every: int | None = None,
    log_file: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    seed: int = 0,
    adapter_name: str = "default",
    progress: bool = True,
    source_nll_budget: float | None = None,
    budget_rate: float = 0.02,
) -> list[dict[str, float | None]]:
    """Fine-tune the LoRA adapter of ``model`` on ``train_batches`` with ``lam * penalty``.

    Args:
        model: a peft model (possibly DDP-wrapped); only parameters that require a gradient
            are trained.
        train_batches: a sequence (list) of dicts (``input_ids``, ``attention_mask``,
            ``labels``), taken cyclically in order: step ``k`` uses micro-batches
            ``k*K .. k*K + K - 1`` modulo the length (a last partial step takes from the next
            pass). Shuffle it yourself, seeded, for other orders. Under DDP each rank passes
            its shard; the run stops at the shortest rank's step count.
        precision: the source precision; ``None`` trains plain LoRA.
        lam: penalty strength ``lambda >= 0`` (with ``source_nll_budget``: its start value).
        lr: AdamW learning rate (the paper: 5e-4).
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear warm-up of the learning rate.
        schedule: the learning-rate schedule after warm-up: ``"linear"``, ``"cosine"`` or
            ``"constant"``.
        max_steps: optimizer steps (default: ``epochs`` passes over the data).
        grad_accum_steps: micro-batches ``K`` per optimizer step; each NLL enters as
            ``NLL / K`` (a skipped micro-batch as 0).
        max_grad_norm: gradient clipping (``None``: off).
        mixed_precision: ``"bf16"``/``"fp16"`` autocast where the device supports it
            (fp16 with loss scaling).
        eval_fn: ``eval_fn(model, step) -> metrics``, called every ``eval_every`` steps and at
            the end (in eval mode, without gradients; training mode is restored).
        log_file: JSON-lines log (appended): one record per optimizer step and evaluation.
        checkpoint_dir: directory of the atomic checkpoints (``None``: no checkpoints).
        checkpoint_every: checkpoint every this many steps (and always at the end).
        resume: continue from the latest complete checkpoint in ``checkpoint_dir`` (the same
            ``grad_accum_steps`` is required; the optimizer's saved learning rate prevails).
        seed: seeds torch, numpy and python's RNG (dropout).
        adapter_name: the peft adapter to train and penalise.
        progress: tqdm bar with target NLL and penalty.
        source_nll_budget: ``epsilon``: adapt ``lambda`` each step so that the projected
            increase of the mean source NLL, ``penalty / 2``, stays near ``epsilon`` (see the
            module docstring); ``None`` keeps ``lambda`` fixed.
        budget_rate: ``eta``, the log-step of the ``lambda`` update (at most
            ``exp(eta)`` per step).

    Returns:
        The log records (dicts with ``step``, ``nll`` (None if every micro-batch of the step
        was skipped), ``penalty``, ``lam`` (of that step), ``loss``, ``lr``, ``grad_norm``,
        ``skipped_batches``; evaluations as ``eval/<metric>``).

    Raises:
        TrainingError: bad arguments, a non-finite NLL, penalty or gradient (before the
            update, on every rank), a checkpoint that does not match.
    """
    if not lam >= 0:
        raise TrainingError(f"lam must be >= 0, got {lam}")
    if lam > 0 and precision is None:
        raise TrainingError("lam > 0 needs a precision")
    if source_nll_budget is not None:
        if precision is None or not lam > 0:
            raise TrainingError("source_nll_budget needs a precision and a start lam > 0")
        if not source_nll_budget > 0 or not budget_rate > 0:
            raise TrainingError(
                f"source_nll_budget and budget_rate must be > 0, got {source_nll_budget} "
                f"and {budget_rate}"
            )
        meta = precision.metadata
        if meta.get("granularity") == "sequence" or meta.get("estimator") == "batch-grad-squared":
            raise TrainingError(
                "source_nll_budget reads penalty / 2 as nats per source token, which needs a "
                "per-token Fisher; this precision is "
                f"{meta.get('estimator')!r} at {meta.get('granularity')!r} granularity"
            )
        if meta.get("scale") is None or not float(meta["scale"]) > 0:
            raise TrainingError(
                "source_nll_budget needs the precision's positive scale (a sum of "
                f"differently scaled precisions has none); got {meta.get('scale')!r}"
            )
        budget_scale = float(meta["scale"])  # q = penalty / (2 * scale) for scale * P
    if grad_accum_steps < 1:
        raise TrainingError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if schedule not in ("linear", "cosine", "constant"):
        raise TrainingError(f"unknown schedule {schedule!r}; valid: linear, cosine, constant")
    if mixed_precision not in (None, "bf16", "fp16"):
        raise TrainingError(
            f"mixed_precision must be None, 'bf16' or 'fp16', got {mixed_precision!r}"
        )
    if warmup_steps < 0 or epochs < 1 or (max_steps is not None and max_steps < 1):
        raise TrainingError(
            f"need warmup_steps >= 0, epochs >= 1 and max_steps >= 1 or None; "
            f"got {warmup_steps}, {epochs}, {max_steps}"
        )
    if not isinstance(train_batches, Sequence):
        raise TrainingError(
            f"train_batches must be a sequence (a list) of batches, not "
            f"{type(train_batches).__name__}: materialise a DataLoader with "
            "list(loader)"
        )
    if len(train_batches) == 0:
        raise TrainingError("train_batches is empty")
    if precision is not None:
        precision.adapter_params(model, adapter_name)  # a mismatch raises here, not mid-run
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if (checkpoint_every or resume) and checkpoints is None:
        raise TrainingError("checkpoint_every and resume need a checkpoint_dir")

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seed the global RNG user code may draw from)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameter")
    device = params[0].device
    steps_per_epoch = math.ceil(len(train_batches) / grad_accum_steps)
    total = max_steps if max_steps is not None else epochs * steps_per_epoch
    total = int(reduce_scalar(total, "min", device))  # DDP: every rank makes the same steps
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(schedule, warmup_steps, total)
    )
    autocast = nullcontext()
    if mixed_precision is not None:
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        if not torch.amp.autocast_mode.is_autocast_available(device.type):
            raise TrainingError(f"autocast is not available on {device.type}")
        autocast = torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")
    extra = {"lam": lam, "lr": lr, "grad_accum_steps": grad_accum_steps, "seed": seed}
    lam_now = lam  # changes only under a source-NLL budget

    start = 0
    if resume:
        ckpt = latest_checkpoint(checkpoints)  # type: ignore[arg-type]
        if ckpt is not None:
            saved = json.loads((ckpt / COMPLETE_FILE).read_text())
            if saved.get("grad_accum_steps") != grad_accum_steps:
                raise TrainingError(
                    f"{ckpt} was written with grad_accum_steps={saved.get('grad_accum_steps')}, "
                    f"not {grad_accum_steps}: the data position would not match"
                )
            for key in ("lr", "lam"):
                if saved.get(key) != extra[key]:
                    logger.warning(
                        "resuming %s with %s=%s (checkpoint: %s); the optimizer's "
                        "saved learning rate prevails",
                        ckpt,
                        key,
                        extra[key],
                        saved.get(key),
                    )
            load_adapter(model, ckpt, adapter_name)
            state = torch.load(ckpt / STATE_FILE, weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            if source_nll_budget is not None:  # the adapted lambda goes on; a fixed one is
                lam_now = float(saved.get("lam_now", lam))  # the caller's
            start = int(state["step"])
            logger.info("resumed from %s (step %d)", ckpt, start)
    if start >= total:
        logger.warning(
            "nothing to train: the checkpoint is at step %d, the run has %d", start, total
        )
        return []
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
    main = is_main_process()  # under torch.distributed only rank 0 writes logs and checkpoints
    log = open(log_file, "a") if log_file is not None and main else None
    records: list[dict[str, float | None]] = []

    def emit(record: dict[str, float | None]) -> None:
        records.append(record)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = eval_fn(model, step)
        model.train(was_training)
        emit({"step": step, **{f"eval/{k}": float(v) for k, v in metrics.items()}})

    def save(step: int) -> None:
        if main:
            save_checkpoint(
                checkpoints,
                step,
                model,
                adapter_name,
                optimizer,
                scheduler,  # type: ignore[arg-type]
                scaler,
                {**extra, "lam_now": lam_now},
            )
        barrier()

    micro = itertools.islice(
        itertools.cycle(range(len(train_batches))), start * grad_accum_steps, None
    )
    bar = tqdm(
        total=total, initial=start, disable=not (progress and main), desc="training", unit="step"
    )
    model.train()
    try:
        for step in range(start + 1, total + 1):
            nll_sum, used, skipped, problem = 0.0, 0, 0, ""
            penalty = torch.zeros((), device=device)
            for k in range(grad_accum_steps):
                last = k == grad_accum_steps - 1
                index = next(micro)
                raw = train_batches[index]
                if "labels" not in raw:
                    raise TrainingError(
                        f"batch {index} has no 'labels' (for plain language "
                        "modelling pass labels=input_ids)"
                    )
                batch = {key: torch.as_tensor(v).to(device) for key, v in raw.items()}
                # DDP: gradients are all-reduced in the last micro-batch's backward only
                sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    if not bool(
                        supervised_mask(batch["labels"], batch.get("attention_mask")).any()
                    ):
                        # no loss term: a zero loss keeps every rank's collectives in step
                        skipped += 1
                        logger.warning(
                            "step %d: batch %d has no supervised token; skipped", step, index
                        )
                        inputs = {key: v for key, v in batch.items() if key != "labels"}
                        with autocast:
                            loss = 0.0 * model(**inputs).logits.float().sum()
                    else:
                        with autocast:
                            nll = model(**batch).loss
                        if not bool(torch.isfinite(nll)) and not problem:
                            problem = f"the target NLL of batch {index} is {nll.item()}"
                        nll_sum += nll.item()
                        used += 1
                        loss = nll / grad_accum_steps
                    if last and precision is not None:
                        # the penalty enters once per optimizer step, in the synced backward
                        with torch.no_grad() if lam_now == 0 else nullcontext():
                            penalty = precision.penalty(model, adapter_name)
                        if not bool(torch.isfinite(penalty)) and not problem:
                            problem = f"the penalty is {penalty.item()}"
                        if lam_now > 0:
                            loss = loss + lam_now * penalty
                    scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, max_grad_norm if max_grad_norm is not None else math.inf
            )
            if not problem and not bool(torch.isfinite(grad_norm)) and not scaler.is_enabled():
                problem = f"the gradient norm is {grad_norm.item()}"
            # every rank learns of a problem on any rank, so none waits in a collective
            if reduce_scalar(1.0 if problem else 0.0, "max", device) > 0:
                optimizer.zero_grad(set_to_none=True)
                reason = problem or "a non-finite loss, penalty or gradient on another rank"
                raise TrainingError(f"step {step}: {reason}; nothing was updated")
            lr_used = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            nll_mean = nll_sum / used if used else None
            pen = float(penalty.detach())
            record = {
                "step": step,
                "nll": nll_mean,
                "penalty": pen,
                "lam": lam_now,
                "loss": None if nll_mean is None else nll_mean + lam_now * pen,
                "lr": lr_used,
                "grad_norm": float(grad_norm),
                "skipped_batches": skipped,
            }
            emit(record)
            if source_nll_budget is not None:  # dual ascent on lambda (module docstring)
                projected = 0.5 * pen / budget_scale
                excess = min(1.0, max(-1.0, projected / source_nll_budget - 1.0))
                lam_now *= math.exp(budget_rate * excess)
            bar.update(1)
            bar.set_postfix(
                nll=f"{nll_mean:.4f}" if nll_mean is not None else "-", penalty=f"{pen:.3e}"
            )
            if eval_every and step % eval_every == 0:
                evaluate(step)
            if checkpoints is not None and checkpoint_every and step % checkpoint_every == 0:
                save(step)
        if eval_fn is not None and not (eval_every and total % eval_every == 0):
            evaluate(total)
        if checkpoints is not None and not (checkpoint_every and total % checkpoint_every == 0):
            save(total)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return records
