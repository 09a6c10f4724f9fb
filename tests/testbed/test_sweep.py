"""The sweep: grid expansion, one cell's records, resuming, the Pareto front, the CLI."""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from helpers import SWEEPS, one_thread
from lalora_curv.cli import run_command
from lalora_curv.cli._run import CliError
from lalora_curv.cli.demo import demo_grid
from lalora_curv.strength import mean_curvature
from lalora_curv.testbed import SOURCES, pretrained
from lalora_curv.testbed.experiment import (
    ALL_LINEAR,
    source_accuracy,
    source_precision,
    target_accuracy,
)
from lalora_curv.testbed.grid import GridError, cell_key, config_key, expand_grid
from lalora_curv.testbed.sweep import SweepError, read_runs, run_cell, run_sweep
from lalora_curv.testbed.sweep_report import (
    aggregate,
    crossing,
    equal_learning_selected,
    format_table,
    front_gap,
    method_fronts,
    pareto_front,
    report,
    source_at_target,
    tables,
)

TINY = {"steps": 40, "texts": 200, "hidden": 32, "mlp": 64, "layers": 1, "heads": 2}
BENCH = {"pretrain": TINY, "train_problems": 64, "test_problems": 32}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the sweep's workers do: one torch thread (two on two shared cores crawl)."""
    with one_thread():
        yield


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LALORA_CURV_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_grid(**methods):
    return {
        "benchmark": BENCH,
        "seeds": [0],
        "common": {"lr": 3e-3, "steps": 4, "eval_every": 2, "rank": 2},
        "methods": methods or {"lora": {}},
    }


# ------------------------------------------------------------------------------- the grid
def test_grid_expands_to_the_product_of_each_methods_lists_times_the_seeds():
    grid = {
        "seeds": [0, 1],
        "common": {"lr": [1e-3, 3e-3], "steps": 100, "targets": "all"},
        "methods": {
            "lora": {},
            "lora-qv": {"method": "lora", "targets": "v_proj,q_proj", "lr": 1e-3},
            "emp": {
                "method": "lalora",
                "structure": ["kfac", "diag"],
                "estimator": "empirical",
                "mc_samples": [4, 8],  # ignored by empirical: the duplicates collapse
                "c": [0.01, 0.1],
            },
            "budget": {"method": "lalora", "budget": 0.05},
            "migu": {"threshold": [0.5, 0.7], "init": "milora"},
        },
    }
    cells = expand_grid(grid)
    by = lambda name: [c for c in cells if c["method"] == name]  # noqa: E731
    assert len(by("lora")) == 2 * 2
    assert {(c["lr"], c["seed"]) for c in by("lora")} == set(
        itertools.product([1e-3, 3e-3], [0, 1])
    )
    assert [c["targets"] for c in by("lora-qv")] == ["q_proj,v_proj"] * 2
    assert len(by("emp")) == 2 * 2 * 2 * 2  # lr x structure x c x seeds (mc_samples dropped)
    assert all(c["mc_samples"] == 1 and "lam" not in c for c in by("emp"))
    budget = by("budget")[0]
    assert budget["budget"] == 0.05 and budget["c"] == 0.01 and budget["estimator"] == "mc"
    assert budget["mc_samples"] == 8 and budget["structure"] == "kfac"
    assert {c["threshold"] for c in by("migu")} == {0.5, 0.7} and "structure" not in by("migu")[0]
    assert all(c["steps"] == 100 and c["eval_every"] == 200 for c in cells)
    assert len({cell_key(c) for c in cells}) == len(cells) == 4 + 2 + 16 + 4 + 8
    a, b = by("lora")[0], by("lora")[1]  # same lr, other seed: one configuration
    assert (a["lr"], a["seed"]) == (1e-3, 0) and (b["lr"], b["seed"]) == (1e-3, 1)
    assert config_key(a) == config_key(b) and cell_key(a) != cell_key(b)


