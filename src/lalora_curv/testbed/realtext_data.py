r"""The real-text scenario's data: source and target texts, the tokenizer, batches, NLL.

* Source text (forgetting), one string per record: HellaSwag context + gold ending (the
  harness's preprocessing), WinoGrande sentence with the correct option written into the blank,
  ARC-Challenge ``"Question: {stem}\nAnswer: {correct choice}"``. Every token is supervised.
  Pretraining uses the training splits (WinoGrande ``train_m``, ARC ``Train``; HellaSwag has no
  local training file: locally its text comes from ``hellaswag_val_full.txt.bz2`` with every item
  that shares a context or an ending with ``hellaswag.jsonl`` removed, from the hub it is the
  ``train`` split); source NLL is measured on the evaluation splits (HellaSwag validation,
  WinoGrande dev, ARC-Challenge test).
* Target text (learning): GSM8K formatted by :mod:`lalora_curv.tasks.formatting` (prompt
  ``"Question: {q}\nAnswer:"`` labelled -100, the worked solution and EOS supervised); the
  train split fine-tunes, the test split measures target NLL.
* A byte-level BPE tokenizer trained (deterministically) on the source training texts and the
  GSM8K training text.

:class:`RealText` reads them once and splits the held-out records into test and validation;
:func:`token_nll` is the measure:
``NLL = -(1 / N) * sum_{(i, t) : y_it != -100} log p(y_it | x_i,<t)``.
"""

from __future__ import annotations

import bz2
import hashlib
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn
from transformers import PreTrainedTokenizerFast

from lalora_curv.tasks.data import TASKS, TaskDataError, load_records
from lalora_curv.tasks.formatting import make_batches, supervised_examples
from lalora_curv.tasks.multiple_choice import hellaswag_preprocess, multiple_choice_items

SOURCES = ("hellaswag", "winogrande", "arc_challenge")
HELLASWAG_FULL = "hellaswag/hellaswag_val_full.txt.bz2"
PAD, EOS = "<pad>", "<eos>"


# --- text -------------------------------------------------------------------------------------


def source_text(task: str, record: dict[str, Any]) -> str:
    """One record of a source task as plain text with its correct answer in place."""
    if task == "winogrande":
        s = record["sentence"]
        blank = s.index("_")
        option = record["option1" if record["answer"] == "1" else "option2"]
        return s[:blank] + option + s[blank + 1 :]
    if task == "arc_challenge":
        item = multiple_choice_items(task, [record])[0]
        return item.contexts[item.gold] + item.continuations[item.gold]
    if task == "hellaswag":
        item = multiple_choice_items(task, [record])[0]
        return item.contexts[item.gold] + item.continuations[item.gold]
    raise TaskDataError(f"{task!r} is not a source task; valid: {list(SOURCES)}")


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", hellaswag_preprocess(text).lower())


