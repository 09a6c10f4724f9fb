"""Task loaders and lm-evaluation-harness conventions, on the real files of ../shared/data."""

from __future__ import annotations

import json

import pytest

from helpers import DATA
from lalora_curv.tasks import (
    TaskDataError,
    extract_flexible,
    extract_strict,
    gsm8k_prompt,
    load_records,
    multiple_choice_items,
    normalize_answer,
)
from lalora_curv.tasks.gsm8k import exact_match, gold_answer
from lalora_curv.tasks.multiple_choice import hellaswag_preprocess

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (the shared data) is absent")


@pytest.mark.parametrize(
    ("task", "count"),
    [("hellaswag", 1000), ("winogrande", 1267), ("arc_challenge", 1172), ("gsm8k", 1319)],
)
def test_evaluation_splits_load_completely(task, count):
    manifest = {m["file"]: m["records"] for m in json.loads((DATA / "MANIFEST.json").read_text())}
    records = load_records(task, DATA)
    assert len(records) == count
    from lalora_curv.tasks.data import TASKS

    assert manifest[TASKS[task][0]] == count


def test_limit_takes_the_first_records_and_sample_a_seeded_subset():
    full = load_records("arc_challenge", DATA)
    assert load_records("arc_challenge", DATA, limit=5) == full[:5]  # the harness's --limit
    a = load_records("arc_challenge", DATA, sample=20, seed=1)
    b = load_records("arc_challenge", DATA, sample=20, seed=1)
    c = load_records("arc_challenge", DATA, sample=20, seed=2)
    assert a == b and a != c and len(a) == 20
    positions = [full.index(r) for r in a]
    assert positions == sorted(positions)


def test_hellaswag_item_by_hand():
    doc = load_records("hellaswag", DATA)[0]
    (item,) = multiple_choice_items("hellaswag", [doc])
    assert item.contexts[0] == (
        "Pole vault: Pole vault is a sport where you run with a pole "
        "and stop and swing your body. A few women"
    )
    assert item.continuations[3] == (
        " are in the gym practicing to do this pole vault, trying to do their best."
    )
    assert item.gold == 3 and item.use_acc_norm


def test_hellaswag_preprocessing_of_wikihow_brackets():
    # the harness's steps, by hand: strip; " [title]" -> ". "; drop "[...]"; one pass of
    # "  " -> " " (so a leading space and one double space survive, as in the harness)
    text = " [header] How to cook [title] Heat oil.  [step] Stir. "
    assert hellaswag_preprocess(text) == " How to cook. Heat oil.  Stir."
    wikihow = [r for r in load_records("hellaswag", DATA) if "[" in r["ctx_a"] + r["ctx_b"]]
    assert wikihow  # the file's WikiHow records carry bracket markup
    for item in multiple_choice_items("hellaswag", wikihow):
        assert "[" not in item.contexts[0] and "]" not in item.contexts[0]


def test_winogrande_partial_scoring_by_hand():
    doc = load_records("winogrande", DATA)[0]
    (item,) = multiple_choice_items("winogrande", [doc])
    assert item.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert item.continuations == (" always got the easier cases.",) * 2
    assert item.gold == 1 and not item.use_acc_norm


def test_arc_letters_and_digits():
    records = load_records("arc_challenge", DATA)
    (item,) = multiple_choice_items("arc_challenge", records[:1])
    assert item.contexts[0].startswith("Question: An astronomer observes") and item.contexts[
        0
    ].endswith("\nAnswer:")
    assert item.gold == 2 and item.continuations[2] == " Planetary days will become shorter."
    digits = [r for r in records if r["answerKey"].isdigit()]
    assert digits  # some ARC questions use 1-4 as labels
    for r, item in zip(digits, multiple_choice_items("arc_challenge", digits), strict=True):
        labels = [c["label"] for c in r["question"]["choices"]]
        assert item.gold == labels.index(r["answerKey"])
    assert {len(i.continuations) for i in multiple_choice_items("arc_challenge", records)} <= {
        3,
        4,
        5,
    }


def test_hub_layouts_become_the_local_schema(tmp_path):
    from lalora_curv.tasks.data import _canonical

    local = load_records("arc_challenge", DATA)[0]
    q = local["question"]
    hub = {
        "id": local["id"],
        "question": q["stem"],
        "answerKey": local["answerKey"],
        "choices": {
            "text": [c["text"] for c in q["choices"]],
            "label": [c["label"] for c in q["choices"]],
        },
    }
    assert _canonical("arc_challenge", hub, "hub") == local
    hs = load_records("hellaswag", DATA)[0]
    assert _canonical("hellaswag", {**hs, "label": "3"}, "hub")["label"] == 3
    with pytest.raises(TaskDataError, match="no gold label"):
        _canonical("hellaswag", {**hs, "label": ""}, "hub")
    wino = {k: v for k, v in load_records("winogrande", DATA)[0].items() if k != "qID"}
    assert _canonical("winogrande", wino, "hub") == wino


def test_malformed_and_missing_files_are_named(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"\n')
    with pytest.raises(TaskDataError, match=r"test\.jsonl:2: not valid JSON"):
        load_records("gsm8k", tmp_path)
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "7"}\n')
    with pytest.raises(TaskDataError, match=r"test\.jsonl:2: gsm8k answer has no '#### "):
        load_records("gsm8k", tmp_path)
    with pytest.raises(TaskDataError, match="no such file"):
        load_records("arc_challenge", tmp_path)
    with pytest.raises(TaskDataError, match="unknown task 'mmlu'"):
        load_records("mmlu", tmp_path)


def test_every_gsm8k_gold_number_is_recovered():
    records = load_records("gsm8k", DATA)
    golds = [gold_answer(r["answer"]) for r in records]
    assert sum("," in r["answer"].split("####")[-1] for r in records) == 14
    assert sum(g.startswith("-") for g in golds) == 2
    for r in records:  # the reference solution, scored as a generation, matches both ways
        assert exact_match(r["answer"], r["answer"], "strict"), r["answer"]
        assert exact_match(r["answer"], r["answer"], "flexible"), r["answer"]


def test_gsm8k_extraction_and_normalisation():
    gen = "She pays $1,200 in total.\n#### 1,200\n\nQuestion: next"
    assert extract_strict(gen) == "1,200" and normalize_answer("1,200") == "1200"
    assert extract_flexible("so the answer is 42.") == "42."
    assert normalize_answer(extract_flexible("so the answer is 42.")) == "42"
    assert extract_strict("no marker 42") is None and extract_flexible("none") is None
    assert exact_match("The answer is $18.", "...\n#### 18", "flexible")
    assert not exact_match("The answer is $18.", "...\n#### 18", "strict")
    assert gsm8k_prompt("Q?") == "Question: Q?\nAnswer:"
    assert gsm8k_prompt("Q?", [("a", "b")]) == "Question: a\nAnswer: b\n\nQuestion: Q?\nAnswer:"