def test_yaml_numbers_without_a_dot_are_numbers():
    grid = yaml.safe_load("methods: {lora: {lr: [3e-3, 1.0e-3], steps: 5}}")
    assert grid["methods"]["lora"]["lr"][0] == "3e-3"  # what YAML 1.1 makes of it
    assert [c["lr"] for c in expand_grid(grid)] == [3e-3, 1e-3]


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"methods": {"x": {"method": "ewc"}}}, "methods.x.method: unknown 'ewc'"),
        (
            {"methods": {"k": {"method": "lalora", "structure": "kfc", "c": 1}}},
            "methods.k.structure",
        ),
        ({"methods": {"k": {"method": "lalora"}}}, "methods.k: a lalora method needs one strength"),
        ({"methods": {"k": {"method": "lalora", "lam": 1, "c": 1}}}, "methods.k: a lalora"),
        (
            {"methods": {"b": {"method": "lalora", "budget": 1e-6, "c": 0}}},
            "methods.b: budget needs a start c > 0",
        ),
        (
            {
                "methods": {
                    "b": {
                        "method": "lalora",
                        "structure": "diag",
                        "estimator": "batch-grad-squared",
                        "budget": 1e-6,
                    }
                }
            },
            "methods.b: budget needs a per-token Fisher",
        ),
        ({"methods": {"lora": {"lr": -1}}}, "methods.lora.lr: must be > 0"),
        ({"methods": {"lora": {"lr": "fast"}}}, "methods.lora.lr: expected a number, got 'fast'"),
        ({"benchmark": {"test_problems": 0}, "methods": {"lora": {}}}, "benchmark.test_problems"),
        ({"methods": {"lora": {"steps": 1.5}}}, "methods.lora.steps: expected an integer"),
        ({"methods": {"lora": {"c": 1}}}, "methods.lora: unknown setting(s) ['c']"),
        ({"methods": {"lora": {"targets": "q,v"}}}, "methods.lora.targets"),
        ({"methods": {"lora": {"lr": []}}}, "methods.lora.lr: an empty list"),
        ({"methods": {"m": {"method": "migu", "threshold": 1}}}, "methods.m.threshold"),
        ({"common": {"lrr": 1}, "methods": {"lora": {}}}, "common: unknown setting(s) ['lrr']"),
        ({"method": {"lora": {}}}, "unknown top-level key(s) ['method']"),
        ({"methods": {}}, "methods: expected a mapping"),
        ({"seeds": ["a"], "methods": {"lora": {}}}, "seeds: integers"),
        ({"benchmark": {"pretrain": {"stepz": 1}}, "methods": {"lora": {}}}, "benchmark.pretrain"),
        (
            {
                "methods": {
                    "d": {
                        "method": "lalora",
                        "structure": "kfac",
                        "lam": 1,
                        "estimator": "batch-grad-squared",
                    }
                }
            },
            "methods.d: estimator batch-grad-squared needs structure diag",
        ),
        (
            {
                "methods": {
                    "p": {"method": "lalora", "structure": "diag", "lam": 1, "init": "pissa"}
                }
            },
            "methods.p: init 'pissa' (B0 != 0) with a penalty needs structure kfac or tri-kfac",
        ),
    ],
)
def test_a_bad_grid_is_refused_naming_the_entry(grid, message):
    with pytest.raises(GridError) as info:
        expand_grid(grid)
    assert message in str(info.value)


