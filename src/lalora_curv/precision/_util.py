"""Helpers shared by the structures: tensor lookup with clear errors, normalised sums."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lalora_curv.errors import ArtifactError


def take(tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...]) -> Tensor:
    """``tensors[key]``, checked to exist and to have ``shape``."""
    if key not in tensors:
        raise ArtifactError(f"tensor {key!r} is missing")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise ArtifactError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def mean_of(t: Tensor | None, shape: tuple[int, ...], count: int, dtype: torch.dtype) -> Tensor:
    """``t / count`` on the CPU in ``dtype``; a statistic no pass produced is zero."""
    return torch.zeros(shape, dtype=dtype) if t is None else (t / count).to("cpu", dtype)
