"""Training checkpoints without pickle: ``checkpoint-<step>/``, written atomically.

A checkpoint holds

* the adapter in peft format (``adapter_model.safetensors`` + ``adapter_config.json``; a
  non-default adapter in its sub-folder), written by ``save_pretrained``;
* ``lalora_train_state.safetensors``: every tensor of the optimizer, scheduler, grad-scaler
  and RNG states (:func:`lalora_curv.statefile.flatten`);
* ``lalora_train_state.json``, written last: the states' JSON skeleton, the run's settings
  (``step``, ``lam``, ``lr``, ``grad_accum_steps``, ``seed``, the precision's and the data's
  digests, ...), the SHA-256 of every other file, and its own (of all of it but that field).

Loading reads only safetensors and JSON, so a planted pickle never runs (a checkpoint of an
older lalora-curv, whose state was a pickle, is refused unread), and checks every file against
its digest: a truncated or corrupt checkpoint is reported by name (:class:`CheckpointError`),
and :func:`load_latest` falls back to the previous complete one, saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from lalora_curv.adapter import unwrap_model
from lalora_curv.atomic import staged_dir, write_bytes
from lalora_curv.errors import LaloraError
from lalora_curv.statefile import StateError, flatten, unflatten

logger = logging.getLogger("lalora_curv")

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "lalora_train_state.safetensors"  # (not Trainer's file names: no mix-up)
COMPLETE_FILE = "lalora_train_state.json"  # written last: its presence marks a whole checkpoint
LEGACY_STATE_FILE = "lalora_train_state.pt"  # a pickle (lalora-curv 0.1): never loaded
KIND = "lalora-curv/train-state"
VERSION = 1


class CheckpointError(LaloraError):
    """A checkpoint is missing, truncated, corrupt, foreign or of an older pickle format."""


def rng_state() -> dict[str, Any]:
    """The RNG states of torch, Python, NumPy and (where available) CUDA."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the global RNG user code may draw from)
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _info_digest(info: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``info`` without its ``sha256`` field.

    An edit of the settings or of the states' skeleton (RNG words, step counts) is detected too.
    """
    body = {k: v for k, v in info.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def step_of(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` directory name (None for other names)."""
    tail = path.name[len(CHECKPOINT_PREFIX) :]
    return int(tail) if path.name.startswith(CHECKPOINT_PREFIX) and tail.isdigit() else None


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    adapter_name: str,
    optimizer,
    scheduler,
    scaler,
    run: dict[str, Any],
) -> Path:
    """Write ``directory/checkpoint-<step>`` atomically.

    It holds the adapter (peft format), the states, and the run's settings ``run`` with the
    digests of every file.
    """
    model = unwrap_model(model)
    final = Path(directory) / f"{CHECKPOINT_PREFIX}{step}"
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
    }
    tensors, skeleton = flatten(state)
    with staged_dir(final) as staging:
        model.save_pretrained(staging, selected_adapters=[adapter_name])
        write_bytes(staging / STATE_FILE, st_save(tensors, metadata={"format": f"{KIND}/1"}))
        files = {
            str(p.relative_to(staging)): _sha256(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        info = {"kind": KIND, "version": VERSION, "step": step, "run": run, "files": files}
        info["state"] = skeleton
        info["sha256"] = _info_digest(info)
        text = json.dumps(info, indent=1, sort_keys=True, allow_nan=False) + "\n"
        write_bytes(staging / COMPLETE_FILE, text.encode())
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(info, state)`` of a checkpoint, every file checked against its digest.

    Raises:
        CheckpointError: naming the checkpoint and what is wrong with it.
    """
    path = Path(path)
    where = f"checkpoint {path}"
    if (path / LEGACY_STATE_FILE).exists() and not (path / STATE_FILE).exists():
        raise CheckpointError(
            f"{where} was written by an older lalora-curv as a pickle "
            f"({LEGACY_STATE_FILE}), which can run code when loaded: it is not read; "
            "restart the run, or resume it with that older version"
        )
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        raise CheckpointError(f"{where} is incomplete: {COMPLETE_FILE} is missing")
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: {COMPLETE_FILE} is corrupt ({e})") from None
    if not isinstance(info, dict) or info.get("kind") != KIND:
        raise CheckpointError(f"{where}: {COMPLETE_FILE} is not a lalora-curv training state")
    if info.get("version") != VERSION or not isinstance(info.get("files"), dict):
        raise CheckpointError(f"{where}: unknown training-state version {info.get('version')!r}")
    try:
        intact = info.get("sha256") == _info_digest(info)
    except ValueError:  # a non-finite number
        intact = False
    if not intact:
        raise CheckpointError(f"{where}: {COMPLETE_FILE} is corrupt (its SHA-256 differs)")
    if not isinstance(info.get("step"), int) or step_of(path) != info["step"]:
        raise CheckpointError(f"{where}: its state is of step {info.get('step')!r}")
    if not isinstance(info.get("run"), dict):
        raise CheckpointError(f"{where}: {COMPLETE_FILE} lacks the run's settings")
    for name, digest in info["files"].items():
        f = path / name
        if not isinstance(name, str) or ".." in Path(name).parts or not f.is_file():
            raise CheckpointError(f"{where}: file {name!r} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{where}: {name} is corrupt or truncated (SHA-256 differs)")
    if STATE_FILE not in info["files"]:
        raise CheckpointError(f"{where}: {STATE_FILE} is not listed")
    try:
        tensors = st_load((path / STATE_FILE).read_bytes())
        state = unflatten(info.get("state"), tensors)
    except (SafetensorError, ValueError, RuntimeError, StateError) as e:
        raise CheckpointError(f"{where}: {STATE_FILE} cannot be read ({e})") from None
    if not isinstance(state, dict) or set(state) != {"optimizer", "scheduler", "scaler", "rng"}:
        raise CheckpointError(f"{where}: the training state lacks its parts")
    return info, state


def candidates(directory: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` directory, the highest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: -int(step_of(p) or 0))


def load_latest(directory: Path) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """The complete checkpoint of the highest step as ``(path, info, state)``.

    A corrupt or incomplete newer one is reported (a warning naming it and why) and skipped.
    ``None`` when the directory holds no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none is complete and intact.
    """
    problems = []
    for path in candidates(directory):
        try:
            info, state = read_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            logger.warning("%s; trying the previous checkpoint", e)
            continue
        if problems:
            logger.warning("resuming from %s instead (%d newer ones unusable)", path, len(problems))
        return path, info, state
    if problems:
        raise CheckpointError(
            "no usable checkpoint in " + str(directory) + ": " + "; ".join(problems)
        )
    return None


def load_adapter(model: nn.Module, path: Path, adapter_name: str) -> None:
    """Load the adapter weights of checkpoint ``path`` into ``model``'s ``adapter_name``.

    Raises:
        CheckpointError: the adapter file is unreadable or does not match the adapter.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    sub = path if adapter_name == "default" else path / adapter_name
    try:
        weights = load_file(sub / "adapter_model.safetensors")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read its adapter ({e})") from None
    result = set_peft_model_state_dict(unwrap_model(model), weights, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the adapter: {unexpected[0]!r}")
