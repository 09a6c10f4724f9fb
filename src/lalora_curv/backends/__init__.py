"""Curvature backends: who computes the token sums behind a precision.

Every backend returns :class:`~lalora_curv.statistics.LoraStatistics` in the library's own
definitions (sums over counted positions and supervised tokens), from which
:func:`~lalora_curv.fit.fit_precision` builds one of our :class:`~lalora_curv.Precision`
objects; no upstream object is ever returned or persisted. Optional backends are imported only
when used.

| backend | structures | estimators | granularity |
|---|---|---|---|
| ``hooks`` (ours) | all (ekfac: two passes) | empirical, mc, batch-grad-squared (diag) | token; sequence (diag) |
| ``curvlinops`` | kfac, tri-kfac, merged-kfac | empirical, mc | token |
| ``backpack`` | diag | empirical, mc | sequence |
| ``laplace`` | kfac, tri-kfac, merged-kfac | empirical, mc | token |
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from lalora_curv.backends._common import FitRequest
from lalora_curv.errors import LaloraError
from lalora_curv.statistics import KFAC_STRUCTURES, STRUCTURES, LoraStatistics

ESTIMATORS = ("empirical", "mc", "batch-grad-squared")
GRANULARITIES = ("token", "sequence")


@dataclass(frozen=True)
class Backend:
    """A statistics backend and what it supports."""

    name: str
    module: str  # defines ``collect_statistics(model, handles, batches, request: FitRequest)``
    structures: tuple[str, ...]
    estimators: tuple[str, ...]
    granularities: tuple[str, ...]
    requires: str = ""  # the pip extra that installs its dependency

    def collector(self) -> Callable[..., LoraStatistics]:
        try:
            module = importlib.import_module(self.module)
        except ImportError as e:
            raise LaloraError(
                f"backend {self.name!r} needs {e.name!r}: pip install 'lalora-curv[backends]'"
            ) from e
        return module.collect_statistics


BACKENDS: dict[str, Backend] = {
    "hooks": Backend("hooks", "lalora_curv.backends.hooks", STRUCTURES, ESTIMATORS, GRANULARITIES),
    "curvlinops": Backend(
        "curvlinops",
        "lalora_curv.backends.curvlinops",
        KFAC_STRUCTURES,
        ("empirical", "mc"),
        ("token",),
        "curvlinops-for-pytorch",
    ),
    "backpack": Backend(
        "backpack",
        "lalora_curv.backends.backpack",
        ("diag",),
        ("empirical", "mc"),
        ("sequence",),
        "backpack-for-pytorch",
    ),
    "laplace": Backend(
        "laplace",
        "lalora_curv.backends.laplace",
        KFAC_STRUCTURES,
        ("empirical", "mc"),
        ("token",),
        "laplace-torch",
    ),
}


def resolve_backend(
    backend: str, structure: str, estimator: str, granularity: str | None
) -> tuple[Backend, str]:
    """The backend for this combination and the granularity it uses; a clear error otherwise."""
    if structure in ("isotropic", "merged-isotropic"):
        raise LaloraError(
            f"structure {structure!r} is an isotropic control that needs no data: build it "
            "with lalora_curv.isotropic_precision(model, structure, scope=...)"
        )
    if structure not in STRUCTURES:
        raise LaloraError(f"unknown structure {structure!r}; valid: {sorted(STRUCTURES)}")
    if backend not in BACKENDS:
        raise LaloraError(f"unknown backend {backend!r}; valid: {sorted(BACKENDS)}")
    if estimator not in ESTIMATORS:
        if backend == "backpack" and (
            "ggn" in estimator.lower() or estimator.lower() in ("exact", "type2", "type-2")
        ):
            raise LaloraError(
                f"estimator {estimator!r}: BackPACK's second-order extensions (DiagGGNExact, "
                "DiagGGNMC) cannot run through a peft LoRA layer (a two-branch container "
                "BackPACK does not support; its torch.fx converter fails on peft's control "
                "flow); estimator='mc' gives an unbiased per-sequence estimate of diag(GGN)"
            )
        if estimator.lower() in ("type2", "type-2", "ggn", "exact"):
            raise LaloraError(
                f"estimator {estimator!r} is not offered for language models: the type-2 "
                "Fisher needs one backward pass per vocabulary entry, and curvlinops' TYPE2 "
                "is biased for causal LMs (cross-token terms through attention); use 'mc' "
                f"(unbiased for the GGN) with more mc_samples; valid: {list(ESTIMATORS)}"
            )
        raise LaloraError(f"unknown estimator {estimator!r}; valid: {list(ESTIMATORS)}")
    spec = BACKENDS[backend]
    granularity = granularity or spec.granularities[0]
    if granularity not in GRANULARITIES:
        raise LaloraError(f"unknown granularity {granularity!r}; valid: {list(GRANULARITIES)}")
    supported = (
        f"backend {backend!r} supports structures {list(spec.structures)}, "
        f"estimators {list(spec.estimators)}, granularity {list(spec.granularities)}"
    )
    if structure not in spec.structures:
        raise LaloraError(f"structure {structure!r} is not available here: {supported}")
    if estimator not in spec.estimators:
        raise LaloraError(f"estimator {estimator!r} is not available here: {supported}")
    if granularity not in spec.granularities:
        raise LaloraError(f"granularity {granularity!r} is not available here: {supported}")
    if estimator == "batch-grad-squared" and structure != "diag":
        raise LaloraError(
            "estimator 'batch-grad-squared' (squared mini-batch gradients) only defines a "
            f"diagonal; use structure='diag', not {structure!r}"
        )
    if granularity == "sequence" and structure != "diag":
        raise LaloraError(
            f"granularity 'sequence' (per-sequence squared gradients) is only defined for "
            f"structure='diag', not {structure!r}"
        )
    return spec, granularity


def needed_sums(structure: str, estimator: str, granularity: str) -> frozenset[str]:
    """The token sums (and recorded tensors) a structure needs."""
    if estimator == "batch-grad-squared" or granularity == "sequence":
        return frozenset({"lora_A_grad", "lora_B_grad"})
    if structure == "diag":
        return frozenset({"lora_A_diag", "lora_B_diag"})
    if structure == "merged-diag":
        return frozenset({"weight_diag"})
    return frozenset({"input_cov", "grad_cov"})


__all__ = [
    "BACKENDS",
    "ESTIMATORS",
    "GRANULARITIES",
    "Backend",
    "FitRequest",
    "needed_sums",
    "resolve_backend",
]