def hellaswag_full_texts(data_dir: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """``(context, endings)`` of ``hellaswag_val_full.txt.bz2``, gold ending first.

    The file holds 6 lines per item: ``"{activity_label}: {ctx}"``, the gold index 0-3 and the
    four endings.
    """
    path = Path(data_dir) / HELLASWAG_FULL
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        raise TaskDataError(f"{path}: {len(lines)} lines, not a multiple of 6")
    items = []
    for start in range(0, len(lines), 6):
        ctx, gold, *endings = lines[start : start + 6]
        if gold not in ("0", "1", "2", "3"):
            raise TaskDataError(f"{path}:{start + 2}: gold label {gold!r} is not 0-3")
        g = int(gold)
        items.append((ctx, (endings[g], *endings[:g], *endings[g + 1 :])))
    return items


def source_texts(task: str, data_dir: str | Path | None, split: str) -> list[str]:
    """Texts of a source task: ``split="train"`` (pretraining) or ``"eval"`` (held out)."""
    if split == "eval" or task != "hellaswag" or data_dir is None:
        return [source_text(task, r) for r in load_records(task, data_dir, split=split)]
    held_out = load_records("hellaswag", data_dir)  # remove every trace of these
    seen = {_norm(e) for r in held_out for e in r["endings"]}
    seen |= {_norm(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"]) for r in held_out}
    return [
        hellaswag_preprocess(ctx) + " " + hellaswag_preprocess(endings[0])
        for ctx, endings in hellaswag_full_texts(data_dir)
        if _norm(ctx) not in seen and not any(_norm(e) in seen for e in endings)
    ]


def data_files(data_dir: str | Path) -> list[Path]:
    """Every local file the scenario reads (their hashes key the cache)."""
    names = {TASKS[t][0] for t in (*SOURCES, "gsm8k")} | {HELLASWAG_FULL}
    names |= {TASKS[t][1] for t in ("winogrande", "arc_challenge", "gsm8k")}
    return sorted(Path(data_dir) / n for n in names)


# --- tokenizer and batches ----------------------------------------------------------------------


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (``tokenizers``) trained on ``texts``; ``<pad>`` = 0, ``<eos>`` = 1.

    BPE merges by pair count with ties broken by the pair itself, so the same texts give the
    same tokenizer in any process.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """``tok`` as a transformers tokenizer, with the scenario's padding and EOS tokens."""
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def text_batches(
    texts: Sequence[str], tokenizer, batch_size: int = 16, max_length: int = 256
) -> list[dict[str, Tensor]]:
    """Right-padded language-modelling batches of ``EOS + text + EOS``.

    Every text token and the closing EOS are supervised (the opening EOS is context, as in
    pretraining's stream); padding is labelled -100. Longer texts lose tokens from their start
    (as :func:`~lalora_curv.tasks.formatting.make_batches` truncates).
    """
    return make_batches(
        [("", t) for t in texts], tokenizer, batch_size=batch_size, max_length=max_length
    )


@torch.no_grad()
def token_nll(model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> tuple[float, int]:
    """``(sum of NLL, N)`` over the supervised tokens of ``batches``.

    Labels are aligned with ``input_ids`` (position ``t`` predicts label ``t + 1``); the
    per-token NLL is their ratio.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            labels = b["labels"][:, 1:]
            total += float(
                F.cross_entropy(
                    logits[:, :-1].flatten(0, 1),
                    labels.flatten(),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total, count


# --- the scenario's data ------------------------------------------------------------------------


class RealText:
    """The scenario's texts, read once: source train/eval texts and GSM8K train/test pairs.

    The held-out records of each task (the source tasks' evaluation splits, the GSM8K test
    split) are split, seeded, into a test set of ``eval_sample`` (``None``: all the others)
    and a disjoint validation set of ``val_sample`` (``data.val``, ``data.target_val``): a
    sweep picks its settings on the validation set and reports the test set. The texts are
    read from ``data_dir`` (``None``: the Hugging Face hub) and split with ``seed``.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        eval_sample: int | None = 400,
        seed: int = 0,
        val_sample: int = 0,
    ):
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.train = {t: source_texts(t, data_dir, "train") for t in SOURCES}
        self.eval, self.val = {}, {}
        for t in SOURCES:
            self.eval[t], self.val[t] = _split(
                source_texts(t, data_dir, "eval"), eval_sample, val_sample, seed, t
            )
        self.target_train = supervised_examples(
            "gsm8k", load_records("gsm8k", data_dir, split="train")
        )
        test, val = _split(load_records("gsm8k", data_dir), eval_sample, val_sample, seed, "gsm8k")
        self.target_test = supervised_examples("gsm8k", test)
        self.target_val = supervised_examples("gsm8k", val)

    def fingerprint(self) -> dict[str, str]:
        """sha256 of every data file (local), or the hub's dataset names."""
        if self.data_dir is None:
            return {t: f"hub:{TASKS[t][2]}:{TASKS[t][3]}" for t in (*SOURCES, "gsm8k")}
        return {
            str(p.relative_to(self.data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in data_files(self.data_dir)
        }


def _split(items: list, test: int | None, val: int, seed: int, task: str) -> tuple[list, list]:
    """``(test, val)``: seeded, disjoint samples of ``test`` and ``val`` items.

    ``test=None``: every item not in val; each sample in file order.
    """
    if val < 0 or (test is not None and test < 1):
        raise ValueError(f"need eval_sample >= 1 (or None) and val_sample >= 0, got {test}, {val}")
    if (test or 0) + val > len(items):
        raise TaskDataError(
            f"{task}: {len(items)} held-out records, fewer than eval_sample + val_sample = "
            f"{(test or 0) + val}"
        )
    order = random.Random(seed).sample(range(len(items)), len(items))
    n_test = len(items) - val if test is None else test
    pick = lambda idx: [items[i] for i in sorted(idx)]  # noqa: E731
    return pick(order[:n_test]), pick(order[n_test : n_test + val])
