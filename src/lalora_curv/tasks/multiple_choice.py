r"""Multiple-choice items of the source tasks, exactly as lm-evaluation-harness builds them.

Each choice ``i`` is scored by the summed log-likelihood of ``continuations[i]`` given
``contexts[i]``; ``acc`` takes the argmax, ``acc_norm`` the argmax of the log-likelihood divided
by the continuation's length in characters.

* HellaSwag: context ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``,
  continuations ``" " + preprocess(ending)``; ``preprocess`` strips, turns ``" [title]"`` into
  ``". "``, drops ``[...]`` and collapses double spaces.
* WinoGrande (partial scoring): for each option the context is ``sentence[:blank] + option``,
  the continuation ``" " + sentence[blank + 1:].strip()``, the same for both; acc only.
* ARC-Challenge: context ``"Question: {stem}\nAnswer:"``, continuations ``" " + choice``,
  gold ``labels.index(answerKey)`` (letters or digits, 3 to 5 choices).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lalora_curv.tasks.data import TaskDataError


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: per choice a context and a continuation; ``gold`` the right index."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    use_acc_norm: bool  # whether the task reports acc_norm (WinoGrande does not)


def hellaswag_preprocess(text: str) -> str:
    """HellaSwag's ``preprocess`` (see the module docstring)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict[str, Any]) -> MultipleChoiceItem:
    """The item of a HellaSwag record, scored with ``acc_norm`` too."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    endings = [" " + hellaswag_preprocess(e) for e in doc["endings"]]
    return MultipleChoiceItem((query,) * len(endings), tuple(endings), int(doc["label"]), True)


def winogrande_item(doc: dict[str, Any]) -> MultipleChoiceItem:
    """The item of a WinoGrande record (partial scoring, ``acc`` only)."""
    blank = doc["sentence"].index("_")
    continuation = " " + doc["sentence"][blank + 1 :].strip()
    contexts = tuple(doc["sentence"][:blank] + opt for opt in (doc["option1"], doc["option2"]))
    return MultipleChoiceItem(contexts, (continuation,) * 2, {"1": 0, "2": 1}[doc["answer"]], False)


def arc_item(doc: dict[str, Any]) -> MultipleChoiceItem:
    """The item of an ARC-Challenge record, scored with ``acc_norm`` too."""
    q = doc["question"]
    labels = [c["label"] for c in q["choices"]]
    context = f"Question: {q['stem']}\nAnswer:"
    choices = tuple(" " + c["text"] for c in q["choices"])
    return MultipleChoiceItem(
        (context,) * len(choices), choices, labels.index(doc["answerKey"]), True
    )


_BUILDERS = {"hellaswag": hellaswag_item, "winogrande": winogrande_item, "arc_challenge": arc_item}


def multiple_choice_items(task: str, records: list[dict[str, Any]]) -> list[MultipleChoiceItem]:
    """The scored items of a multiple-choice task's records (see :func:`load_records`)."""
    if task not in _BUILDERS:
        raise TaskDataError(f"{task!r} is not a multiple-choice task; valid: {sorted(_BUILDERS)}")
    return [_BUILDERS[task](r) for r in records]
