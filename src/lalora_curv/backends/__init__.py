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

from lalora_curv.backends.common import FitRequest
from lalora_curv.errors import LaloraError
from lalora_curv.precision import REGISTRY, Precision
from lalora_curv.statistics import LoraStatistics

ESTIMATORS = ("empirical", "mc", "batch-grad-squared")
GRANULARITIES = ("token", "sequence")
#: every statistic a structure may need (:meth:`~lalora_curv.Precision.required_statistics`)
ALL_STATISTICS = frozenset(
    {
        "input_cov",
        "grad_cov",
        "lora_A_diag",
        "lora_B_diag",
        "weight_diag",
        "lora_A_grad",
        "lora_B_grad",
        "rotated",
    }
)


@dataclass(frozen=True)
class Backend:
    """A statistics backend: the statistics, estimators and granularities it computes.

    Which structures it can fit follows from what each structure declares it needs.
    """

    name: str
    module: str  # defines ``collect_statistics(model, handles, batches, request: FitRequest)``
    statistics: frozenset[str]
    estimators: tuple[str, ...]
    granularities: tuple[str, ...]
    requires: str = ""  # the pip extra that installs its dependency

    def collector(self) -> Callable[..., LoraStatistics]:
        """The backend module's ``collect_statistics``.

        Raises:
            LaloraError: its dependency is not installed (naming the extra that installs it).
        """
        try:
            module = importlib.import_module(self.module)
        except ImportError as e:
            raise LaloraError(
                f"backend {self.name!r} needs {e.name!r}: pip install 'lalora-curv[backends]'"
            ) from e
        return module.collect_statistics

    def fits(self, cls: type[Precision], estimator: str, granularity: str) -> bool:
        """Whether this backend computes everything structure ``cls`` needs."""
        return (
            estimator in self.estimators
            and granularity in self.granularities
            and estimator in cls.estimators
            and granularity in cls.granularities
            and cls.required_statistics(estimator, granularity) <= self.statistics
        )

    def structures(self) -> list[str]:
        """The fitted structures this backend can fit with some estimator and granularity."""
        return [
            name
            for name, cls in REGISTRY.items()
            if cls.fitted
            and any(self.fits(cls, e, g) for e in self.estimators for g in self.granularities)
        ]


KFAC_SUMS = frozenset({"input_cov", "grad_cov"})
BACKENDS: dict[str, Backend] = {
    "hooks": Backend(
        "hooks", "lalora_curv.backends.hooks", ALL_STATISTICS, ESTIMATORS, GRANULARITIES
    ),
    "curvlinops": Backend(
        "curvlinops",
        "lalora_curv.backends.curvlinops",
        KFAC_SUMS,
        ("empirical", "mc"),
        ("token",),
        "curvlinops-for-pytorch",
    ),
    "backpack": Backend(
        "backpack",
        "lalora_curv.backends.backpack",
        frozenset({"lora_A_grad", "lora_B_grad"}),
        ("empirical", "mc"),
        ("sequence",),
        "backpack-for-pytorch",
    ),
    "laplace": Backend(
        "laplace",
        "lalora_curv.backends.laplace",
        KFAC_SUMS,
        ("empirical", "mc"),
        ("token",),
        "laplace-torch",
    ),
}


def resolve_backend(
    backend: str, structure: str, estimator: str, granularity: str | None
) -> tuple[Backend, str]:
    """The backend for this combination and the granularity it uses; a clear error otherwise."""
    fitted = sorted(n for n, c in REGISTRY.items() if c.fitted)
    if structure in REGISTRY and not REGISTRY[structure].fitted:
        raise LaloraError(
            f"structure {structure!r} is an isotropic control that needs no data: build it "
            "with lalora_curv.isotropic_precision(model, structure, scope=...)"
        )
    if structure not in REGISTRY:
        raise LaloraError(f"unknown structure {structure!r}; valid: {fitted}")
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
    spec, cls = BACKENDS[backend], REGISTRY[structure]
    granularity = granularity or spec.granularities[0]
    if granularity not in GRANULARITIES:
        raise LaloraError(f"unknown granularity {granularity!r}; valid: {list(GRANULARITIES)}")
    supported = (
        f"backend {backend!r} supports structures {spec.structures()}, estimators "
        f"{list(spec.estimators)}, granularity {list(spec.granularities)}"
    )
    if structure not in spec.structures():
        raise LaloraError(f"structure {structure!r} is not available here: {supported}")
    if estimator not in cls.estimators:
        raise LaloraError(
            f"estimator {estimator!r} is not defined for structure {structure!r} (valid: "
            f"{list(cls.estimators)})"
            + (
                "; 'batch-grad-squared' (squared mini-batch gradients) only defines a "
                "diagonal: use structure='diag'"
                if estimator == "batch-grad-squared"
                else ""
            )
        )
    if granularity not in cls.granularities:
        raise LaloraError(
            f"granularity {granularity!r} is not defined for structure {structure!r} (valid: "
            f"{list(cls.granularities)}); 'sequence' (per-sequence squared gradients) is only "
            "defined for structure='diag'"
        )
    if not spec.fits(cls, estimator, granularity):
        what = "estimator" if estimator not in spec.estimators else "granularity"
        value = estimator if what == "estimator" else granularity
        raise LaloraError(f"{what} {value!r} is not available here: {supported}")
    return spec, granularity


__all__ = [
    "BACKENDS",
    "ESTIMATORS",
    "GRANULARITIES",
    "Backend",
    "FitRequest",
    "resolve_backend",
]
