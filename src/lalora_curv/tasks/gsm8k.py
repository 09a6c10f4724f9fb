r"""GSM8K as lm-evaluation-harness scores it (``gsm8k``, zero-shot by default).

Prompt ``"Question: {question}\nAnswer:"``; greedy generation until ``"Question:"`` or EOS.
Two extractions of the model's answer:

* strict-match: the first ``#### (\-?[0-9\.\,]+)``;
* flexible-extract: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``.

Before comparing, both sides drop ``,`` and ``$``, everything up to ``"#### "`` and a trailing
``"."``, case-insensitively; exact match of the results.
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
STOP_SEQUENCES = ("Question:",)
_DROP = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def gsm8k_prompt(question: str, fewshot: list[tuple[str, str]] | None = None) -> str:
    """The prompt, optionally preceded by ``(question, answer)`` examples."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in (fewshot or []))
    return f"{shots}Question: {question}\nAnswer:"


def extract_strict(text: str) -> str | None:
    """The first ``#### <number>`` of a generation (None if there is none)."""
    m = STRICT.search(text)
    return m.group(1) if m else None


def extract_flexible(text: str) -> str | None:
    """The last number-like token of a generation (None if there is none)."""
    matches = FLEXIBLE.findall(text)
    if not matches:
        return None
    a, b = matches[-1]
    return a or b


def normalize_answer(text: str) -> str:
    """The harness's normalisation: drop ``,``, ``$``, up to ``#### ``, a trailing ``.``."""
    for pattern in _DROP:
        text = pattern.sub("", text)
    return text.strip().lower()


def gold_answer(answer: str) -> str:
    """The normalised gold number of a GSM8K ``answer`` field."""
    return normalize_answer(answer.split("####")[-1])


def exact_match(generation: str, answer: str, mode: str = "strict") -> bool:
    """Whether the extracted, normalised generation equals the gold answer."""
    extracted = extract_strict(generation) if mode == "strict" else extract_flexible(generation)
    return extracted is not None and normalize_answer(extracted) == gold_answer(answer)


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """``text`` up to the first stop sequence (the harness stops generating there)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts``, cut at ``"Question:"`` (left-padded batches).

    As the harness: a tokenizer without a pad token pads with EOS, and prompts keep their last
    ``window - max_new_tokens`` tokens.
    """
    device = next(model.parameters()).device
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    saved = (tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token)
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(
            range(0, len(prompts), batch_size),
            disable=not progress,
            desc="gsm8k generation",
            unit="batch",
        ):
            chunk = prompts[start : start + batch_size]
            limit = (
                {"truncation": True, "max_length": window - max_new_tokens}
                if (window and window > max_new_tokens)
                else {}
            )
            enc = tokenizer(
                chunk, return_tensors="pt", padding=True, add_special_tokens=False, **limit
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            outputs += [truncate_at_stop(t) for t in texts]
    finally:
        tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token = saved
        model.train(was_training)
    return outputs


def score_gsm8k(
    model,
    tokenizer,
    records: list[dict],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    fewshot: list[tuple[str, str]] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """``exact_match_strict``, ``exact_match_flexible`` and ``n`` over GSM8K ``records``."""
    prompts = [gsm8k_prompt(r["question"], fewshot) for r in records]
    generations = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    n = len(records)
    strict = sum(
        exact_match(g, r["answer"], "strict") for g, r in zip(generations, records, strict=True)
    )
    flexible = sum(
        exact_match(g, r["answer"], "flexible") for g, r in zip(generations, records, strict=True)
    )
    return {
        "exact_match_strict": strict / n if n else None,
        "exact_match_flexible": flexible / n if n else None,
        "n": n,
    }
