"""Sequential tasks on the embedded benchmark (a tiny pretrained world, seconds)."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from lalora_curv.tasks.formatting import make_batches
from lalora_curv.testbed import World, pretrained
from lalora_curv.testbed.model import make_tokenizer
from lalora_curv.testbed.sequential import run_sequential

TINY = {"steps": 3, "texts": 50, "hidden": 32, "mlp": 64, "layers": 1, "heads": 2}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("LALORA_CURV_CACHE", str(tmp_path))
    return lambda: pretrained(0, TINY, progress=False)


def test_holdings_are_new_single_token_facts_covered_by_the_tokenizer():
    world = World(0)
    holdings = world.holdings()
    assert [p.split()[6] for p, _ in holdings] == world.entities
    assert holdings == World(0).holdings() and holdings != World(1).holdings()
    tok = make_tokenizer(world)
    for prompt, answer in holdings:
        assert tok.unk_token_id not in tok(prompt + answer, add_special_tokens=False)["input_ids"]
        assert len(tok(answer, add_special_tokens=False)["input_ids"]) == 1
    assert len({a for _, a in holdings}) > 10  # not a constant answer


@pytest.mark.parametrize("method", ["lalora", "online"])
def test_stage_two_penalty_is_centred_where_the_method_says(tiny, monkeypatch, method):
    """At the start of task 2 the online precision's mode is theta_1 (penalty 0), while the
    source-only precision still pulls towards theta_0 (penalty > 0)."""
    seen = []
    real_train = lc.train

    def spy(model, batches, precision, lam, **kw):
        if precision is not None:
            seen.append((float(precision.penalty(model).detach()), lam, precision))
        return real_train(model, batches, precision, lam, **kw)

    monkeypatch.setattr(lc, "train", spy)
    model, tok, world = tiny()
    run = run_sequential(
        model,
        tok,
        world,
        method=method,
        c=0.01,
        steps=4,
        eval_every=2,
        test_problems=8,
        train_problems=64,
        task_problems=32,
        mc_samples=2,
    )
    (p1, lam1, prec1), (p2, lam2, prec2) = seen
    assert p1 == 0.0  # both start at the adapter's init
    if method == "online":
        batches = make_batches(world.problems("train", 32), tok, batch_size=16, max_length=64)
        tokens = sum(int((b["labels"] != -100).sum()) for b in batches)  # answer + EOS each
        assert p2 == 0.0 and prec2.metadata["online"][0]["tokens"] == tokens
        assert prec2.counts["supervised_tokens"] == prec1.counts["supervised_tokens"] + tokens
        assert lam2 != lam1  # c over the new precision's mean curvature
    else:
        assert p2 > 0.0 and prec2 is prec1 and lam2 == lam1
    assert run["lam"] == [lam1, lam2]
    assert [(p["stage"], p["step"]) for p in run["curve"]] == [
        (0, 0),
        (1, 2),
        (1, 4),
        (2, 6),
        (2, 8),
    ]


def test_plain_lora_is_reproducible_and_bad_methods_are_refused(tiny):
    runs = []
    for _ in range(2):
        model, tok, world = tiny()
        runs.append(
            run_sequential(
                model,
                tok,
                world,
                method="lora",
                steps=3,
                eval_every=3,
                test_problems=8,
                train_problems=48,
            )
        )
    assert runs[0]["curve"] == runs[1]["curve"] and runs[0]["lam"] == [0.0, 0.0]
    model, tok, world = tiny()
    with pytest.raises(lc.LaloraError, match="unknown method 'ewc'"):
        run_sequential(model, tok, world, method="ewc")
    assert all(torch.isfinite(p).all() for p in model.parameters())
