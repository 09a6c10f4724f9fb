"""What a precision records besides its tensors: one typed, validated schema.

:class:`PrecisionMetadata` is the one place the metadata's fields, types and admissible values
are stated and checked (:meth:`PrecisionMetadata.from_json`): every precision's metadata
passes through it when the precision is built (fitted, summed, scaled, re-based, loaded), so
``prec.metadata`` (the JSON form, a copy) always holds every field, and ``prec.meta`` gives it
typed. The artifact's ``precision.json`` is that JSON form plus the artifact's own fields
(kind, format version, modules, digests, aliases), so a saved, loaded and re-saved artifact is
byte-identical.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lalora_curv.errors import ArtifactError

#: the counts every fit records (sums of several precisions add them)
COUNT_NAMES = ("positions", "supervised_tokens", "sequences", "batches", "skipped_batches")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class PrecisionMetadata:
    """The metadata of a precision (JSON-able).

    Attributes:
        structure: the structure's registry name.
        backend, estimator, granularity, mc_samples, seed: how it was fitted.
        counts: positions, supervised tokens, sequences, batches, skipped batches.
        adapter: the peft config of the adapter fitted (name, r, alpha, targets, ...).
        base_model: name, revision, type and quantization of the base model, where known.
        sources: the source data sets' names; self_generated: their sampling settings.
        created: when (UTC); library_version: by which lalora-curv.
        lora_B_init_zero: whether the statistics were measured at ``B0 = 0`` (portable).
        stats_dtype: the accumulation dtype.
        scale: the product of the factors it was scaled by (None: a pool of mixed scales).
        component_weights: the K-FAC family's component weights.
        storage: how the structure's tensors are stored.
        rebased, recentred: moved onto another adapter / around another mode.
        online: each step of :func:`lalora_curv.online_laplace`.
        unpenalised: trainable tensors the precision does not cover, named when fitted.
    """

    structure: str
    backend: str | None = None
    estimator: str | None = None
    granularity: str | None = None
    mc_samples: int | None = None
    seed: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    base_model: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    self_generated: list[dict[str, Any]] = field(default_factory=list)
    created: str | None = None
    library_version: str | None = None
    lora_B_init_zero: bool | None = None
    stats_dtype: str | None = None
    scale: float | None = 1.0
    component_weights: list[float] | None = None
    storage: dict[str, Any] | None = None
    rebased: bool = False
    recentred: bool = False
    online: list[dict[str, Any]] = field(default_factory=list)
    unpenalised: list[str] = field(default_factory=list)

    @classmethod
    def fields(cls) -> frozenset[str]:
        """The names of the metadata fields."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "metadata") -> PrecisionMetadata:
        """Validate ``data`` (the JSON form) and build the metadata.

        Raises:
            ArtifactError: naming the field and what is wrong with it.
        """
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: metadata must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - cls.fields())
        if unknown:
            raise ArtifactError(f"{where}: unknown metadata fields {unknown}")
        if not isinstance(data.get("structure"), str):
            raise ArtifactError(
                f"{where}: 'structure' must be a name, got {data.get('structure')!r}"
            )
        for name in ("backend", "estimator", "granularity", "created", "library_version",
                     "stats_dtype"):  # fmt: skip
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ArtifactError(f"{where}: {name!r} must be a string, got {data[name]!r}")
        for name in ("mc_samples", "seed"):
            if data.get(name) is not None and not _is_int(data[name]):
                raise ArtifactError(f"{where}: {name!r} must be an integer, got {data[name]!r}")
        counts = data.get("counts", {})
        if not isinstance(counts, dict) or not all(
            isinstance(k, str) and _is_int(v) and v >= 0 for k, v in counts.items()
        ):
            raise ArtifactError(f"{where}: 'counts' must map names to non-negative integers")
        for name in ("adapter", "base_model"):
            if not isinstance(data.get(name, {}), dict):
                raise ArtifactError(f"{where}: {name!r} must be a mapping")
        for name in ("sources", "unpenalised"):
            value = data.get(name, [])
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise ArtifactError(f"{where}: {name!r} must be a list of names")
        for name in ("self_generated", "online"):
            value = data.get(name, [])
            if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
                raise ArtifactError(f"{where}: {name!r} must be a list of mappings")
        for name in ("lora_B_init_zero", "rebased", "recentred"):
            if data.get(name) is not None and not isinstance(data[name], bool):
                raise ArtifactError(f"{where}: {name!r} must be true or false, got {data[name]!r}")
        scale = data.get("scale", 1.0)
        if scale is not None and not (_is_number(scale) and scale > 0):
            raise ArtifactError(f"{where}: 'scale' must be a positive finite number, got {scale!r}")
        weights = data.get("component_weights")
        if weights is not None and (
            not isinstance(weights, list)
            or not weights
            or not all(_is_number(w) and w >= 0 for w in weights)
        ):
            raise ArtifactError(
                f"{where}: 'component_weights' must be a non-empty list of numbers >= 0"
            )
        if data.get("storage") is not None and not isinstance(data["storage"], dict):
            raise ArtifactError(f"{where}: 'storage' must be a mapping")
        values = {k: copy.deepcopy(v) for k, v in data.items()}
        if values.get("scale") is not None:
            values["scale"] = float(values["scale"])
        if values.get("component_weights") is not None:
            values["component_weights"] = [float(w) for w in values["component_weights"]]
        if values.get("rebased") is None:
            values.pop("rebased", None)
        if values.get("recentred") is None:
            values.pop("recentred", None)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The JSON form: every field (a deep copy)."""
        return copy.deepcopy(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> PrecisionMetadata:
        """A validated copy with ``changes``."""
        return PrecisionMetadata.from_json({**self.to_json(), **changes})


__all__ = ["COUNT_NAMES", "PrecisionMetadata"]
