r"""EKFAC: K-FAC's eigenbasis with eigenvalues refitted to the data (George et al., 2018).

For a weight ``W`` (out x in) with K-FAC factors ``G = Q_g diag(.) Q_g^T`` and
``C = Q_a diag(.) Q_a^T``, EKFAC keeps the Kronecker eigenbasis and replaces the products of
factor eigenvalues by the second moments of the per-token gradients in that basis:

.. math::

    \Lambda = \frac1N \sum_t \big((Q_g^\top \tilde g_t)^{\odot 2}\big)
    \big((Q_a^\top a_t)^{\odot 2}\big)^\top,\qquad
    r = \langle \Lambda,\, (Q_g^\top\, dW\, Q_a)^{\odot 2} \rangle

with ``a_t`` the layer input and ``g~_t`` its output gradient (lora_A: ``x_t`` and
``s B0^T g_t``; lora_B: ``u_t`` and ``s g_t``). Dense (row-major):
``(Q_g (x) Q_a) diag(vec Lambda) (Q_g (x) Q_a)^T``. It is exact on the diagonal of the
per-token Fisher in the eigenbasis, which K-FAC is not. Blocks per lora_A and lora_B (no
cross blocks); it needs a second pass over the data and depends on the adapter (no rebase).

Storage (:meth:`~lalora_curv.precision.Precision.with_storage`): the eigenbases and
eigenvalues in float32 (as fitted), float64 or bfloat16 (each entry rounded,
``|x~ - x| <= u |x|``, ``u = 2^-8``; products after upcasting to the mode's dtype). With
``e = 2u + u^2``, ``R = Q_g^T dW Q_a`` and ``S = |Q_g|^T |dW| |Q_a|``, the rotated
displacement moves by ``|R~ - R| <= e S`` entrywise, so the penalty moves by at most

.. math:: \sum \Lambda \big(u (|R| + e S)^{\odot 2} + e S \odot (2 |R| + e S)\big)

(a worst case; the rounding errors mostly cancel). No low-rank storage: the eigenbases are
orthogonal matrices, not PSD factors, and keeping ``k`` of their vectors drops whole
directions of ``Lambda`` with no diagonal correction that keeps the penalty's diagonal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lalora_curv.adapter import LoraModuleSpec
from lalora_curv.errors import IncompatiblePrecisionError, LaloraError
from lalora_curv.precision._util import mean_of, take
from lalora_curv.precision.base import Precision
from lalora_curv.precision.factors import upcast


class EKFACPrecision(Precision):
    """Eigenvalue-corrected K-FAC blocks for lora_A and lora_B of each module.

    Attributes:
        grad_eigvecs: ``{param name: Q_g}`` (out x out).
        input_eigvecs: ``{param name: Q_a}`` (in x in).
        eigenvalues: ``{param name: Lambda}`` (out x in, the parameter's shape).
    """

    structure = "ekfac"
    passes = 2
    poolable = False
    lowrank_refusal = (
        "its eigenbases Q_g, Q_a are orthogonal matrices, not PSD factors: keeping k "
        "eigenvectors would drop whole directions of the refitted eigenvalues, with no "
        "diagonal correction (bfloat16 halves its bytes; the K-FAC structures have lowrank)"
    )

    def __init__(
        self,
        modules: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        grad_eigvecs: Mapping[str, Tensor],
        input_eigvecs: Mapping[str, Tensor],
        eigenvalues: Mapping[str, Tensor],
        metadata: Mapping[str, Any],
    ) -> None:
        super().__init__(modules, mode, metadata)
        self.grad_eigvecs = dict(grad_eigvecs)
        self.input_eigvecs = dict(input_eigvecs)
        self.eigenvalues = dict(eigenvalues)
        self._record_storage()
        self._upcast: dict = {}

    @classmethod
    def required_statistics(cls, estimator: str, granularity: str) -> frozenset[str]:
        """K-FAC's factors (first pass) and the squared gradients in their eigenbasis (second)."""
        return frozenset({"input_cov", "grad_cov", "lora_A_diag", "lora_B_diag", "rotated"})

    @classmethod
    def fit(cls, collect, specs, mode, metadata, estimator, granularity) -> EKFACPrecision:
        """Fit in two passes over the batches.

        K-FAC's factors and their eigenbases ``Q_g, Q_a`` from the first, the per-token squared
        gradients in that basis (``Lambda``) from the second.
        """
        from lalora_curv.precision.kfac import KFACPrecision

        first = collect(KFACPrecision.needs(estimator, granularity))
        kfac = KFACPrecision.from_statistics(first, specs, mode, dict(metadata))
        bases = eigenbases(kfac)
        second = collect(frozenset({"lora_A_diag", "lora_B_diag"}), pass_number=2, rotations=bases)
        if second.counts() != first.counts():
            raise LaloraError("the batches changed between the two passes of the EKFAC fit")
        n, dtype = second.supervised_tokens, next(iter(mode.values())).dtype
        grad, inp, eig = {}, {}, {}
        for name, spec in specs.items():
            sums = second.modules[name]
            b = bases[name]
            grad[spec.lora_A_name], inp[spec.lora_A_name] = b["g_A"], b["x"]
            grad[spec.lora_B_name], inp[spec.lora_B_name] = b["g_B"], b["u"]
            eig[spec.lora_A_name] = mean_of(
                sums.lora_A_diag, (spec.rank, spec.in_features), n, dtype
            )
            eig[spec.lora_B_name] = mean_of(
                sums.lora_B_diag, (spec.out_features, spec.rank), n, dtype
            )
        return cls(specs, mode, grad, inp, eig, metadata)

    def _eigvecs(self, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(Q_g, Q_a)`` of parameter ``name`` in the compute ``dtype`` (upcast once)."""
        return (
            upcast(self.grad_eigvecs[name], dtype, self._upcast, ("grad", name)),
            upcast(self.input_eigvecs[name], dtype, self._upcast, ("input", name)),
        )

    def _param_quad(self, name: str, d: Tensor) -> Tensor:
        Q_g, Q_a = self._eigvecs(name, d.dtype)
        lam = upcast(self.eigenvalues[name], d.dtype, self._upcast, ("eigenvalues", name))
        return (lam * (Q_g.T @ d @ Q_a).square()).sum()

    def _module_quad(self, spec: LoraModuleSpec, dA: Tensor, dB: Tensor) -> Tensor:
        return self._param_quad(spec.lora_A_name, dA) + self._param_quad(spec.lora_B_name, dB)

    def module_trace(self, name: str) -> float:
        """The refitted eigenvalues' sum (the rotations are orthogonal)."""
        spec = self.modules[name]
        return float(self.eigenvalues[spec.lora_A_name].double().sum()) + float(
            self.eigenvalues[spec.lora_B_name].double().sum()
        )

    def _param_dense(self, name: str) -> Tensor:
        Q = torch.kron(*self._eigvecs(name, self.dtype))
        return Q @ torch.diag(self.eigenvalues[name].flatten().to(self.dtype)) @ Q.T

    def _module_dense(self, spec: LoraModuleSpec) -> Tensor:
        return torch.block_diag(
            self._param_dense(spec.lora_A_name), self._param_dense(spec.lora_B_name)
        )

    def structure_tensors(self) -> dict[str, Tensor]:
        """``grad_eigvecs.``, ``input_eigvecs.`` and ``eigenvalues.<param name>``, as stored."""
        tensors = {}
        for n in self.param_names:
            tensors[f"grad_eigvecs.{n}"] = self.grad_eigvecs[n]
            tensors[f"input_eigvecs.{n}"] = self.input_eigvecs[n]
            tensors[f"eigenvalues.{n}"] = self.eigenvalues[n]
        return tensors

    @classmethod
    def from_tensors(cls, modules, mode, tensors, metadata) -> EKFACPrecision:
        """Inverse of :meth:`structure_tensors` (validates names and shapes)."""
        grad, inp, eig = {}, {}, {}
        for s in modules.values():
            for n, (out_dim, in_dim) in (
                (s.lora_A_name, (s.rank, s.in_features)),
                (s.lora_B_name, (s.out_features, s.rank)),
            ):
                grad[n] = take(tensors, f"grad_eigvecs.{n}", (out_dim, out_dim))
                inp[n] = take(tensors, f"input_eigvecs.{n}", (in_dim, in_dim))
                eig[n] = take(tensors, f"eigenvalues.{n}", (out_dim, in_dim))
        return cls(modules, mode, grad, inp, eig, metadata)

    def _weighted_sum(self, others: list[Precision], weights: list[float]) -> EKFACPrecision:
        if others:
            raise IncompatiblePrecisionError(
                "EKFAC precisions fitted on different data have different eigenbases and "
                "cannot be pooled; fit one EKFAC precision on all source batches"
            )
        eig = {n: (weights[0] * t.to(self.dtype)).to(t) for n, t in self.eigenvalues.items()}
        return EKFACPrecision(
            self.modules, self.mode, self.grad_eigvecs, self.input_eigvecs, eig, self._metadata
        )


def eigenbases(kfac) -> dict[str, dict[str, Tensor]]:
    """Eigenvectors of each module's K-FAC factors: input ``x``/``u``, gradient ``g_A``/``g_B``.

    The factors of a one-component :class:`~lalora_curv.KFACPrecision`.
    """
    bases = {}
    for name in kfac.modules:
        b = kfac.blocks(name)
        factors = {
            "x": b.input_cov,
            "g_A": b.lora_A_grad_cov,
            "u": b.lora_B_input_cov,
            "g_B": b.lora_B_grad_cov,
        }
        # contiguous: the artifact stores them so, and matmul results must not depend on layout
        bases[name] = {k: torch.linalg.eigh(f[0])[1].contiguous() for k, f in factors.items()}
    return bases
