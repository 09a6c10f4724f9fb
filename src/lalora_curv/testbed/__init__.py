"""The embedded benchmark: a procedural world, a tiny pretrained Llama, forgetting on a CPU.

``pretrained(seed)`` gives the model (pretrained once in about two minutes on 2 cores, then
cached), its tokenizer and the :class:`World`; ``experiment.finetune`` fine-tunes LoRA on the
target with or without a precision's penalty and measures source accuracy (forgetting) and
target exact match (learning) before and after.
"""

from __future__ import annotations

from lalora_curv.testbed.model import pretrained
from lalora_curv.testbed.world import SOURCES, World

__all__ = ["SOURCES", "World", "pretrained"]
