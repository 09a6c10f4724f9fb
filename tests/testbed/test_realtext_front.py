"""benchmarks/bench_realtext_front.py: the grid, the resume keys and the NLL fronts, on
synthetic runs checked against a brute-force dominance test."""

from __future__ import annotations

import numpy as np
import pytest

from lalora_curv.testbed import sweep_report

front = pytest.importorskip("bench_realtext_front")  # benchmarks/ is on pytest's pythonpath

BEFORE = {
    "source": {"hellaswag": 4.0, "winogrande": 5.0, "arc_challenge": 6.0},
    "source_all": 5.0,
    "target": 8.0,
}


def test_grid_has_every_lr_method_and_seed_and_keys_ignore_outputs():
    cells = front.grid([1e-3, 2e-3], [1e3, 1e4], [0, 1, 2], 200, 50, 8)
    assert len(cells) == 2 * 3 * 3
    assert {(c["method"], c["lam"]) for c in cells} == {
        ("lora", 0.0),
        ("lalora-kfac-mc", 1e3),
        ("lalora-kfac-mc", 1e4),
    }
    assert all(c["mc_samples"] == (8 if c["lam"] else 0) for c in cells)
    keys = {front.run_key(c) for c in cells}
    assert len(keys) == len(cells)
    # a finished run (with its results) has its cell's key: it is skipped on a re-run
    assert front.run_key({**cells[3], "seconds": 9.0, "trajectory": []}) == front.run_key(cells[3])


def _run(rng, method, lr, lam, seed):
    trajectory = []
    for step in (0, 50, 100):
        t = BEFORE["target"] - (0 if step == 0 else rng.uniform(0, 3))
        tasks = {
            k: v + (0 if step == 0 else rng.uniform(-0.1, 1)) for k, v in BEFORE["source"].items()
        }
        trajectory.append(
            {
                "step": step,
                "source": tasks,
                "source_all": float(np.mean(list(tasks.values()))),
                "target": t,
            }
        )
    return {
        "method": method,
        "lr": lr,
        "lam": lam,
        "seed": seed,
        "steps": 100,
        "eval_every": 50,
        "mc_samples": 8 if lam else 0,
        "trajectory": trajectory,
    }


def test_fronts_are_the_non_dominated_seed_means_in_nll_terms(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    runs = [
        _run(rng, m, lr, lam, s)
        for lr in (1e-3, 2e-3)
        for m, lam in (("lora", 0.0), ("lalora-kfac-mc", 1e3), ("lalora-kfac-mc", 1e4))
        for s in (0, 1, 2)
    ]
    configs = sweep_report.aggregate(front.records(runs, BEFORE))
    rows = front.front_table(sweep_report.method_fronts(configs))
    for method in ("lora", "lalora-kfac-mc"):
        # brute force: seed means of (learning, forgetting) per (lr, lam, step), then dominance
        points = {}
        for r in runs:
            if r["method"] != method:
                continue
            for c in r["trajectory"]:
                key = (r["lr"], r["lam"], c["step"])
                points.setdefault(key, []).append(
                    (BEFORE["target"] - c["target"], c["source_all"] - BEFORE["source_all"])
                )
        means = {k: np.mean(v, axis=0) for k, v in points.items()}
        stds = {k: np.std(v, axis=0, ddof=1) for k, v in points.items()}  # sample std
        expected = sorted(
            k
            for k, (learn, forget) in means.items()
            if not any(
                lo >= learn and fo <= forget and (lo > learn or fo < forget)
                for o, (lo, fo) in means.items()
                if o != k
            )
        )
        mine = [r for r in rows if r["method"] == method]
        assert sorted((r["lr"], r["lam"], r["step"]) for r in mine) == expected
        assert len(mine) >= 2  # random points: a staircase, not one point
        for r in mine:
            k = (r["lr"], r["lam"], r["step"])
            assert (r["learning"], r["forgetting"]) == pytest.approx(tuple(means[k]), abs=1e-12)
            assert (r["learning_std"], r["forgetting_std"]) == pytest.approx(
                tuple(stds[k]), abs=1e-12
            )
            assert r["seeds"] == 3
        learning = [r["learning"] for r in mine]
        assert learning == sorted(learning)

    # the plot draws forgetting itself (lower is better) along each front
    figures = []
    monkeypatch.setattr(sweep_report, "save_figure", lambda fig, path: figures.append(fig) or path)
    front.plot(configs, tmp_path / "f.png", "test")
    ax = figures[0].axes[0]
    assert "lower is better" in ax.get_ylabel() and "learning" in ax.get_xlabel()
    drawn = {}
    for line in ax.get_lines():
        method = line.get_label().split(" (")[0]
        if method in ("lora", "lalora-kfac-mc"):  # the front's step line
            drawn[method] = sorted(np.round(line.get_ydata(), 12))
    assert drawn == {
        m: sorted(np.round([r["forgetting"] for r in rows if r["method"] == m], 12))
        for m in ("lora", "lalora-kfac-mc")
    }
