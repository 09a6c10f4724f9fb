"""The K-FAC family: B-K-FAC, B-TRI-K-FAC and the merged-update K-FAC.

Every structure here is built from two *base-layer* factors per module, fitted once
(token-level "expand" K-FAC, Eschenhagen et al. 2023):

.. math::

    C_x = \\mathbb{E}[x x^\\top] \\;(D_{in} \\times D_{in}),\\qquad
    G_h = \\mathbb{E}[g g^\\top] \\;(D_{out} \\times D_{out}),

``x`` the layer input and ``g = dL/dh`` its output gradient, plus the adapter's mode
``(A_0, B_0, s)``. The LoRA blocks follow exactly (docs/math.md, section 5):

.. math::

    C_u = A_0 C_x A_0^\\top,\\; C_{xu} = C_x A_0^\\top,\\;
    G_B = s^2 G_h,\\; G_{AB} = s^2 B_0^\\top G_h,\\; G_{AA} = s^2 B_0^\\top G_h B_0 .

In PyTorch's row-major flattening the precision block of a weight with input factor ``C`` and
output factor ``G`` is ``kron(G, C)``. Penalties use ``(G (x) C) vec(V) = vec(G V C)`` and never
form a Kronecker product or a ``D_out x D_in`` matrix (with ``dA = A - A0``, ``dB = B - B0``):

.. math::

    r_{\\text{kfac}} = \\langle dA, G_{AA}\\, dA\\, C_x \\rangle + \\langle dB, G_B\\, dB\\, C_u \\rangle

    r_{\\text{tri-kfac}} = r_{\\text{kfac}} + 2 \\langle dA, G_{AB}\\, dB\\, C_{xu}^\\top \\rangle
    = \\operatorname{tr}(G_h\\, dW_{lin}\\, C_x\\, dW_{lin}^\\top),\\;
    dW_{lin} = s (B_0\\, dA + dB\\, A_0)

    r_{\\text{merged}} = \\operatorname{tr}\\big((U^\\top G_h U)(V C_x V^\\top)\\big),\\;
    U = [dB, B_0],\\; V = s [A; dA]

(the last is the K-FAC penalty of the merged update ``dW = s (B A - B_0 A_0)``, evaluated in
``2r x 2r``). At the default init ``B_0 = 0`` the A and cross blocks vanish exactly and are
skipped. A pooled precision holds ``K`` weighted components ``sum_k w_k G_k (x) C_k``, stacked
along a leading axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lalora_curv.adapter import LoraModuleSpec
from lalora_curv.errors import ArtifactError, LaloraError
from lalora_curv.precision._util import take
from lalora_curv.precision.base import Precision
from lalora_curv.precision.diag import rebased_metadata, rebased_modules


@dataclass(frozen=True)
class LoraBlocks:
    """The LoRA K-FAC blocks of one module, stacked over components and weighted.

    Shapes (``K`` components): ``input_cov`` (K, D_in, D_in), ``lora_B_input_cov`` = C_u
    (K, r, r), ``cross_input_cov`` = C_xu (K, D_in, r), ``lora_B_grad_cov`` = G_B
    (K, D_out, D_out), ``lora_A_grad_cov`` = G_AA (K, r, r), ``cross_grad_cov`` = G_AB
    (K, r, D_out). Component weights are folded into the grad factors. ``b0_zero`` marks
    ``B_0 = 0``, where every A and cross block is exactly zero.
    """

    input_cov: Tensor
    lora_B_input_cov: Tensor
    cross_input_cov: Tensor
    lora_B_grad_cov: Tensor
    lora_A_grad_cov: Tensor
    cross_grad_cov: Tensor
    b0_zero: bool


class KroneckerPrecision(Precision):
    """Shared storage of the K-FAC family: base factors per module and component weights.

    Attributes:
        input_cov: ``{module: C_x}`` stacked over components, (K, D_in, D_in).
        grad_cov: ``{module: G_h}`` stacked over components, (K, D_out, D_out).
        weights: the K component weights (pooling weights times scale).
    """

    rebasable = True

    def __init__(
        self,
        modules: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        input_cov: Mapping[str, Tensor],
        grad_cov: Mapping[str, Tensor],
        weights: list[float],
        metadata: Mapping[str, Any],
    ) -> None:
        super().__init__(modules, mode, metadata)
        self.input_cov = dict(input_cov)
        self.grad_cov = dict(grad_cov)
        self.weights = [float(w) for w in weights]
        self._metadata["component_weights"] = list(self.weights)
        self._blocks: dict[str, LoraBlocks] = {}

    def blocks(self, name: str) -> LoraBlocks:
        """The module's LoRA blocks derived from its base factors and the mode (cached)."""
        if name not in self._blocks:
            spec = self.modules[name]
            A0, B0 = self.mode[spec.lora_A_name], self.mode[spec.lora_B_name]
            C, G = self.input_cov[name], self.grad_cov[name]
            w = torch.tensor(self.weights, dtype=G.dtype, device=G.device).view(-1, 1, 1)
            Gw = (spec.scaling**2) * w * G
            C_xu = C @ A0.T
            Gw_B0 = Gw @ B0
            self._blocks[name] = LoraBlocks(
                input_cov=C,
                lora_B_input_cov=A0 @ C_xu,
                cross_input_cov=C_xu,
                lora_B_grad_cov=Gw,
                lora_A_grad_cov=B0.T @ Gw_B0,
                cross_grad_cov=Gw_B0.transpose(-1, -2),
                b0_zero=not bool(B0.any()),
            )
        return self._blocks[name]

    def structure_tensors(self) -> dict[str, Tensor]:
        tensors = {f"input_cov.{n}": t for n, t in self.input_cov.items()}
        tensors.update({f"grad_cov.{n}": t for n, t in self.grad_cov.items()})
        return tensors

    @classmethod
    def from_tensors(cls, modules, mode, tensors, metadata) -> KroneckerPrecision:
        weights = metadata.get("component_weights", [1.0])
        if not isinstance(weights, list) or not weights:
            raise ArtifactError("metadata 'component_weights' must be a non-empty list")
        k = len(weights)
        input_cov = {
            s.name: take(tensors, f"input_cov.{s.name}", (k, s.in_features, s.in_features))
            for s in modules.values()
        }
        grad_cov = {
            s.name: take(tensors, f"grad_cov.{s.name}", (k, s.out_features, s.out_features))
            for s in modules.values()
        }
        return cls(modules, mode, input_cov, grad_cov, weights, metadata)

    def with_structure(self, structure: str) -> KroneckerPrecision:
        """The same factors under another K-FAC structure (kfac, tri-kfac, merged-kfac)."""
        if structure not in KFAC_CLASSES:
            raise LaloraError(
                f"unknown K-FAC structure {structure!r}; valid: {sorted(KFAC_CLASSES)}"
            )
        cls = KFAC_CLASSES[structure]
        return cls(
            self.modules, self.mode, self.input_cov, self.grad_cov, self.weights, self._metadata
        )

    def _weighted_sum(self, others: list[Precision], weights: list[float]) -> KroneckerPrecision:
        parts: list[KroneckerPrecision] = [self, *others]  # type: ignore[list-item]
        new_weights = [w * wk for p, w in zip(parts, weights, strict=True) for wk in p.weights]
        input_cov = {
            n: torch.cat([p.input_cov[n].to(t) for p in parts]) for n, t in self.input_cov.items()
        }
        grad_cov = {
            n: torch.cat([p.grad_cov[n].to(t) for p in parts]) for n, t in self.grad_cov.items()
        }
        return type(self)(self.modules, self.mode, input_cov, grad_cov, new_weights, self._metadata)

    def rebase(self, model: nn.Module, adapter_name: str = "default") -> KroneckerPrecision:
        modules, mode = rebased_modules(self, model, adapter_name)
        return type(self)(
            modules,
            mode,
            self.input_cov,
            self.grad_cov,
            self.weights,
            rebased_metadata(self, model, adapter_name, mode),
        )

    def _lora_B_term(self, b: LoraBlocks, dB: Tensor) -> Tensor:
        """``<dB, G_B dB C_u>``, summed over components."""
        return ((b.lora_B_grad_cov @ dB @ b.lora_B_input_cov) * dB).sum()

    def _lora_A_term(self, b: LoraBlocks, dA: Tensor) -> Tensor:
        """``<dA, G_AA dA C_x>``, summed over components."""
        return ((b.lora_A_grad_cov @ (dA @ b.input_cov)) * dA).sum()

    def _cross_term(self, b: LoraBlocks, dA: Tensor, dB: Tensor) -> Tensor:
        """``2 <dA, G_AB dB C_xu^T>``, summed over components."""
        return 2 * ((b.cross_grad_cov @ dB @ b.cross_input_cov.transpose(-1, -2)) * dA).sum()

    def _block_kfac(self, b: LoraBlocks) -> tuple[Tensor, Tensor, Tensor]:
        """Dense (A, A), (A, B) and (B, B) blocks, row-major, summed over components."""

        def kron_sum(G: Tensor, C: Tensor) -> Tensor:
            return sum(torch.kron(G[k].contiguous(), C[k].contiguous()) for k in range(G.shape[0]))

        return (
            kron_sum(b.lora_A_grad_cov, b.input_cov),
            kron_sum(b.cross_grad_cov, b.cross_input_cov),
            kron_sum(b.lora_B_grad_cov, b.lora_B_input_cov),
        )


