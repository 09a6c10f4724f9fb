"""The real-text scenario: texts from the real files, per-token NLL, tokenizer, short pretraining."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lalora_curv as lc
from helpers import DATA
from lalora_curv.strength import Strength
from lalora_curv.tasks import load_records
from lalora_curv.tasks.data import TaskDataError
from lalora_curv.testbed import finetune as ft
from lalora_curv.testbed import realtext as rt
from lalora_curv.testbed import realtext_data as rd

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (the shared data) is absent")

TINY = {
    "vocab": 300,
    "hidden": 16,
    "layers": 1,
    "heads": 2,
    "mlp": 32,
    "block": 32,
    "steps": 10,
    "batch": 4,
    "lr": 2e-2,
}


@pytest.fixture(scope="module")
def data() -> rd.RealText:
    return rd.RealText(DATA, eval_sample=40)


@pytest.fixture(scope="module")
def small(data) -> rd.RealText:
    """The same data with 60 training texts per task and 30 GSM8K pairs (fast pretraining)."""
    d = copy.copy(data)
    d.train = {t: v[:60] for t, v in data.train.items()}
    d.target_train = data.target_train[:30]
    return d


def test_source_texts_of_hand_checked_records():
    wino = load_records("winogrande", DATA, limit=2)  # answer "2" (Maria), then "1" (Sarah)
    assert rd.source_text("winogrande", wino[0]) == (
        "Sarah was a much better surgeon than Maria so Maria always got the easier cases."
    )
    assert rd.source_text("winogrande", wino[1]) == (
        "Sarah was a much better surgeon than Maria so Sarah always got the harder cases."
    )
    hella = load_records("hellaswag", DATA, limit=1)[0]  # label 3
    assert rd.source_text("hellaswag", hella) == (
        "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your "
        "body. A few women are in the gym practicing to do this pole vault, trying to do their "
        "best."
    )
    arc = load_records("arc_challenge", DATA, limit=1)[0]  # answerKey C
    assert rd.source_text("arc_challenge", arc) == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite "
        "impact. Which is the most likely effect of this increase in rotation?\n"
        "Answer: Planetary days will become shorter."
    )
    with pytest.raises(TaskDataError, match="not a source task"):
        rd.source_text("gsm8k", {})


def test_hellaswag_pretraining_text_leaves_out_every_held_out_item():
    items = rd.hellaswag_full_texts(DATA)
    assert len(items) == 10042
    # line 37 of the file: gold 2 of four endings (hand-checked), moved to the front
    ctx, endings = items[6]
    assert ctx.startswith("Playing harmonica: A man is standing in front of a camera.")
    assert endings[0] == "rocks back and forth to the music as he goes."
    train = rd.source_texts("hellaswag", DATA, "train")
    assert train[0] == (
        "Playing harmonica: A man is standing in front of a camera. He starts playing a "
        "harmonica for the camera. he rocks back and forth to the music as he goes."
    )
    # items 0-5 (the first two below) are in hellaswag.jsonl
    gone = ("Roof shingle removal: A man is sitting on a roof.", "Clean and jerk: A lady walks")
    assert not any(t.startswith(gone) for t in train)
    held = {rd._norm(t) for t in rd.source_texts("hellaswag", DATA, "eval")}
    assert len(held) == 1000 and not held & {rd._norm(t) for t in train}
    assert 8900 < len(train) < 10042 - 1000 + 1


def test_data_files_hash_as_the_manifest_says(data):
    manifest = {m["file"]: m["sha256"] for m in json.loads((DATA / "MANIFEST.json").read_text())}
    fingerprint = data.fingerprint()
    assert len(fingerprint) == 8 and set(fingerprint) <= set(manifest)
    for name, digest in fingerprint.items():
        assert digest == manifest[name], name
    assert data.target_train[0][0].startswith("Question: ") and data.target_train[0][0].endswith(
        "\nAnswer:"
    )
    assert data.target_train[0][1].startswith(" ") and "\n#### " in data.target_train[0][1]
    assert all(len(v) == 40 for v in data.eval.values()) and len(data.target_test) == 40


@torch.no_grad()
def _reference_nll(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Sum over positions t of -log softmax(logits_t)[labels_{t+1}], one unpadded sequence."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    total, count = 0.0, 0
    for t in range(len(ids) - 1):
        if labels[t + 1] == -100:
            continue
        z = logits[t]
        total += float(torch.logsumexp(z, 0) - z[labels[t + 1]])
        count += 1
    return total, count


def test_token_nll_against_a_manual_computation_with_padding_and_masked_labels():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).double().eval()
    seqs = [[3, 5, 7, 9, 11, 2], [4, 6, 8], [1, 2, 3, 4, 5, 6, 7, 8]]
    labs = [[-100, -100, 7, 9, 11, 2], [-100, 6, 8], [-100, 2, -100, 4, 5, -100, 7, 8]]
    width = max(map(len, seqs))
    batch = {
        "input_ids": torch.zeros(3, width, dtype=torch.long),
        "attention_mask": torch.zeros(3, width, dtype=torch.long),
        "labels": torch.full((3, width), -100),
    }
    for i, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
        batch["input_ids"][i, : len(s)] = torch.tensor(s)
        batch["input_ids"][i, len(s) :] = 13  # padding ids the mask must hide
        batch["attention_mask"][i, : len(s)] = 1
        batch["labels"][i, : len(s)] = torch.tensor(lab)
    total, count = rd.token_nll(model, [batch])
    ref = [_reference_nll(model, s, lab) for s, lab in zip(seqs, labs, strict=True)]
    assert count == sum(c for _, c in ref) == 4 + 2 + 5
    assert total == pytest.approx(sum(t for t, _ in ref), rel=1e-10)
    # split into two batches: the same sums
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    assert rd.token_nll(model, halves) == pytest.approx((total, count), rel=1e-10)


def test_text_batches_supervise_every_text_token_and_the_closing_eos(data):
    tok = rd.wrap_tokenizer(rd.train_bpe(data.train["winogrande"][:200], 400))
    texts = data.eval["winogrande"][:3]
    (batch,) = rd.text_batches(texts, tok, batch_size=3)
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        row = batch["input_ids"][i, : len(ids) + 2].tolist()
        assert row == [tok.eos_token_id, *ids, tok.eos_token_id]
        assert batch["labels"][i].tolist() == (
            [-100, *ids, tok.eos_token_id] + [-100] * (batch["labels"].shape[1] - len(ids) - 2)
        )


def test_tokenizer_is_deterministic_across_processes_and_round_trips(data):
    texts = data.train["arc_challenge"][:300] + [p + a for p, a in data.target_train[:100]]
    here = rd.train_bpe(texts, 600)
    assert here.get_vocab_size() == 600 and here.token_to_id(rd.PAD) == 0
    assert here.token_to_id(rd.EOS) == 1
    script = (
        "import json, sys; from lalora_curv.testbed.realtext_data import train_bpe; "
        "print(train_bpe(json.load(sys.stdin), 600).to_str())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    assert (
        hashlib.sha256(other.encode()).digest() == hashlib.sha256(here.to_str().encode()).digest()
    )
    tok = rd.wrap_tokenizer(here)
    for t in [*data.eval["arc_challenge"][:20], "Unseen ✓ bytes: ü\n"]:
        assert tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t


def test_short_pretraining_is_reproducible_and_cached(small, tmp_path, monkeypatch):
    model_a, tok_a, _ = rt.pretrain(small, {**TINY, "seed": 1}, progress=False)
    model_b, tok_b, _ = rt.pretrain(small, {**TINY, "seed": 1}, progress=False)
    model_c, _, _ = rt.pretrain(small, {**TINY, "seed": 2}, progress=False)
    assert tok_a.backend_tokenizer.to_str() == tok_b.backend_tokenizer.to_str()
    assert len(tok_a) == 300
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not torch.equal(model_a.lm_head.weight, model_c.lm_head.weight)
    # it trained: it fits its own training blocks better than an untrained model does
    blocks = rt.packed_blocks(
        [t for task in rd.SOURCES for t in small.train[task]], tok_a, 32, seed=1
    )[:16]
    untrained = LlamaForCausalLM(model_a.config).eval()
    batch = [{"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks}]
    assert rd.token_nll(model_a, batch)[0] < rd.token_nll(untrained, batch)[0] - 0.1 * 16 * 31

    monkeypatch.setenv("LALORA_CURV_CACHE", str(tmp_path))
    # the settings PRETRAIN adds, at what rt.pretrain reads when they are absent
    settings = {**TINY, "weight_decay": 0.01, "gsm8k_questions": False, "val_fraction": 0.0}
    first, tok = rt.pretrained(small, settings, seed=1, progress=False)
    again, _ = rt.pretrained(small, settings, seed=1, progress=False)
    for (n, p), (_, q) in zip(model_a.named_parameters(), first.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    for (n, p), (_, q) in zip(first.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    entries = os.listdir(tmp_path / "realtext")
    assert len(entries) == 1 and not entries[0].startswith(".")
    saved = json.loads((tmp_path / "realtext" / entries[0] / "realtext.json").read_text())
    assert saved["data"] == small.fingerprint() and saved["hidden"] == 16
    result = rt.evaluate(first, tok, small, batch_size=16)
    assert set(result["source"]) == set(rd.SOURCES) and result["target_tokens"] > 0
    # a 300-token vocabulary: a model barely trained is near log(300) = 5.7 per token
    assert 3.0 < result["source_all"] < 7.0 and 3.0 < result["target"] < 7.0


def test_finetune_measures_both_sides_and_a_zero_lambda_penalty_changes_nothing(small):
    model, tok, _ = rt.pretrain(small, {**TINY, "seed": 0}, progress=False)
    kw = dict(steps=3, lr=1e-2, batch_size=4, max_length=64, fit_texts=8)
    plain = rt.finetune(copy.deepcopy(model), tok, small, eval_every=2, **kw)
    assert [c["step"] for c in plain["trajectory"]] == [2, 3]  # every 2 steps and the end
    assert {k: v for k, v in plain["trajectory"][-1].items() if k != "step"} == plain["after"]
    zero = rt.finetune(copy.deepcopy(model), tok, small, precision_structure="kfac", **kw)
    assert plain["before"] == zero["before"]
    assert plain["after"] == zero["after"]  # same training pairs, penalty weighted by 0
    assert plain["after"]["target"] != plain["before"]["target"]
    a, b = plain["after"], plain["before"]
    assert plain["source_increase"] == pytest.approx(a["source_all"] - b["source_all"])
    assert plain["target_decrease"] == pytest.approx(b["target"] - a["target"])
    # the pooled source NLL is the token-weighted mean of the per-task NLLs
    counts = {
        t: rd.token_nll(model, rd.text_batches(small.eval[t], tok, 16, 64))[1] for t in rd.SOURCES
    }
    pooled = sum(counts[t] * b["source"][t] for t in rd.SOURCES) / sum(counts.values())
    assert b["source_all"] == pytest.approx(pooled, rel=1e-6)
    strong = rt.finetune(
        copy.deepcopy(model), tok, small, precision_structure="kfac", strength=1e4, **kw
    )
    assert strong["final_penalty"] > 0 and strong["after"] != plain["after"]


def test_finetune_on_a_self_generated_precision_of_the_same_token_count(small):
    model, tok, _ = rt.pretrain(small, {**TINY, "seed": 0}, progress=False)
    kw = dict(steps=2, lr=1e-2, batch_size=4, max_length=64, fit_texts=8)
    texts = rt.finetune(copy.deepcopy(model), tok, small, precision_structure="kfac", **kw)
    own = rt.finetune(
        copy.deepcopy(model),
        tok,
        small,
        precision_structure="kfac",
        source="self-generated",
        strength=Strength.relative(0.5),
        **kw,
    )
    n = texts["source_tokens"]
    assert n <= own["source_tokens"] < n + 64  # at most one sequence more than the texts
    assert own["lam_applied"] == pytest.approx(0.5 / own["mean_curvature"])
    assert own["final_penalty"] > 0
    with pytest.raises(ValueError, match="source"):
        rt.finetune(model, tok, small, precision_structure="kfac", source="web", **kw)


@pytest.fixture(scope="module")
def tiny_adapter(small):
    from peft import LoraConfig, get_peft_model

    model, tok, _ = rt.pretrain(small, {**TINY, "seed": 0}, progress=False)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"])), tok


@pytest.mark.parametrize("structure", lc.STRUCTURES)
def test_every_fitted_structure_gets_a_precision_pooled_over_the_source_tasks(
    small, tiny_adapter, structure
):
    """EKFAC, whose fits cannot be added, included: one fit on every task's texts."""
    peft_model, tok = tiny_adapter
    kw = dict(estimator="empirical", fit_texts=4, max_length=32)
    prec = rt.source_precision(peft_model, tok, small, structure=structure, **kw)
    kfac = rt.source_precision(peft_model, tok, small, structure="kfac", **kw)
    assert prec.structure == structure and prec.metadata["sources"] == list(rd.SOURCES)
    assert prec.counts["supervised_tokens"] == kfac.counts["supervised_tokens"] > 0


def test_finetune_seed_sets_the_lora_init_and_data_order_and_reproduces(small, monkeypatch):
    model, tok, _ = rt.pretrain(small, {**TINY, "seed": 0}, progress=False)
    inits, orders = [], []
    lora_adapter, train = ft.lora_adapter, ft.lc.train

    def spy_peft(*args, **kwargs):
        peft_model = lora_adapter(*args, **kwargs)
        inits.append(
            [p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n]
        )
        return peft_model

    def spy_train(peft_model, batches, *args, **kwargs):
        orders.append(torch.cat([b["input_ids"][:, :8] for b in batches]))
        return train(peft_model, batches, *args, **kwargs)

    monkeypatch.setattr(ft, "lora_adapter", spy_peft)
    monkeypatch.setattr(ft.lc, "train", spy_train)
    kw = dict(steps=4, lr=1e-2, batch_size=4, max_length=64, fit_texts=8, eval_every=2)
    kw |= dict(precision_structure="kfac", mc_samples=2, strength=1e3)
    runs = [rt.finetune(copy.deepcopy(model), tok, small, seed=s, **kw) for s in (0, 0, 1)]
    # every checkpoint of a LALoRA run is measured, as for plain LoRA
    assert [c["step"] for c in runs[0]["trajectory"]] == [2, 4]
    # a fixed seed: the same init, data order and numbers, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(inits[0], inits[1], strict=True))
    assert torch.equal(orders[0], orders[1])
    assert runs[0] == runs[1]
    # another seed: another LoRA init (every lora_A), other training pairs in another order
    assert len(inits[0]) > 0 and not any(
        torch.equal(a, b) for a, b in zip(inits[0], inits[2], strict=True)
    )
    assert not torch.equal(orders[0], orders[2])
    assert runs[2]["before"] == runs[0]["before"]  # B = 0: the untouched model either way
    assert runs[2]["trajectory"][0]["target"] != runs[0]["trajectory"][0]["target"]
    assert runs[2]["lam_applied"] == runs[0]["lam_applied"] == 1e3


