"""Training checkpoints: the adapter in peft format plus optimizer, scheduler, scaler and RNG
state, written atomically (temp directory + rename) as ``checkpoint-<step>/``."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lalora_curv.adapter import unwrap_model
from lalora_curv.errors import LaloraError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "lalora_train_state.pt"  # (not Trainer's file names: no mix-up between the two)
COMPLETE_FILE = "lalora_train_state.json"


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the global RNG user code may draw from)
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    adapter_name: str,
    optimizer,
    scheduler,
    scaler,
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
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
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
    """The complete lalora-curv checkpoint with the highest step (None if there is none)."""
    if not directory.is_dir():
        return None
    done = [
        p
        for p in directory.glob(f"{CHECKPOINT_PREFIX}*")
        if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / COMPLETE_FILE).is_file()
    ]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def load_adapter(model: nn.Module, path: Path, adapter_name: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    sub = path if adapter_name == "default" else path / adapter_name
    weights = load_file(sub / "adapter_model.safetensors")
    result = set_peft_model_state_dict(unwrap_model(model), weights, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise LaloraError(f"checkpoint {path} does not match the adapter: {unexpected[0]!r}")
