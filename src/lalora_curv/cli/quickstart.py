"""``lalora-curv quickstart``: fit -> save -> load -> penalty on a tiny model, offline."""

from __future__ import annotations

from typing import Any

from lalora_curv.cli._run import RunDir

EXAMPLES = """examples:
  lalora-curv quickstart --out runs/quickstart
  lalora-curv quickstart --steps 50 --seed 1 --no-progress
"""


def quickstart(
    out: str = "runs/quickstart", steps: int = 20, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Fit every structure on a tiny random Llama, save, load, train on a shifted target.

    Args:
        out: run directory (artifacts, summary.json, train_log.jsonl, penalties.png).
        steps: plain-LoRA training steps on the target.
        seed: seed of the model, adapter and data.
        progress: progress bars.

    Returns:
        The summary written to ``OUT/summary.json``.
    """
    RunDir("quickstart", out, locals())
    from lalora_curv.quickstart import run

    return run(out, steps=steps, progress=progress, seed=seed)