def test_the_packaged_demo_grids_are_the_shipped_ones_and_every_shipped_grid_expands():
    realtext = demo_grid()
    assert realtext == yaml.safe_load((SWEEPS / "demo_realtext.yaml").read_text())
    cells = expand_grid(realtext)  # plain LoRA, the isotropic control, LALoRA; one seed
    assert [c["method"] for c in cells] == ["lora", "l2-all", "lalora-kfac-mc"]
    assert {c["benchmark"]["scenario"] for c in cells} == {"realtext"}
    assert [c.get("structure") for c in cells] == [None, "isotropic", "kfac"]
    assert demo_grid("embedded") == yaml.safe_load((SWEEPS / "demo.yaml").read_text())
    cells = expand_grid(demo_grid("embedded"))
    assert [c["method"] for c in cells] == [
        "lora",
        "lalora-kfac-mc",
        "lalora-kfac-mc",
        "lalora-budget",
    ]
    assert all(c["lr"] == 3e-3 and c["steps"] == 1000 and c["eval_every"] == 200 for c in cells)
    assert all(c["rank"] == 8 and c["targets"] == "all" for c in cells)
    front = expand_grid(yaml.safe_load((SWEEPS / "front.yaml").read_text()))
    assert {c["seed"] for c in front} == {0, 1, 2}


# ------------------------------------------------------------------------------- the front
def brute_force_front(source, target):
    n = len(source)
    return sorted(
        (
            i
            for i in range(n)
            if not any(
                target[j] >= target[i]
                and source[j] >= source[i]
                and (target[j] > target[i] or source[j] > source[i])
                for j in range(n)
            )
        ),
        key=lambda i: (target[i], i),
    )


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    grid = rng.choice([4, 10, None])  # coarse values: ties and duplicates
    value = (lambda: rng.randint(0, grid) / grid) if grid else rng.random
    source, target = [value() for _ in range(n)], [value() for _ in range(n)]
    assert pareto_front(source, target) == brute_force_front(source, target)


# ------------------------------------------------------------------------------- one cell
def test_a_cells_records_start_at_the_pretrained_models_accuracies(cache):
    cell = expand_grid(tiny_grid(k={"method": "lalora", "c": 0.5, "mc_samples": 2}))[0]
    records = run_cell(cell)
    assert [r["step"] for r in records] == [0, 2, 4]
    model, tok, world = pretrained(0, TINY, progress=False)
    test = world.problems("test", BENCH["test_problems"])
    start = records[0]
    assert start["source"] == source_accuracy(model, tok, world)
    assert start["target"] == target_accuracy(model, tok, test)
    for r in records:
        assert set(r["source"]) == set(SOURCES)
        assert r["source_mean"] == pytest.approx(sum(r["source"].values()) / 3)
        assert r["key"] == cell_key(cell) and r["config"] == config_key(cell)
    assert start["penalty"] == 0.0 and records[-1]["penalty"] > 0  # theta = mu at step 0
    # lam = c / mean curvature, the mean curvature recomputed from the K-FAC blocks directly
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=list(ALL_LINEAR))
    )
    prec = source_precision(peft_model, tok, world, structure="kfac", mc_samples=2, seed=0)
    trace = 0.0  # tr(G (x) C) = tr(G) tr(C) per block (at B0 = 0 only the B block)
    for name in prec.modules:
        b = prec.blocks(name)
        tr = lambda m: m.double().diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
        trace += float((tr(b.lora_B_grad_cov) * tr(b.lora_B_input_cov)).sum())
    assert start["lam"] == pytest.approx(0.5 * prec.num_params / trace, rel=1e-5)


def test_the_embedded_source_precision_pools_every_structure_ekfac_in_one_fit(cache):
    model, tok, world = pretrained(0, TINY, progress=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=["q_proj"])
    )
    precs = {
        s: source_precision(peft_model, tok, world, structure=s, estimator="empirical")
        for s in ("kfac", "ekfac")
    }
    for s, prec in precs.items():
        assert prec.structure == s and prec.metadata["sources"] == list(SOURCES)
    tokens = {s: p.counts["supervised_tokens"] for s, p in precs.items()}
    assert tokens["ekfac"] == tokens["kfac"] > 0


def test_the_relative_strength_of_a_diag_precision_divides_by_its_mean_entry(cache):
    model, tok, world = pretrained(0, TINY, progress=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=["q_proj"])
    )
    prec = source_precision(peft_model, tok, world, structure="diag", estimator="empirical")
    entries = torch.cat([t.flatten() for t in prec.structure_tensors().values()])
    assert mean_curvature(prec) == pytest.approx(float(entries.mean()), rel=1e-6)


