r"""Diagonal precisions: on the LoRA parameters (DIAG) and on the merged update (EWC).

``DiagPrecision``: one precision per LoRA parameter (fitted with the per-token Fisher by
default; with ``estimator="batch-grad-squared"`` it is the paper's DIAG, squared mini-batch
gradients),

.. math:: r = \langle D_A, (A - A_0)^{\odot 2} \rangle + \langle D_B, (B - B_0)^{\odot 2} \rangle.

``MergedDiagPrecision`` (EWC on the merged update ``dW = s (B A - B_0 A_0)``): one precision
per base-weight entry, fitted on the base layer (so it re-bases onto any adapter),

.. math:: r = \langle D_W, dW^{\odot 2} \rangle,

a degree-4 polynomial in ``(A, B)``.

Storage (:meth:`~lalora_curv.precision.Precision.with_storage`): the diagonals in float32 (as
fitted), float64 or bfloat16; with ``D~_i = D_i (1 + e_i)``, ``|e_i| <= u = 2^-8``, the
penalty of any displacement moves by at most ``u`` relative (every term is ``>= 0``). A
diagonal has no factor to truncate: no low-rank storage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lalora_curv.adapter import LoraModuleSpec
from lalora_curv.precision._util import mean_of, take
from lalora_curv.precision.base import Precision, rebased_metadata, rebased_modules
from lalora_curv.precision.factors import upcast


class DiagPrecision(Precision):
    """Per-parameter precision of lora_A and lora_B.

    The per-token Fisher diagonal, or the paper's DIAG when fitted with
    ``estimator="batch-grad-squared"``.

    Attributes:
        diag: ``{param name: precision}``, each of the parameter's shape.
    """

    structure = "diag"
    estimators = ("empirical", "mc", "batch-grad-squared")
    granularities = ("token", "sequence")
    lowrank_refusal = (
        "a diagonal is one number per LoRA parameter, with no factor to truncate "
        "(bfloat16 halves its bytes)"
    )

    @classmethod
    def needs(cls, estimator: str, granularity: str) -> frozenset[str]:
        """Per-token squared gradients, or squares of gradients summed over a sequence or batch.

        Summed over a sequence with ``granularity="sequence"``, over a whole batch with
        ``"batch-grad-squared"``.
        """
        if estimator == "batch-grad-squared" or granularity == "sequence":
            return frozenset({"lora_A_grad", "lora_B_grad"})
        return frozenset({"lora_A_diag", "lora_B_diag"})

    @classmethod
    def from_statistics(cls, stats, specs, mode, metadata) -> DiagPrecision:
        """``D = S / N`` for lora_A and lora_B of every module."""
        n, dtype = stats.supervised_tokens, next(iter(mode.values())).dtype
        diag = {}
        for name, spec in specs.items():
            sums = stats.modules[name]
            diag[spec.lora_A_name] = mean_of(
                sums.lora_A_diag, (spec.rank, spec.in_features), n, dtype
            )
            diag[spec.lora_B_name] = mean_of(
                sums.lora_B_diag, (spec.out_features, spec.rank), n, dtype
            )
        return cls(specs, mode, diag, metadata)

    def __init__(
        self,
        modules: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        diag: Mapping[str, Tensor],
        metadata: Mapping[str, Any],
    ) -> None:
        super().__init__(modules, mode, metadata)
        self.diag = dict(diag)
        self._record_storage()
        self._upcast: dict = {}

    def _module_quad(self, spec: LoraModuleSpec, dA: Tensor, dB: Tensor) -> Tensor:
        D_A, D_B = (
            upcast(self.diag[n], d.dtype, self._upcast, n)
            for n, d in ((spec.lora_A_name, dA), (spec.lora_B_name, dB))
        )
        return (D_A * dA.square()).sum() + (D_B * dB.square()).sum()

    def module_trace(self, name: str) -> float:
        """The sum of the module's lora_A and lora_B diagonals."""
        spec = self.modules[name]
        return float(self.diag[spec.lora_A_name].double().sum()) + float(
            self.diag[spec.lora_B_name].double().sum()
        )

    def _module_dense(self, spec: LoraModuleSpec) -> Tensor:
        return torch.diag(
            torch.cat(
                [self.diag[spec.lora_A_name].flatten(), self.diag[spec.lora_B_name].flatten()]
            ).to(self.dtype)
        )

    def structure_tensors(self) -> dict[str, Tensor]:
        """``{"diag.<param name>": D}``, as in the artifact."""
        return {f"diag.{n}": t for n, t in self.diag.items()}

    @classmethod
    def from_tensors(cls, modules, mode, tensors, metadata) -> DiagPrecision:
        """Inverse of :meth:`structure_tensors` (validates names and shapes)."""
        diag = {}
        for spec in modules.values():
            diag[spec.lora_A_name] = take(
                tensors, f"diag.{spec.lora_A_name}", (spec.rank, spec.in_features)
            )
            diag[spec.lora_B_name] = take(
                tensors, f"diag.{spec.lora_B_name}", (spec.out_features, spec.rank)
            )
        return cls(modules, mode, diag, metadata)

    def _weighted_sum(self, others: list[Precision], weights: list[float]) -> DiagPrecision:
        parts = [self, *others]
        diag = {  # in the compute dtype, then back to this precision's storage
            n: sum(w * p.diag[n].to(self.dtype) for p, w in zip(parts, weights, strict=True)).to(t)
            for n, t in self.diag.items()
        }
        return DiagPrecision(self.modules, self.mode, diag, self._metadata)


