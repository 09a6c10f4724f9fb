"""Log-likelihood scoring of multiple-choice items, as lm-evaluation-harness's ``hf`` model does.

A request ``(context, continuation)`` is encoded as the harness encodes it: trailing spaces of the
context move to the continuation, ``whole = encode(context + continuation)``,
``context_ids = encode(context)``, ``continuation_ids = whole[len(context_ids):]``, no special
tokens (an empty context becomes the EOS/BOS token). Its score is
``sum_t log p(continuation_t | context, continuation_<t)``; sequences longer than the model's
window keep their last tokens. ``acc`` is the argmax over choices; ``acc_norm`` the argmax of the
score divided by the choice's length in characters (without the joining space).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lalora_curv.tasks.multiple_choice import MultipleChoiceItem


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the harness's way."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if not ctx:
        start = (
            tokenizer.eos_token_id
            if tokenizer.eos_token_id is not None
            else (tokenizer.bos_token_id)
        )
        return [start], whole
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[float]:
    """Summed log-likelihood of each continuation given its context."""
    device = next(model.parameters()).device
    max_length = max_length or getattr(
        getattr(model, "config", None), "max_position_embeddings", 2048
    )
    encoded = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        ids = (ctx + cont)[-(max_length + 1) :]  # +1: the last token is only ever a target
        encoded.append((ids, len(cont)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # less padding
    scores = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(
            range(0, len(order), batch_size),
            disable=not progress,
            desc="log-likelihoods",
            unit="batch",
        ):
            chunk = order[start : start + batch_size]
            inputs = [encoded[i][0][:-1] for i in chunk]
            width = max(len(x) for x in inputs)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, x in enumerate(inputs):
                ids[row, : len(x)] = torch.tensor(x)
                mask[row, : len(x)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logprobs = torch.log_softmax(
                logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1
            )
            for row, i in enumerate(chunk):
                full, n_cont = encoded[i]
                n = len(full) - 1
                targets = torch.tensor(full[-n_cont:], device=device)
                positions = torch.arange(n - n_cont, n, device=device)
                scores[i] = float(logprobs[row, positions, targets].sum())
    finally:
        model.train(was_training)
    return scores


def score_multiple_choice(
    model: nn.Module,
    tokenizer,
    items: Sequence[MultipleChoiceItem],
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """``acc`` (and ``acc_norm`` where the task reports it) and ``n`` over ``items``."""
    requests = [
        (c, x) for item in items for c, x in zip(item.contexts, item.continuations, strict=True)
    ]
    lls = loglikelihoods(model, tokenizer, requests, batch_size, progress=progress)
    acc = acc_norm = 0
    pos = 0
    for item in items:
        k = len(item.continuations)
        ll = lls[pos : pos + k]
        pos += k
        acc += int(max(range(k), key=lambda i: ll[i]) == item.gold)
        # the harness divides by the choice's length, without the " " that joins it
        norm = [ll[i] / len(item.continuations[i].removeprefix(" ")) for i in range(k)]
        acc_norm += int(max(range(k), key=lambda i: norm[i]) == item.gold)
    n = len(items)
    result: dict[str, float | int | None] = {"acc": acc / n if n else None, "n": n}
    if items and items[0].use_acc_norm:
        result["acc_norm"] = acc_norm / n if n else None
    return result