class KFACPrecision(KroneckerPrecision):
    """B-K-FAC: Kronecker blocks for lora_A and lora_B of each module (cross blocks dropped)."""

    structure = "kfac"

    def _module_quad(self, spec: LoraModuleSpec, dA: Tensor, dB: Tensor) -> Tensor:
        b = self.blocks(spec.name)
        r = self._lora_B_term(b, dB)
        return r if b.b0_zero else r + self._lora_A_term(b, dA)

    def _module_dense(self, spec: LoraModuleSpec) -> Tensor:
        aa, _, bb = self._block_kfac(self.blocks(spec.name))
        return torch.block_diag(aa, bb)


class TriKFACPrecision(KroneckerPrecision):
    """B-TRI-K-FAC: B-K-FAC plus the cross lora_A/lora_B blocks of each module."""

    structure = "tri-kfac"

    def _module_quad(self, spec: LoraModuleSpec, dA: Tensor, dB: Tensor) -> Tensor:
        b = self.blocks(spec.name)
        r = self._lora_B_term(b, dB)
        if b.b0_zero:
            return r
        return r + self._lora_A_term(b, dA) + self._cross_term(b, dA, dB)

    def _module_dense(self, spec: LoraModuleSpec) -> Tensor:
        aa, ab, bb = self._block_kfac(self.blocks(spec.name))
        return torch.cat([torch.cat([aa, ab], 1), torch.cat([ab.T, bb], 1)], 0)