# ------------------------------------------------------------------------------- the sweep
def test_a_rerun_trains_nothing_and_keeps_the_results(cache, tmp_path):
    cells = expand_grid(tiny_grid(lora={"lr": [1e-3, 3e-3]}))
    first = run_sweep(cells, tmp_path / "out", workers=1, progress=False)
    text = (tmp_path / "out" / "runs.jsonl").read_text()
    second = run_sweep(cells, tmp_path / "out", workers=1, progress=False)
    assert first == {"cells": 2, "done": 0, "ran": 2}
    assert second == {"cells": 2, "done": 2, "ran": 0}
    assert (tmp_path / "out" / "runs.jsonl").read_text() == text
    records = read_runs(tmp_path / "out" / "runs.jsonl")
    assert len(records) == 2 * 3 and {r["key"] for r in records} == {cell_key(c) for c in cells}
    more = expand_grid(tiny_grid(lora={"lr": [1e-3, 3e-3, 1e-2]}))  # a grown grid: one more
    assert run_sweep(more, tmp_path / "out", workers=1, progress=False)["ran"] == 1
    assert (tmp_path / "out" / "runs.jsonl").read_text().startswith(text)


def test_run_sweep_refuses_fewer_than_one_worker_before_touching_the_output(tmp_path):
    cells = expand_grid(tiny_grid())
    with pytest.raises(ValueError, match=r"workers must be >= 1, got 0"):
        run_sweep(cells, tmp_path / "out", workers=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_failed_cell_neither_stops_the_others_nor_loses_them(cache, tmp_path, monkeypatch):
    import lalora_curv.testbed.sweep as sweep_module

    cells = expand_grid(tiny_grid(lora={"lr": [1e-3, 2e-3, 3e-3]}))
    bad = cell_key(cells[0])
    real = sweep_module.run_cell

    def flaky(cell, progress=False, data_dir=None):
        if cell_key(cell) == bad:
            raise RuntimeError("out of memory (simulated)")
        return real(cell, progress)

    monkeypatch.setattr(sweep_module, "run_cell", flaky)
    with pytest.raises(SweepError, match=r"1 of 3 cells failed") as err:
        run_sweep(cells, tmp_path / "out", workers=1, progress=False)
    assert f"key {bad}" in str(err.value) and "out of memory (simulated)" in str(err.value)
    written = {r["key"] for r in read_runs(tmp_path / "out" / "runs.jsonl")}
    assert written == {cell_key(c) for c in cells} - {bad}
    monkeypatch.setattr(sweep_module, "run_cell", real)  # the fault is gone: only it re-runs
    assert run_sweep(cells, tmp_path / "out", workers=1, progress=False)["ran"] == 1


def test_cli_sweep_reports_the_finished_cells_before_failing(cache, tmp_path, monkeypatch):
    import lalora_curv.testbed.sweep as sweep_module

    real = sweep_module.run_cell

    def flaky(cell, progress=False, data_dir=None):
        if cell["lr"] == 3e-3:
            raise RuntimeError("simulated")
        return real(cell, progress)

    monkeypatch.setattr(sweep_module, "run_cell", flaky)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(tiny_grid(lora={"lr": [1e-3, 3e-3]})))
    out = tmp_path / "out"
    args = ["sweep", "--grid", str(path), "--out", str(out), "--workers", "1", "--no-progress"]
    with pytest.raises(CliError, match=r"1 of 2 cells failed[\s\S]*cover the finished cells"):
        run_command(args)
    summary = json.loads((out / "summary.json").read_text())
    assert [c["cell"]["lr"] for c in summary["configs"]] == [1e-3]