def test_validation_and_test_splits_are_disjoint_seeded_samples():
    d = rd.RealText(DATA, eval_sample=30, val_sample=20, seed=3)
    again = rd.RealText(DATA, eval_sample=30, val_sample=20, seed=3)
    for task in rd.SOURCES:
        assert len(d.eval[task]) == 30 and len(d.val[task]) == 20
        assert not set(d.eval[task]) & set(d.val[task])
        assert d.eval[task] == again.eval[task] and d.val[task] == again.val[task]
    assert len(d.target_test) == 30 and len(d.target_val) == 20
    assert not set(d.target_test) & set(d.target_val)
    # held out of training: no GSM8K test question is a training question
    assert not {p for p, _ in d.target_val} & {p for p, _ in d.target_train}
    with pytest.raises(TaskDataError, match="fewer than"):
        rd._split(list(range(10)), 8, 3, 0, "toy")
    with pytest.raises(ValueError, match="split"):
        rt.evaluate(None, None, rd.RealText(DATA, eval_sample=5), split="val")


def test_pretraining_text_adds_the_gsm8k_questions_and_never_an_answer(small):
    base = rt.pretraining_texts(small, {"gsm8k_questions": False})
    texts = rt.pretraining_texts(small, {"gsm8k_questions": True})
    assert texts[: len(base)] == base
    assert texts[len(base) :] == [q for q, _ in small.target_train]
    answers = {a.strip() for _, a in small.target_train}
    assert not any(t.strip() in answers for t in texts)
    assert all("####" not in t for t in texts[len(base) :])


