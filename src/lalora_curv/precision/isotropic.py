r"""Isotropic controls: an L2 pull towards the init, with no curvature at all.

The oldest remedy for forgetting is weight decay towards the pretrained point. These
precisions are that pull, as :class:`~lalora_curv.precision.Precision` objects like the
curvature ones (penalty, sums, scaling, save/load), so that a comparison can tell whether the
curvature or merely *a* pull to the init protects the source tasks.

``IsotropicPrecision``: one number per LoRA tensor, ``w_A`` for lora_A and ``w_B`` for
lora_B of each module,

.. math:: r = \sum_m w_{A,m} \lVert A_m - A_{0,m} \rVert_F^2 + w_{B,m} \lVert B_m - B_{0,m} \rVert_F^2 ,

the precision matrix ``diag(w_A 1, w_B 1)`` (``scope="all"``: every ``w = 1``;
``scope="lora_B"``: ``w_A = 0``, the control that matches K-FAC at the default init ``B_0 = 0``,
where the curvature of lora_A is exactly zero).

``MergedIsotropicPrecision``: the squared Frobenius norm of the merged update,

.. math:: r = \sum_m w_m \lVert s (B_m A_m - B_{0,m} A_{0,m}) \rVert_F^2 ,

gauge-invariant like merged K-FAC and of degree 4 in ``(A, B)``: merged K-FAC with both
factors the identity.

Neither depends on data: both are built from the adapter alone
(:func:`isotropic_precision`), their counts are zero, and both re-base onto any adapter (the
new mode is its init).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lalora_curv._version import __version__
from lalora_curv.adapter import (
    LoraModuleSpec,
    adapter_config,
    adapter_mode,
    base_model_info,
    find_lora_modules,
)
from lalora_curv.errors import ArtifactError, LaloraError
from lalora_curv.precision._util import take
from lalora_curv.precision.base import REGISTRY, Precision, rebased_metadata, rebased_modules
from lalora_curv.timestamps import utc_now

#: which LoRA tensors :class:`IsotropicPrecision` pulls back
SCOPES = ("all", "lora_B")


def _check_weight(key: str, t: Tensor) -> Tensor:
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ArtifactError(f"tensor {key!r} must be a finite number >= 0, got {t.tolist()}")
    return t


class IsotropicPrecision(Precision):
    """L2 to the init on the LoRA tensors: ``sum w_p ||theta_p - mu_p||^2``.

    Attributes:
        weight: ``{param name: w}``, a one-element tensor per LoRA tensor.
    """

    structure = "isotropic"
    rebasable = True
    fitted = False
    lowrank_refusal = "an isotropic precision is one number per LoRA tensor"

    def __init__(
        self,
        modules: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        weight: Mapping[str, Tensor],
        metadata: Mapping[str, Any],
    ) -> None:
        super().__init__(modules, mode, metadata)
        self.weight = dict(weight)
        self._record_storage()

    @property
    def scope(self) -> str:
        """``"lora_B"`` when every lora_A weight is zero, else ``"all"``."""
        a_free = all(
            not bool(self.weight[s.lora_A_name].any()) for s in self.modules.values()
        ) and any(bool(self.weight[s.lora_B_name].any()) for s in self.modules.values())
        return "lora_B" if a_free else "all"

    def _module_quad(self, spec: LoraModuleSpec, dA: Tensor, dB: Tensor) -> Tensor:
        w_A = self.weight[spec.lora_A_name].to(dA.dtype).reshape(())
        w_B = self.weight[spec.lora_B_name].to(dB.dtype).reshape(())
        return w_A * dA.square().sum() + w_B * dB.square().sum()

    def module_trace(self, name: str) -> float:
        """``w_A`` times the size of lora_A plus ``w_B`` times the size of lora_B."""
        spec = self.modules[name]
        return (
            float(self.weight[spec.lora_A_name].double().sum()) * spec.rank * (spec.in_features)
            + float(self.weight[spec.lora_B_name].double().sum()) * spec.out_features * spec.rank
        )

    def _module_dense(self, spec: LoraModuleSpec) -> Tensor:
        n_A, n_B = spec.rank * spec.in_features, spec.out_features * spec.rank
        w_A = self.weight[spec.lora_A_name].to(self.dtype).reshape(())
        w_B = self.weight[spec.lora_B_name].to(self.dtype).reshape(())
        diag = torch.cat([w_A.expand(n_A), w_B.expand(n_B)])  # lora_A then lora_B, row-major
        return torch.diag(diag)

    def structure_tensors(self) -> dict[str, Tensor]:
        """``{"isotropic.<param name>": w}``, as in the artifact."""
        return {f"isotropic.{n}": t for n, t in self.weight.items()}

    @classmethod
    def from_tensors(cls, modules, mode, tensors, metadata) -> IsotropicPrecision:
        """Inverse of :meth:`structure_tensors` (validates names, shapes and weights ``>= 0``)."""
        weight = {}
        for spec in modules.values():
            for name in (spec.lora_A_name, spec.lora_B_name):
                key = f"isotropic.{name}"
                weight[name] = _check_weight(key, take(tensors, key, (1,)))
        return cls(modules, mode, weight, metadata)

    def _weighted_sum(self, others: list[Precision], weights: list[float]) -> IsotropicPrecision:
        parts = [self, *others]
        weight = {
            n: sum(w * p.weight[n].to(self.dtype) for p, w in zip(parts, weights, strict=True)).to(
                t
            )
            for n, t in self.weight.items()
        }
        return IsotropicPrecision(self.modules, self.mode, weight, self._metadata)

    def rebase(self, model: nn.Module, adapter_name: str = "default") -> IsotropicPrecision:
        """The same weights, centred at another adapter's current weights (its init)."""
        modules, mode = rebased_modules(self, model, adapter_name)
        return IsotropicPrecision(
            modules, mode, self.weight, rebased_metadata(self, model, adapter_name)
        )


