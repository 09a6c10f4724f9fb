"""``fit_precision``: stage 1 of LALoRA, a Laplace precision of the LoRA parameters."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lalora_curv import checks
from lalora_curv._version import __version__
from lalora_curv.adapter import (
    adapter_config,
    adapter_mode,
    base_model_info,
    check_active,
    eager_model,
    find_lora_modules,
    unpenalised_trainables,
)
from lalora_curv.backends import resolve_backend
from lalora_curv.backends.common import FitRequest, derive_seed
from lalora_curv.distributed import rank, world_size
from lalora_curv.errors import CurvatureError, LaloraError
from lalora_curv.precision import REGISTRY, Precision
from lalora_curv.statistics import LoraStatistics
from lalora_curv.timestamps import utc_now

logger = logging.getLogger("lalora_curv")


def fit_precision(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    structure: str = "kfac",
    backend: str = "hooks",
    estimator: str = "empirical",
    mc_samples: int = 1,
    adapter_name: str = "default",
    max_batches: int | None = None,
    progress: bool = True,
    *,
    seed: int = 0,
    stats_dtype: torch.dtype = torch.float32,
    sources: Sequence[str] | str | None = None,
    granularity: str | None = None,
    allow_unpenalised: bool = False,
) -> Precision:
    """Fit a Laplace precision of the LoRA parameters of ``model`` on source ``batches``.

    The mode ``mu`` is the adapter's current weights (its init). The loss behind the curvature
    is the sum of per-token negative log-likelihoods over supervised tokens; the precision is
    its token-level Fisher divided by the number of supervised tokens ``N`` (see
    :mod:`lalora_curv.precision`).

    Under ``torch.distributed`` every rank passes its own shard of the batches; the sums and
    counts are all-reduced, so every rank gets the precision of all the data (MC labels are
    drawn from a seed derived from ``(seed, rank)``).

    Args:
        model: a Hugging Face causal LM with a peft LoRA adapter (any module whose forward
            takes ``input_ids``/``attention_mask`` and returns logits works).
        batches: iterable of dicts with ``input_ids``, optional ``attention_mask``, ``labels``
            (-100 = no loss).
        structure: ``"diag"``, ``"kfac"``, ``"tri-kfac"``, ``"merged-kfac"``,
            ``"merged-diag"`` or ``"ekfac"`` (two passes over ``batches``).
        backend: statistics backend: ``"hooks"`` (ours), ``"curvlinops"``, ``"backpack"`` or
            ``"laplace"`` (see :mod:`lalora_curv.backends` for what each supports).
        estimator: ``"empirical"`` (true labels), ``"mc"`` (labels drawn from the model,
            ``mc_samples`` draws) or, for ``structure="diag"`` only, ``"batch-grad-squared"``
            (the paper's squared mini-batch gradients).
        mc_samples: label draws per supervised token for ``estimator="mc"``.
        adapter_name: the peft adapter to fit.
        max_batches: stop after this many batches.
        progress: show a progress bar.
        seed: seed of the Monte-Carlo label draws.
        stats_dtype: accumulation dtype (float32 or float64), whatever the model's dtype.
        sources: names of the source data, recorded in the metadata (default
            ``["self-generated"]`` for :func:`~lalora_curv.self_generated_batches`, whose
            sampling settings go to ``metadata["self_generated"]``).
        granularity: ``"token"`` (per-token, "expand" statistics) or, for diagonals,
            ``"sequence"`` (squares of per-sequence gradients); ``None`` takes the backend's
            own (``"sequence"`` for BackPACK, ``"token"`` otherwise).
        allow_unpenalised: fit although the model trains tensors the precision does not
            cover (see :func:`~lalora_curv.adapter.unpenalised_trainables`; refused by
            default); their names go to ``metadata["unpenalised"]``, and :func:`lalora_curv.train`
            accepts exactly those.

    Returns:
        A :class:`~lalora_curv.precision.Precision` of the requested structure.
    """
    spec, granularity = _check_arguments(
        batches, structure, backend, estimator, mc_samples, granularity, stats_dtype,
        max_batches, seed, adapter_name, progress, sources, allow_unpenalised,
    )  # fmt: skip
    model = eager_model(model)  # a torch.compile'd model is fitted through its eager module
    handles = find_lora_modules(model, adapter_name)
    check_active(model, adapter_name)
    unpenalised = unpenalised_trainables(model, handles)
    if unpenalised and not allow_unpenalised:
        raise LaloraError(
            f"the model trains {len(unpenalised)} tensors that a LoRA precision does not cover "
            f"({', '.join(unpenalised[:3])}{', ...' if len(unpenalised) > 3 else ''}: "
            "modules_to_save copies, LoRA biases, trainable token rows or another adapter's "
            "weights), which the penalty would leave free to drift; freeze them "
            "(requires_grad_(False)), or pass allow_unpenalised=True to fit anyway (the "
            "artifact records their names)"
        )
    mode = adapter_mode(handles, stats_dtype)
    b0_zero = all(not bool(t.any()) for n, t in mode.items() if n.endswith("lora_B.weight"))
    if b0_zero and structure != "merged-diag":
        logger.info(
            "lora_B is zero at the mode (default LoRA init): the lora_A and cross "
            "blocks of the precision are exactly zero; only lora_B carries curvature"
        )
    provenance = getattr(batches, "provenance", None)  # lc.self_generated_batches
    if isinstance(sources, str):
        sources = [sources]
    if sources is None and provenance is not None:
        sources = ["self-generated"]
    metadata: dict[str, Any] = {
        "backend": backend,
        "estimator": estimator,
        "granularity": granularity,
        "mc_samples": mc_samples,
        "seed": seed,
        "adapter": adapter_config(model, adapter_name),
        "base_model": base_model_info(model),
        "sources": list(sources or []),
        "self_generated": [provenance] if provenance is not None else [],
        "created": utc_now(),
        "library_version": __version__,
        "lora_B_init_zero": b0_zero,
        "stats_dtype": str(stats_dtype).removeprefix("torch."),
        "scale": 1.0,
        "unpenalised": unpenalised,
    }
    cls = REGISTRY[structure]
    if cls.passes > 1 and iter(batches) is batches:  # type: ignore[comparison-overlap]
        raise LaloraError(
            f"structure {structure!r} makes {cls.passes} passes over the batches: pass a list "
            "or a DataLoader, not an iterator"
        )
    request = FitRequest(
        backend=backend,
        needs=frozenset(),
        estimator=estimator,
        mc_samples=mc_samples,
        seed=seed,
        max_batches=max_batches,
        progress=progress and rank() == 0,
        dtype=stats_dtype,
        granularity=granularity,
        vocab_size=getattr(getattr(model, "config", None), "vocab_size", None),
    )
    collect = _Passes(spec.collector(), model, handles, batches, request, metadata)
    specs = {name: h.spec for name, h in handles.items()}
    return cls.fit(collect, specs, mode, metadata, estimator, granularity)


def fit_pooled_precision(
    model: nn.Module,
    batches_by_source: Mapping[str, Sequence[Mapping[str, Tensor]]],
    structure: str = "kfac",
    **fit: Any,
) -> Precision:
    r"""The precision of several source datasets pooled: the paper's :math:`\sum_s \Lambda_s`.

    One :func:`fit_precision` per source, named after its key, summed with ``+``:

    .. math:: P = \sum_s N_s P_s / \sum_s N_s

    (``N_s`` the supervised tokens of source ``s``): the mean Fisher per supervised token of
    all the sources. A structure whose fits cannot be added (``Precision.poolable`` is False:
    EKFAC, each fit in its own eigenbasis) is instead fitted once on every source's batches,
    which estimates the same mean Fisher in one basis.

    Args:
        model: as for :func:`fit_precision`.
        batches_by_source: ``{source name: its batches}``, each a sequence (EKFAC joins them).
        structure: as for :func:`fit_precision`.
        **fit: the other arguments of :func:`fit_precision`, but ``sources`` (the keys) and
            ``max_batches`` (per source or in all would differ: slice the batches instead).

    Returns:
        The pooled precision, its ``metadata["sources"]`` the keys in order.
    """
    for name in ("sources", "max_batches"):
        if name in fit:
            raise LaloraError(
                f"fit_pooled_precision takes no {name!r}: the sources are the keys of "
                "batches_by_source, and each source's batches are fitted whole (slice them)"
            )
    if not batches_by_source:
        raise LaloraError("batches_by_source is empty: pass at least one source's batches")
    cls = REGISTRY.get(structure) if isinstance(structure, str) else None
    if cls is not None and not cls.poolable:  # (a bad name: fit_precision names the problem)
        joined = [b for batches in batches_by_source.values() for b in batches]
        return fit_precision(model, joined, structure, sources=list(batches_by_source), **fit)
    pooled: Precision | None = None
    for name, batches in batches_by_source.items():
        p = fit_precision(model, batches, structure, sources=[name], **fit)
        pooled = p if pooled is None else pooled + p
    assert pooled is not None
    return pooled


def _check_arguments(
    batches, structure, backend, estimator, mc_samples, granularity, stats_dtype, max_batches,
    seed, adapter_name, progress, sources, allow_unpenalised,
):  # fmt: skip
    """Check every argument of :func:`fit_precision`.

    A :class:`LaloraError` names the first wrong one; returns the backend's spec and the
    resolved granularity.
    """
    for name, value in (("structure", structure), ("backend", backend), ("estimator", estimator)):
        checks.string(name, value)
    spec, granularity = resolve_backend(backend, structure, estimator, granularity)
    checks.integer("mc_samples", mc_samples, 1)
    if mc_samples != 1 and estimator != "mc":
        raise LaloraError(f"mc_samples={mc_samples} applies only to estimator='mc'")
    if stats_dtype not in (torch.float32, torch.float64):
        raise LaloraError(f"stats_dtype must be torch.float32 or torch.float64, got {stats_dtype}")
    checks.integer("max_batches", max_batches, 1, optional=True)
    checks.integer("seed", seed)
    checks.string("adapter_name", adapter_name)
    checks.boolean("progress", progress)
    checks.boolean("allow_unpenalised", allow_unpenalised)
    if sources is not None and not (
        isinstance(sources, str)
        or (isinstance(sources, Sequence) and all(isinstance(x, str) and x for x in sources))
    ):
        raise LaloraError(f"sources must be a name or a list of names, got {sources!r}")
    if batches is None or isinstance(batches, Mapping) or not isinstance(batches, Iterable):
        raise LaloraError(
            "batches must be an iterable of batch dicts (a list or a DataLoader), got "
            f"{type(batches).__name__}"
        )
    return spec, granularity


class _Passes:
    """One pass over the batches collecting what a structure ``needs``.

    A structure's :meth:`~lalora_curv.precision.Precision.fit` calls it once per pass: the
    backend's statistics, summed over ranks under ``torch.distributed``, checked (supervised
    tokens, finite), the first pass's counts recorded in ``metadata``.
    """

    def __init__(self, collector, model, handles, batches, request: FitRequest, metadata) -> None:
        self.collector, self.model, self.handles = collector, model, handles
        self.batches, self.request, self.metadata = batches, request, metadata
        self.device = next(iter(handles.values())).lora_A.weight.device

    def __call__(
        self,
        needs: frozenset[str],
        pass_number: int = 1,
        rotations: dict[str, dict[str, Tensor]] | None = None,
    ) -> LoraStatistics:
        seed, dtype = self.request.seed, self.request.dtype
        pass_seed = seed if pass_number == 1 else derive_seed(seed, "pass", pass_number)
        if rotations is not None:
            rotations = {
                n: {k: q.to(self.device, dtype) for k, q in b.items()} for n, b in rotations.items()
            }
        request = dataclasses.replace(
            self.request,
            needs=needs,
            seed=derive_seed(pass_seed, "rank", rank()) if world_size() > 1 else pass_seed,
            rotations=rotations,
        )
        stats = self.collector(self.model, self.handles, self.batches, request)
        if world_size() > 1:  # each rank saw its shard: sum the sums and counts
            keys = {"lora_A_grad": "lora_A_diag", "lora_B_grad": "lora_B_diag"}
            stats.all_reduce(
                {n: _shapes(h.spec) for n, h in self.handles.items()},
                {keys.get(k, k) for k in needs},
                dtype,
                self.device,
            )
        if stats.supervised_tokens == 0:
            raise CurvatureError(
                f"no supervised token in {stats.batches} batches (all labels -100 "
                "or padding): nothing to fit"
            )
        stats.check_finite()
        if pass_number == 1:
            self.metadata["counts"] = stats.counts()
        return stats


def _shapes(spec) -> dict[str, tuple[int, ...]]:
    return {
        "input_cov": (spec.in_features,) * 2,
        "grad_cov": (spec.out_features,) * 2,
        "lora_A_diag": (spec.rank, spec.in_features),
        "lora_B_diag": (spec.out_features, spec.rank),
        "weight_diag": (spec.out_features, spec.in_features),
    }
