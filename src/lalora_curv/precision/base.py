r"""The :class:`Precision` base class: a Laplace precision over the LoRA parameters.

A precision ``P`` of the LoRA parameters ``theta = {A, B}`` of every adapted module, with mode
``mu`` (the adapter's init ``A0, B0``), defines the penalty (Sliwa et al., "Mitigating Forgetting
in Low Rank Adaptation", ICML 2025)

.. math::

    r(\theta) = (\theta - \mu)^\top P\, (\theta - \mu),

added to the target loss as ``loss = nll + lam * r``. ``P`` is stored as the *mean* Fisher per
supervised source token (see :mod:`lalora_curv.statistics`), together with the counts; the
Laplace posterior precision of ``N`` source tokens is ``N P`` (plus a prior), so a target loss
averaged over ``M`` tokens pairs with ``lam = N / (2 M)`` in the Laplace view, and a ``lam``
tuned on one data size carries over to another.

Parameter order (``param_names``, ``to_dense``): modules in model order, per module lora_A then
lora_B, each flattened row-major (``tensor.flatten()``).

Subclasses implement a structure: the per-module quadratic form, its dense block, and the
tensors <-> metadata pair; this class derives the rest (penalty, sums, scaling, saving).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lalora_curv.adapter import (
    LoraModuleSpec,
    adapter_config,
    adapter_mode,
    find_lora_modules,
    match_modules,
    whole,
)
from lalora_curv.errors import IncompatiblePrecisionError, LaloraError
from lalora_curv.precision.factors import (
    DENSE_DTYPES,
    STORAGE_PRESETS,
    STORAGES,
    dense_storage,
    resolve_storage,
)
from lalora_curv.precision.metadata import PrecisionMetadata
from lalora_curv.statistics import LoraStatistics
from lalora_curv.timestamps import utc_now

#: every structure by name, filled by the classes themselves (:meth:`Precision.__init_subclass__`):
#: the one list of structures that fitting, loading, the backends and the command line read
REGISTRY: dict[str, type[Precision]] = {}

#: what :meth:`Precision.fit` is given to run a pass over the batches: ``collect(needs,
#: **extra) -> LoraStatistics`` (``extra``: e.g. EKFAC's ``rotations``)
Collect = Callable[..., LoraStatistics]


class Precision(ABC):
    """A precision (curvature) of LoRA parameters with its mode, penalty and artifact.

    A structure is a subclass with a ``structure`` name: defining it registers the class
    (:data:`REGISTRY`), and the class says what it is fitted from (:meth:`needs`,
    :attr:`estimators`, :attr:`granularities`) and how (:meth:`from_statistics`, or
    :meth:`fit` for several passes); nothing else names it.

    A precision is built by :func:`~lalora_curv.fit_precision` (the isotropic controls by
    :func:`~lalora_curv.isotropic_precision`), loaded by :func:`~lalora_curv.load_precision`, or
    constructed from ``modules``, ``mode``, the structure's own tensors (and, for the K-FAC
    family, its component weights) and ``metadata``, which is checked against
    :class:`~lalora_curv.precision.metadata.PrecisionMetadata`.

    Attributes:
        modules: the adapted modules, in model order.
        mode: ``{param name: tensor}``, the mode ``mu`` (adapter weights at fitting time).
    """

    structure: ClassVar[str]
    #: the Fisher estimators the structure is defined for (``fit_precision(estimator=...)``)
    estimators: ClassVar[tuple[str, ...]] = ("empirical", "mc")
    #: ``"token"`` (per-token, "expand" statistics) and, for diagonals, ``"sequence"``
    granularities: ClassVar[tuple[str, ...]] = ("token",)
    #: passes over the batches a fit makes (more than one needs a re-iterable, not an iterator)
    passes: ClassVar[int] = 1
    #: the penalty is a quadratic form in ``theta - mu`` (False for the merged-update forms)
    quadratic: ClassVar[bool] = True
    #: the statistics live on the base layer, so the precision serves any adapter of the base
    rebasable: ClassVar[bool] = False
    #: the storages :meth:`with_storage` offers (:data:`~lalora_curv.precision.factors.STORAGES`)
    storages: ClassVar[tuple[str, ...]] = tuple(DENSE_DTYPES)
    #: why the structure has no ``"lowrank"`` storage (empty where it has one)
    lowrank_refusal: ClassVar[str] = ""
    #: the precision is estimated from source data (False for the isotropic controls)
    fitted: ClassVar[bool] = True
    #: fits on different data pool with ``+`` (False for EKFAC: each fit has its own
    #: eigenbasis; :func:`~lalora_curv.fit_pooled_precision` fits it once on all the sources)
    poolable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register every class that names a structure (a shared base names none)."""
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("structure")
        if isinstance(name, str):
            REGISTRY[name] = cls

    # ------------------------------------------------------------------ fitting
    @classmethod
    def needs(cls, estimator: str, granularity: str) -> frozenset[str]:
        """The statistics a pass over the batches must accumulate for this structure.

        :class:`~lalora_curv.statistics.ModuleSums` fields, or ``"lora_A_grad"``/``"lora_B_grad"``
        for squares of summed gradients.
        """
        raise LaloraError(f"structure {cls.structure!r} is not fitted from data")

    @classmethod
    def required_statistics(cls, estimator: str, granularity: str) -> frozenset[str]:
        """Every statistic of every pass (a backend must offer them all).

        ``"rotated"``: the diagonal sums in another basis (EKFAC's second pass).
        """
        return cls.needs(estimator, granularity)

    @classmethod
    def from_statistics(
        cls,
        stats: LoraStatistics,
        specs: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        metadata: dict[str, Any],
    ) -> Precision:
        """The precision from one pass's token sums, normalised as every structure is.

        See :mod:`lalora_curv.precision`: input factors divided by the counted positions,
        everything built from gradients by the supervised tokens ``N``.
        """
        raise LaloraError(f"structure {cls.structure!r} is not fitted from data")

    @classmethod
    def fit(
        cls,
        collect: Collect,
        specs: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        metadata: dict[str, Any],
        estimator: str,
        granularity: str,
    ) -> Precision:
        """Fit the structure: one pass collecting :meth:`needs`, then :meth:`from_statistics`.

        EKFAC overrides it with its two passes.
        """
        stats = collect(cls.needs(estimator, granularity))
        return cls.from_statistics(stats, specs, mode, metadata)

    def __init__(
        self,
        modules: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        metadata: Mapping[str, Any],
    ) -> None:
        self.modules = dict(modules)
        self.mode = dict(mode)
        # every field checked and present (defaults filled): the one schema of the metadata
        self._metadata = PrecisionMetadata.from_json(
            {**dict(metadata), "structure": self.structure}, where=f"{self.structure} metadata"
        ).to_json()
        self._on_device: dict[torch.device, Precision] = {}
        self._resolved: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        missing = [n for n in self.param_names if n not in self.mode]
        if missing:
            raise LaloraError(f"the mode lacks parameter {missing[0]!r}")

    # ------------------------------------------------------------------ subclass surface
    @abstractmethod
    def _module_quad(self, spec: LoraModuleSpec, dA: Tensor, dB: Tensor) -> Tensor:
        """Penalty of one module at displacement ``(dA, dB)`` from the mode."""

    def _module_dense(self, spec: LoraModuleSpec) -> Tensor:
        """Dense precision block of one module (lora_A then lora_B, row-major)."""
        raise LaloraError(
            f"structure {self.structure!r} has a penalty of degree 4 in (A, B): no dense "
            "precision matrix exists; evaluate it with quad() or penalty()"
        )

    @abstractmethod
    def module_trace(self, name: str) -> float:
        """Trace of module ``name``'s precision block over its LoRA parameters.

        For the merged structures, which have no matrix over ``(A, B)``: over the merged update
        ``dW``.
        """

    def trace(self) -> float:
        """``tr(P) = sum over modules of`` :meth:`module_trace`: the precision's scale.

        E.g. ``trace() / num_params`` is its mean eigenvalue, which makes ``lam`` comparable
        across estimators and source data (``lam = c * num_params / trace()``).
        """
        return sum(self.module_trace(name) for name in self.modules)

    @abstractmethod
    def structure_tensors(self) -> dict[str, Tensor]:
        """The structure's tensors, keyed as in the artifact (mode tensors excluded)."""

    @classmethod
    @abstractmethod
    def from_tensors(
        cls,
        modules: Mapping[str, LoraModuleSpec],
        mode: Mapping[str, Tensor],
        tensors: Mapping[str, Tensor],
        metadata: Mapping[str, Any],
    ) -> Precision:
        """Inverse of :meth:`structure_tensors` (validates names and shapes)."""

    @abstractmethod
    def _weighted_sum(self, others: list[Precision], weights: list[float]) -> Precision:
        """``sum_i weights[i] * P_i`` over ``[self, *others]`` (compatibility checked)."""

    # ------------------------------------------------------------------ derived API
    @property
    def param_names(self) -> list[str]:
        """LoRA parameter names (peft's saved-adapter keys), in the order of ``to_dense``."""
        return [n for s in self.modules.values() for n in (s.lora_A_name, s.lora_B_name)]

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the artifact metadata (structure, estimator, counts, adapter, ...)."""
        return copy.deepcopy(self._metadata)

    @property
    def meta(self) -> PrecisionMetadata:
        """The metadata, typed (:class:`~lalora_curv.precision.metadata.PrecisionMetadata`)."""
        return PrecisionMetadata.from_json(self._metadata)

    @property
    def counts(self) -> dict[str, int]:
        """A copy of the fit's counts (positions, supervised tokens, sequences, batches)."""
        return dict(self._metadata.get("counts", {}))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the mode, in which penalties are computed."""
        return next(iter(self.mode.values())).dtype

    @property
    def device(self) -> torch.device:
        """The device of the mode."""
        return next(iter(self.mode.values())).device

    @property
    def num_params(self) -> int:
        """The number of LoRA parameters, ``r (D_in + D_out)`` summed over the modules."""
        return sum(s.rank * (s.in_features + s.out_features) for s in self.modules.values())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(structure={self.structure!r}, modules={len(self.modules)}, "
            f"params={self.num_params}, estimator={self._metadata.get('estimator')!r}, "
            f"supervised_tokens={self.counts.get('supervised_tokens')})"
        )

    def digest(self) -> str:
        """SHA-256 of what defines the penalty.

        The structure, the modules, the component weights and every tensor (names, dtypes,
        shapes, bytes); equal for a precision and its saved-and-loaded copy, different for any
        other (a checkpoint records it).
        """
        h = hashlib.sha256()
        head = {
            "structure": self.structure,
            "modules": [[n, s.to_json()] for n, s in self.modules.items()],
            "component_weights": self._metadata.get("component_weights"),
        }
        h.update(json.dumps(head, sort_keys=True).encode())
        tensors = self.all_tensors()
        for name in sorted(tensors):
            t = tensors[name].detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def all_tensors(self) -> dict[str, Tensor]:
        """Every tensor of the artifact: the structure's plus ``mode.<param name>``."""
        tensors = {f"mode.{n}": t for n, t in self.mode.items()}
        tensors.update(self.structure_tensors())
        return tensors

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Precision:
        """A copy with every tensor on ``device`` and/or in ``dtype``.

        A bfloat16 storage (:meth:`with_storage`) is kept as stored, the mode (the compute
        dtype) moves.
        """

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        def move_stored(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=None if t.dtype == torch.bfloat16 else dtype)

        meta = self.metadata
        if dtype is not None:
            meta["stats_dtype"] = str(dtype).removeprefix("torch.")
        return type(self).from_tensors(
            self.modules,
            {n: move(t) for n, t in self.mode.items()},
            {n: move_stored(t) for n, t in self.structure_tensors().items()},
            meta,
        )

    def _for_device(self, device: torch.device) -> Precision:
        if device == self.device:
            return self
        if device not in self._on_device:
            self._on_device[device] = self.to(device)
        return self._on_device[device]

    def quad(self, delta: Mapping[str, Tensor]) -> Tensor:
        """The penalty at ``theta = mu + delta``; for quadratic structures ``delta^T P delta``.

        Args:
            delta: ``{param name: displacement}`` for every name in :attr:`param_names`.
        """
        missing = [n for n in self.param_names if n not in delta]
        if missing:
            raise LaloraError(f"delta lacks parameter {missing[0]!r} ({len(missing)} missing)")
        extra = sorted(set(delta) - set(self.param_names))
        if extra:
            raise LaloraError(
                f"delta has parameter {extra[0]!r}, which the precision does not cover"
            )
        first = delta[self.param_names[0]]
        target = self._for_device(first.device)
        total: Tensor | None = None
        for spec in target.modules.values():
            dA, dB = delta[spec.lora_A_name], delta[spec.lora_B_name]
            for name, d in ((spec.lora_A_name, dA), (spec.lora_B_name, dB)):
                if d.shape != target.mode[name].shape:
                    raise LaloraError(
                        f"delta[{name!r}] has shape {tuple(d.shape)}, expected "
                        f"{tuple(target.mode[name].shape)}"
                    )
            term = target._module_quad(spec, dA.to(target.dtype), dB.to(target.dtype))
            total = term if total is None else total + term
        assert total is not None
        return total

    def penalty(self, model: nn.Module, adapter_name: str | None = None) -> Tensor:
        """Differentiable ``(theta - mu)^T P (theta - mu)`` at the model's current adapter.

        Raises:
            AdapterMismatchError: naming the first module of the model's adapter that does
                not match the precision (other modules, shapes, rank or scaling).
        """
        # FSDP2 shards are gathered differentiably: each rank gets its shard's gradient
        params = {n: whole(p) for n, p in self.adapter_params(model, adapter_name).items()}
        device = params[self.param_names[0]].device
        target = self._for_device(device)
        delta = {n: p.to(target.dtype) - target.mode[n] for n, p in params.items()}
        return target.quad(delta)

    def adapter_params(
        self, model: nn.Module, adapter_name: str | None = None
    ) -> dict[str, Tensor]:
        """``{param name: parameter}`` of the model's adapter, checked against the precision."""
        adapter = adapter_name or self._metadata.get("adapter", {}).get("name", "default")
        cached = self._resolved.get(model)
        if (
            cached is not None
            and cached[0] == adapter
            and all(
                adapter in h.layer.lora_A
                and h.layer.lora_A[adapter] is h.lora_A
                and h.layer.lora_B[adapter] is h.lora_B
                for h in cached[1].values()
            )
        ):  # the same modules still carry the adapter: skip the model traversal
            handles = cached[1]
        else:
            handles = find_lora_modules(model, adapter)
            match_modules(self.modules, handles, what=f"{self.structure} precision")
            self._resolved[model] = (adapter, handles)
        params = {}
        for spec in self.modules.values():
            h = handles[spec.name]
            params[spec.lora_A_name] = h.lora_A.weight
            params[spec.lora_B_name] = h.lora_B.weight
        return params

    def to_dense(self) -> Tensor:
        """The dense precision matrix (small models, quadratic structures), order param_names."""
        return torch.block_diag(*[self._module_dense(s) for s in self.modules.values()])

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: object) -> Precision:
        r"""Pooled precision of two source datasets.

        Counts add, and

        .. math:: P_{a+b} = (N_a P_a + N_b P_b) / (N_a + N_b)

        with ``N`` the supervised-token counts, so that ``(N_a + N_b) P_{a+b}`` is the sum of
        the two (sum-normalised) precisions, the paper's :math:`\sum_s \Lambda_s`.
        """
        if not isinstance(other, Precision):
            return NotImplemented
        self._check_compatible(other)
        n_a = self.counts.get("supervised_tokens", 0)
        n_b = other.counts.get("supervised_tokens", 0)
        if n_a + n_b > 0:
            pooling = [n_a / (n_a + n_b), n_b / (n_a + n_b)]
        elif self.fitted:
            raise IncompatiblePrecisionError("cannot pool precisions without supervised tokens")
        else:  # built from no data (the isotropic controls): the plain mean
            pooling = [0.5, 0.5]
        result = self._weighted_sum([other], pooling)
        meta = result._metadata
        meta["counts"] = {
            k: self.counts.get(k, 0) + other.counts.get(k, 0)
            for k in set(self.counts) | set(other.counts)
        }
        meta["sources"] = list(self._metadata.get("sources", [])) + list(
            other._metadata.get("sources", [])
        )
        meta["self_generated"] = list(self._metadata.get("self_generated", [])) + list(
            other._metadata.get("self_generated", [])
        )
        if "lora_B_init_zero" in self._metadata or "lora_B_init_zero" in other._metadata:
            # statistics of a model with a non-zero adapter update taint the sum (see rebase)
            meta["lora_B_init_zero"] = bool(self._metadata.get("lora_B_init_zero", True)) and bool(
                other._metadata.get("lora_B_init_zero", True)
            )
        meta["created"] = utc_now()
        scales = {self._metadata.get("scale", 1.0), other._metadata.get("scale", 1.0)}
        meta["scale"] = scales.pop() if len(scales) == 1 else None  # mixed: no single factor
        return result

    def __mul__(self, factor: object) -> Precision:
        """``factor * P`` (counts unchanged; ``metadata['scale']`` records the product)."""
        if not isinstance(factor, int | float) or isinstance(factor, bool):
            return NotImplemented
        if not (factor >= 0 and math.isfinite(factor)):
            raise LaloraError(
                f"a precision can only be scaled by a finite factor >= 0, got {factor}"
            )
        result = self._weighted_sum([], [float(factor)])
        scale = self._metadata.get("scale", 1.0)  # None: a sum of mixed scales stays mixed
        result._metadata["scale"] = None if scale is None else float(scale) * float(factor)
        return result

    __rmul__ = __mul__

    def _check_compatible(self, other: Precision) -> None:
        if type(other) is not type(self):
            raise IncompatiblePrecisionError(
                f"cannot add a {other.structure!r} precision to a {self.structure!r} precision"
            )
        for key in ("estimator",):
            if self._metadata.get(key) != other._metadata.get(key):
                raise IncompatiblePrecisionError(
                    f"cannot add precisions with different {key}: "
                    f"{self._metadata.get(key)!r} vs {other._metadata.get(key)!r}"
                )
        # per-token and per-sequence squared gradients are different statistics: a token-count
        # weighted mean of the two is neither (an artifact that does not record it passes)
        grains = {self._metadata.get("granularity"), other._metadata.get("granularity")}
        if len(grains - {None}) > 1:
            raise IncompatiblePrecisionError(
                f"cannot add precisions with different granularity: "
                f"{self._metadata.get('granularity')!r} vs {other._metadata.get('granularity')!r}"
                " (fit both per token or both per sequence)"
            )
        names = list(self.modules)
        if names != list(other.modules):
            diff = sorted(set(names) ^ set(other.modules)) or names
            raise IncompatiblePrecisionError(
                f"cannot add precisions over different modules (first difference: {diff[0]!r})"
            )
        for name, spec in self.modules.items():
            if spec != other.modules[name]:
                raise IncompatiblePrecisionError(
                    f"cannot add precisions: module {name!r} differs ({spec} vs "
                    f"{other.modules[name]})"
                )
        for name, t in self.mode.items():
            if not torch.equal(t, other.mode[name].to(t.device, t.dtype)):
                hint = (
                    " (rebase both onto the same adapter first)"
                    if self.rebasable
                    else " (refit on the same adapter)"
                )
                raise IncompatiblePrecisionError(
                    f"cannot add precisions with different modes: {name!r} differs{hint}"
                )

    # ------------------------------------------------------------------ adapters
    def rebase(self, model: nn.Module, adapter_name: str = "default") -> Precision:
        """The same curvature for another adapter (rank, alpha, seed or init) of the same base.

        Only structures whose statistics live on the base layer can do this (the K-FAC family
        and merged-diag); the new mode is the adapter's current weights, so call it right after
        creating the adapter.
        """
        raise LaloraError(
            f"a {self.structure!r} precision depends on the adapter it was fitted with and "
            "cannot be re-based; refit it, or fit a K-FAC precision, which can"
        )

    def recentred(self, mode: Mapping[str, Tensor]) -> Precision:
        """The same statistics around another point ``mode`` of the same adapter.

        For the structures whose quadratic form lives in LoRA space (diag, ekfac) this keeps
        ``P`` and moves ``mu``: ``(theta - mode)^T P (theta - mode)``, the online-EWC step.
        For the structures built from base-layer statistics (the K-FAC family, merged-diag) the
        LoRA-space blocks are derived again at ``mode``: e.g. the K-FAC (A, A) block
        ``(B^T G B) (x) C`` is no longer zero once ``B != 0``, so moves of ``A`` that change the
        function on the source data are penalised too (docs/math.md, "sequential tasks").

        Args:
            mode: ``{param name: tensor}`` for every name in :attr:`param_names`, each of the
                mode's shape (e.g. another precision's ``.mode`` on the same adapter).
        """
        missing = [n for n in self.param_names if n not in mode]
        extra = sorted(set(mode) - set(self.param_names))
        if missing or extra:
            name = missing[0] if missing else extra[0]
            where = "lacks" if missing else "has extra"
            raise IncompatiblePrecisionError(
                f"cannot recentre: the new mode {where} parameter {name!r} (another adapter?)"
            )
        new_mode = {}
        for name, old in self.mode.items():
            t = mode[name]
            if tuple(t.shape) != tuple(old.shape):
                raise IncompatiblePrecisionError(
                    f"cannot recentre: {name!r} has shape {tuple(t.shape)} in the new mode, "
                    f"{tuple(old.shape)} in the precision (another rank?)"
                )
            if not bool(torch.isfinite(t).all()):
                raise LaloraError(f"cannot recentre: the new mode's {name!r} is not finite")
            new_mode[name] = t.detach().to(old.device, old.dtype).clone()
        meta = self.metadata
        meta["recentred"] = True
        return type(self).from_tensors(self.modules, new_mode, self.structure_tensors(), meta)

    @classmethod
    def check_storage(cls, storage: str, rank: int | None = None) -> None:
        """Raise :class:`LaloraError` unless :meth:`with_storage` accepts ``(storage, rank)``.

        The error names the problem; the check is for this structure and needs no fitted
        precision. A preset (:data:`~lalora_curv.precision.factors.STORAGE_PRESETS`) counts as
        what it names.
        """
        storage, rank = resolve_storage(storage, rank)
        if storage not in STORAGES:
            valid = ", ".join([*STORAGES, *STORAGE_PRESETS])
            raise LaloraError(f"unknown storage {storage!r}; valid: {valid}")
        if storage not in cls.storages:
            raise LaloraError(
                f"a {cls.structure!r} precision has no storage {storage!r}: "
                f"{cls.lowrank_refusal}; valid: {', '.join(cls.storages)}"
            )
        if storage == "lowrank":
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise LaloraError(f"storage 'lowrank' needs an integer rank >= 1, got {rank!r}")
        elif rank is not None:
            raise LaloraError(f"rank applies to storage 'lowrank' only, not {storage!r}")

    @property
    def storage(self) -> dict[str, Any]:
        """How the structure's tensors are stored: ``{"format", "dtype"[, "rank"]}``."""
        return dict(self._metadata["storage"])

    def _record_storage(self) -> None:
        """Set ``metadata["storage"]`` from the structure's tensors (all in one dtype)."""
        self._metadata["storage"] = dense_storage(self.structure_tensors().values())

    def with_storage(self, storage: str, rank: int | None = None) -> Precision:
        """The same precision with its structure tensors in another storage.

        Every structure offers the dense storages ``"float32"``, ``"float64"`` and
        ``"bfloat16"``: each tensor (diagonal, EKFAC eigenbasis or eigenvalue) rounded to the
        nearest number of that dtype, ``|x~ - x| <= u |x|`` with ``u = 2^-8`` for bfloat16
        (half the bytes of float32). Penalties are computed in the mode's dtype, so only
        that rounding is lost: for the diagonal structures, whose penalty is
        ``sum_i D_i v_i^2`` with ``D_i >= 0``, the penalty moves by at most ``u`` relative.
        The K-FAC family adds ``"lowrank"`` with ``rank``
        (:meth:`KroneckerPrecision.with_storage`); invalid choices raise as
        :meth:`check_storage` says.
        """
        self.check_storage(storage, rank)
        storage, rank = resolve_storage(storage, rank)
        target = DENSE_DTYPES[storage]
        tensors = {n: t.to(target) for n, t in self.structure_tensors().items()}
        return type(self).from_tensors(self.modules, self.mode, tensors, self._metadata)