class MergedIsotropicPrecision(Precision):
    """Squared Frobenius norm of the merged update: ``sum_m w_m ||s (B A - B0 A0)||_F^2``.

    Attributes:
        weight: ``{module name: w}``, a one-element tensor per module.
    """

    structure = "merged-isotropic"
    quadratic = False
    rebasable = True
    fitted = False
    lowrank_refusal = "a merged isotropic precision is one number per module"

    def __init__(
        self,
        modules: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        weight: Mapping[str, Tensor],
        metadata: Mapping[str, Any],
    ) -> None:
        super().__init__(modules, mode, metadata)
        self.weight = dict(weight)
        self._record_storage()

    def _module_quad(self, spec: LoraModuleSpec, dA: Tensor, dB: Tensor) -> Tensor:
        A0, B0 = self.mode[spec.lora_A_name], self.mode[spec.lora_B_name]
        w = self.weight[spec.name].to(dA.dtype).reshape(())
        # ||dW||^2 = tr(U^T U V V^T) with dW = U V, U = [dB, B0], V = s [A; dA]: in 2r x 2r
        U = torch.cat([dB, B0], 1)
        V = spec.scaling * torch.cat([A0 + dA, dA], 0)
        return w * ((U.T @ U) * (V @ V.T)).sum()

    def module_trace(self, name: str) -> float:
        """``w D_out D_in``: the trace over the merged update ``dW``."""
        spec = self.modules[name]
        return float(self.weight[name].double().sum()) * spec.out_features * spec.in_features

    def structure_tensors(self) -> dict[str, Tensor]:
        """``{"merged_isotropic.<module name>": w}``, as in the artifact."""
        return {f"merged_isotropic.{n}": t for n, t in self.weight.items()}

    @classmethod
    def from_tensors(cls, modules, mode, tensors, metadata) -> MergedIsotropicPrecision:
        """Inverse of :meth:`structure_tensors` (validates names, shapes and weights ``>= 0``)."""
        weight = {}
        for spec in modules.values():
            key = f"merged_isotropic.{spec.name}"
            weight[spec.name] = _check_weight(key, take(tensors, key, (1,)))
        return cls(modules, mode, weight, metadata)

    def _weighted_sum(
        self, others: list[Precision], weights: list[float]
    ) -> MergedIsotropicPrecision:
        parts = [self, *others]
        weight = {
            n: sum(w * p.weight[n].to(self.dtype) for p, w in zip(parts, weights, strict=True)).to(
                t
            )
            for n, t in self.weight.items()
        }
        return MergedIsotropicPrecision(self.modules, self.mode, weight, self._metadata)

    def rebase(self, model: nn.Module, adapter_name: str = "default") -> MergedIsotropicPrecision:
        """The same weights, centred at another adapter's current weights (its init)."""
        modules, mode = rebased_modules(self, model, adapter_name)
        return MergedIsotropicPrecision(
            modules, mode, self.weight, rebased_metadata(self, model, adapter_name)
        )


