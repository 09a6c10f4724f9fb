"""lalora-curv: Laplace curvature penalties for LoRA fine-tuning without forgetting (LALoRA).

Stage 1 fits a precision (curvature) of the LoRA parameters on source data::

    prec = lalora_curv.fit_precision(model, batches, structure="kfac")

stage 2 adds ``lam * prec.penalty(model)`` to the target loss. See Sliwa, Schneider, Hennig,
Hernandez-Lobato, "Mitigating Forgetting in Low Rank Adaptation", ICML 2025.
"""

from __future__ import annotations

from lalora_curv._version import __version__
from lalora_curv.artifact import load_precision, save_precision
from lalora_curv.errors import (
    AdapterMismatchError,
    ArtifactError,
    BatchError,
    CurvatureError,
    IncompatiblePrecisionError,
    LaloraError,
    TrainingError,
)
from lalora_curv.fit import fit_pooled_precision, fit_precision
from lalora_curv.online import online_laplace
from lalora_curv.precision import (
    REGISTRY,
    DiagPrecision,
    EKFACPrecision,
    IsotropicPrecision,
    KFACPrecision,
    KroneckerPrecision,
    MergedDiagPrecision,
    MergedIsotropicPrecision,
    MergedKFACPrecision,
    Precision,
    TriKFACPrecision,
    isotropic_precision,
)
from lalora_curv.precision.factors import STORAGE_PRESETS
from lalora_curv.selfgen import SelfGeneratedBatches, self_generated_batches
from lalora_curv.strength import Strength
from lalora_curv.train import train

STRUCTURES = tuple(name for name, cls in REGISTRY.items() if cls.fitted)
"""The structure names ``fit_precision(structure=...)`` accepts (the isotropic controls need no
data: :func:`isotropic_precision`); every name is in :data:`lalora_curv.precision.REGISTRY`."""

__all__ = [
    "STORAGE_PRESETS",
    "STRUCTURES",
    "AdapterMismatchError",
    "ArtifactError",
    "BatchError",
    "CurvatureError",
    "DiagPrecision",
    "EKFACPrecision",
    "IncompatiblePrecisionError",
    "IsotropicPrecision",
    "KFACPrecision",
    "KroneckerPrecision",
    "LaloraError",
    "MergedDiagPrecision",
    "MergedIsotropicPrecision",
    "MergedKFACPrecision",
    "Precision",
    "SelfGeneratedBatches",
    "Strength",
    "TrainingError",
    "TriKFACPrecision",
    "__version__",
    "fit_pooled_precision",
    "fit_precision",
    "isotropic_precision",
    "load_precision",
    "online_laplace",
    "save_precision",
    "self_generated_batches",
    "train",
]
