"""The run directory every command writes: resolved config, JSON-lines metrics, artifacts.

Layout (each command adds its own artifacts and plots)::

    OUT/config.yaml      every argument of the run, loadable again with --config
    OUT/metrics.jsonl    one JSON object per line (appended as the run goes)

Every file is written atomically (a temporary sibling, then a rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lalora_curv.errors import LaloraError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
#: names the command that owns a run directory, so another command does not overwrite it
COMMAND_FILE = ".lalora-curv-command"


class CliError(LaloraError):
    """A command-line input is wrong (a path, a name, a combination); the message says which."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def split_names(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (blanks dropped)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s and s.strip()]


class RunDir:
    """A command's output directory; creating it writes ``config.yaml`` from ``config``.

    Args:
        command: the command writing it; a directory of another command is refused.
        out: the directory (created).
        config: the command's arguments (``locals()`` at its start); written as YAML so the
            run can be repeated with ``--config OUT/config.yaml``.
        fresh_metrics: start ``metrics.jsonl`` afresh (it is appended to otherwise).
    """

    def __init__(
        self,
        command: str,
        out: str | Path,
        config: Mapping[str, Any],
        fresh_metrics: bool = True,
    ):
        self.path = Path(out)
        if self.path.exists() and not self.path.is_dir():
            raise CliError(f"--out {self.path} exists and is not a directory")
        owner = self.path / COMMAND_FILE
        if owner.is_file() and owner.read_text().strip() != command:
            raise CliError(
                f"--out {self.path} is a {owner.read_text().strip()} run directory; give "
                f"{command} its own --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(owner, command + "\n")
        clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
        atomic_write_text(
            self.path / CONFIG_FILE, yaml.safe_dump(clean, sort_keys=False, allow_unicode=True)
        )
        if fresh_metrics:
            (self.path / METRICS_FILE).unlink(missing_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl``."""
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record), sort_keys=True, allow_nan=False) + "\n")


def save_adapter(
    model, path: Path, adapter_name: str = "default", initial: Path | None = None
) -> Path:
    """``model.save_pretrained`` (peft format) into ``path``, atomically replacing it.

    ``initial``: the saved init of a PiSSA/OLoRA/MiLoRA adapter, whose base weights are the
    residual ``W - s B0 A0``. peft then writes the plain LoRA adapter of rank ``2 r`` for the
    *original* base, ``[B, -B0] [A; A0]`` (``s (B A - B0 A0)``, the same function).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        extra = (
            {} if initial is None else {"path_initial_model_for_weight_conversion": str(initial)}
        )
        model.save_pretrained(staging, selected_adapters=[adapter_name], **extra)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old)
        else:
            os.rename(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path
