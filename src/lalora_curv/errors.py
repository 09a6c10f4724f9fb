"""Exceptions raised by lalora-curv.

Every error names the problem (the file, module, tensor or batch at fault) so that a
wrong input never turns into a silently wrong precision or penalty.
"""

from __future__ import annotations


class LaloraError(Exception):
    """Base class of every lalora-curv error."""


class ArtifactError(LaloraError):
    """A saved precision is missing, truncated, corrupt, foreign or of an unknown version."""


class AdapterMismatchError(LaloraError):
    """A precision does not match the LoRA adapter of the model it is applied to."""


class BatchError(LaloraError, ValueError):
    """A batch is malformed (missing keys, wrong shapes or dtypes)."""


class CurvatureError(LaloraError):
    """A curvature statistic is not finite (NaN or inf)."""


class IncompatiblePrecisionError(LaloraError):
    """Two precisions cannot be added (different structure, modules, adapter mode or estimator)."""


class TrainingError(LaloraError):
    """Training cannot go on (a non-finite loss or penalty, bad arguments)."""