class MergedKFACPrecision(KroneckerPrecision):
    """K-FAC on the merged update ``dW = s (B A - B0 A0)``: gauge-invariant, degree 4."""

    structure = "merged-kfac"
    quadratic = False

    def _module_quad(self, spec: LoraModuleSpec, dA: Tensor, dB: Tensor) -> Tensor:
        b = self.blocks(spec.name)
        A0, B0 = self.mode[spec.lora_A_name], self.mode[spec.lora_B_name]
        A = A0 + dA
        # dW = s (B A - B0 A0) = s (dB A + B0 dA): exactly zero at the mode, no cancellation
        if b.b0_zero:
            U, V = dB, spec.scaling * A
        else:
            U, V = torch.cat([dB, B0], 1), spec.scaling * torch.cat([A, dA], 0)
        # lora_B_grad_cov = s^2 w G_h: divide s^2 back out instead of keeping a second copy.
        UGU = U.T @ b.lora_B_grad_cov @ U / spec.scaling**2
        VCV = V @ b.input_cov @ V.T
        return (UGU * VCV).sum()


KFAC_CLASSES: dict[str, type[KroneckerPrecision]] = {
    "kfac": KFACPrecision,
    "tri-kfac": TriKFACPrecision,
    "merged-kfac": MergedKFACPrecision,
}
