"""Figures: matplotlib when it is installed (it is optional: extra ``bench``), written
atomically (a temporary sibling, then a rename) and closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: what a command prints when it skipped its plots
SKIPPED = "plots skipped: matplotlib is not installed (pip install 'lalora-curv[bench]')"


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save the matplotlib ``fig`` to ``path`` (a crash never leaves a half-written PNG) and
    close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp)
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path
