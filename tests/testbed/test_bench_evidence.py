"""benchmarks/bench_evidence.py: the confirmed verdict needs every family at full seeds."""

from __future__ import annotations

import pytest

import bench_evidence as be

FAMILIES = {"lora": "plain", "l2-all": "isotropic", "kfac-empirical": "curvature"}


def config(method: str, seeds: int) -> dict:
    return {"method": method, "seeds": list(range(seeds))}


def test_confirmed_configs_need_every_family_at_full_seeds():
    full = [config("lora", 5), config("l2-all", 5), config("kfac-empirical", 5)]
    screening = [config("lora", 2), config("l2-all", 2)]
    assert be.confirmed_configs(full + screening, FAMILIES, 5) == full
    # stage 2 half done: the curvature variant at 4 seeds, so no confirmed verdict at all
    partial = [config("lora", 5), config("l2-all", 5), config("kfac-empirical", 4)]
    assert be.confirmed_configs(partial + screening, FAMILIES, 5) == []


def test_verdict_needs_two_standard_errors():
    def pick(method: str, forgetting: float, std: float) -> dict:
        return {
            "label": method, "step": 25, "n": 5, "target": 1.0, "target_std": 0.0,
            "source_mean": -forgetting, "source_mean_std": std, "val/source_mean": -forgetting,
        }  # fmt: skip

    picks = {
        "lora": {1.0: pick("lora", 0.05, 0.01)},
        "l2-all": {1.0: pick("l2-all", 0.020, 0.005)},
        "kfac-empirical": {1.0: pick("kfac-empirical", 0.010, 0.005)},
    }
    (row,) = be.verdict(picks, FAMILIES)
    se = (2 * 0.005**2 / 5) ** 0.5
    assert row["standard_error"] == pytest.approx(se)
    assert row["curvature_minus_isotropic_forgetting"] == pytest.approx(-0.010)
    assert row["curvature_wins"] is (0.010 > 2 * se) and not row["isotropic_wins"]
    picks["kfac-empirical"][1.0] = pick("kfac-empirical", 0.018, 0.005)  # within 2 SE: a tie
    (row,) = be.verdict(picks, FAMILIES)
    assert not row["curvature_wins"] and not row["isotropic_wins"]


def test_equal_learning_curves_stop_where_a_seed_stops_learning():
    def run(seed: int, learnt: list[float], forgot: list[float]) -> list[dict]:
        cell = {"method": "lora", "kind": "lora", "lr": 1e-3, "seed": seed, "benchmark": {}}
        return [
            {"cell": cell, "config": "c", "key": f"k{seed}", "method": "lora", "seed": seed,
             "step": 25 * i, "target": x, "source_mean": -y, "source": {}, "lam": 0.0}
            for i, (x, y) in enumerate(zip(learnt, forgot, strict=True))
        ]  # fmt: skip

    records = run(0, [0.0, 1.0, 2.0], [0.0, 0.1, 0.3]) + run(1, [0.0, 2.0, 3.0], [0.0, 0.1, 0.2])
    ((label, line),) = be.equal_learning_curves(records, [0.5, 1.5, 2.5]).items()
    assert label == "lora"
    # seed 0: 0.05 at 0.5, 0.2 at 1.5 (its curve ends at 2.0, so 2.5 is off the line)
    # seed 1: 0.025, 0.075
    assert [x for x, *_ in line] == [0.5, 1.5]
    assert [m for _, m, _, _ in line] == pytest.approx([0.0375, 0.1375])
    assert [se for *_, se, _ in line] == pytest.approx([0.0125, 0.0625])  # std / sqrt(2)
    assert [n for *_, n in line] == [2, 2]
