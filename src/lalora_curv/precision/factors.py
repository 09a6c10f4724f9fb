r"""Storage of the K-FAC factors: dense (float32, float64, bfloat16) or low rank + diagonal.

The dense storages apply to every structure's tensors (diagonals, EKFAC eigenbases and
eigenvalues: :meth:`~lalora_curv.precision.Precision.with_storage`); low rank is for the
symmetric PSD factors of the K-FAC family only.

A factor is a stack of ``K`` symmetric positive semi-definite ``D x D`` matrices ``F_k`` (one
per pooled component): the input factor ``C_x`` or the output-gradient factor ``G_h`` of a
module. Every K-FAC penalty touches a factor only through products ``F M`` with a thin ``M``
(``D x m``, ``m`` = r or 2r), so each storage needs only :meth:`Factor.mm`.

* **dense** (``"float32"``, ``"float64"``, ``"bfloat16"``): ``F`` itself. bfloat16 keeps 8
  significant bits (each entry rounded to nearest, relative error <= u = 2^-8) and halves the
  float32 bytes of the artifact; products are computed after upcasting to the compute dtype
  (the dtype of the mode; the copy is made on first use and kept), so only the rounding of
  ``F`` is lost.
* **lowrank** (eigen-truncated with a diagonal correction): with ``F = Q diag(lam) Q^T``,
  ``lam_1 >= ... >= lam_D``,

  .. math::

      F \approx U_k \operatorname{diag}(l_k) U_k^\top + \operatorname{diag}(d),\quad
      U_k = Q_{:, 1..k},\; l_k = \lambda_{1..k},\;
      d = \operatorname{diag}(F) - \operatorname{diag}(U_k \operatorname{diag}(l_k) U_k^\top)
        = \sum_{i > k} \lambda_i\, q_i^{\odot 2} \ge 0 .

  The diagonal of ``F`` is kept exactly, the approximation stays positive semi-definite
  (negative rounding eigenvalues are clipped to 0), its error has zero trace (an isotropic
  random displacement sees no error in expectation), and ``k = D`` reproduces ``F`` up to
  rounding (with ``d = 0`` exactly). Products cost :math:`O(D k m)` and never form the ``D x D`` matrix:
  ``F M = U_k (l_k \odot (U_k^\top M)) + d \odot M``. Bytes: ``(D k + k + D)`` numbers
  instead of ``D^2``. The eigendecomposition runs in float64.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lalora_curv.errors import ArtifactError, IncompatiblePrecisionError, LaloraError
from lalora_curv.precision._util import take as _take

#: dense storages by name; "lowrank" is the other one
DENSE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
}
STORAGES = (*DENSE_DTYPES, "lowrank")
#: named storages: ``"compact"`` is the largest rank whose K-FAC artifact for Llama-3.2-3B
#: shapes (all seven linears, r = 16) stays within 300 MB (``benchmarks/bench_lowrank.py``,
#: where its penalty error on a trained model is measured: far above 1 %)
STORAGE_PRESETS: dict[str, tuple[str, int | None]] = {"compact": ("lowrank", 48)}


def resolve_storage(storage: str, rank: int | None) -> tuple[str, int | None]:
    """A preset name as its ``(storage, rank)``; any other pair unchanged."""
    if storage in STORAGE_PRESETS:
        if rank is not None:
            raise LaloraError(f"storage preset {storage!r} sets its own rank; give no rank")
        return STORAGE_PRESETS[storage]
    return storage, rank


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dense_storage(tensors: Iterable[Tensor]) -> dict[str, Any]:
    """``{"format": "dense", "dtype": ...}``: the one dtype every tensor is stored in."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        names = sorted(_dtype_name(d) for d in dtypes) or ["none"]
        raise LaloraError(f"a precision's tensors must share one storage dtype, got {names}")
    return {"format": "dense", "dtype": _dtype_name(dtypes.pop())}


def upcast(t: Tensor, dtype: torch.dtype, cache: dict, key: Any = None) -> Tensor:
    """``t`` in the compute ``dtype``: ``t`` itself if it is already, else a cached copy.

    The copy is made on first use and kept in ``cache`` (so a bfloat16 storage costs its
    float32 twin's products and only the rounding of ``t`` is lost).
    """
    if t.dtype == dtype:
        return t
    if (key, dtype) not in cache:
        cache[key, dtype] = t.to(dtype)
    return cache[key, dtype]


class Factor(ABC):
    """A stack of ``K`` symmetric PSD ``D x D`` matrices in some storage."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """``(K, D)``: components and size."""

    @property
    @abstractmethod
    def storage(self) -> dict[str, Any]:
        """The storage's metadata: ``{"format": "dense"|"lowrank", "dtype": ..., ["rank"]}``."""

    @abstractmethod
    def mm(self, M: Tensor) -> Tensor:
        """``F_k M`` for every component, ``(K, D, m)``, in ``M``'s dtype (``M`` is ``D x m``)."""

    @abstractmethod
    def trace(self) -> Tensor:
        """``tr F_k`` per component, (K,), in float64."""

    @abstractmethod
    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The ``(K, D, D)`` matrices (forms them for low rank), in ``dtype`` if given."""

    @abstractmethod
    def tensors(self, kind: str, name: str) -> dict[str, Tensor]:
        """The tensors of the artifact.

        Keyed ``<kind>.<name>`` (dense) or ``<kind>_eigvecs|_eigvals|_diag.<name>`` (low rank).
        """

    @abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on ``device`` and/or in ``dtype``."""

    @property
    def nbytes(self) -> int:
        """The bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors("f", "x").values())


@dataclass(frozen=True, eq=False)
class DenseFactor(Factor):
    """``F`` itself, ``matrix`` of shape ``(K, D, D)``.

    A matrix stored in another dtype than the products' (bfloat16) is upcast once, on first
    use, and the copy kept: the penalty then costs what a float32 factor costs.
    """

    matrix: Tensor
    _upcast: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, D)``: components and size."""
        return self.matrix.shape[0], self.matrix.shape[-1]

    @property
    def storage(self) -> dict[str, Any]:
        """``{"format": "dense", "dtype": ...}``, the matrix's dtype."""
        return {"format": "dense", "dtype": _dtype_name(self.matrix.dtype)}

    def mm(self, M: Tensor) -> Tensor:
        """``F_k M`` per component, in ``M``'s dtype (the matrix upcast once and kept)."""
        return upcast(self.matrix, M.dtype, self._upcast) @ M

    def trace(self) -> Tensor:
        """``tr F_k`` per component, (K,), in float64."""
        return self.matrix.double().diagonal(dim1=-2, dim2=-1).sum(-1)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The stored ``(K, D, D)`` matrices, in ``dtype`` if given."""
        return self.matrix if dtype is None else self.matrix.to(dtype)

    def tensors(self, kind: str, name: str) -> dict[str, Tensor]:
        """``{"<kind>.<name>": matrix}``."""
        return {f"{kind}.{name}": self.matrix}

    def to(self, device=None, dtype=None) -> DenseFactor:
        """A copy on ``device`` and/or in ``dtype``."""
        return DenseFactor(self.matrix.to(device=device, dtype=dtype))


@dataclass(frozen=True, eq=False)
class LowRankFactor(Factor):
    """A low-rank factor with a diagonal correction, ``U diag(l) U^T + diag(d)``.

    ``eigvecs`` (K, D, k), ``eigvals`` (K, k) descending, ``diag`` (K, D).
    """

    eigvecs: Tensor
    eigvals: Tensor
    diag: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, D)``: components and size."""
        return self.eigvecs.shape[0], self.eigvecs.shape[1]

    @property
    def rank(self) -> int:
        """``k``, the eigenpairs kept per component."""
        return self.eigvecs.shape[-1]

    @property
    def storage(self) -> dict[str, Any]:
        """``{"format": "lowrank", "dtype": ..., "rank": k}``."""
        return {"format": "lowrank", "dtype": _dtype_name(self.eigvecs.dtype), "rank": self.rank}

    def mm(self, M: Tensor) -> Tensor:
        """``U (l * (U^T M)) + d * M`` per component, in ``M``'s dtype, never ``D x D``."""
        U = self.eigvecs.to(M.dtype)
        inner = self.eigvals.to(M.dtype).unsqueeze(-1) * (U.transpose(-1, -2) @ M)
        return U @ inner + self.diag.to(M.dtype).unsqueeze(-1) * M

    def trace(self) -> Tensor:
        """``sum(l) + sum(d)`` (the eigenvectors are orthonormal)."""
        return self.eigvals.double().sum(-1) + self.diag.double().sum(-1)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """``U diag(l) U^T + diag(d)`` formed, ``(K, D, D)``, in ``dtype`` if given."""
        U = self.eigvecs if dtype is None else self.eigvecs.to(dtype)
        lam = self.eigvals.to(U.dtype).unsqueeze(-2)
        return (U * lam) @ U.transpose(-1, -2) + torch.diag_embed(self.diag.to(U.dtype))

    def tensors(self, kind: str, name: str) -> dict[str, Tensor]:
        """``U``, ``l`` and ``d`` as ``<kind>_eigvecs``, ``_eigvals`` and ``_diag.<name>``."""
        return {
            f"{kind}_eigvecs.{name}": self.eigvecs,
            f"{kind}_eigvals.{name}": self.eigvals,
            f"{kind}_diag.{name}": self.diag,
        }

    def to(self, device=None, dtype=None) -> LowRankFactor:
        """A copy on ``device`` and/or in ``dtype``."""
        return LowRankFactor(
            *(t.to(device=device, dtype=dtype) for t in (self.eigvecs, self.eigvals, self.diag))
        )

    def truncated(self, rank: int) -> LowRankFactor:
        """Keep the ``rank`` leading eigenpairs, moving the others' mass into the diagonal.

        Equal to truncating the original ``F`` at ``rank`` directly.
        """
        if rank >= self.rank:
            return self
        U, lam = self.eigvecs[..., rank:], self.eigvals[..., rank:]
        d = self.diag + (U.square() * lam.unsqueeze(-2)).sum(-1)
        return LowRankFactor(
            self.eigvecs[..., :rank].contiguous(), self.eigvals[..., :rank].contiguous(), d
        )


