"""The paper's recipe (``lalora-curv paper``): end to end on the real task files with a tiny
random Llama, its splits, its selection on validation, its resumption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

import lalora_curv as lc
from helpers import DATA, byte_tokenizer
from lalora_curv.__main__ import main
from lalora_curv.strength import mean_curvature
from lalora_curv.tasks.data import load_records
from lalora_curv.testbed.paper import (
    SOURCES,
    RecipeConfig,
    RecipeError,
    pick,
    recipe_splits,
    score,
)
from lalora_curv.toy import tiny_llama

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (the shared data) is absent")

SMALL = dict(fit_records=6, val_records=4, test_records=5, train_records=8)


def _untimed(metrics):
    """``metrics`` without the ``seconds`` each scoring took."""
    if isinstance(metrics, dict):
        return {k: _untimed(v) for k, v in metrics.items() if k != "seconds"}
    return metrics


def _key(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


@needs_data
def test_splits_are_disjoint_and_held_out_of_the_test_split():
    splits = recipe_splits(DATA, RecipeConfig(**SMALL))
    for task, parts in splits.records.items():
        keys = {p: {_key(r) for r in recs} for p, recs in parts.items()}
        names = list(keys)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                assert not keys[a] & keys[b], f"{task}: {a} and {b} share records"
    # tasks with a training file: fit and val from it, test = the evaluation split's first N
    for task in ("winogrande", "arc_challenge"):
        train = {_key(r) for r in load_records(task, DATA, split="train")}
        assert {_key(r) for r in splits.records[task]["fit"]} <= train
        assert {_key(r) for r in splits.records[task]["val"]} <= train
        assert splits.records[task]["test"] == load_records(task, DATA, limit=5)
    # HellaSwag has none here: its evaluation records are cut three ways, and that is said
    evaluation = {_key(r) for r in load_records("hellaswag", DATA)}
    for part in ("fit", "val", "test"):
        assert {_key(r) for r in splits.records["hellaswag"][part]} <= evaluation
    assert any(n.startswith("hellaswag: no training split") for n in splits.notes)
    assert splits.counts()["gsm8k"] == {"train": 8, "val": 4, "test": 5}
    assert splits.records["gsm8k"]["test"] == load_records("gsm8k", DATA, limit=5)
    # seeded: the same seed, the same records; another seed, others
    again = recipe_splits(DATA, RecipeConfig(**SMALL))
    assert again.records == splits.records
    other = recipe_splits(DATA, RecipeConfig(**SMALL, seed=1))
    assert other.records["winogrande"]["fit"] != splits.records["winogrande"]["fit"]


@needs_data
def test_splits_refuse_what_the_data_cannot_give(tmp_path):
    for task in ("winogrande", "arc_challenge", "gsm8k"):
        (tmp_path / task).symlink_to(DATA / task)
    (tmp_path / "hellaswag").mkdir()  # three times the records: enough to fit on 1100
    text = (DATA / "hellaswag" / "hellaswag.jsonl").read_text()
    (tmp_path / "hellaswag" / "hellaswag.jsonl").write_text(text * 3)
    with pytest.raises(RecipeError, match="hellaswag has no training split"):
        recipe_splits(DATA, RecipeConfig(fit_records=900, val_records=100))
    with pytest.raises(RecipeError, match="arc_challenge: 1119 training records cannot give"):
        recipe_splits(tmp_path, RecipeConfig(fit_records=1100, val_records=100))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(cs=()), "cs must be"),
        (dict(cs=(0.0,)), "cs must be"),
        (dict(controls=("l3",)), "unknown control 'l3'"),
        (dict(fit_records=0), "fit_records must be"),
        (dict(structure="isotropic"), "not a fitted curvature"),
        (dict(max_steps=True), "max_steps must be"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(RecipeError, match=message):
        RecipeConfig(**settings)


def _variant(name, family, c, source, target):
    return {
        "name": name,
        "family": family,
        "c": c,
        "val": {"source": source, "target": target, "selection": (source + target) / 2},
    }


def test_pick_maximises_the_validation_score_and_breaks_ties_towards_the_weaker_strength():
    variants = [
        _variant("lalora-c0.1", "lalora", 0.1, 0.50, 0.30),
        _variant("lalora-c1", "lalora", 1.0, 0.60, 0.28),  # best mean: 0.44
        _variant("lalora-c10", "lalora", 10.0, 0.62, 0.20),
        _variant("l2-c0.1", "l2", 0.1, 0.5, 0.1),
        _variant("l2-c1", "l2", 1.0, 0.5, 0.1),  # tie with c = 0.1
    ]
    assert pick(variants, "lalora")["name"] == "lalora-c1"
    assert pick(variants, "l2")["name"] == "l2-c0.1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paper")
    tok = byte_tokenizer()
    model = tiny_llama(
        vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1
    )
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def _args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "paper", "--model", str(model_dir), "--data_dir", str(DATA), "--out", str(out),
        "--fit_records", "6", "--val_records", "4", "--test_records", "5",
        "--train_records", "8", "--max_steps", "3", "--batch_size", "4", "--r", "2",
        "--lora_alpha", "4", "--target_modules", "q_proj,v_proj", "--cs", "1",
        "--max_new_tokens", "6", "--eval_batch_size", "8", "--max_length", "256",
        "--checkpoint_every", "2", "--no_progress", *extra,
    ]  # fmt: skip


@pytest.mark.slow  # the whole recipe on the real files, three times (run, resume, refusal)
@needs_data
def test_recipe_end_to_end_through_the_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(model_dir, out)) in (0, None)
    printed = capsys.readouterr().out
    assert "hellaswag: no training split" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["picks"] == {"lora": "lora", "lalora": "lalora-c1", "l2": "l2-c1"}
    assert set(result["test"]) == {"base", "lora", "lalora", "l2"}
    assert result["splits"]["hellaswag"] == {"fit": 6, "val": 4, "test": 5}
    variants = [json.loads(x) for x in (out / "variants.jsonl").read_text().splitlines()]
    assert [v["name"] for v in variants] == ["lora", "lalora-c1", "l2-c1"]
    assert all(v["steps"] == 3 for v in variants)
    # the precision: one artifact per source and the pooled sum, fitted at the saved init
    parts = [lc.load_precision(out / "precision" / t) for t in SOURCES]
    assert [p.metadata["sources"] for p in parts] == [[t] for t in SOURCES]
    prec = parts[0] + parts[1] + parts[2]
    assert result["precision"]["digest"] == prec.digest()
    # the strength is relative: lambda = c / m(P), for LALoRA and for the L2 control
    by_name = {v["name"]: v for v in variants}
    assert by_name["lalora-c1"]["lam"] == pytest.approx(1.0 / mean_curvature(prec), rel=1e-6)
    assert by_name["lora"]["lam"] == 0.0
    # the numbers are the saved adapters' own: re-scored independently from the files
    tok = byte_tokenizer()
    config = RecipeConfig(**SMALL, max_new_tokens=6, eval_batch_size=8)
    splits = recipe_splits(DATA, config)
    test = {t: parts_["test"] for t, parts_ in splits.records.items()}
    for family, name in result["picks"].items():
        model = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(model_dir), out / "adapters" / name
        )
        again = score(model, tok, test, config)
        assert again["source"] == pytest.approx(result["test"][family]["source"], abs=1e-12)
        assert _untimed(again["gsm8k"]) == _untimed(result["test"][family]["gsm8k"])
    # trained adapters moved; the init is the mode
    init = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(model_dir), out / "adapter_init"
    )
    lora = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(model_dir), out / "adapters/lora"
    )
    a = {n: p for n, p in init.named_parameters() if "lora_B" in n}
    b = {n: p for n, p in lora.named_parameters() if "lora_B" in n}
    assert all(torch.all(a[n] == 0) for n in a) and any(torch.any(b[n] != 0) for n in b)
    assert (out / "table.md").read_text().count("\n") == 6  # header, rule, 4 rows
    assert (out / "recipe.png").is_file()
    # resumed: nothing is trained again, the same picks and test numbers
    assert main(_args(model_dir, out)) in (0, None)
    printed = capsys.readouterr().out
    assert "reusing the precision" in printed and "lora: done earlier" in printed
    again = json.loads((out / "results.json").read_text())
    assert _untimed(again["test"]) == _untimed(result["test"])
    # another setting into the same run directory is refused, and nothing is touched
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(_args(model_dir, out, "--lr", "1e-3")) == 1
    assert "other settings (lr: 0.0002 there, 0.001 now)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow  # the recipe on the real files, twice
@needs_data
def test_a_variant_killed_in_training_continues_from_its_checkpoint(model_dir, tmp_path):
    """A run stopped after lora's checkpoint at step 2 (simulated: its variant line removed,
    its adapter and final checkpoint deleted) trains lora from step 2, not from 0."""
    out = tmp_path / "run"
    assert main(_args(model_dir, out, "--controls", "")) in (0, None)
    first = json.loads((out / "results.json").read_text())
    lines = (out / "variants.jsonl").read_text().splitlines()
    (out / "variants.jsonl").write_text("\n".join(lines[1:]) + "\n")  # lora unfinished
    steps = sorted((out / "checkpoints" / "lora").iterdir())
    for later in steps[1:]:
        shutil.rmtree(later)
    log = out / "logs" / "lora.jsonl"
    assert main(_args(model_dir, out, "--controls", "")) in (0, None)
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in records if "nll" in r] == [1, 2, 3]  # each step once
    again = json.loads((out / "results.json").read_text())
    assert _untimed(again["test"]["lora"]) == _untimed(first["test"]["lora"])  # bit-identical
