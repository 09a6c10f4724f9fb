r"""Supervised batches from task records: prompts labelled -100, answers supervised.

The target (GSM8K) is formatted as instruction fine-tuning: prompt ``"Question: {q}\nAnswer:"``
(the evaluation prompt), target ``" " + answer`` (the worked solution ending in ``#### N``) and
EOS. Source tasks use the same split, with the gold choice as the target, so the batches that fit
a precision on a source sub-dataset and the batches that fine-tune on the target are built
alike. These are the dicts :func:`lalora_curv.fit_precision` and :func:`lalora_curv.train` take.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lalora_curv.tasks.gsm8k import gsm8k_prompt
from lalora_curv.tasks.multiple_choice import multiple_choice_items
from lalora_curv.tasks.scoring import encode_pair


def supervised_examples(task: str, records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(prompt, target)`` pairs: GSM8K question and solution, or a context and its gold choice."""
    if task == "gsm8k":
        return [(gsm8k_prompt(r["question"]), " " + r["answer"]) for r in records]
    return [
        (item.contexts[item.gold], item.continuations[item.gold])
        for item in multiple_choice_items(task, list(records))
    ]


def make_batches(
    examples: Sequence[tuple[str, str]],
    tokenizer,
    batch_size: int = 1,
    max_length: int = 512,
    add_eos: bool = True,
) -> list[dict[str, Tensor]]:
    """Right-padded batches; labels are -100 on the prompt and padding.

    An example longer than ``max_length`` loses tokens from the start of its prompt (the target
    is kept whole while it fits).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for prompt, target in examples:
        ctx, cont = encode_pair(tokenizer, prompt, target)
        if add_eos and tokenizer.eos_token_id is not None:
            cont = [*cont, tokenizer.eos_token_id]
        ids = (ctx + cont)[-max_length:]
        n_target = min(len(cont), len(ids))
        rows.append((ids, len(ids) - n_target))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches
