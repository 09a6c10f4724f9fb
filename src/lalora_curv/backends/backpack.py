r"""The ``backpack`` backend: per-sequence diagonal curvature from BackPACK's ``SumGradSquared``.

BackPACK (Dangel, Kunstner, Hennig, ICLR 2020) extends modules with hooks that compute
per-sample quantities during the backward pass. Its first-order extensions work on the LoRA
``Linear`` layers of a transformer (only these are extended): with inputs of shape
(batch, seq, features), a sample is a *sequence*, so ``SumGradSquared`` gives

.. math:: \sum_b \Big(\sum_t \nabla_\theta \ell_{b,t}\Big)^{\odot 2}

for the summed NLL: the per-sequence empirical Fisher with true labels, and with labels drawn
from the model (the same seeded sampler as the hooks backend) an unbiased per-sequence estimate
of diag(GGN). Divided by the number of supervised tokens it is ``structure="diag"`` with
``granularity="sequence"``.

BackPACK's second-order extensions (DiagGGNExact, DiagGGNMC) cannot run on a Llama: RMSNorm,
rotary embeddings, attention and SiLU gating are not supported modules; they are not offered.
The extension hooks are removed and parameter gradients restored after the fit.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lalora_curv.adapter import LoraHandle
from lalora_curv.backends.common import (
    FitRequest,
    check_finite_loss,
    fit_loop,
    fitting_state,
    loss_labels,
    model_logits,
    only_lora_trainable,
    supervised_logits,
)
from lalora_curv.batches import PreparedBatch
from lalora_curv.statistics import LoraStatistics, ModuleSums


@contextlib.contextmanager
def extended(modules: list[nn.Module]) -> Iterator[None]:
    """BackPACK-extend ``modules`` for the duration of the block, then remove every trace.

    BackPACK has no public way to undo ``extend``: this deletes the hooks it added from torch's
    per-module hook dictionaries (fragile if BackPACK changes how it registers them; the test
    ``test_backpack_leaves_no_trace`` watches).
    """
    from backpack import extend, memory_cleanup

    before = [
        (
            m,
            set(m._forward_hooks),
            set(m._backward_hooks),
            getattr(m, "_is_full_backward_hook", None),
        )
        for m in modules
    ]
    try:
        for m in modules:
            extend(m)
        yield
    finally:
        for m, fwd, bwd, full in before:
            for key in set(m._forward_hooks) - fwd:
                del m._forward_hooks[key]
            for key in set(m._backward_hooks) - bwd:
                del m._backward_hooks[key]
            m._is_full_backward_hook = full
            if hasattr(m, "_backpack_extend"):
                delattr(m, "_backpack_extend")
            memory_cleanup(m)


def collect_statistics(
    model: nn.Module,
    handles: dict[str, LoraHandle],
    batches: Iterable[Mapping[str, Tensor]],
    request: FitRequest,
) -> LoraStatistics:
    """Per-sequence squared-gradient sums of every LoRA parameter, computed by BackPACK."""
    estimator, seed, dtype = request.estimator, request.seed, request.dtype
    from backpack import backpack
    from backpack.extensions import SumGradSquared

    sums = {name: ModuleSums() for name in handles}
    params = [p for h in handles.values() for p in (h.lora_A.weight, h.lora_B.weight)]
    device = params[0].device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = request.samples

    def process(batch: PreparedBatch, index: int) -> None:
        all_logits = model_logits(model, batch)
        logits = supervised_logits(all_logits, batch)
        labels = loss_labels(all_logits, batch, index, estimator, samples, generator)
        for k in range(samples):
            loss = F.cross_entropy(logits, labels[k], reduction="sum")
            check_finite_loss(loss, index)
            last = k == samples - 1
            with backpack(SumGradSquared(), retain_graph=not last), warnings.catch_warnings():
                # lora_A's input needs no gradient; BackPACK's module hooks still see g_out
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward(retain_graph=not last)
            for name, h in handles.items():
                for key, weight in (
                    ("lora_A_diag", h.lora_A.weight),
                    ("lora_B_diag", h.lora_B.weight),
                ):
                    sums[name].add(key, weight.sum_grad_squared.to(dtype) / samples)
                    del weight.sum_grad_squared
            for p in params:
                p.grad = None

    modules = [m for h in handles.values() for m in (h.lora_A, h.lora_B)]
    # only the LoRA weights require grad (and get .grad, restored afterwards): a plain backward
    # then reaches every LoRA layer, also with trainable base weights or input gradients on
    with fitting_state(model, handles), only_lora_trainable(model, handles), extended(modules):
        stats = fit_loop(batches, process, device, request)
    stats.modules = sums
    return stats
