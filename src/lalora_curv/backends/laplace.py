"""The ``laplace`` backend (laplace-torch) and the export of a precision to laplace-torch.

laplace-torch (Daxberger et al., NeurIPS 2021) is the reference library for Laplace
approximations. Fitting: its ``KronLaplace`` on the LoRA parameters (only those require a
gradient during the fit), with curvlinops as its curvature backend (``CurvlinopsEF`` for the
empirical Fisher, ``CurvlinopsGGN(stochastic=True)`` for the MC Fisher), on dict batches whose
model wrapper returns the supervised logits. Each unpadded piece of a batch (see
:func:`lalora_curv.backends.curvlinops.unpadded_pieces`) is fitted as a data set of one item,
and its Kronecker factors, read from the public ``H_facs``, are converted into our raw sums.

Known limitations of laplace-torch in this setting, handled here and worth knowing when using
it directly on language models:

* it rescales the input factor of every mini-batch by ``len(y) / len(dataset)``, mixing token
  counts (``y``) with sequence counts (the data set), so for token-level language modelling
  its ``H`` is off by the number of supervised tokens per sequence;
* its ``Kron + Kron`` adds factors (a product of sums, not a sum of products);
* its model output must be 2-D, so prompt tokens and padding count unless the model masks them
  (our wrapper does), and its GGN default is the type-2 Fisher (one backward per vocabulary
  entry, biased for causal LMs), which is why ``mc`` maps to ``CurvlinopsGGN(stochastic=True)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lalora_curv.adapter import LoraHandle
from lalora_curv.backends.common import (
    FitRequest,
    SupervisedLogits,
    check_labels,
    derive_seed,
    fit_loop,
    fitting_state,
    hooks_restored,
    input_sums,
    only_lora_trainable,
    unpadded_pieces,
)
from lalora_curv.batches import PreparedBatch
from lalora_curv.errors import LaloraError
from lalora_curv.statistics import LoraStatistics, ModuleSums

_WARNED = [False]


def _warn_limitations() -> None:
    if not _WARNED[0]:
        _WARNED[0] = True
        warnings.warn(
            "backend 'laplace': laplace-torch's KronLaplace, used directly on a language model, "
            "rescales each batch's input factor by len(y)/len(dataset) (tokens over sequences), "
            "adds Kron factors across batches (a product of sums) and counts every output "
            "position it is given; lalora-curv feeds it supervised logits only, one unpadded "
            "piece at a time, and undoes the rescaling",
            stacklevel=3,
        )


def _lora_module_order(wrapper: nn.Module, handles: dict[str, LoraHandle]) -> list[tuple[str, str]]:
    """(module name, "A"/"B") in laplace-torch's factor order (the model's module order)."""
    which = {}
    for name, h in handles.items():
        which[id(h.lora_A)] = (name, "A")
        which[id(h.lora_B)] = (name, "B")
    return [which[id(m)] for _, m in wrapper.named_modules() if id(m) in which]


def collect_statistics(
    model: nn.Module,
    handles: dict[str, LoraHandle],
    batches: Iterable[Mapping[str, Tensor]],
    request: FitRequest,
) -> LoraStatistics:
    """Base K-FAC sums computed by laplace-torch's ``KronLaplace``."""
    estimator, mc_samples, seed, dtype = (
        request.estimator,
        request.mc_samples,
        request.seed,
        request.dtype,
    )
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    wrapper = SupervisedLogits(model)
    order = _lora_module_order(wrapper, handles)
    sums = {name: ModuleSums() for name in handles}
    device = next(iter(handles.values())).lora_A.weight.device
    pieces_seen = [0]

    def process(batch: PreparedBatch, index: int) -> None:
        for X, y, positions in unpadded_pieces(batch, "laplace"):
            check_labels(y, model, index)
            if y.numel() == 0:  # laplace-torch scales this piece's input factor by len(y) = 0
                for name, x_sum in input_sums(model, handles, X, dtype).items():
                    sums[name].add("input_cov", x_sum)
                continue
            size = X["input_ids"].shape[0]
            kwargs: dict[str, Any] = {
                "seed": derive_seed(seed, "piece", pieces_seen[0]) % 2**31,
                "num_per_example_loss_terms": max(1, y.numel() // size),
            }
            if estimator == "mc":
                backend, backend_kwargs = CurvlinopsGGN, {"stochastic": True}
                kwargs["mc_samples"] = mc_samples
            else:
                backend, backend_kwargs = CurvlinopsEF, {}
            pieces_seen[0] += 1
            la = KronLaplace(
                wrapper,
                "classification",
                backend=backend,
                backend_kwargs=backend_kwargs,
                asdl_fisher_kwargs=kwargs,
            )
            la.fit(torch.utils.data.DataLoader([{**X, "labels": y}], batch_size=None))
            kfacs = la.H_facs.kfacs
            if len(kfacs) != len(order):
                raise LaloraError(
                    f"laplace-torch returned {len(kfacs)} factor pairs for {len(order)} LoRA layers"
                )
            for (name, which), (grad_f, input_f) in zip(order, kfacs, strict=True):
                s = handles[name].spec.scaling
                if which == "A":  # input factor: mean over positions, times len(y) / 1
                    sums[name].add("input_cov", input_f.to(dtype) / y.numel() * positions)
                else:  # gradient factor of lora_B: sum over tokens of (s g)(s g)^T
                    sums[name].add("grad_cov", grad_f.to(dtype) / s**2)

    _warn_limitations()
    with fitting_state(model, handles), only_lora_trainable(model, handles), hooks_restored(model):
        stats = fit_loop(batches, process, device, request)
    stats.modules = sums
    return stats