def lowrank(factor: Factor, rank: int, dtype: torch.dtype) -> LowRankFactor:
    """Eigen-truncate ``factor`` to ``rank`` (at most ``D``) with the diagonal correction."""
    if isinstance(factor, LowRankFactor):
        if rank > factor.rank and factor.rank < factor.shape[1]:
            raise LaloraError(
                f"cannot raise the rank of a low-rank factor from {factor.rank} to {rank}: the "
                "discarded eigenpairs are gone; compress the float32 precision instead"
            )
        return factor.truncated(rank).to(dtype=dtype)
    F = factor.dense(torch.float64)
    F = (F + F.transpose(-1, -2)) / 2
    lam, Q = torch.linalg.eigh(F)  # ascending
    k = min(rank, F.shape[-1])
    lam = lam.flip(-1)[..., :k].clamp_min(0)
    U = Q.flip(-1)[..., :k]
    if k == F.shape[-1]:  # nothing discarded: d = 0 exactly
        d = torch.zeros(F.shape[:-1], dtype=F.dtype)
    else:
        d = torch.diagonal(F, dim1=-2, dim2=-1) - (U.square() * lam.unsqueeze(-2)).sum(-1)
        d = d.clamp_min(0)
    return LowRankFactor(U.to(dtype).contiguous(), lam.to(dtype), d.to(dtype))


def convert(factor: Factor, storage: str, rank: int | None, dtype: torch.dtype) -> Factor:
    """``factor`` in ``storage`` (one of :data:`STORAGES`); ``dtype`` is the compute dtype."""
    if storage == "lowrank":
        assert rank is not None
        return lowrank(factor, rank, dtype)
    target = DENSE_DTYPES[storage]
    if isinstance(factor, DenseFactor):
        return factor if factor.matrix.dtype == target else DenseFactor(factor.matrix.to(target))
    return DenseFactor(factor.dense(torch.float64).to(target))


def concat(factors: list[Factor]) -> Factor:
    """Stack the components of several factors (pooling).

    Low ranks are zero-padded to the largest (a zero eigenpair adds nothing).
    """
    if all(isinstance(f, DenseFactor) for f in factors):
        first = factors[0].matrix  # type: ignore[attr-defined]
        return DenseFactor(torch.cat([f.matrix.to(first) for f in factors]))  # type: ignore[attr-defined]
    if all(isinstance(f, LowRankFactor) for f in factors):
        low: list[LowRankFactor] = factors  # type: ignore[assignment]
        k, ref = max(f.rank for f in low), low[0].eigvecs
        vecs = [torch.nn.functional.pad(f.eigvecs.to(ref), (0, k - f.rank)) for f in low]
        vals = [torch.nn.functional.pad(f.eigvals.to(ref), (0, k - f.rank)) for f in low]
        return LowRankFactor(
            torch.cat(vecs), torch.cat(vals), torch.cat([f.diag.to(ref) for f in low])
        )
    kinds = sorted({f.storage["format"] for f in factors})
    raise IncompatiblePrecisionError(
        f"cannot add precisions whose factors are stored as {' and '.join(kinds)}; convert "
        "them to one storage first (prec.with_storage(...))"
    )


def factor_from_tensors(
    tensors: Mapping[str, Tensor], kind: str, name: str, shape: tuple[int, int], fmt: str
) -> Factor:
    """Read the factor ``kind.name`` of ``shape = (K, D)`` stored in format ``fmt``."""
    K, D = shape
    if fmt == "dense":
        key = f"{kind}.{name}"
        t = _take(tensors, key, (K, D, D))
        if t.dtype not in DENSE_DTYPES.values():
            raise ArtifactError(f"tensor {key!r} has dtype {t.dtype}, not a factor storage")
        return DenseFactor(t)
    if fmt != "lowrank":
        raise ArtifactError(f"unknown factor storage format {fmt!r}; valid: dense, lowrank")
    vec_key = f"{kind}_eigvecs.{name}"
    if vec_key not in tensors:
        raise ArtifactError(f"tensor {vec_key!r} is missing")
    k = tensors[vec_key].shape[-1] if tensors[vec_key].dim() == 3 else -1
    if not 1 <= k <= D:
        raise ArtifactError(
            f"tensor {vec_key!r} has shape {tuple(tensors[vec_key].shape)}, expected ({K}, {D}, k) "
            f"with 1 <= k <= {D}"
        )
    U = _take(tensors, vec_key, (K, D, k))
    lam = _take(tensors, f"{kind}_eigvals.{name}", (K, k))
    d = _take(tensors, f"{kind}_diag.{name}", (K, D))
    if len({U.dtype, lam.dtype, d.dtype}) != 1:
        raise ArtifactError(f"the low-rank tensors of {kind}.{name} have different dtypes")
    for key, t in ((f"{kind}_eigvals.{name}", lam), (f"{kind}_diag.{name}", d)):
        if bool((t < 0).any()):
            raise ArtifactError(f"tensor {key!r} has negative entries (not a PSD factor)")
    return LowRankFactor(U, lam, d)