def rebased_modules(
    prec: Precision, model: nn.Module, adapter_name: str
) -> tuple[dict[str, LoraModuleSpec], dict[str, Tensor]]:
    """The model adapter's module specs and mode, checked against the base-layer shapes.

    The base-layer statistics are those of the model *with* the fitted adapter; they describe
    the base model alone only when that adapter was a no-op (``B0 = 0``, the default init).
    """
    if prec.fitted and prec.metadata.get("lora_B_init_zero") is False:
        raise LaloraError(
            "cannot rebase: this precision was fitted with a non-zero lora_B (B0 != 0), so its "
            "statistics include that adapter's update s B0 A0; refit on the new adapter, or "
            "fit at a zero-B init to get a portable precision"
        )
    handles = find_lora_modules(model, adapter_name)
    for name in sorted(set(handles) | set(prec.modules)):
        if name not in handles or name not in prec.modules:
            where = "the model" if name not in handles else "the precision"
            raise LaloraError(f"cannot rebase: module {name!r} is missing from {where}")
        old, new = prec.modules[name], handles[name].spec
        if (old.in_features, old.out_features) != (new.in_features, new.out_features):
            raise LaloraError(
                f"cannot rebase: module {name!r} is {new.out_features}x"
                f"{new.in_features} in the model, {old.out_features}x"
                f"{old.in_features} in the precision (another base model?)"
            )
    modules = {name: handles[name].spec for name in prec.modules}
    mode = adapter_mode({n: handles[n] for n in prec.modules}, prec.dtype)
    mode = {n: t.to(prec.device) for n, t in mode.items()}
    return modules, mode


def rebased_metadata(prec: Precision, model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """``prec``'s metadata for its copy re-based onto the model's adapter ``adapter_name``."""
    meta = prec.metadata
    meta["adapter"] = adapter_config(model, adapter_name)
    # "lora_B_init_zero" says where the statistics were measured (rebase refuses B0 != 0), and
    # they are unchanged: a B0 = 0 fit moved onto a B0 != 0 adapter (PiSSA) stays portable
    meta["rebased"] = True
    return meta