def fake_records():
    """Two methods; method a has two configurations; two seeds each; steps 0 and 10."""
    rng = random.Random(0)
    records = []
    for method, lr in (("a", 1e-3), ("a", 3e-3), ("b", 1e-3)):
        for seed in (0, 1):
            cell = {"method": method, "kind": "lora", "lr": lr, "seed": seed, "benchmark": {}}
            for step in (0, 10):
                source = {s: rng.random() for s in SOURCES}
                records.append(
                    {
                        "key": cell_key(cell),
                        "config": config_key(cell),
                        "method": method,
                        "seed": seed,
                        "step": step,
                        "source": source,
                        "source_mean": sum(source.values()) / 3,
                        "target": rng.random(),
                        "lam": 0.0,
                        "cell": cell,
                    }
                )
    return records


def test_aggregate_and_tables_are_seed_means_and_the_fronts(tmp_path):
    records = fake_records()
    configs = aggregate(records)
    assert [c["label"] for c in configs] == ["a lr=0.001", "a lr=0.003", "b"]
    assert [c["settings"] for c in configs] == ["lr=0.001", "lr=0.003", ""]
    for c in configs:
        for p in c["points"]:
            mine = [r for r in records if r["config"] == c["config"] and r["step"] == p["step"]]
            t = torch.tensor([r["target"] for r in mine], dtype=torch.float64)
            assert p["n"] == 2 and p["target"] == pytest.approx(float(t.mean()))
            assert p["target_std"] == pytest.approx(float(t.std(unbiased=True)))  # sample std
    rows, summary = tables(configs, threshold=0.0)
    assert [r["config"] for r in rows if r["kind"] == "final"] == ["a lr=0.001", "a lr=0.003", "b"]
    for method in ("a", "b"):
        pts = [p for c in configs if c["method"] == method for p in c["points"]]
        best = max(pts, key=lambda p: p["source_mean"])  # threshold 0: the highest source
        (row,) = [r for r in rows if r["kind"] == "front" and r["method"] == method]
        assert row["source"] == round(best["source_mean"], 4)
        front = summary["methods"][method]["front"]
        ref = brute_force_front([p["source_mean"] for p in pts], [p["target"] for p in pts])
        assert [(p["source_mean"], p["target"]) for p in front] == [
            (pts[i]["source_mean"], pts[i]["target"]) for i in ref
        ]
    out = report(records, tmp_path)
    assert {Path(f).name for f in out["files"]} >= {"table.csv", "summary.json"}
    every = sum(
        len(c["points"]) for c in json.loads((tmp_path / "summary.json").read_text())["configs"]
    )
    assert every == len({(r["config"], r["step"]) for r in records})  # nothing left out


def test_source_at_target_and_front_gap_read_the_front_by_brute_force():
    configs = aggregate(fake_records())
    fronts = method_fronts(configs)
    levels = [0.2, 0.5, 0.8]
    table = source_at_target(fronts, levels)
    for method in ("a", "b"):
        pts = [p for c in configs if c["method"] == method for p in c["points"]]
        for level in levels:
            ok = [p["source_mean"] for p in pts if p["target"] >= level]  # every point
            got = table[method][f"{level:g}"]
            assert (got is None) == (not ok)
            if ok:
                assert got["source_mean"] == max(ok) and got["target"] >= level
    # a hand-made front: (source, target) = (1.0, 0.1), (0.9, 0.3), (0.7, 0.5)
    front = [{"source_mean": s, "target": t} for s, t in ((1.0, 0.1), (0.9, 0.3), (0.7, 0.5))]
    for (source, target), gap in (
        ((0.8, 0.2), 0.1),  # below: the front keeps 0.9 at target 0.3 >= 0.2
        ((0.95, 0.3), -0.05),  # beyond the front at equal learning
        ((0.7, 0.5), 0.0),  # on it
        ((0.5, 0.05), 0.5),
        ((0.9, 0.6), None),  # learns more than any front point
    ):
        got = front_gap({"source_mean": source, "target": target}, front)
        assert got == pytest.approx(gap) if gap is not None else got is None
    rows, summary = tables(configs, threshold=0.0)
    text = format_table(rows, 0.0, summary["source_at_target"])
    assert "with target >= T" in text and "T=0.1" in text
    # no method reaches target 0.1: no levels, and no empty table of method names
    low = [{**c, "points": [{**p, "target": 0.01} for p in c["points"]]} for c in configs]
    rows, summary = tables(low, threshold=0.0)
    assert all(by_level == {} for by_level in summary["source_at_target"].values())
    assert format_table(rows, 0.0, summary["source_at_target"]) == format_table(rows, 0.0)


