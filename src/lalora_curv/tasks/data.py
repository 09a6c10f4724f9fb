"""Task records from local files (original schemas) or the Hugging Face hub, made uniform.

| task | local file (``data_dir/...``) | hub | evaluation split |
|---|---|---|---|
| ``hellaswag`` | ``hellaswag/hellaswag.jsonl`` | ``Rowan/hellaswag`` | validation |
| ``winogrande`` | ``winogrande/dev.jsonl`` | ``allenai/winogrande``, ``winogrande_xl`` | validation |
| ``arc_challenge`` | ``arc_challenge/ARC-Challenge-Test.jsonl`` | ``allenai/ai2_arc``, ``ARC-Challenge`` | test |
| ``gsm8k`` | ``gsm8k/test.jsonl`` | ``openai/gsm8k``, ``main`` | test |

Field differences between the two sources are removed here: HellaSwag's ``label`` is an int
locally and a string on the hub; WinoGrande's hub records have no ``qID``; ARC's local
``question`` is ``{"stem", "choices": [{"text", "label"}]}`` while the hub has ``question``
(the stem) and ``choices = {"text": [...], "label": [...]}``. Every record comes back in the
local (original) schema.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lalora_curv.errors import LaloraError


class TaskDataError(LaloraError):
    """A task file is missing or holds a malformed record (the file and line are named)."""


#: task -> (local evaluation file, local training file or None, hub path, hub config, split)
TASKS: dict[str, tuple[str, str | None, str, str | None, str]] = {
    "hellaswag": ("hellaswag/hellaswag.jsonl", None, "Rowan/hellaswag", None, "validation"),
    "winogrande": (
        "winogrande/dev.jsonl",
        "winogrande/train_m.jsonl",
        "allenai/winogrande",
        "winogrande_xl",
        "validation",
    ),
    "arc_challenge": (
        "arc_challenge/ARC-Challenge-Test.jsonl",
        "arc_challenge/ARC-Challenge-Train.jsonl",
        "allenai/ai2_arc",
        "ARC-Challenge",
        "test",
    ),
    "gsm8k": ("gsm8k/test.jsonl", "gsm8k/train.jsonl", "openai/gsm8k", "main", "test"),
}

_REQUIRED = {
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "arc_challenge": ("question", "answerKey"),
    "gsm8k": ("question", "answer"),
}


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{path}:{number}: expected a JSON object")
            yield number, record


def _canonical(task: str, record: dict[str, Any], where: str) -> dict[str, Any]:
    """The record in the local (original) schema; raises naming ``where`` if malformed."""
    if task == "arc_challenge" and isinstance(record.get("question"), str):  # hub layout
        choices = record.get("choices") or {}
        record = {
            "id": record.get("id"),
            "answerKey": record.get("answerKey"),
            "question": {
                "stem": record["question"],
                "choices": [
                    {"text": t, "label": lab}
                    for t, lab in zip(
                        choices.get("text", []), choices.get("label", []), strict=True
                    )
                ],
            },
        }
    missing = [k for k in _REQUIRED[task] if k not in record]
    if missing:
        raise TaskDataError(f"{where}: {task} record lacks {missing[0]!r}")
    if task == "hellaswag":
        if record["label"] in ("", None):
            raise TaskDataError(f"{where}: hellaswag record has no gold label (a test record?)")
        record = {**record, "label": int(record["label"])}
        if len(record["endings"]) != 4 or not 0 <= record["label"] < 4:
            raise TaskDataError(f"{where}: hellaswag needs 4 endings and a label in 0-3")
    elif task == "winogrande":
        if record["sentence"].count("_") != 1 or record["answer"] not in ("1", "2"):
            raise TaskDataError(f"{where}: winogrande needs one '_' and answer '1' or '2'")
    elif task == "arc_challenge":
        q = record["question"]
        if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
            raise TaskDataError(f"{where}: arc question needs 'stem' and 'choices'")
        labels = [c["label"] for c in q["choices"]]
        if not 3 <= len(labels) <= 5 or record["answerKey"] not in labels:
            raise TaskDataError(f"{where}: arc needs 3-5 choices and an answerKey among {labels}")
    elif task == "gsm8k" and "####" not in record["answer"]:
        raise TaskDataError(f"{where}: gsm8k answer has no '#### <number>' line")
    return record


def load_records(
    task: str,
    data_dir: str | Path | None = None,
    *,
    split: str = "eval",
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Records of ``task`` in the original (local) schema.

    Args:
        task: ``"hellaswag"``, ``"winogrande"``, ``"arc_challenge"`` or ``"gsm8k"``.
        data_dir: folder holding the original files (e.g. ``../shared/data``); ``None`` loads
            from the Hugging Face hub with ``datasets``.
        split: ``"eval"`` (the evaluation split of the table above) or ``"train"``.
        limit: keep the first ``limit`` records (the harness's ``--limit``).
        sample: keep a seeded random subset of this many records (file order kept).
        seed: seed of that subset.

    Raises:
        TaskDataError: unknown task, missing file, malformed record (file and line named).
    """
    if task not in TASKS:
        raise TaskDataError(f"unknown task {task!r}; valid: {sorted(TASKS)}")
    if split not in ("eval", "train"):
        raise TaskDataError(f"split must be 'eval' or 'train', got {split!r}")
    local_eval, local_train, hub, config, hub_split = TASKS[task]
    if data_dir is not None:
        name = local_eval if split == "eval" else local_train
        if name is None:
            raise TaskDataError(f"{task} has no local training file")
        path = Path(data_dir) / name
        records = [_canonical(task, r, f"{path}:{n}") for n, r in _read_jsonl(path)]
    else:  # pragma: no cover - needs the network; the loaders are tested on local files
        from datasets import load_dataset

        rows = load_dataset(hub, config, split=hub_split if split == "eval" else "train")
        records = [_canonical(task, dict(r), f"{hub}[{i}]") for i, r in enumerate(rows)]
    if limit is not None:
        records = records[:limit]
    if sample is not None and sample < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), sample))
        records = [records[i] for i in keep]
    return records
