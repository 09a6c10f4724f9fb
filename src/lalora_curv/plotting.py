"""Figures: matplotlib when it is installed (it is optional: extra ``bench``).

Figures are written atomically (a temporary sibling, then a rename) and closed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from lalora_curv.atomic import write_bytes

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
    """Save the matplotlib ``fig`` to ``path`` atomically and close it; returns the path.

    :func:`lalora_curv.atomic.write_bytes`: a crash never leaves a half-written image.
    """
    plt = pyplot()
    path = Path(path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=path.suffix.lstrip(".") or "png")
    finally:
        if plt is not None:
            plt.close(fig)
    return write_bytes(path, buffer.getvalue())
