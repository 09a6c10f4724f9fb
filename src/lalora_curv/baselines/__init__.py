"""Methods the paper compares LALoRA with, for equal-footing experiments.

* :func:`migu`: MIGU (Du et al., 2024), magnitude-based gradient updating: only the output rows
  of each adapted layer with the largest output magnitude are updated;
* :func:`milora_init`: MiLoRA (Wang et al., 2024), the adapter initialised from the *minor*
  singular components of each base weight (not in peft);
* PiSSA and OLoRA come from peft itself (``LoraConfig(init_lora_weights="pissa" | "olora")``);
  EWC on the merged update is ``structure="merged-diag"`` (or ``"merged-kfac"``).

:func:`lora_adapter` makes an adapter with any of these inits (``INITS``).

Each combines with a LALoRA penalty: at a non-zero init (``B0 != 0``) the A and cross blocks
of the precision carry curvature (``structure="tri-kfac"``).
"""

from lalora_curv.baselines.inits import INITS, lora_adapter
from lalora_curv.baselines.migu import migu
from lalora_curv.baselines.milora import milora_init

__all__ = ["INITS", "lora_adapter", "migu", "milora_init"]