class MergedDiagPrecision(Precision):
    """Diagonal precision of the merged update ``dW = s (B A - B0 A0)`` (EWC on ``W``).

    Attributes:
        weight_diag: ``{module name: D_W}``, each ``out_features x in_features``.
    """

    structure = "merged-diag"
    quadratic = False
    rebasable = True
    lowrank_refusal = (
        "a diagonal is one number per base weight, with no factor to truncate (bfloat16 "
        "halves its bytes; merged-kfac has a low-rank storage)"
    )

    @classmethod
    def needs(cls, estimator: str, granularity: str) -> frozenset[str]:
        """The per-token squared gradients of the base weight, ``S_W`` (``weight_diag``)."""
        return frozenset({"weight_diag"})

    @classmethod
    def from_statistics(cls, stats, specs, mode, metadata) -> MergedDiagPrecision:
        """``D_W = S_W / N`` per module."""
        n, dtype = stats.supervised_tokens, next(iter(mode.values())).dtype
        weight_diag = {
            name: mean_of(
                stats.modules[name].weight_diag, (spec.out_features, spec.in_features), n, dtype
            )
            for name, spec in specs.items()
        }
        return cls(specs, mode, weight_diag, metadata)

    def __init__(
        self,
        modules: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        weight_diag: Mapping[str, Tensor],
        metadata: Mapping[str, Any],
    ) -> None:
        super().__init__(modules, mode, metadata)
        self.weight_diag = dict(weight_diag)
        self._record_storage()
        self._upcast: dict = {}

    def _module_quad(self, spec: LoraModuleSpec, dA: Tensor, dB: Tensor) -> Tensor:
        A0, B0 = self.mode[spec.lora_A_name], self.mode[spec.lora_B_name]
        dW = spec.scaling * (dB @ (A0 + dA) + B0 @ dA)  # = s (B A - B0 A0), exact at the mode
        D_W = upcast(self.weight_diag[spec.name], dW.dtype, self._upcast, spec.name)
        return (D_W * dW.square()).sum()

    def module_trace(self, name: str) -> float:
        """``sum D_W``: the trace over the merged update ``dW``."""
        return float(self.weight_diag[name].double().sum())

    def structure_tensors(self) -> dict[str, Tensor]:
        """``{"weight_diag.<module name>": D_W}``, as in the artifact."""
        return {f"weight_diag.{n}": t for n, t in self.weight_diag.items()}

    @classmethod
    def from_tensors(cls, modules, mode, tensors, metadata) -> MergedDiagPrecision:
        """Inverse of :meth:`structure_tensors` (validates names and shapes)."""
        weight_diag = {
            s.name: take(tensors, f"weight_diag.{s.name}", (s.out_features, s.in_features))
            for s in modules.values()
        }
        return cls(modules, mode, weight_diag, metadata)

    def _weighted_sum(self, others: list[Precision], weights: list[float]) -> MergedDiagPrecision:
        parts = [self, *others]
        wd = {  # in the compute dtype, then back to this precision's storage
            n: sum(
                w * p.weight_diag[n].to(self.dtype) for p, w in zip(parts, weights, strict=True)
            ).to(t)
            for n, t in self.weight_diag.items()
        }
        return MergedDiagPrecision(self.modules, self.mode, wd, self._metadata)

    def rebase(self, model: nn.Module, adapter_name: str = "default") -> MergedDiagPrecision:
        """The same ``D_W`` for another adapter of the same base (see :meth:`Precision.rebase`)."""
        modules, mode = rebased_modules(self, model, adapter_name)
        return MergedDiagPrecision(
            modules, mode, self.weight_diag, rebased_metadata(self, model, adapter_name)
        )