def test_pretraining_keeps_the_step_of_lowest_validation_nll(small):
    cfg = {**TINY, "seed": 0, "steps": 8, "lr": 5e-2, "val_fraction": 0.25, "val_every": 3}
    model, tok, report = rt.pretrain(small, cfg, progress=False)
    steps = [p["step"] for p in report["validation"]]
    assert steps == [3, 6, 8]  # every val_every steps and the last
    best = min(report["validation"], key=lambda p: p["val_nll"])
    assert report["kept_step"] == best["step"]
    blocks = rt.packed_blocks(rt.pretraining_texts(small, cfg), tok, cfg["block"], cfg["seed"])
    val = blocks[: report["val_blocks"]]
    assert report["val_blocks"] + report["train_blocks"] == len(blocks)
    batch = [{"input_ids": val, "attention_mask": torch.ones_like(val), "labels": val}]
    total, count = rd.token_nll(model, batch)
    assert total / count == pytest.approx(best["val_nll"], rel=1e-6)


@pytest.mark.parametrize(
    "structure,scope", [("isotropic", "all"), ("isotropic", "lora_B"), ("merged-isotropic", "all")]
)
def test_finetune_with_an_isotropic_control_measures_both_splits(structure, scope):
    data = rd.RealText(DATA, eval_sample=8, val_sample=6)
    small = copy.copy(data)
    small.train = {t: v[:40] for t, v in data.train.items()}
    small.target_train = data.target_train[:30]
    model, tok, _ = rt.pretrain(small, {**TINY, "seed": 0}, progress=False)
    kw = dict(steps=2, lr=1e-2, batch_size=4, max_length=64, eval_every=1, validation=True)
    result = rt.finetune(
        copy.deepcopy(model),
        tok,
        small,
        precision_structure=structure,
        scope=scope,
        strength=Strength.relative(3.0),
        **kw,
    )
    assert set(result["before"]["val"]) == {"source", "source_all", "target", "target_tokens"}
    assert [c["step"] for c in result["trajectory"]] == [1, 2]
    assert result["trajectory"][-1]["val"] != result["before"]["val"]
    assert result["final_penalty"] > 0
    # lam = c / mean eigenvalue: the mean of an all-LoRA isotropic control is 1, of the
    # lora_B one the share of lora_B entries, of the merged one D_out D_in / (r (D_in + D_out))
    assert result["lam_applied"] == pytest.approx(3.0 / result["mean_curvature"])
    shapes = [
        (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in rt.ALL_LINEAR
    ]
    r = 8  # finetune's default rank
    entries = {"lora_A": sum(r * i for i, _ in shapes), "lora_B": sum(o * r for _, o in shapes)}
    n_params = entries["lora_A"] + entries["lora_B"]
    expected = {
        ("isotropic", "all"): 1.0,
        ("isotropic", "lora_B"): entries["lora_B"] / n_params,
        ("merged-isotropic", "all"): sum(i * o for i, o in shapes) / n_params,
    }[structure, scope]
    assert result["mean_curvature"] == pytest.approx(expected, rel=1e-12)


REALTEXT_GRID = {
    "benchmark": {"scenario": "realtext", "eval_sample": 5, "val_sample": 4, "fit_texts": 6,
                  "batch_size": 2, "max_length": 64},
    "seeds": [0],
    "common": {"lr": 1.0e-2, "steps": 4, "eval_every": 2, "rank": 2, "targets": "q_proj,v_proj"},
    "methods": {
        "lora": {},
        "l2-lora-B": {"method": "lalora", "structure": "isotropic", "scope": "lora_B", "c": 1.0},
        "kfac-mc": {"method": "lalora", "structure": "kfac", "estimator": "mc",
                    "mc_samples": 1, "c": 0.5},
    },
}  # fmt: skip


def test_realtext_grid_cells_carry_the_shipped_model_and_refuse_what_does_not_apply():
    from lalora_curv.testbed.grid import GridError, expand_grid

    cells = expand_grid(REALTEXT_GRID)
    assert [c["method"] for c in cells] == ["lora", "l2-lora-B", "kfac-mc"]
    bench = cells[0]["benchmark"]
    assert bench["scenario"] == "realtext" and len(bench["model"]) == 16
    iso = cells[1]
    assert iso["scope"] == "lora_B" and "estimator" not in iso and "mc_samples" not in iso
    bad = [
        ({"benchmark": {"scenario": "realtext", "pretrain_seed": 0}}, "unknown setting"),
        ({"methods": {"m": {"method": "migu"}}}, "not offered on the realtext"),
        ({"methods": {"p": {"method": "lora", "init": "pissa"}}}, "default init only"),
        ({"methods": {"k": {"method": "lalora", "structure": "kfac", "scope": "all", "c": 1}}},
         "scope applies to structure isotropic only"),
        ({"benchmark": {"scenario": "moon"}}, "unknown 'moon'"),
    ]  # fmt: skip
    for change, message in bad:
        grid = {**REALTEXT_GRID, **change}
        if "benchmark" in change and change["benchmark"].get("scenario") == "realtext":
            grid["benchmark"] = change["benchmark"]
        with pytest.raises(GridError, match=message):
            expand_grid(grid)


@pytest.mark.slow  # two sweep cells on the shipped hidden-192 model, scored on the real files
def test_a_realtext_cell_measures_both_splits_from_step_0():
    """On the shipped model: every checkpoint on test and validation, higher-is-better axes
    that start at exactly 0, the isotropic control's lambda = c / its mean eigenvalue."""
    from lalora_curv.testbed.grid import expand_grid
    from lalora_curv.testbed.sweep import run_cell

    cells = expand_grid(REALTEXT_GRID)
    plain = run_cell(cells[0], data_dir=str(DATA))
    iso = run_cell(cells[1], data_dir=str(DATA))
    assert [r["step"] for r in plain] == [0, 2, 4]
    first = plain[0]
    assert first["target"] == 0.0 and first["source_mean"] == 0.0
    assert first["val"] == {"source": dict.fromkeys(rd.SOURCES, 0.0), "source_mean": 0.0,
                            "target": 0.0}  # fmt: skip
    last = plain[-1]
    assert last["target"] > 0  # it learns GSM8K
    assert last["nll"]["target"] == pytest.approx(plain[0]["nll"]["target"] - last["target"])
    assert last["val"]["target"] != last["target"]  # another split
    # lora_B-only L2 on q, v of a hidden-192 model at r = 2: mean eigenvalue 192 / (192 + 192)
    assert iso[0]["mean_curvature"] == pytest.approx(0.5)
    assert iso[0]["lam"] == pytest.approx(1.0 / 0.5)
    assert iso[-1]["penalty"] > 0 and plain[-1]["penalty"] is None


@pytest.mark.slow  # the demo's three real-text cells on the shipped model, and its plots
def test_demo_runs_the_realtext_grid_on_the_data_and_refuses_an_unreadable_folder(
    tmp_path, monkeypatch, capsys
):
    """With --data_dir the demo runs its grid on the real-text scenario (here a tiny copy of
    the grid); a folder without the files is refused before anything is written; the hub out
    of reach falls back to the embedded grid, saying so."""
    import lalora_curv.cli.demo  # noqa: F401  (the module, not the function of that name)
    from lalora_curv.cli import run_command
    from lalora_curv.cli._run import CliError

    demo_module = sys.modules["lalora_curv.cli.demo"]
    grids = {"realtext": REALTEXT_GRID, "embedded": {"unused": True}}
    monkeypatch.setattr(demo_module, "demo_grid", lambda scenario: grids[scenario])
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--workers", "1", "--no-progress"]
    summary = run_command([*args, "--data_dir", str(DATA)])
    printed = capsys.readouterr().out
    assert set(summary["methods"]) == {"lora", "l2-lora-B", "kfac-mc"}
    assert "One seed" in printed and "docs/results.md" in printed
    assert "give --data_dir" not in printed
    assert (out / "pareto.png").is_file() and (out / "curves.png").is_file()
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {r["cell"]["benchmark"]["scenario"] for r in records} == {"realtext"}

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CliError, match=r"--data_dir .*empty: .*no such file"):
        run_command(["demo", "--out", str(tmp_path / "refused"), "--data_dir", str(empty)])
    assert not (tmp_path / "refused").exists()

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub")

    ran = []
    monkeypatch.setattr(demo_module.realtext_sweep, "data", offline)
    monkeypatch.setattr(demo_module, "run_grid", lambda grid, *a: ran.append(grid) or {})
    run_command(["demo", "--out", str(tmp_path / "hub"), "--data_dir", "hub"])
    printed = capsys.readouterr().out
    assert "hub is out of reach" in printed and "Couldn't reach 'Rowan/hellaswag'" in printed
    assert ran == [grids["embedded"]]
