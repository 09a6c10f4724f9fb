"""The checks :func:`~lalora_curv.train.train` runs before any step.

Its arguments, its batches' token ids, and that the precision covers what the optimizer
moves. Each check raises an error naming the argument or tensor it refuses, before any work: a token
id outside the vocabulary is otherwise a bare ``IndexError`` deep in the embedding, a tensor
the precision does not cover would drift unpenalised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lalora_curv import checks
from lalora_curv.adapter import check_active, find_lora_modules, unpenalised_trainables
from lalora_curv.errors import BatchError, LaloraError, TrainingError
from lalora_curv.precision import Precision
from lalora_curv.strength import as_strength


def check_token_ids(batches: Sequence[Mapping[str, Tensor]], model: nn.Module) -> None:
    """Every ``input_ids`` in ``[0, vocab)`` and every label there or -100.

    A token id outside the vocabulary is otherwise a bare ``IndexError`` deep in the embedding.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for i, raw in enumerate(batches):
        if not isinstance(raw, Mapping):
            raise BatchError(f"batch {i}: expected a dict of tensors, got {type(raw).__name__}")
        if "labels" not in raw:
            raise TrainingError(
                f"batch {i} has no 'labels' (for plain language modelling pass labels=input_ids)"
            )
        for key in ("input_ids", "labels"):
            if key not in raw:
                raise BatchError(f"batch {i}: missing {key!r}")
            t = torch.as_tensor(raw[key])
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise BatchError(f"batch {i}: {key} must be an integer tensor, got {t.dtype}")
            if not t.numel():
                continue
            low = -100 if key == "labels" else 0
            bad = (t < 0) & (t != low) if key == "labels" else t < 0
            if vocab is not None:
                bad = bad | (t >= vocab)
            if bool(bad.any()):
                value = int(t[bad][0])
                raise BatchError(
                    f"batch {i}: {key} holds token id {value}, outside the model's vocabulary "
                    f"[0, {vocab})" + (" (labels: or -100)" if key == "labels" else "")
                )


def check_train_arguments(
    train_batches: Any,
    precision: Precision | None,
    lam: Any,
    kw: dict[str, Any],
) -> dict[str, Any]:
    """Every argument of :func:`train` (``kw``: the others, by name), validated.

    A :class:`TrainingError` names the first wrong one; the validated values are returned.
    """
    e = {"error": TrainingError}
    out = dict(kw)
    if precision is not None and not isinstance(precision, Precision):
        raise TrainingError(
            f"precision must be a lalora_curv Precision or None, got {type(precision).__name__}"
        )
    try:
        out["strength"] = as_strength(lam)
    except LaloraError as err:
        raise TrainingError(str(err)) from None
    out["strength"].check(precision, TrainingError)
    out["lr"] = checks.number("lr", kw["lr"], 0.0, **e)  # (0: a run that must not move)
    out["weight_decay"] = checks.number("weight_decay", kw["weight_decay"], 0.0, **e)
    out["warmup_steps"] = checks.integer("warmup_steps", kw["warmup_steps"], 0, **e)
    out["max_steps"] = checks.integer("max_steps", kw["max_steps"], 1, optional=True, **e)
    out["epochs"] = checks.integer("epochs", kw["epochs"], 1, **e)
    out["grad_accum_steps"] = checks.integer("grad_accum_steps", kw["grad_accum_steps"], 1, **e)
    out["max_grad_norm"] = checks.number(
        "max_grad_norm", kw["max_grad_norm"], 0.0, strict=True, optional=True, **e
    )
    for name in ("eval_every", "checkpoint_every"):
        out[name] = checks.integer(name, kw[name], 1, optional=True, **e)
    out["seed"] = checks.integer("seed", kw["seed"], **e)
    out["adapter_name"] = checks.string("adapter_name", kw["adapter_name"], **e)
    out["progress"] = checks.boolean("progress", kw["progress"], **e)
    if kw["resume"] not in (False, True, "force"):
        raise TrainingError(f"resume must be False, True or 'force', got {kw['resume']!r}")
    checks.choice("schedule", kw["schedule"], ("linear", "cosine", "constant"), **e)
    if kw["mixed_precision"] not in (None, "bf16", "fp16"):
        raise TrainingError(
            f"mixed_precision must be None, 'bf16' or 'fp16', got {kw['mixed_precision']!r}"
        )
    if kw["eval_fn"] is not None and not callable(kw["eval_fn"]):
        raise TrainingError("eval_fn must be callable: eval_fn(model, step) -> metrics")
    if not isinstance(train_batches, Sequence):
        raise TrainingError(
            f"train_batches must be a sequence (a list) of batches, not "
            f"{type(train_batches).__name__}: materialise a DataLoader with "
            "list(loader)"
        )
    if len(train_batches) == 0:
        raise TrainingError("train_batches is empty")
    if (out["checkpoint_every"] or kw["resume"]) and kw["checkpoint_dir"] is None:
        raise TrainingError("checkpoint_every and resume need a checkpoint_dir")
    return out


def check_covered(
    model: nn.Module,
    precision: Precision | None,
    adapter_name: str,
    error: type[LaloraError] = TrainingError,
) -> None:
    """Check what training with ``precision`` needs of ``model``.

    ``adapter_name`` is the active adapter, the precision matches it, and every tensor the
    optimizer moves is penalised or was named when the precision was fitted
    (``metadata["unpenalised"]``).
    """
    check_active(model, adapter_name, error)
    if precision is None:
        return
    precision.adapter_params(model, adapter_name)  # a mismatch raises here, not mid-run
    handles = find_lora_modules(model, adapter_name)
    allowed = set(precision.metadata.get("unpenalised", []))
    free = [n for n in unpenalised_trainables(model, handles) if n not in allowed]
    if free:
        raise error(
            f"the model trains {len(free)} tensors the precision does not cover "
            f"({', '.join(free[:3])}{', ...' if len(free) > 3 else ''}): they would drift "
            "unpenalised; freeze them, or fit the precision with allow_unpenalised=True "
            "(which records them)"
        )
