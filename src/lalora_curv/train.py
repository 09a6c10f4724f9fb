"""Stage 2 of LALoRA: fine-tune the adapter on target data with the Laplace penalty.

``train`` is one readable loop (AdamW, warm-up + schedule, gradient accumulation, clipping,
autocast, evaluation callback, JSON-lines log, atomic checkpoints, exact resume). Per optimizer
step it minimises

.. math:: \\frac1K \\sum_{k=1}^{K} \\overline{\\text{NLL}}_k + \\lambda\\,(\\theta-\\mu)^\\top P(\\theta-\\mu)

over ``K`` accumulated micro-batches (each NLL the model's mean over its supervised tokens).
The penalty does not depend on the batch, so it is computed and back-propagated once per
optimizer step, not once per micro-batch.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lalora_curv.adapter import unwrap_model
from lalora_curv.errors import LaloraError
from lalora_curv.precision import Precision

logger = logging.getLogger("lalora_curv")

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
COMPLETE_FILE = "trainer_state.json"


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


def _supervised_tokens(batch: Mapping[str, Tensor]) -> int:
    labels = torch.as_tensor(batch["labels"])
    mask = batch.get("attention_mask")
    sup = labels[:, 1:] != -100
    if mask is not None:
        m = torch.as_tensor(mask).bool()
        sup &= m[:, 1:] & m[:, :-1]
    return int(sup.sum())


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the global RNG user code may draw from)
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    adapter_name: str,
    optimizer,
    scheduler,
    extra: dict[str, Any],
) -> Path:
    """Write ``directory/checkpoint-<step>`` atomically: adapter (peft format) + trainer state."""
    model = unwrap_model(model)
    final = directory / f"{CHECKPOINT_PREFIX}{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    try:
        model.save_pretrained(staging, selected_adapters=[adapter_name])
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "step": step,
            },
            staging / STATE_FILE,
        )
        (staging / COMPLETE_FILE).write_text(
            json.dumps({"step": step, **extra}, indent=2, sort_keys=True) + "\n"
        )
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory`` (None if there is none)."""
    if not directory.is_dir():
        return None
    done = [p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if (p / COMPLETE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def _load_adapter(model: nn.Module, path: Path, adapter_name: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    sub = path if adapter_name == "default" else path / adapter_name
    weights = load_file(sub / "adapter_model.safetensors")
    result = set_peft_model_state_dict(unwrap_model(model), weights, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise TrainingError(f"checkpoint {path} does not match the adapter: {unexpected[0]!r}")


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
) -> list[dict[str, float]]:
    """Fine-tune the LoRA adapter of ``model`` on ``train_batches`` with ``lam * penalty``.

    Args:
        model: a peft model; only parameters that require a gradient are trained.
        train_batches: a sequence of dicts (``input_ids``, ``attention_mask``, ``labels``),
            visited in order, ``epochs`` times (shuffle it yourself, seeded, for other orders).
        precision: the source precision; ``None`` trains plain LoRA.
        lam: penalty strength ``lambda >= 0``.
        lr, weight_decay: AdamW settings (the paper: lr 5e-4).
        warmup_steps, schedule: linear warm-up, then ``"linear"``, ``"cosine"`` or
            ``"constant"``.
        max_steps: optimizer steps (default: ``epochs`` passes over the data).
        grad_accum_steps: micro-batches per optimizer step.
        max_grad_norm: gradient clipping (``None``: off).
        mixed_precision: ``"bf16"``/``"fp16"`` autocast where the device supports it.
        eval_fn: ``eval_fn(model, step) -> metrics``, called every ``eval_every`` steps and at
            the end (in eval mode; training mode is restored).
        log_file: JSON-lines log: one record per optimizer step and evaluation.
        checkpoint_dir, checkpoint_every: atomic checkpoints every N steps and at the end.
        resume: continue from the latest complete checkpoint in ``checkpoint_dir``.
        seed: seeds torch, numpy and python's RNG (dropout, order-independent state).
        adapter_name: the peft adapter to train and penalise.
        progress: tqdm bar with target NLL and penalty.

    Returns:
        The log records (dicts with ``step``, ``nll``, ``penalty``, ``loss``, ``lr`` ...).
    """
    if not lam >= 0:
        raise TrainingError(f"lam must be >= 0, got {lam}")
    if lam > 0 and precision is None:
        raise TrainingError("lam > 0 needs a precision")
    if grad_accum_steps < 1:
        raise TrainingError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if schedule not in ("linear", "cosine", "constant"):
        raise TrainingError(f"unknown schedule {schedule!r}; valid: linear, cosine, constant")
    if mixed_precision not in (None, "bf16", "fp16"):
        raise TrainingError(
            f"mixed_precision must be None, 'bf16' or 'fp16', got {mixed_precision!r}"
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
    scaler = torch.amp.GradScaler(
        device.type, enabled=mixed_precision == "fp16" and device.type == "cuda"
    )

    start = 0
    if resume:
        ckpt = latest_checkpoint(checkpoints)  # type: ignore[arg-type]
        if ckpt is not None:
            _load_adapter(model, ckpt, adapter_name)
            state = torch.load(ckpt / STATE_FILE, weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start = int(state["step"])
            logger.info("resumed from %s (step %d)", ckpt, start)
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
    main = _is_main_process()  # under torch.distributed only rank 0 writes logs and checkpoints
    log = open(log_file, "a") if log_file is not None and main else None
    records: list[dict[str, float]] = []

    def emit(record: dict[str, float]) -> None:
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

    micro = itertools.islice(
        itertools.cycle(range(len(train_batches))), start * grad_accum_steps, None
    )
    extra = {"lam": lam, "lr": lr, "grad_accum_steps": grad_accum_steps, "seed": seed}
    bar = tqdm(
        total=total, initial=start, disable=not (progress and main), desc="training", unit="step"
    )
    model.train()
    try:
        for step in range(start + 1, total + 1):
            nll_sum, used, skipped = 0.0, 0, 0
            penalty = torch.zeros((), device=device)
            for k in range(grad_accum_steps):
                last = k == grad_accum_steps - 1
                index = next(micro)
                batch = {
                    k_: torch.as_tensor(v).to(device) for k_, v in train_batches[index].items()
                }
                # DDP: gradients are all-reduced in the last micro-batch's backward only
                sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    if _supervised_tokens(batch) == 0:
                        # no loss term: a zero loss keeps every rank's collectives in step
                        skipped += 1
                        logger.warning(
                            "step %d: batch %d has no supervised token; skipped", step, index
                        )
                        inputs = {k_: v for k_, v in batch.items() if k_ != "labels"}
                        with autocast:
                            loss = 0.0 * model(**inputs).logits.float().sum()
                    else:
                        with autocast:
                            nll = model(**batch).loss
                        if not bool(torch.isfinite(nll)):
                            raise TrainingError(
                                f"step {step}: the target NLL of batch {index} "
                                f"is {nll.item()}; nothing was updated"
                            )
                        nll_sum += nll.item()
                        used += 1
                        loss = nll / grad_accum_steps
                    if last and precision is not None:
                        # the penalty enters once per optimizer step, in the synced backward
                        with torch.no_grad() if lam == 0 else nullcontext():
                            penalty = precision.penalty(model, adapter_name)
                        if not bool(torch.isfinite(penalty)):
                            raise TrainingError(f"step {step}: the penalty is {penalty.item()}")
                        if lam > 0:
                            loss = loss + lam * penalty
                    scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                if max_grad_norm is not None
                else torch.zeros(())
            )
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            nll_mean = nll_sum / max(used, 1)
            record = {
                "step": step,
                "nll": nll_mean,
                "penalty": float(penalty.detach()),
                "loss": nll_mean + lam * float(penalty.detach()),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "skipped_batches": skipped,
            }
            emit(record)
            bar.update(1)
            bar.set_postfix(nll=f"{nll_mean:.4f}", penalty=f"{record['penalty']:.3e}")
            if eval_every and step % eval_every == 0:
                evaluate(step)
            if checkpoints is not None and checkpoint_every and step % checkpoint_every == 0:
                if main:
                    save_checkpoint(
                        checkpoints, step, model, adapter_name, optimizer, scheduler, extra
                    )
                _barrier()
        if eval_fn is not None and not (eval_every and total % eval_every == 0):
            evaluate(total)
        if checkpoints is not None and total > start:
            if main:
                save_checkpoint(
                    checkpoints, total, model, adapter_name, optimizer, scheduler, extra
                )
            _barrier()
    finally:
        bar.close()
        if log is not None:
            log.close()
    return records
