r"""The K-FAC family: B-K-FAC, B-TRI-K-FAC and the merged-update K-FAC.

Every structure here is built from two *base-layer* factors per module, fitted once
(token-level "expand" K-FAC, Eschenhagen et al. 2023):

.. math::

    C_x = \mathbb{E}[x x^\top] \;(D_{in} \times D_{in}),\qquad
    G_h = \mathbb{E}[g g^\top] \;(D_{out} \times D_{out}),

``x`` the layer input and ``g = dL/dh`` its output gradient, plus the adapter's mode
``(A_0, B_0, s)``. The LoRA blocks follow exactly (docs/math.md, section 5):

.. math::

    C_u = A_0 C_x A_0^\top,\; C_{xu} = C_x A_0^\top,\;
    G_B = s^2 G_h,\; G_{AB} = s^2 B_0^\top G_h,\; G_{AA} = s^2 B_0^\top G_h B_0 .

In PyTorch's row-major flattening the precision block of a weight with input factor ``C`` and
output factor ``G`` is ``kron(G, C)``. Penalties use ``(G (x) C) vec(V) = vec(G V C)`` and never
form a Kronecker product or a ``D_out x D_in`` matrix (with ``dA = A - A0``, ``dB = B - B0``):

.. math::

    r_{\text{kfac}} = \langle dA, G_{AA}\, dA\, C_x \rangle + \langle dB, G_B\, dB\, C_u \rangle

    r_{\text{tri-kfac}} = r_{\text{kfac}} + 2 \langle dA, G_{AB}\, dB\, C_{xu}^\top \rangle
    = \operatorname{tr}(G_h\, dW_{lin}\, C_x\, dW_{lin}^\top),\;
    dW_{lin} = s (B_0\, dA + dB\, A_0)

    r_{\text{merged}} = \operatorname{tr}\big((U^\top G_h U)(V C_x V^\top)\big),\;
    U = [dB, B_0],\; V = s [A; dA]

(the last is the K-FAC penalty of the merged update ``dW = s (B A - B_0 A_0)``, evaluated in
``2r x 2r``). At the default init ``B_0 = 0`` the A and cross blocks vanish exactly and are
skipped. A pooled precision holds ``K`` weighted components ``sum_k w_k G_k (x) C_k``, stacked
along a leading axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lalora_curv.adapter import LoraModuleSpec
from lalora_curv.errors import ArtifactError, LaloraError
from lalora_curv.precision._util import mean_of
from lalora_curv.precision.base import REGISTRY, Precision, rebased_metadata, rebased_modules
from lalora_curv.precision.factors import (
    STORAGES,
    DenseFactor,
    Factor,
    concat,
    convert,
    factor_from_tensors,
    resolve_storage,
)


@dataclass(frozen=True)
class LoraBlocks:
    """The LoRA K-FAC blocks of one module, stacked over components and weighted.

    ``input_factor`` is C_x and ``grad_factor`` G_h (K components, in their storage, never
    densified here); ``grad_scale`` (K, 1, 1) holds ``s^2 w_k``, so ``G_B = grad_scale G_h``.
    The small blocks are dense: ``lora_B_input_cov`` = C_u (K, r, r), ``cross_input_cov`` =
    C_xu (K, D_in, r), ``lora_A_grad_cov`` = G_AA (K, r, r), ``cross_grad_cov`` = G_AB
    (K, r, D_out), with the component weights folded into the grad blocks. ``b0_zero`` marks
    ``B_0 = 0``, where every A and cross block is exactly zero.
    """

    input_factor: Factor
    grad_factor: Factor
    grad_scale: Tensor
    lora_B_input_cov: Tensor
    cross_input_cov: Tensor
    lora_A_grad_cov: Tensor
    cross_grad_cov: Tensor
    b0_zero: bool

    @property
    def input_cov(self) -> Tensor:
        """Dense C_x (K, D_in, D_in) in the compute dtype (formed for low-rank storage)."""
        return self.input_factor.dense(self.grad_scale.dtype)

    @property
    def lora_B_grad_cov(self) -> Tensor:
        """Dense G_B = s^2 w G_h (K, D_out, D_out) (formed for low-rank storage)."""
        return self.grad_scale * self.grad_factor.dense(self.grad_scale.dtype)

    def grad_mm(self, M: Tensor) -> Tensor:
        """``G_B M = s^2 w_k G_h M`` per component, (K, D_out, m)."""
        return self.grad_scale * self.grad_factor.mm(M)


class _DenseView(Mapping[str, Tensor]):
    """``{module: dense factor}`` computed on access (no copy for dense storage)."""

    def __init__(self, factors: dict[str, Factor]) -> None:
        self._factors = factors

    def __getitem__(self, name: str) -> Tensor:
        return self._factors[name].dense()

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)


class KroneckerPrecision(Precision):
    """Shared storage of the K-FAC family: base factors per module and component weights.

    Storage (:meth:`with_storage`, recorded as ``metadata["storage"]``): every factor dense
    in float32 (as fitted), float64 or bfloat16, or eigen-truncated to rank ``k`` with a
    diagonal correction, ``F ~= U_k diag(l_k) U_k^T + diag(d)`` with
    ``d = diag(F) - diag(U_k diag(l_k) U_k^T)`` (the diagonal kept exactly); see
    :mod:`lalora_curv.precision.factors`. Penalties touch factors only through ``F M`` with
    thin ``M``: ``O(D k r)`` for low rank, no ``D x D`` matrix formed.

    Attributes:
        input_factors: ``{module: C_x}`` as :class:`~lalora_curv.precision.factors.Factor`.
        grad_factors: ``{module: G_h}``.
        input_cov: ``{module: C_x}`` dense, (K, D_in, D_in) (formed on access if low rank).
        grad_cov: ``{module: G_h}`` dense, (K, D_out, D_out).
        weights: the K component weights (pooling weights times scale).
    """

    rebasable = True
    storages = STORAGES

    @classmethod
    def needs(cls, estimator: str, granularity: str) -> frozenset[str]:
        """The sums of both K-FAC factors, ``S_x`` (``input_cov``) and ``S_g`` (``grad_cov``)."""
        return frozenset({"input_cov", "grad_cov"})

    @classmethod
    def from_statistics(cls, stats, specs, mode, metadata) -> KroneckerPrecision:
        """``C_x = S_x / positions`` and ``G_h = S_g / N`` per module, one component."""
        n, positions = stats.supervised_tokens, stats.positions
        dtype = next(iter(mode.values())).dtype
        input_cov, grad_cov = {}, {}
        for name, spec in specs.items():
            sums = stats.modules[name]
            d_in, d_out = spec.in_features, spec.out_features
            input_cov[name] = mean_of(sums.input_cov, (d_in, d_in), positions, dtype).unsqueeze(0)
            grad_cov[name] = mean_of(sums.grad_cov, (d_out, d_out), n, dtype).unsqueeze(0)
        return cls(specs, mode, input_cov, grad_cov, [1.0], metadata)

    def __init__(
        self,
        modules: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        input_cov: Mapping[str, Tensor | Factor],
        grad_cov: Mapping[str, Tensor | Factor],
        weights: list[float],
        metadata: Mapping[str, Any],
    ) -> None:
        super().__init__(modules, mode, metadata)
        self.input_factors = {n: _as_factor(f) for n, f in input_cov.items()}
        self.grad_factors = {n: _as_factor(f) for n, f in grad_cov.items()}
        self.weights = [float(w) for w in weights]
        self._metadata["component_weights"] = list(self.weights)
        self._metadata["storage"] = _common_storage(
            [*self.input_factors.values(), *self.grad_factors.values()]
        )
        self._blocks: dict[str, LoraBlocks] = {}

    @property
    def input_cov(self) -> Mapping[str, Tensor]:
        """``{module: C_x}`` dense, (K, D_in, D_in), formed on access if low rank."""
        return _DenseView(self.input_factors)

    @property
    def grad_cov(self) -> Mapping[str, Tensor]:
        """``{module: G_h}`` dense, (K, D_out, D_out), formed on access if low rank."""
        return _DenseView(self.grad_factors)

    def blocks(self, name: str) -> LoraBlocks:
        """The module's LoRA blocks derived from its base factors and the mode (cached)."""
        if name not in self._blocks:
            spec = self.modules[name]
            A0, B0 = self.mode[spec.lora_A_name], self.mode[spec.lora_B_name]
            C, G = self.input_factors[name], self.grad_factors[name]
            w = torch.tensor(self.weights, dtype=A0.dtype, device=A0.device).view(-1, 1, 1)
            scale = (spec.scaling**2) * w
            C_xu = C.mm(A0.T)
            Gw_B0 = scale * G.mm(B0)
            self._blocks[name] = LoraBlocks(
                input_factor=C,
                grad_factor=G,
                grad_scale=scale,
                lora_B_input_cov=A0 @ C_xu,
                cross_input_cov=C_xu,
                lora_A_grad_cov=B0.T @ Gw_B0,
                cross_grad_cov=Gw_B0.transpose(-1, -2),
                b0_zero=not bool(B0.any()),
            )
        return self._blocks[name]

    def structure_tensors(self) -> dict[str, Tensor]:
        """Every factor's tensors (``input_cov`` and ``grad_cov``), keyed as in the artifact."""
        tensors = {}
        for n, f in self.input_factors.items():
            tensors.update(f.tensors("input_cov", n))
        for n, f in self.grad_factors.items():
            tensors.update(f.tensors("grad_cov", n))
        return tensors

    @classmethod
    def from_tensors(cls, modules, mode, tensors, metadata) -> KroneckerPrecision:
        """Inverse of :meth:`structure_tensors`, in the storage the metadata names."""
        weights = metadata.get("component_weights", [1.0])
        if not isinstance(weights, list) or not weights:
            raise ArtifactError("metadata 'component_weights' must be a non-empty list")
        storage = metadata.get("storage", {"format": "dense"})
        if not isinstance(storage, dict) or storage.get("format") not in ("dense", "lowrank"):
            raise ArtifactError(
                f"metadata 'storage' must name format 'dense' or 'lowrank', got {storage!r}"
            )
        fmt, k = storage["format"], len(weights)
        input_cov = {
            s.name: factor_from_tensors(tensors, "input_cov", s.name, (k, s.in_features), fmt)
            for s in modules.values()
        }
        grad_cov = {
            s.name: factor_from_tensors(tensors, "grad_cov", s.name, (k, s.out_features), fmt)
            for s in modules.values()
        }
        return cls(modules, mode, input_cov, grad_cov, weights, metadata)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KroneckerPrecision:
        """A copy on ``device`` and/or in ``dtype``.

        ``dtype`` changes the mode and the factors of dense float storage and low rank, but
        keeps bfloat16 factors as stored.
        """
        meta = self.metadata
        if dtype is not None:
            meta["stats_dtype"] = str(dtype).removeprefix("torch.")

        def move(f: Factor) -> Factor:
            keep = isinstance(f, DenseFactor) and f.matrix.dtype == torch.bfloat16
            return f.to(device, None if keep else dtype)

        return type(self)(
            self.modules,
            {n: t.to(device=device, dtype=dtype) for n, t in self.mode.items()},
            _map_shared(self.input_factors, move),
            _map_shared(self.grad_factors, move),
            self.weights,
            meta,
        )

    def with_storage(self, storage: str, rank: int | None = None) -> KroneckerPrecision:
        """The same precision with its factors stored as ``storage``.

        Args:
            storage: ``"float32"`` (as fitted), ``"float64"``, ``"bfloat16"`` (half the bytes
                of float32, each entry rounded to 8 significant bits), or ``"lowrank"``: each
                factor ``F ~= U_k diag(l_k) U_k^T + diag(d)`` from its ``rank`` leading
                eigenpairs, ``d`` chosen so that the diagonal of ``F`` is kept exactly
                (``rank >= D`` keeps every eigenpair of that factor).
            rank: the ``k`` of ``"lowrank"`` (required there, refused otherwise).

        Factors with identical content (the input factor of q/k/v, of gate/up) are converted
        once and shared. A low-rank precision converts to a smaller rank or to dense storage,
        not to a larger rank.
        """
        self.check_storage(storage, rank)
        storage, rank = resolve_storage(storage, rank)
        dtype = self.dtype

        def conv(f: Factor) -> Factor:
            return convert(f, storage, rank, dtype)

        cache: dict[tuple, list[tuple[Factor, Factor]]] = {}
        return type(self)(
            self.modules,
            self.mode,
            _map_shared(self.input_factors, conv, cache),
            _map_shared(self.grad_factors, conv, cache),
            self.weights,
            self._metadata,
        )

    def with_structure(self, structure: str) -> KroneckerPrecision:
        """The same factors under another K-FAC structure (kfac, tri-kfac, merged-kfac)."""
        family = sorted(n for n, c in REGISTRY.items() if issubclass(c, KroneckerPrecision))
        if structure not in family:
            raise LaloraError(f"unknown K-FAC structure {structure!r}; valid: {family}")
        cls = REGISTRY[structure]
        return cls(
            self.modules,
            self.mode,
            self.input_factors,
            self.grad_factors,
            self.weights,
            self._metadata,
        )

    def _weighted_sum(self, others: list[Precision], weights: list[float]) -> KroneckerPrecision:
        parts: list[KroneckerPrecision] = [self, *others]  # type: ignore[list-item]
        new_weights = [w * wk for p, w in zip(parts, weights, strict=True) for wk in p.weights]
        if not others:  # scaling: the factors are unchanged
            input_cov, grad_cov = self.input_factors, self.grad_factors
        else:
            input_cov = {n: concat([p.input_factors[n] for p in parts]) for n in self.modules}
            grad_cov = {n: concat([p.grad_factors[n] for p in parts]) for n in self.modules}
        return type(self)(self.modules, self.mode, input_cov, grad_cov, new_weights, self._metadata)

    def rebase(self, model: nn.Module, adapter_name: str = "default") -> KroneckerPrecision:
        """The same factors for another adapter of the same base (see :meth:`Precision.rebase`)."""
        modules, mode = rebased_modules(self, model, adapter_name)
        return type(self)(
            modules,
            mode,
            self.input_factors,
            self.grad_factors,
            self.weights,
            rebased_metadata(self, model, adapter_name),
        )

    def _lora_B_term(self, b: LoraBlocks, dB: Tensor) -> Tensor:
        """``<dB, G_B dB C_u>``, summed over components."""
        return ((b.grad_mm(dB) @ b.lora_B_input_cov) * dB).sum()

    def _lora_A_term(self, b: LoraBlocks, dA: Tensor) -> Tensor:
        """``<dA, G_AA dA C_x>``, summed over components (``dA C_x = (C_x dA^T)^T``)."""
        dA_C = b.input_factor.mm(dA.T).transpose(-1, -2)
        return ((b.lora_A_grad_cov @ dA_C) * dA).sum()

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


