r"""Stage 2 of LALoRA: fine-tune the adapter on target data with the Laplace penalty.

``train`` is one readable loop (AdamW, warm-up + schedule, gradient accumulation, clipping,
autocast, evaluation callback, JSON-lines log, atomic checkpoints, exact resume). Per optimizer
step it minimises

.. math:: \frac1K \sum_{k=1}^{K} \overline{\text{NLL}}_k + \lambda\,(\theta-\mu)^\top P(\theta-\mu)

over ``K`` accumulated micro-batches (each NLL the model's mean over its supervised tokens).
The penalty does not depend on the batch, so it is computed and back-propagated once per
optimizer step, not once per micro-batch.

``lambda`` is a :class:`~lalora_curv.strength.Strength`: fixed, relative to the precision's
mean eigenvalue, or adapted each step to a source-NLL budget (a plain number is a fixed
``lambda``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lalora_curv.adapter import (
    unwrap_model,
)
from lalora_curv.atomic import write_text
from lalora_curv.backends.common import accepts_position_ids
from lalora_curv.batches import prepare_batch
from lalora_curv.checkpoint import CheckpointError, load_adapter, load_latest, save_checkpoint
from lalora_curv.checkpoint import set_rng_state as _set_rng_state
from lalora_curv.distributed import barrier, is_main_process, reduce_scalar
from lalora_curv.errors import TrainingError
from lalora_curv.precision import Precision
from lalora_curv.strength import Strength
from lalora_curv.train_checks import check_covered, check_token_ids, check_train_arguments

logger = logging.getLogger("lalora_curv")

#: what a resumed run must share with its checkpoint (else the position means nothing), and
#: what it may change (with a warning; the optimizer's saved learning rate prevails)
RESUME_MUST_MATCH = ("precision_digest", "data_digest", "grad_accum_steps", "seed", "adapter_name")
RESUME_MAY_CHANGE = (
    "strength",
    "lr",
    "schedule",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "total_steps",
)


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


def data_digest(batches: Sequence[Mapping[str, Tensor]]) -> str:
    """SHA-256 of the batches in order (every tensor's key, dtype, shape and bytes).

    A resumed run must see the same data in the same order for its position to mean anything.
    """
    h = hashlib.sha256()
    for raw in batches:
        for key in sorted(raw):
            t = torch.as_tensor(raw[key]).detach().to("cpu").contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _sharded(model: nn.Module) -> bool:
    """Whether the model's trainable parameters are FSDP2 shards (DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)


def _resume(
    checkpoints: Path,
    run: dict[str, Any],
    force: bool,
    model: nn.Module,
    adapter_name: str,
    optimizer,
    scheduler,
    scaler,
) -> tuple[int, dict[str, Any]]:
    """Restore the latest usable checkpoint; ``(step, its run settings)`` (0 when none)."""
    try:
        found = load_latest(checkpoints)
    except CheckpointError as e:
        raise TrainingError(f"cannot resume: {e}") from None
    if found is None:
        return 0, {}
    path, info, state = found
    saved = info["run"]
    differ = [k for k in RESUME_MUST_MATCH if saved.get(k) != run.get(k)]
    if differ:
        details = ", ".join(f"{k}={saved.get(k)!r} there, {run.get(k)!r} now" for k in differ)
        if not force:
            raise TrainingError(
                f"{path} was written with another {', '.join(differ)} ({details}): the run "
                "it continues would not be this one; start a new checkpoint_dir, or pass "
                "resume='force' to continue anyway"
            )
        logger.warning("resuming %s despite another %s (resume='force')", path, details)
    for key in RESUME_MAY_CHANGE:
        if saved.get(key) != run.get(key):
            logger.warning(
                "resuming %s with %s=%s (checkpoint: %s); the optimizer's saved learning rate "
                "prevails",
                path,
                key,
                run.get(key),
                saved.get(key),
            )
    try:
        load_adapter(model, path, adapter_name)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
    except (CheckpointError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise TrainingError(f"cannot resume from {path}: its state does not fit ({e})") from None
    logger.info("resumed from %s (step %d)", path, info["step"])
    return int(info["step"]), saved


def _truncate_log(log_file: Path, step: int) -> None:
    """Drop the records a killed run logged after the checkpoint it resumes from.

    They are logged again, so every step appears once.
    """
    if not log_file.is_file():
        return
    kept = [
        line
        for line in log_file.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    write_text(log_file, "".join(line + "\n" for line in kept))


def train(
    model: nn.Module,
    train_batches: Sequence[Mapping[str, Tensor]],
    precision: Precision | None = None,
    lam: float | Strength = 0.0,
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
    resume: bool | str = False,
    seed: int = 0,
    adapter_name: str = "default",
    progress: bool = True,
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
        lam: the penalty's strength: a number (``lambda >= 0``) or a
            :class:`~lalora_curv.strength.Strength` (``Strength.relative(c)``: ``c`` over the
            precision's mean eigenvalue; ``Strength.budget(epsilon, start_lam=...)``:
            ``lambda`` adapted each step so that the projected rise of the mean source NLL,
            ``penalty / 2``, stays near ``epsilon`` nats per token).
        lr: AdamW learning rate (the paper: 5e-4).
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear warm-up of the learning rate.
        schedule: the learning-rate schedule after warm-up: ``"linear"``, ``"cosine"`` or
            ``"constant"``.
        max_steps: optimizer steps (default: ``epochs`` passes over the data).
        epochs: passes over ``train_batches`` when ``max_steps`` is not given.
        grad_accum_steps: micro-batches ``K`` per optimizer step; each NLL enters as
            ``NLL / K`` (a skipped micro-batch as 0).
        max_grad_norm: gradient clipping at this norm (> 0; ``None``: off).
        mixed_precision: ``"bf16"``/``"fp16"`` autocast where the device supports it
            (fp16 with loss scaling).
        eval_fn: ``eval_fn(model, step) -> metrics``, called every ``eval_every`` steps and at
            the end (in eval mode, without gradients; training mode is restored).
        eval_every: steps between calls of ``eval_fn`` (``None``: only at the end).
        log_file: JSON-lines log (appended): one record per optimizer step and evaluation; a
            resumed run first drops the records after its checkpoint's step.
        checkpoint_dir: directory of the atomic checkpoints (``None``: no checkpoints).
        checkpoint_every: checkpoint every this many steps (and always at the end).
        resume: ``True``: continue from the latest complete checkpoint in ``checkpoint_dir``
            (a corrupt newer one is reported and skipped). The checkpoint must have been
            written with the same precision (its :meth:`~lalora_curv.Precision.digest`), the
            same batches in the same order, ``grad_accum_steps``, ``seed`` and
            ``adapter_name``, else the run is refused; ``"force"`` continues anyway. Another
            ``lam``, ``lr``, schedule or step count is taken with a warning (the optimizer's
            saved learning rate prevails).
        seed: seeds torch, numpy and python's RNG (dropout).
        adapter_name: the peft adapter to train and penalise.
        progress: tqdm bar with target NLL and penalty.

    Returns:
        The log records (dicts with ``step``, ``nll`` (None if every micro-batch of the step
        was skipped), ``penalty``, ``lam`` (of that step), ``loss``, ``lr``, ``grad_norm``,
        ``skipped_batches``; evaluations as ``eval/<metric>``).

    Raises:
        TrainingError: bad arguments, a non-finite NLL, penalty or gradient (before the
            update, on every rank), a checkpoint that does not match.
        BatchError: a malformed batch (a token id outside the vocabulary, float ids).
    """
    a = check_train_arguments(train_batches, precision, lam, dict(locals()))
    strength, grad_accum_steps, seed = a["strength"], a["grad_accum_steps"], a["seed"]
    check_covered(model, precision, adapter_name, TrainingError)
    check_token_ids(train_batches, model)
    if checkpoint_dir is not None and _sharded(model):
        raise TrainingError(
            "checkpoints of an FSDP-sharded run are not supported (each rank holds a shard of "
            "the adapter and of the optimizer state): train without checkpoint_dir, or under "
            "DDP, where the adapter is whole on every rank"
        )
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seed the global RNG user code may draw from)
    opt = _Optimisation.build(model, len(train_batches), a, mixed_precision)
    run = {
        "strength": strength.to_json(),
        "lr": a["lr"],
        "grad_accum_steps": grad_accum_steps,
        "seed": seed,
        "schedule": schedule,
        "warmup_steps": warmup_steps,
        "weight_decay": a["weight_decay"],
        "max_grad_norm": a["max_grad_norm"],
        "total_steps": opt.total,
        "adapter_name": adapter_name,
        "precision_digest": precision.digest() if precision is not None else None,
        "data_digest": data_digest(train_batches),
    }
    lam_now = strength.initial_lam(precision)  # changes only under a source-NLL budget
    start = 0
    if resume:
        start, saved = _resume(
            checkpoints,  # type: ignore[arg-type]
            run,
            resume == "force",
            model,
            adapter_name,
            opt.optimizer,
            opt.scheduler,
            opt.scaler,
        )
        if start and strength.kind == "budget":  # the adapted lambda goes on; another
            lam_now = float(saved.get("lam_now", lam_now))  # strength is the caller's
    if start >= opt.total:
        logger.warning(
            "nothing to train: the checkpoint is at step %d, the run has %d", start, opt.total
        )
        return []
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
    main = is_main_process()  # under torch.distributed only rank 0 writes logs and checkpoints
    if log_file is not None and main and start > 0:
        _truncate_log(Path(log_file), start)
    with _Log(log_file if main else None) as log:
        loop = _Loop(
            model, train_batches, precision, strength, adapter_name, opt, a["max_grad_norm"],
            grad_accum_steps, log, eval_fn, eval_every, checkpoints, checkpoint_every, run, main,
        )  # fmt: skip
        loop.run(start, lam_now, progress and main)
        return log.records


class _Optimisation:
    """The optimisation of one run.

    The trainable parameters, the step count, AdamW, the learning-rate schedule, autocast and
    the gradient scaler.
    """

    def __init__(self, params, device, total, optimizer, scheduler, scaler, autocast) -> None:
        self.params, self.device, self.total = params, device, total
        self.optimizer, self.scheduler = optimizer, scheduler
        self.scaler, self.autocast = scaler, autocast

    @classmethod
    def build(
        cls, model: nn.Module, n_batches: int, a: dict[str, Any], mixed_precision: str | None
    ) -> _Optimisation:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("the model has no trainable parameter")
        device = params[0].device
        steps_per_epoch = math.ceil(n_batches / a["grad_accum_steps"])
        total = a["max_steps"] if a["max_steps"] is not None else a["epochs"] * steps_per_epoch
        total = int(reduce_scalar(total, "min", device))  # DDP: every rank makes the same steps
        optimizer = torch.optim.AdamW(params, lr=a["lr"], weight_decay=a["weight_decay"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(a["schedule"], a["warmup_steps"], total)
        )
        autocast = nullcontext()
        if mixed_precision is not None:
            dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
            if not torch.amp.autocast_mode.is_autocast_available(device.type):
                raise TrainingError(f"autocast is not available on {device.type}")
            autocast = torch.autocast(device.type, dtype=dtype)
        scaler = torch.amp.GradScaler(device.type, enabled=mixed_precision == "fp16")
        return cls(params, device, total, optimizer, scheduler, scaler, autocast)


class _Log:
    """The run's records, returned and appended to ``log_file`` (JSON lines) as they come."""

    def __init__(self, log_file: str | Path | None) -> None:
        self.records: list[dict[str, Any]] = []
        self._file = open(log_file, "a") if log_file is not None else None

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()


class _Loop:
    """The optimizer steps from a start step to the last.

    With the strength's updates, evaluations every ``eval_every`` steps (and at the end) and
    checkpoints every ``checkpoint_every`` steps (and at the end).
    """

    def __init__(
        self, model, batches, precision, strength, adapter_name, opt, max_grad_norm,
        grad_accum_steps, log, eval_fn, eval_every, checkpoints, checkpoint_every, run, main,
    ) -> None:  # fmt: skip
        self.model, self.batches, self.precision = model, batches, precision
        self.strength, self.adapter_name, self.opt = strength, adapter_name, opt
        self.K, self.log, self.eval_fn, self.eval_every = grad_accum_steps, log, eval_fn, eval_every
        self.checkpoints, self.checkpoint_every = checkpoints, checkpoint_every
        self.run_settings, self.main = run, main
        self.step_fn = _Step(
            model, batches, precision, adapter_name, opt.params, opt.optimizer, opt.scheduler,
            opt.scaler, opt.autocast, grad_accum_steps, max_grad_norm, opt.device,
        )  # fmt: skip

    def evaluate(self, step: int) -> None:
        if self.eval_fn is None:
            return
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            metrics = self.eval_fn(self.model, step)
        self.model.train(was_training)
        self.log.emit({"step": step, **{f"eval/{k}": float(v) for k, v in metrics.items()}})

    def save(self, step: int, lam_now: float) -> None:
        if self.main:
            save_checkpoint(
                self.checkpoints,
                step,
                self.model,
                self.adapter_name,
                self.opt.optimizer,
                self.opt.scheduler,
                self.opt.scaler,
                {**self.run_settings, "lam_now": lam_now},
            )
        barrier()

    def run(self, start: int, lam_now: float, progress: bool) -> None:
        total, every, ckpt = self.opt.total, self.eval_every, self.checkpoint_every
        micro = itertools.islice(itertools.cycle(range(len(self.batches))), start * self.K, None)
        bar = tqdm(total=total, initial=start, disable=not progress, desc="training", unit="step")
        self.model.train()
        try:
            for step in range(start + 1, total + 1):
                record = self.step_fn(step, micro, lam_now)
                self.log.emit(record)
                pen, nll_mean = float(record["penalty"] or 0.0), record["nll"]
                lam_now = self.strength.next_lam(lam_now, pen, self.precision)
                bar.update(1)
                bar.set_postfix(
                    nll=f"{nll_mean:.4f}" if nll_mean is not None else "-", penalty=f"{pen:.3e}"
                )
                if every and step % every == 0:
                    self.evaluate(step)
                if self.checkpoints is not None and ckpt and step % ckpt == 0:
                    self.save(step, lam_now)
            if self.eval_fn is not None and not (every and total % every == 0):
                self.evaluate(total)
            if self.checkpoints is not None and not (ckpt and total % ckpt == 0):
                self.save(total, lam_now)
        finally:
            bar.close()


class _Step:
    """One optimizer step.

    ``K`` micro-batches (NLL / K each), the penalty once (in the last, synchronised backward),
    clipping, the non-finite guard on every rank, the update.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Mapping[str, Tensor]],
        precision: Precision | None,
        adapter_name: str,
        params: list[nn.Parameter],
        optimizer,
        scheduler,
        scaler,
        autocast,
        grad_accum_steps: int,
        max_grad_norm: float | None,
        device: torch.device,
    ) -> None:
        self.model, self.batches, self.precision = model, batches, precision
        self.adapter_name, self.params = adapter_name, params
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.autocast, self.K, self.max_grad_norm = autocast, grad_accum_steps, max_grad_norm
        self.device = device
        self.accepts_position_ids = accepts_position_ids(model)
        self.has_config = hasattr(unwrap_model(model), "config")

    def __call__(self, step: int, micro, lam_now: float) -> dict[str, Any]:
        model, K = self.model, self.K
        nll_sum, used, skipped, problem = 0.0, 0, 0, ""
        penalty = torch.zeros((), device=self.device)
        for k in range(K):
            last = k == K - 1
            index = next(micro)
            raw = self.batches[index]
            prepared = prepare_batch(raw, self.device, index)
            # the model's inputs as the fit builds them (packed rows without the 2-D mask, the
            # positions of padded rows), plus any other key the batch carries
            inputs = {
                k: torch.as_tensor(v).to(self.device)
                for k, v in raw.items()
                if k not in ("input_ids", "attention_mask", "position_ids", "labels")
            }
            inputs.update(prepared.model_inputs(self.accepts_position_ids))
            if self.has_config:  # no KV cache in training (a cache also disables transformers'
                inputs["use_cache"] = False  # masking of packed sequences)
            # DDP: gradients are all-reduced in the last micro-batch's backward only
            sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                if prepared.num_supervised == 0:
                    # no loss term: a zero loss keeps every rank's collectives in step
                    skipped += 1
                    logger.warning(
                        "step %d: batch %d has no supervised token; skipped", step, index
                    )
                    with self.autocast:
                        loss = 0.0 * model(**inputs).logits.float().sum()
                else:
                    labels = torch.as_tensor(raw["labels"]).to(self.device, torch.long)
                    with self.autocast:
                        nll = model(**inputs, labels=labels).loss
                    if not bool(torch.isfinite(nll)) and not problem:
                        problem = f"the target NLL of batch {index} is {nll.item()}"
                    nll_sum += nll.item()
                    used += 1
                    loss = nll / K
                if last and self.precision is not None:
                    # the penalty enters once per optimizer step, in the synced backward
                    with torch.no_grad() if lam_now == 0 else nullcontext():
                        penalty = self.precision.penalty(model, self.adapter_name)
                    if not bool(torch.isfinite(penalty)) and not problem:
                        problem = f"the penalty is {penalty.item()}"
                    if lam_now > 0:
                        loss = loss + lam_now * penalty
                self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, self.max_grad_norm if self.max_grad_norm is not None else math.inf
        )
        if not problem and not bool(torch.isfinite(grad_norm)) and not self.scaler.is_enabled():
            problem = f"the gradient norm is {grad_norm.item()}"
        # every rank learns of a problem on any rank, so none waits in a collective
        if reduce_scalar(1.0 if problem else 0.0, "max", self.device) > 0:
            self.optimizer.zero_grad(set_to_none=True)
            reason = problem or "a non-finite loss, penalty or gradient on another rank"
            raise TrainingError(f"step {step}: {reason}; nothing was updated")
        lr_used = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        nll_mean = nll_sum / used if used else None
        pen = float(penalty.detach())
        return {
            "step": step,
            "nll": nll_mean,
            "penalty": pen,
            "lam": lam_now,
            "loss": None if nll_mean is None else nll_mean + lam_now * pen,
            "lr": lr_used,
            "grad_norm": float(grad_norm),
            "skipped_batches": skipped,
        }


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete, intact checkpoint of the highest step in ``directory`` (None if none)."""
    try:
        found = load_latest(Path(directory))
    except CheckpointError:
        return None
    return found[0] if found else None
