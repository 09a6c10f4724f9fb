"""The precision structures and the isotropic controls.

Structures: diag, kfac, tri-kfac, merged-kfac, merged-diag, ekfac, and the isotropic controls
(isotropic, merged-isotropic), which need no data.

The one normalisation every structure shares: a precision is the *mean* over supervised source
tokens of the token-level ("expand") Fisher of the summed NLL. K-FAC input factors are means
over counted (non-padding) positions, gradient factors and diagonals are sums divided by the
number of supervised tokens ``N``; ``metadata['counts']`` keeps ``N`` and the other counts.
"""

from __future__ import annotations

from lalora_curv.precision.base import REGISTRY, Precision
from lalora_curv.precision.diag import DiagPrecision, MergedDiagPrecision
from lalora_curv.precision.ekfac import EKFACPrecision
from lalora_curv.precision.isotropic import (
    IsotropicPrecision,
    MergedIsotropicPrecision,
    isotropic_precision,
)
from lalora_curv.precision.kfac import (
    KFACPrecision,
    KroneckerPrecision,
    MergedKFACPrecision,
    TriKFACPrecision,
)

__all__ = [
    "REGISTRY",
    "DiagPrecision",
    "EKFACPrecision",
    "IsotropicPrecision",
    "KFACPrecision",
    "KroneckerPrecision",
    "MergedDiagPrecision",
    "MergedIsotropicPrecision",
    "MergedKFACPrecision",
    "Precision",
    "TriKFACPrecision",
    "isotropic_precision",
]
