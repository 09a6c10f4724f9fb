r"""MIGU: update only the output rows of each adapted layer with the largest output magnitude.

MIGU (Du et al., "Unlocking Continual Learning Abilities in Language Models", 2024) caches the
output ``h`` (tokens x D_out) of every linear layer in the forward pass, computes the
L1-normalised magnitude of each output dimension over the batch's tokens,

.. math:: m_j = \frac{\sum_t |h_{tj}|}{\sum_{j'} \sum_t |h_{tj'}|},

and in the backward pass keeps the gradient only of rows ``j`` with ``m_j`` above the
``threshold``-quantile of ``m`` (``threshold = 0.7``: the top 30 % of rows). For a LoRA layer
the rows are those of the merged update ``dW = s B A``: the gradient of the LoRA branch's
output is zeroed on the other dimensions, so ``lora_B`` rows outside the mask get no gradient
and ``lora_A`` receives only ``B^T`` times the kept rows' gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lalora_curv.adapter import find_lora_modules
from lalora_curv.errors import LaloraError


def row_mask(output: Tensor, threshold: float) -> Tensor:
    """``m_j > quantile(m, threshold)`` for the L1-normalised row magnitudes ``m`` of ``output``.

    ``output`` is (..., D_out); at ``threshold = 0`` every row is kept.
    """
    magnitude = output.detach().abs().reshape(-1, output.shape[-1]).sum(0)
    magnitude = magnitude / magnitude.sum().clamp_min(torch.finfo(magnitude.dtype).tiny)
    if threshold == 0.0:
        return torch.ones_like(magnitude, dtype=torch.bool)
    return magnitude > torch.quantile(magnitude.float(), threshold).to(magnitude.dtype)


@contextlib.contextmanager
def migu(model: nn.Module, threshold: float = 0.7, adapter_name: str = "default") -> Iterator[None]:
    """Within the block, every backward pass through ``model`` applies MIGU's row mask.

    Usage::

        with lc.baselines.migu(model, threshold=0.7):
            lc.train(model, target_batches, lr=...)

    Args:
        model: a peft model with a LoRA adapter.
        threshold: the quantile of row magnitudes below which rows are frozen for the step.
        adapter_name: the adapter whose LoRA branches are masked.
    """
    if not 0.0 <= threshold < 1.0:
        raise LaloraError(f"MIGU threshold must be in [0, 1), got {threshold!r}")
    handles = find_lora_modules(model, adapter_name)
    removers = []
    for handle in handles.values():
        state: dict[str, Tensor] = {}

        def on_branch(module: nn.Module, args, output: Tensor, state=state) -> None:
            if output.requires_grad:  # lora_B runs inside the layer's forward, before its hook
                state["branch"] = output

        def on_layer(module: nn.Module, args, output: Tensor, state=state) -> None:
            branch = state.pop("branch", None)
            if branch is not None:  # this forward's mask, bound now (a later forward has its own)
                mask = row_mask(output, threshold).to(branch.dtype)
                branch.register_hook(lambda grad, mask=mask: grad * mask)

        removers.append(handle.layer.register_forward_hook(on_layer))
        removers.append(handle.lora_B.register_forward_hook(on_branch))
    try:
        yield
    finally:
        for r in removers:
            r.remove()
