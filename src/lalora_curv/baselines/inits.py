"""LoRA adapters with the inits the experiments compare, in one place.

``"default"``: peft's (``A`` Kaiming-uniform, ``B0 = 0``, the base model unchanged);
``"pissa"`` / ``"olora"``: peft's principal-SVD / QR inits; ``"milora"``:
:func:`lalora_curv.baselines.milora_init` (minor singular components). The last three replace
each base weight ``W`` by ``W - s B0 A0``, so the function is unchanged at init.
"""

from __future__ import annotations

import copy

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lalora_curv.baselines.milora import milora_init
from lalora_curv.errors import LaloraError

INITS = ("default", "pissa", "olora", "milora")
"""The names :func:`lora_adapter` accepts."""
_PEFT_INIT = {"default": True, "pissa": "pissa", "olora": "olora", "milora": True}


def lora_adapter(model: nn.Module, config: LoraConfig, init: str = "default") -> PeftModel:
    """``get_peft_model(model, config)`` with the adapter initialised by ``init``.

    See the module docstring; ``config.init_lora_weights`` is overridden (the config passed in
    is not changed). Seed torch first for a reproducible init.

    Raises:
        LaloraError: an unknown ``init``, or MiLoRA on a layer it does not support.
    """
    if init not in INITS:
        raise LaloraError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    config = copy.deepcopy(config)
    config.init_lora_weights = _PEFT_INIT[init]
    peft_model = get_peft_model(model, config)
    if init == "milora":
        milora_init(peft_model)
    return peft_model
