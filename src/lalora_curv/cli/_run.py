"""The run directory every command writes: resolved config, JSON-lines metrics, artifacts.

Layout (each command adds its own artifacts and plots)::

    OUT/config.yaml      every argument of the run, loadable again with --config
    OUT/metrics.jsonl    one JSON object per line (appended as the run goes)

Every file is written atomically (:mod:`lalora_curv.atomic`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lalora_curv.atomic import staged_dir, write_text
from lalora_curv.errors import LaloraError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
#: names the command that owns a run directory, so another command does not overwrite it
COMMAND_FILE = ".lalora-curv-command"


class CliError(LaloraError):
    """A command-line input is wrong (a path, a name, a combination); the message says which."""


def data_source(data_dir: str | None) -> str | None:
    """``--data_dir`` as the loaders take it: a checked folder, or ``None`` for the hub.

    A folder laid out like ../shared/data is refused if missing; ``hub`` (the Hugging Face
    hub) and no value are ``None``.
    """
    if data_dir is None or data_dir == "hub":
        return None
    if not Path(data_dir).is_dir():
        raise CliError(f"--data_dir {data_dir}: no such folder")
    return data_dir


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
        write_text(owner, command + "\n")
        clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
        write_text(
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

    The replacement is :func:`lalora_curv.atomic.staged_dir`'s.

    ``initial``: the saved init of a PiSSA/OLoRA/MiLoRA adapter, whose base weights are the
    residual ``W - s B0 A0``. peft then writes the plain LoRA adapter of rank ``2 r`` for the
    *original* base, ``[B, -B0] [A; A0]`` (``s (B A - B0 A0)``, the same function).
    """
    extra = {} if initial is None else {"path_initial_model_for_weight_conversion": str(initial)}
    with staged_dir(path) as staging:
        model.save_pretrained(staging, selected_adapters=[adapter_name], **extra)
    return path
