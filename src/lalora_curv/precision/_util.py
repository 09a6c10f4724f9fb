"""Helpers shared by the structures: tensor lookup with clear errors."""

from __future__ import annotations

from collections.abc import Mapping

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
