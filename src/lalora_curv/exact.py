"""The exact, dense curvature of the LoRA parameters (small models).

The reference the K-FAC and diagonal approximations are measured against, computed by
laplace-torch with curvlinops.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lalora_curv.adapter import find_lora_modules
from lalora_curv.backends.common import SupervisedLogits, fitting_state, only_lora_trainable
from lalora_curv.batches import prepare_batch
from lalora_curv.errors import LaloraError


def exact_curvature(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    kind: str = "ggn",
    adapter_name: str = "default",
) -> Tensor:
    """The exact, dense curvature of the LoRA parameters per supervised token (small models).

    laplace-torch's ``FullLaplace`` with curvlinops operators: ``kind="ggn"`` is the exact
    generalised Gauss-Newton matrix of the summed NLL (the expectation of the MC Fisher),
    ``kind="ef"`` the empirical Fisher of the per-token losses, ``sum_tau grad l_tau grad
    l_tau^T``. Divided by the number of supervised tokens; order: ``param_names``.
    Needs eager attention.
    """
    from laplace import FullLaplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    if kind not in ("ggn", "ef"):
        raise LaloraError(f"unknown curvature kind {kind!r}; valid: ['ef', 'ggn']")
    handles = find_lora_modules(model, adapter_name)
    device = next(iter(handles.values())).lora_A.weight.device
    data = []
    for i, raw in enumerate(batches):
        b = prepare_batch(raw, device, i)
        if b.num_supervised:
            data.append(
                {
                    "input_ids": b.input_ids,
                    "attention_mask": b.attention_mask,
                    "supervised": b.supervised,
                    "labels": b.targets[b.supervised],
                }
            )
    n = sum(int(d["labels"].numel()) for d in data)
    if n == 0:
        raise LaloraError("no supervised token in the batches")
    backend = {"ggn": CurvlinopsGGN, "ef": CurvlinopsEF}[kind]
    with fitting_state(model, handles), only_lora_trainable(model, handles):
        la = FullLaplace(SupervisedLogits(model), "classification", backend=backend)
        la.fit(torch.utils.data.DataLoader(data, batch_size=None))
        order = [p for p in model.parameters() if p.requires_grad]
    expected = [p for h in handles.values() for p in (h.lora_A.weight, h.lora_B.weight)]
    if [id(p) for p in order] != [id(p) for p in expected]:
        raise LaloraError("the model's parameter order differs from the LoRA module order")
    return la.H.detach() / n
