"""Your own data as supervised batches: the dataset formats TRL's ``SFTTrainer`` takes.

:func:`dataset_batches` turns a dataset into the batches :func:`lalora_curv.fit_precision` and
:func:`lalora_curv.train` take (``input_ids``, ``attention_mask``, ``labels`` with -100 where
no loss is taken; packed batches add ``position_ids``). Each example is one of four formats,
recognised from its fields (:func:`detect_format`):

================================== ============================================ ===============
format                             fields                                       supervised
================================== ============================================ ===============
``language-modeling``              ``{"text"}``                                 every token
``prompt-completion``              ``{"prompt": str, "completion": str}``       the completion
``conversational``                 ``{"messages": [{"role", "content"}, ...]}`` assistant turns
``conversational-prompt-completion`` ``{"prompt": [messages], "completion":     the completion
                                   [messages]}``                                messages
================================== ============================================ ===============

Conversations are rendered with the tokenizer's chat template. Where the template marks the
assistant's tokens (``{% generation %}`` ... ``{% endgeneration %}``), exactly those are
supervised (``return_assistant_tokens_mask``); otherwise each assistant turn's tokens are the
rendering of the conversation up to and including that turn minus the rendering of the turns
before it with the generation prompt (the *prefix rule*), which must be a prefix of it (a
template for which it is not is refused, naming the example).

Text and completions end with EOS (when the tokenizer has one and the text does not already);
prompts and texts get the tokenizer's own special tokens (BOS). An example longer than
``max_length`` is cut at its end, as TRL does. Batches are length-sorted (less padding; the
statistics do not depend on the order) and right-padded, or, with ``packing=True``, examples
are concatenated into rows of up to ``max_length`` tokens with ``position_ids`` restarting at
every example: the model then attends within each example only (transformers' packed-sequence
masking), and no label crosses from one example into the next.

Sources (:func:`load_examples`): a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a
folder of such files, or a Hugging Face hub id (with ``split`` and ``config``), read with
``datasets``; or a list of dicts, or a ``datasets.Dataset``, already in memory.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lalora_curv.errors import LaloraError

FORMATS = (
    "language-modeling",
    "prompt-completion",
    "conversational",
    "conversational-prompt-completion",
)
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetError(LaloraError):
    """A dataset cannot be read or an example is not in a supported format."""


def detect_format(example: Mapping[str, Any]) -> str:
    """The format of one example from its fields (see the module docstring)."""
    if not isinstance(example, Mapping):
        raise DatasetError(f"an example must be a mapping of fields, got {type(example).__name__}")
    if "messages" in example:
        return "conversational"
    if "prompt" in example and "completion" in example:
        prompt = example["prompt"]
        return (
            "conversational-prompt-completion"
            if isinstance(prompt, list)
            else ("prompt-completion")
        )
    if "text" in example:
        return "language-modeling"
    raise DatasetError(
        f"an example with fields {sorted(example)} is in no supported format: give 'text', "
        "'prompt' + 'completion', or 'messages' (a list of {'role', 'content'})"
    )


def load_examples(
    source: str | Path | Sequence[Mapping[str, Any]] | Any,
    *,
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The first ``limit`` examples of ``source`` as dicts.

    ``source``: a local file or folder, a hub id (loaded with ``datasets.load_dataset``), a
    ``datasets.Dataset`` or a list of dicts.
    """
    if isinstance(source, str | Path):
        rows = _load_dataset(source, split, config)
    elif isinstance(source, Sequence) and not isinstance(source, str):
        rows = source
    elif hasattr(source, "__iter__") and hasattr(source, "column_names"):  # datasets.Dataset
        rows = source
    else:
        raise DatasetError(
            f"cannot read examples from a {type(source).__name__}: give a path, a hub id, a "
            "datasets.Dataset or a list of dicts"
        )
    out = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        if not isinstance(row, Mapping):
            raise DatasetError(f"example {i} is a {type(row).__name__}, not a mapping of fields")
        out.append(dict(row))
    if not out:
        raise DatasetError(
            f"{source if isinstance(source, str | Path) else 'the data'}: no examples"
        )
    return out


def _load_dataset(source: str | Path, split: str, config: str | None):
    try:
        from datasets import load_dataset
    except ImportError as e:  # pragma: no cover - datasets comes with the hf extra
        raise DatasetError(
            "reading a dataset needs 'datasets': pip install 'lalora-curv[hf]'"
        ) from e
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        kinds = {SUFFIXES.get(p.suffix.lower()) for p in files} - {None}
        files = [p for p in files if p.suffix.lower() in SUFFIXES]
        if not files:
            raise DatasetError(f"{source}: no .jsonl, .json, .parquet or .csv file there")
        if len(kinds) > 1:
            raise DatasetError(f"{source}: files of several kinds ({sorted(kinds)}); keep one")
        try:
            return load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
        except Exception as e:  # datasets raises many kinds; say which file and why
            raise DatasetError(f"{source}: cannot be read as a dataset ({e})") from None
    if str(source).startswith((".", "/", "~")):
        raise DatasetError(f"{source}: no such file or folder")
    try:  # pragma: no cover - needs the network; local files are the tested path
        return load_dataset(str(source), config, split=split)
    except Exception as e:  # pragma: no cover
        raise DatasetError(f"{source}: cannot load it from the hub ({e})") from None


# ---------------------------------------------------------------------------------- tokenizing
def _eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids if eos is None or (ids and ids[-1] == eos) else [*ids, eos]


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DatasetError(f"{where}: every message needs 'role' and 'content', got {m!r}")