def isotropic_precision(
    model: nn.Module,
    structure: str = "isotropic",
    *,
    scope: str = "all",
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
) -> Precision:
    """An isotropic control for the adapter ``adapter_name`` of ``model``.

    Centred at its current weights (the init), every weight 1 (scale it with ``w * prec``).

    Args:
        model: a peft model with a LoRA adapter.
        structure: ``"isotropic"`` (L2 on the LoRA tensors) or ``"merged-isotropic"``
            (squared Frobenius norm of the merged update).
        scope: for ``"isotropic"``: ``"all"`` (lora_A and lora_B) or ``"lora_B"`` (lora_B
            only); ``"merged-isotropic"`` takes ``"all"`` only.
        adapter_name: the peft adapter.
        dtype: the dtype of the mode and the weights (float32 or float64).
    """
    controls = sorted(n for n, c in REGISTRY.items() if not c.fitted)
    if structure not in controls:
        raise LaloraError(f"unknown isotropic structure {structure!r}; valid: {controls}")
    if scope not in SCOPES:
        raise LaloraError(f"unknown scope {scope!r}; valid: {list(SCOPES)}")
    if structure == "merged-isotropic" and scope != "all":
        raise LaloraError(
            "scope applies to structure 'isotropic' only: the merged update has one norm"
        )
    if dtype not in (torch.float32, torch.float64):
        raise LaloraError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    handles = find_lora_modules(model, adapter_name)
    mode = adapter_mode(handles, dtype)
    specs = {name: h.spec for name, h in handles.items()}
    one = torch.ones(1, dtype=dtype)
    if structure == "isotropic":
        weight = {}
        for spec in specs.values():
            weight[spec.lora_A_name] = one.clone() if scope == "all" else torch.zeros_like(one)
            weight[spec.lora_B_name] = one.clone()
    else:
        weight = {name: one.clone() for name in specs}
    b0_zero = all(not bool(t.any()) for n, t in mode.items() if n.endswith("lora_B.weight"))
    metadata = {
        "backend": None,
        "estimator": None,
        "granularity": None,
        "counts": {"positions": 0, "supervised_tokens": 0, "sequences": 0, "batches": 0},
        "adapter": adapter_config(model, adapter_name),
        "base_model": base_model_info(model),
        "sources": [],
        "self_generated": [],
        "created": utc_now(),
        "library_version": __version__,
        "lora_B_init_zero": b0_zero,
        "stats_dtype": str(dtype).removeprefix("torch."),
        "scale": 1.0,
    }
    prefix = "isotropic" if structure == "isotropic" else "merged_isotropic"
    tensors = {f"{prefix}.{n}": t for n, t in weight.items()}
    return REGISTRY[structure].from_tensors(specs, mode, tensors, metadata)
