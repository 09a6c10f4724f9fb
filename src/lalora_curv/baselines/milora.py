r"""MiLoRA: initialise each adapter from the minor singular components of its base weight.

MiLoRA (Wang et al., "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient
LLM Finetuning", 2024) splits each adapted weight ``W = U S V^T`` (singular values in
decreasing order) into its principal part and its ``r`` smallest components,

.. math:: W = W_{res} + U_m S_m V_m^\top,\quad
    B_0 = U_m S_m^{1/2} / \sqrt{s},\; A_0 = S_m^{1/2} V_m^\top / \sqrt{s},

keeps ``W_res`` frozen in the base layer and trains ``A``, ``B`` (``s`` the LoRA scaling), so
the model's function is unchanged at init (``W_res + s B_0 A_0 = W``), like PiSSA with the
minor instead of the principal components.
"""

from __future__ import annotations

import torch
from torch import nn

from lalora_curv.adapter import find_lora_modules
from lalora_curv.errors import LaloraError


@torch.no_grad()
def milora_init(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Re-initialise every LoRA module of ``adapter_name`` in place and return ``model``.

    See the module docstring. The base weights change: save the base model with the adapter
    (or re-run this deterministic init) to restore the pair.
    """
    for name, handle in find_lora_modules(model, adapter_name).items():
        if getattr(handle.layer, "fan_in_fan_out", False):
            raise LaloraError(
                f"{name}: MiLoRA supports Linear layers (out x in weights), not GPT-2 style "
                "Conv1D (fan_in_fan_out=True)"
            )
        base = handle.layer.get_base_layer()
        weight = base.weight
        r, s = handle.spec.rank, handle.spec.scaling
        U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
        Um, Sm, Vm = U[:, -r:], S[-r:], Vh[-r:]
        root = Sm.sqrt() / (s**0.5)
        B0 = Um * root
        A0 = root[:, None] * Vm
        weight.copy_((weight.double() - s * B0 @ A0).to(weight.dtype))
        handle.lora_A.weight.copy_(A0.to(handle.lora_A.weight.dtype))
        handle.lora_B.weight.copy_(B0.to(handle.lora_B.weight.dtype))
    return model
