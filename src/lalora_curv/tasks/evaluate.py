"""``evaluate``: score a model (optionally with a peft adapter) on the paper's tasks.

The result has the command line's JSON layout::

    {"hellaswag": {"acc", "acc_norm", "n"}, "winogrande": {"acc", "n"},
     "arc_challenge": {"acc", "acc_norm", "n"},
     "gsm8k": {"exact_match_strict", "exact_match_flexible", "n"}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lalora_curv.tasks.data import TASKS, TaskDataError, load_records
from lalora_curv.tasks.gsm8k import score_gsm8k
from lalora_curv.tasks.multiple_choice import multiple_choice_items
from lalora_curv.tasks.scoring import score_multiple_choice


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    num_fewshot: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Metrics of every task in ``tasks`` on its evaluation split.

    ``limit`` keeps the first records, ``sample`` a seeded subset; GSM8K's few-shot examples
    are the first ``num_fewshot`` training records (the harness's ``first_n`` sampler; its
    ``gsm8k`` task defaults to 5, this function to 0: say which you compare with).
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise TaskDataError(f"unknown task {unknown[0]!r}; valid: {sorted(TASKS)}")
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        records = load_records(task, data_dir, limit=limit, sample=sample, seed=seed)
        if task == "gsm8k":
            shots = (
                [
                    (r["question"], r["answer"])
                    for r in load_records("gsm8k", data_dir, split="train", limit=num_fewshot)
                ]
                if num_fewshot
                else None
            )
            results[task] = score_gsm8k(
                model,
                tokenizer,
                records,
                max_new_tokens,
                batch_size,
                fewshot=shots,
                progress=progress,
            )
        else:
            results[task] = score_multiple_choice(
                model, tokenizer, multiple_choice_items(task, records), batch_size, progress
            )
    return results


def load_model(model_path: str, adapter: str | None = None, dtype: str = "float32"):
    """``AutoModelForCausalLM`` + tokenizer from a local path or hub id, with a peft adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer
