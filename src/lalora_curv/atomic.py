"""Atomic writes: a file or a directory appears whole or not at all.

* :func:`write_bytes` / :func:`write_text` / :func:`write_json`: a file written to a temporary
  sibling, flushed to disk (``fsync``) and renamed over the target (``os.replace`` is atomic on
  POSIX).
* :func:`staged_dir`: a directory built in a temporary sibling ``.NAME.<random>.tmp``, then
  swapped in: an existing ``NAME`` is first renamed to ``.NAME.<random>.old``, the new one
  renamed to ``NAME``, and the old copy deleted; if the swap fails the old copy is renamed
  back. A crash leaves ``NAME`` complete (old or new), or, only between the two renames, no
  ``NAME`` and the previous one as ``.NAME.<random>.old`` (:func:`leftovers` finds it, the next
  :func:`staged_dir` of ``NAME`` deletes such leftovers once the new ``NAME`` is in place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, rename).

    The file gets the permissions a plain ``open`` would give (``mkstemp`` alone makes it
    private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    """``obj`` as sorted, indented JSON (no NaN/inf), written atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def leftovers(final: Path) -> dict[str, list[Path]]:
    """Siblings an interrupted :func:`staged_dir` of ``final`` left.

    ``{"tmp": [...], "old": [...]}`` (a half-built new copy; the previous copy, moved aside).
    """
    final = Path(final)
    if not final.parent.is_dir():
        return {"tmp": [], "old": []}
    found: dict[str, list[Path]] = {"tmp": [], "old": []}
    for p in final.parent.glob(f".{final.name}.*"):
        kind = p.name.rsplit(".", 1)[-1]
        if kind in found and p.is_dir():
            found[kind].append(p)
    return {k: sorted(v) for k, v in found.items()}


@contextlib.contextmanager
def staged_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging directory that replaces ``final`` atomically on a normal exit.

    See the module docstring. On an exception it is deleted and ``final`` is untouched. With
    ``replace=False`` (a cache), a ``final`` another process completed meanwhile is kept and
    the staging copy dropped.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # as mkdir would (mkdtemp makes it private)
        yield staging
        if final.exists() and not replace:
            return
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.rmdir(old)
            os.rename(final, old)
            try:
                os.rename(staging, final)
            except BaseException:
                os.rename(old, final)  # put the old copy back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for stale in (p for ps in leftovers(final).values() for p in ps):  # earlier crashes'
        shutil.rmtree(stale, ignore_errors=True)


__all__ = ["leftovers", "staged_dir", "write_bytes", "write_json", "write_text"]
