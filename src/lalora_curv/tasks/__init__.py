"""Evaluation tasks in the paper's setup, scored as lm-evaluation-harness scores them.

Source tasks (forgetting), multiple choice: HellaSwag, WinoGrande, ARC-Challenge.
Target task (learning), generated exact match: GSM8K. Records come from local files in the
original schemas or from the Hugging Face hub (see :mod:`lalora_curv.tasks.data`).
"""

from __future__ import annotations

from lalora_curv.tasks.data import TASKS, TaskDataError, load_records
from lalora_curv.tasks.gsm8k import (
    extract_flexible,
    extract_strict,
    gsm8k_prompt,
    normalize_answer,
)
from lalora_curv.tasks.multiple_choice import MultipleChoiceItem, multiple_choice_items

__all__ = [
    "TASKS",
    "MultipleChoiceItem",
    "TaskDataError",
    "extract_flexible",
    "extract_strict",
    "gsm8k_prompt",
    "load_records",
    "multiple_choice_items",
    "normalize_answer",
]