def _tr(t: Tensor) -> Tensor:
    """Traces of a stack of square matrices (K, n, n) -> (K,), in float64."""
    return t.double().diagonal(dim1=-2, dim2=-1).sum(-1)


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

    def module_trace(self, name: str) -> float:
        """``sum_k tr(G_B,k) tr(C_u,k) + tr(G_AA,k) tr(C_x,k)`` (``tr(G (x) C) = tr G tr C``)."""
        b = self.blocks(name)
        tr_G_B = b.grad_scale.double().view(-1) * b.grad_factor.trace()
        trace = float((tr_G_B * _tr(b.lora_B_input_cov)).sum())
        if not b.b0_zero:
            trace += float((_tr(b.lora_A_grad_cov) * b.input_factor.trace()).sum())
        return trace


class TriKFACPrecision(KroneckerPrecision):
    """B-TRI-K-FAC: B-K-FAC plus the cross lora_A/lora_B blocks of each module."""

    structure = "tri-kfac"
    module_trace = KFACPrecision.module_trace  # the cross blocks are off the diagonal

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
        # grad_mm multiplies by s^2 w_k G_h: divide s^2 back out (V carries s already)
        UGU = U.T @ b.grad_mm(U) / spec.scaling**2
        VCV = V @ b.input_factor.mm(V.T)
        return (UGU * VCV).sum()

    def module_trace(self, name: str) -> float:
        """``sum_k w_k tr(G_k) tr(C_k)``: the trace over the merged update ``dW``."""
        w = torch.tensor(self.weights, dtype=torch.float64)
        G, C = self.grad_factors[name], self.input_factors[name]
        return float((w * G.trace() * C.trace()).sum())


