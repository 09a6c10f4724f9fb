"""The embedded benchmark: its world, its cached model, and that plain LoRA really forgets."""

from __future__ import annotations

import os

import pytest
import torch

from lalora_curv.testbed import SOURCES, World, pretrained
from lalora_curv.testbed.experiment import finetune, source_accuracy, target_accuracy
from lalora_curv.testbed.model import make_tokenizer


def test_world_is_deterministic_and_covered_by_its_tokenizer():
    a, b, c = World(0), World(0), World(1)
    assert a.entities == b.entities and a.colour == b.colour and a.entities != c.entities
    tok = make_tokenizer(a)
    texts = a.pretraining_texts(__import__("random").Random(0), 200)
    texts += [p + a_ for p, a_ in a.problems("train", 50) + a.problems("test", 50)]
    for t in texts:
        assert tok.unk_token_id not in tok(t, add_special_tokens=False)["input_ids"], t
    for source in SOURCES:
        items = a.source_items(source)
        assert len(items) == len(a.entities)
        for e, item in zip(a.entities, items, strict=True):
            assert item.continuations[item.gold].strip() == a.fact(source, e)[1]
            assert len(set(item.continuations)) == 4
    train_people = {p.split()[2] for p, _ in a.problems("train", 300)}
    test_people = {p.split()[2] for p, _ in a.problems("test", 300)}
    assert not train_people & test_people
    for p, ans in a.problems("test", 20):
        numbers = [int(w) for w in p.split() if w.isdigit()]
        assert int(ans) == sum(numbers)


def test_pretrained_model_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LALORA_CURV_CACHE", str(tmp_path))
    tiny = {"steps": 3, "texts": 50, "hidden": 32, "mlp": 64, "layers": 1, "heads": 2}
    model, tok, world = pretrained(0, tiny, progress=False)
    again, _, _ = pretrained(0, tiny, progress=False)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    entries = os.listdir(tmp_path / "testbed")
    assert len(entries) == 1 and not entries[0].startswith(".")  # no staging directory left
    acc = source_accuracy(model, tok, world)
    assert set(acc) == set(SOURCES) and all(0 <= v <= 1 for v in acc.values())
    assert 0 <= target_accuracy(model, tok, world.problems("test", 10)) <= 1


@pytest.mark.slow  # 1000 steps on the default model (+ its ~2 min pretraining when not cached)
def test_plain_lora_forgets_while_it_learns():
    """The benchmark's reason to exist: on the default model (pretrained once, ~2 minutes),
    plain LoRA on all linear modules at lr 3e-3 learns the target and loses >= 10 points of
    source accuracy."""
    model, tok, world = pretrained(0, progress=False)
    assert source_accuracy(model, tok, world) == {s: 1.0 for s in SOURCES}
    result = finetune(model, tok, world, steps=1000, lr=3e-3)
    assert result["target_gain"] >= 0.15, result
    assert result["source_drop"] >= 0.10, result


@pytest.mark.parametrize("steps", [3, 20, 40])
def test_pretraining_runs_at_step_counts_where_one_cycle_warmup_has_one_step(
    steps, tmp_path, monkeypatch
):
    """OneCycleLR divides by pct_start * steps - 1: 20 steps at pct 0.05 used to crash."""
    monkeypatch.setenv("LALORA_CURV_CACHE", str(tmp_path))
    tiny = {"steps": steps, "texts": 20, "hidden": 16, "mlp": 32, "layers": 1, "heads": 2}
    model, _, _ = pretrained(0, tiny, progress=False)
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    with pytest.raises(ValueError, match="at least 3 steps"):
        pretrained(0, {**tiny, "steps": 2}, progress=False)