def test_crossing_reads_the_first_crossing_on_the_straight_line_between_checkpoints():
    curve = [(0, 0.0, 0.0), (25, 1.0, 0.1), (50, 3.0, 0.5), (75, 2.0, 0.9), (100, 4.0, 1.0)]
    assert crossing(curve, 0.5) == pytest.approx((12.5, 0.05))
    assert crossing(curve, 2.0) == pytest.approx((37.5, 0.3))  # the first crossing, not step 75
    assert crossing(curve, 3.0) == pytest.approx((50, 0.5))  # on a checkpoint
    assert crossing(curve, 0.0) == (0, 0.0)
    assert crossing(curve, 4.5) is None  # never reached


def monotone_records(seed_count: int = 3):
    """Method a: three configurations (the last one's seed 2 learns too little on
    validation); method b: one. Learning rises with the step on both splits."""
    rng = random.Random(1)
    records = []
    for method, lr in (("a", 1e-3), ("a", 2e-3), ("a", 3e-3), ("b", 1e-3)):
        for seed in range(seed_count):
            cell = {"method": method, "kind": "lora", "lr": lr, "seed": seed, "benchmark": {}}
            learnt = {"test": 0.0, "val": 0.0}
            forgot = {"test": 0.0, "val": 0.0}
            for step in (0, 25, 50, 75):
                if step:
                    for split in learnt:
                        slow = lr == 3e-3 and seed == 2 and split == "val"
                        learnt[split] += 0.01 if slow else rng.uniform(0.2, 0.6)
                        forgot[split] += rng.uniform(0.0, 0.1)
                records.append(
                    {
                        "key": cell_key(cell), "config": config_key(cell), "method": method,
                        "seed": seed, "step": step, "cell": cell, "lam": 0.0,
                        "source": {s: -forgot["test"] for s in SOURCES},
                        "source_mean": -forgot["test"], "target": learnt["test"],
                        "val": {"source_mean": -forgot["val"], "target": learnt["val"]},
                    }
                )  # fmt: skip
    return records


def test_equal_learning_selected_interpolates_each_run_and_picks_on_validation():
    import numpy as np

    records = monotone_records()
    levels = [0.3, 0.7, 10.0]
    picks = equal_learning_selected(records, levels)

    def read(rs, split, level):  # the monotone curve: numpy's interpolation is the reference
        rs = sorted(rs, key=lambda r: r["step"])
        get = (lambda r: r["val"]) if split == "val" else (lambda r: r)
        xs = [get(r)["target"] for r in rs]
        return (
            None
            if xs[-1] < level
            else float(np.interp(level, xs, [get(r)["source_mean"] for r in rs]))
        )

    for method in ("a", "b"):
        for level in levels:
            candidates = []
            for config in sorted({r["config"] for r in records if r["method"] == method}):
                seeds = sorted({r["seed"] for r in records if r["config"] == config})
                runs = [
                    [r for r in records if r["config"] == config and r["seed"] == s] for s in seeds
                ]
                val = [read(rs, "val", level) for rs in runs]
                if None not in val:
                    candidates.append((float(np.mean(val)), config, runs))
            got = picks[method][f"{level:g}"]
            if not candidates:
                assert got is None
                continue
            val_mean, config, runs = max(candidates, key=lambda c: c[0])
            test = [v for v in (read(rs, "test", level) for rs in runs) if v is not None]
            assert got["config"] == config and got["n"] == len(test) and got["target"] == level
            assert got["val/source_mean"] == pytest.approx(val_mean)
            assert got["source_mean"] == pytest.approx(float(np.mean(test)))
            assert got["source_mean_std"] == pytest.approx(float(np.std(test, ddof=1)))
    assert picks["a"]["10"] is None  # no run learns that much