def _as_factor(f: Tensor | Factor) -> Factor:
    return f if isinstance(f, Factor) else DenseFactor(f)


def _common_storage(factors: list[Factor]) -> dict[str, Any]:
    """The one storage of every factor (the rank of low rank: the largest ``k``)."""
    kinds = {(f.storage["format"], f.storage["dtype"]) for f in factors}
    if len(kinds) != 1:
        raise LaloraError(f"the factors of one precision must share one storage, got {kinds}")
    storage = dict(factors[0].storage)
    if storage["format"] == "lowrank":
        storage["rank"] = max(f.storage["rank"] for f in factors)
    return storage


def _map_shared(
    factors: Mapping[str, Factor],
    fn: Callable[[Factor], Factor],
    cache: dict[tuple, list[tuple[Factor, Factor]]] | None = None,
) -> dict[str, Factor]:
    """``{name: fn(factor)}``, computing ``fn`` once per distinct content.

    Factors equal tensor by tensor (the input factor of q/k/v, of gate/up) share one result.
    """
    cache = {} if cache is None else cache
    out = {}
    for name, f in factors.items():
        tensors = f.tensors("f", "x")
        candidates = cache.setdefault(_fingerprint(tensors), [])
        for seen, result in candidates:
            other = seen.tensors("f", "x")
            if seen is f or all(torch.equal(tensors[k], other[k]) for k in tensors):
                out[name] = result
                break
        else:
            out[name] = fn(f)
            candidates.append((f, out[name]))
    return out


def _fingerprint(tensors: Mapping[str, Tensor]) -> tuple:
    """Names, shapes, dtypes and 64 sampled entries: equal content implies equal prints."""
    parts: list[Any] = []
    for k in sorted(tensors):
        t = tensors[k].detach().reshape(-1)
        step = max(1, t.numel() // 64)
        parts += [k, tuple(t.shape), str(t.dtype), tuple(t[::step][:64].double().tolist())]
    return tuple(parts)