def has_generation_markers(tokenizer) -> bool:
    """Whether the chat template marks the assistant's tokens (``{% generation %}``)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def _conversation(tokenizer, messages: list, where: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a conversation, only assistant turns supervised."""
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            f"{where}: a conversational example needs a tokenizer with a chat template "
            "(tokenizer.chat_template is not set)"
        )
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        return ids, [t if m else -100 for t, m in zip(ids, mask, strict=True)]
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        end = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if ids[: len(end)] != end or end[: len(start)] != start:
            raise DatasetError(
                f"{where}: the chat template renders turn {i} differently in the whole "
                "conversation than on its own, so its tokens cannot be found; use a template "
                "with {% generation %} markers"
            )
        labels[len(start) : len(end)] = ids[len(start) : len(end)]
    return ids, labels


def tokenize_example(
    example: Mapping[str, Any], tokenizer, fmt: str | None = None, where: str = "example"
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, -100 where no loss is taken (untruncated)."""
    fmt = fmt or detect_format(example)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "language-modeling":
        text = example.get("text")
        if not isinstance(text, str):
            raise DatasetError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        ids = _eos(tokenizer, list(tokenizer(text)["input_ids"]))
        return ids, list(ids)
    if fmt == "prompt-completion":
        prompt, completion = example.get("prompt"), example.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DatasetError(f"{where}: 'prompt' and 'completion' must be strings")
        p = list(tokenizer(prompt)["input_ids"])
        c = _eos(tokenizer, list(tokenizer(completion, add_special_tokens=False)["input_ids"]))
        return p + c, [-100] * len(p) + c
    if fmt == "conversational":
        messages = example.get("messages")
        _check_messages(messages, where)
        return _conversation(tokenizer, messages, where)
    prompt, completion = example.get("prompt"), example.get("completion")
    _check_messages(prompt, where)
    _check_messages(completion, where)
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            f"{where}: a conversational example needs a tokenizer with a chat template"
        )
    start = _render(tokenizer, prompt, add_generation_prompt=True)
    ids = _render(tokenizer, [*prompt, *completion], add_generation_prompt=False)
    if ids[: len(start)] != start:
        raise DatasetError(
            f"{where}: the chat template renders the prompt differently before its completion"
        )
    return ids, [-100] * len(start) + ids[len(start) :]


# ------------------------------------------------------------------------------------ batching
def dataset_batches(
    source: str | Path | Sequence[Mapping[str, Any]] | Any,
    tokenizer,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    packing: bool = False,
    sort_by_length: bool = True,
    fmt: str | None = None,
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
    shuffle_seed: int | None = None,
) -> list[dict[str, Tensor]]:
    """Supervised batches of ``source`` (see the module docstring).

    Args:
        source: a local file or folder, a hub id, a ``datasets.Dataset`` or a list of dicts.
        tokenizer: the model's tokenizer (with a chat template for conversations).
        batch_size: sequences (packed: rows) per batch.
        max_length: tokens per sequence (per row when packing); longer examples lose their end.
        packing: concatenate examples into rows with restarting ``position_ids``.
        sort_by_length: sort the examples by length before batching (less padding).
        fmt: the format of every example (default: detected from the first one; all must
            share it).
        split: the split of a hub dataset.
        config: the configuration of a hub dataset.
        limit: the first ``limit`` examples.
        shuffle_seed: shuffle the examples with this seed first (for training order).

    Raises:
        DatasetError: unreadable data, an example in no or another format, no supervised token.
    """
    if batch_size < 1 or max_length < 2:
        raise DatasetError(
            f"need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}"
        )
    examples = load_examples(source, split=split, config=config, limit=limit)
    fmt = fmt or detect_format(examples[0])
    rows: list[tuple[list[int], list[int]]] = []
    for i, ex in enumerate(examples):
        found = detect_format(ex)
        if found != fmt:
            raise DatasetError(f"example {i} is {found!r}, the others {fmt!r}: use one format")
        ids, labels = tokenize_example(ex, tokenizer, fmt, where=f"example {i}")
        rows.append((ids[:max_length], labels[:max_length]))
    if not any(any(x != -100 for x in labels[1:]) for _, labels in rows):
        raise DatasetError("no example has a supervised token (after truncation to max_length)")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DatasetError("the tokenizer has neither a pad nor an EOS token to pad with")
    if packing:
        return _packed(rows, batch_size, max_length, pad)
    if sort_by_length:
        rows.sort(key=lambda r: len(r[0]))
    return [_padded(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)]


def _padded(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _packed(
    rows: list[tuple[list[int], list[int]]], batch_size: int, max_length: int, pad: int
) -> list[dict[str, Tensor]]:
    """Rows of whole examples (greedy, in order) with restarting position ids.

    The first label of each example is -100 (it would be predicted from the previous example's
    last token).
    """
    packed: list[list[tuple[list[int], list[int]]]] = [[]]
    for ids, lab in rows:
        if sum(len(i) for i, _ in packed[-1]) + len(ids) > max_length and packed[-1]:
            packed.append([])
        packed[-1].append((ids, lab))
    batches = []
    for start in range(0, len(packed), batch_size):
        chunk = packed[start : start + batch_size]
        width = max(sum(len(i) for i, _ in row) for row in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        positions = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, row in enumerate(chunk):
            at = 0
            for ids, lab in row:
                n = len(ids)
                input_ids[r, at : at + n] = torch.tensor(ids)
                mask[r, at : at + n] = 1
                labels[r, at + 1 : at + n] = torch.tensor(lab[1:])
                positions[r, at : at + n] = torch.arange(n)
                at += n
            positions[r, at:] = torch.arange(width - at)  # padding: a segment of its own
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": mask,
                "labels": labels,
                "position_ids": positions,
            }
        )
    return batches


__all__ = [
    "FORMATS",
    "DatasetError",
    "dataset_batches",
    "detect_format",
    "has_generation_markers",
    "load_examples",
    "tokenize_example",
]