# ------------------------------------------------------------------------------- the CLI
@pytest.mark.slow  # three sweeps, one of them in two spawned worker processes
def test_cli_sweep_end_to_end_with_one_and_two_workers_gives_the_same_runs(cache, tmp_path):
    grid = tiny_grid(lora={}, migu={"threshold": 0.5})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        summary = run_command(
            [
                "sweep",
                "--grid",
                str(path),
                "--out",
                str(out),
                "--workers",
                str(workers),
                "--no-progress",
            ]
        )
        assert set(summary["methods"]) == {"lora", "migu"}
        for name in ("config.yaml", "grid.yaml", "runs.jsonl", "table.csv", "summary.json"):
            assert (out / name).is_file(), name
        results[workers] = sorted(
            (r["key"], r["step"], r["source_mean"], r["target"])
            for r in read_runs(out / "runs.jsonl")
        )
    assert len(results[1]) == 2 * 3 and results[1] == results[2]
    # a smaller grid into the same directory: nothing trains, and its report leaves the
    # dropped method's records out (they stay in runs.jsonl)
    path.write_text(yaml.safe_dump(tiny_grid(lora={})))
    summary = run_command(
        ["sweep", "--grid", str(path), "--out", str(tmp_path / "w1"), "--no-progress"]
    )
    assert set(summary["methods"]) == {"lora"}
    assert len(read_runs(tmp_path / "w1" / "runs.jsonl")) == 2 * 3


def test_cli_sweep_names_a_bad_grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"methods": {"lora": {"rank": 0}}}))
    with pytest.raises(CliError, match=r"--grid: methods.lora.rank: must be > 0"):
        run_command(["sweep", "--grid", str(path), "--out", str(tmp_path / "o")])
    with pytest.raises(CliError, match="does not exist"):
        run_command(["sweep", "--grid", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")])


def test_cli_demo_runs_its_packaged_grid_and_says_where_the_results_are(
    cache, tmp_path, monkeypatch, capsys
):
    demo_module = sys.modules["lalora_curv.cli.demo"]  # (lalora_curv.cli.demo: the function)
    tiny = tiny_grid(lora={}, kfac={"method": "lalora", "c": 0.1, "mc_samples": 2})
    # the real one takes minutes; without --data_dir the demo runs the embedded benchmark
    monkeypatch.setattr(demo_module, "demo_grid", lambda scenario: {"embedded": tiny}[scenario])
    out = tmp_path / "demo"
    summary = run_command(["demo", "--out", str(out), "--workers", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert "give --data_dir DIR" in printed  # it says why, and how to get the real-text demo
    for name in ("table.csv", "summary.json", "pareto.png", "curves.png"):
        assert (out / name).is_file() and str(out / name) in printed, name
    assert "final point of each configuration" in printed and "kfac" in printed
    assert "not as evidence" in printed and "docs/results.md" in printed
    assert yaml.safe_load((out / "grid.yaml").read_text()) == tiny
    assert set(summary["methods"]) == {"lora", "kfac"}
    with pytest.raises(CliError, match="is a demo run directory"):  # it belongs to demo
        run_command(["sweep", "--grid", str(SWEEPS / "demo.yaml"), "--out", str(out)])


def test_demo_without_matplotlib_says_the_plots_were_skipped(cache, tmp_path, monkeypatch, capsys):
    import builtins

    demo_module = sys.modules["lalora_curv.cli.demo"]
    monkeypatch.setattr(demo_module, "demo_grid", lambda scenario: tiny_grid(lora={}))
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "demo"
    run_command(["demo", "--out", str(out), "--workers", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert "plots skipped: matplotlib is not installed" in printed
    assert "lalora-curv[bench]" in printed
    assert (out / "table.csv").is_file() and not (out / "pareto.png").exists()
