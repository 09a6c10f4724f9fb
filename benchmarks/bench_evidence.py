"""Evidence II: does the curvature matter, or would any pull towards the init do?

The real-text scenario (:mod:`lalora_curv.testbed.realtext`, the shipped 4.2M-parameter model)
at equal compute, every method's front over learning rate x strength x checkpoint, in two
stages run by ``lalora-curv``'s sweep machinery into one resumable ``runs.jsonl``:

1. **screen** (``sweeps/evidence_screen.yaml``, 2 seeds): plain LoRA at five learning rates,
   the three isotropic controls (L2 on every LoRA tensor, on lora_B only, the Frobenius norm of
   the merged update) and the curvature variants, each at several relative strengths ``c``
   (``lam = c / mean eigenvalue of P``: one axis for every structure and estimator);
2. **confirm** (3 more seeds, 5 in all): the settings chosen on the *validation* split for
   plain LoRA, the best isotropic control and the two best curvature variants (the
   configurations on each one's validation front, at most :data:`CONFIRM_CONFIGS` each);
   a method's *score* is the mean, over learning levels of 25, 50, 75 and 90 % of plain LoRA's
   best validation learning, of the validation forgetting its front reaches there (plain
   LoRA's at a level it never reaches).

``report`` (run after both, and by the other stages when they finish) reads every record and
writes ``evidence.json``: per method and learning level, the (lr, strength, step) chosen on
validation with its *test* numbers (mean, sample std and n over seeds), the test front read at
the same levels, and the verdict: at each level, does a curvature variant forget less than the
best isotropic control by more than two standard errors of the difference? Plots:
``evidence_fronts.png`` (small multiples: each curvature variant against plain LoRA and the
best isotropic control) and the sweep's own ``pareto.png``/``curves.png``.

    python benchmarks/bench_evidence.py            # screen, confirm, report (hours; resumable)
    python benchmarks/bench_evidence.py report     # tables and plots from the runs so far
    python benchmarks/bench_evidence.py screen --methods lora   # part of the screening grid
    python benchmarks/bench_evidence.py confirm --configs-per-method 2 --curvature-picks 1
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any

import yaml

from bench_core import environment, write_result
from bench_realtext import add_data_dir_argument, data_dir_of
from lalora_curv.testbed.grid import ISOTROPIC, config_key, expand_grid
from lalora_curv.testbed.sweep import read_runs, run_sweep
from lalora_curv.testbed.sweep_report import (
    aggregate,
    crossing,
    equal_learning_selected,
    method_fronts,
    pareto_front,
    report,
    run_curves,
    sample_std,
    source_at_target,
)
from lalora_curv.testbed.sweep_report import validation_selected as select_on_validation

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCREEN = ROOT / "sweeps" / "evidence_screen.yaml"
OUT = HERE / "results" / "evidence"
CONFIRM_SEEDS = [2, 3, 4]
CONFIRM_CONFIGS = 3  # configurations per confirmed method (its validation front's)
LEVEL_FRACTIONS = (0.25, 0.5, 0.75, 0.9)  # of plain LoRA's best validation learning
PLAIN = "lora"


def family(method_cell: dict[str, Any]) -> str:
    """``plain``, ``isotropic`` or ``curvature``."""
    if method_cell["kind"] != "lalora":
        return "plain"
    return "isotropic" if method_cell["structure"] in ISOTROPIC else "curvature"


def levels_of(configs: list[dict[str, Any]], key: str = "val/target") -> list[float]:
    """The learning levels: fractions of plain LoRA's best learning (``key``), rounded."""
    top = max(p[key] for c in configs if c["method"] == PLAIN for p in c["points"])
    return [round(f * top, 3) for f in LEVEL_FRACTIONS]


def scores(configs: list[dict[str, Any]], levels: list[float]) -> dict[str, float]:
    """Per method: the mean over ``levels`` of the validation ``source_mean`` (minus
    forgetting) its validation front reaches there; at a level it never reaches, plain
    LoRA's (no better than no penalty)."""
    picks = select_on_validation(configs, levels)
    plain = picks[PLAIN]
    out = {}
    for method, by_level in picks.items():
        vals = []
        for level, p in by_level.items():
            fallback = plain[level]["val/source_mean"] if plain[level] else -math.inf
            vals.append(p["val/source_mean"] if p else fallback)
        out[method] = sum(vals) / len(vals)
    return out


def validation_front_configs(configs: list[dict[str, Any]], method: str, k: int) -> list[str]:
    """The ``k`` configurations with the most points on ``method``'s validation front."""
    pts = [(c["config"], p) for c in configs if c["method"] == method for p in c["points"]]
    front = pareto_front([p["val/source_mean"] for _, p in pts], [p["val/target"] for _, p in pts])
    count: dict[str, int] = {}
    for i in front:
        config, p = pts[i]
        if p["step"] > 0:  # step 0 is every configuration's (the untouched model)
            count[config] = count.get(config, 0) + 1
    return sorted(count, key=lambda c: -count[c])[:k]


def confirm_selection(
    configs: list[dict[str, Any]], per_method: int = CONFIRM_CONFIGS, curvature_picks: int = 2
) -> dict[str, Any]:
    """What stage 2 re-runs: plain LoRA, the best isotropic control and the ``curvature_picks``
    best curvature variants by :func:`scores`, each with (at most ``per_method``) of its
    validation front's configurations."""
    levels = levels_of(configs)
    score = scores(configs, levels)
    fam = {c["method"]: family(c["cell"]) for c in configs}
    chosen = [PLAIN]
    for name, n in (("isotropic", 1), ("curvature", curvature_picks)):
        ranked = sorted((m for m in score if fam[m] == name), key=lambda m: -score[m])
        chosen += ranked[:n]
    picks = {m: validation_front_configs(configs, m, per_method) for m in chosen}
    return {"levels": levels, "scores": score, "families": fam, "methods": picks}


def confirm_cells(
    screen_cells: list[dict[str, Any]], selection: dict[str, Any]
) -> list[dict[str, Any]]:
    """The chosen configurations' cells at :data:`CONFIRM_SEEDS`."""
    wanted = {c for cs in selection["methods"].values() for c in cs}
    out, seen = [], set()
    for cell in screen_cells:
        if config_key(cell) in wanted and config_key(cell) not in seen:
            seen.add(config_key(cell))
            for seed in CONFIRM_SEEDS:
                out.append({**copy.deepcopy(cell), "seed": seed})
    return out


def se(point: dict[str, Any], key: str) -> float:
    """The standard error of a seed mean: sample std / sqrt(n)."""
    return point[f"{key}_std"] / math.sqrt(point["n"])


def verdict(picks: dict[str, dict[str, Any]], families: dict[str, str]) -> list[dict[str, Any]]:
    """Per level: the best isotropic control and the best curvature variant (by validation
    forgetting), and whether the curvature one forgets less on test by more than two standard
    errors of the difference, ``sqrt(se_a^2 + se_b^2)``."""
    rows = []
    levels = list(next(iter(picks.values())))
    for level in levels:
        best = {}
        for name in ("plain", "isotropic", "curvature"):
            cands = [(m, by[level]) for m, by in picks.items() if families[m] == name and by[level]]
            if cands:
                best[name] = max(cands, key=lambda mp: mp[1]["val/source_mean"])
        row: dict[str, Any] = {"level": float(level)}
        for name, (m, p) in best.items():
            row[name] = {
                "method": m,
                "label": p["label"],
                "step": p["step"],
                "n": p["n"],
                "learning": p["target"],
                "learning_std": p["target_std"],
                "forgetting": -p["source_mean"],
                "forgetting_std": p["source_mean_std"],
            }
        if "isotropic" in best and "curvature" in best:
            (_, iso), (_, cur) = best["isotropic"], best["curvature"]
            diff = cur["source_mean"] - iso["source_mean"]  # > 0: curvature forgets less
            err = math.sqrt(se(cur, "source_mean") ** 2 + se(iso, "source_mean") ** 2)
            row["curvature_minus_isotropic_forgetting"] = -diff
            row["standard_error"] = err
            row["curvature_wins"] = bool(diff > 2 * err)
            row["isotropic_wins"] = bool(-diff > 2 * err)
        rows.append(row)
    return rows


def confirmed_configs(
    configs: list[dict[str, Any]], families: dict[str, str], n_full: int
) -> list[dict[str, Any]]:
    """The configurations run at all ``n_full`` seeds, if every family has one; else none.

    A verdict on the confirmed seeds needs plain LoRA, an isotropic control and a curvature
    variant each at full seeds: a half-finished stage 2 yields no confirmed verdict.
    """
    full = [c for c in configs if len(c["seeds"]) >= n_full]
    return full if {families[c["method"]] for c in full} == set(FAMILIES) else []


def write_report(out: Path, screen_seeds: set[int]) -> dict[str, Any]:
    """``evidence.json`` and the plots from every record in ``out/runs.jsonl``.

    Levels, screening tables, test fronts and plots read the screening seeds only (so that
    stage 2's runs never move them); the confirmed verdict reads the configurations run at
    every seed of both stages.
    """
    records = read_runs(out / "runs.jsonl")
    if not records:
        raise SystemExit(f"{out / 'runs.jsonl'}: no runs yet")
    summary = report(records, out)  # the sweep's pareto.png, curves.png, table.csv
    configs = aggregate([r for r in records if r["seed"] in screen_seeds])
    families = {c["method"]: family(c["cell"]) for c in configs}
    levels = levels_of(configs)
    n_full = len(screen_seeds) + len(CONFIRM_SEEDS)
    every_seed = aggregate(records)
    confirmed = confirmed_configs(every_seed, families, n_full)
    picks_all = select_on_validation(configs, levels)
    picks_confirmed = select_on_validation(confirmed, levels) if confirmed else {}
    screen_records = [r for r in records if r["seed"] in screen_seeds]
    full = {c["config"] for c in confirmed}
    confirmed_records = [r for r in records if r["config"] in full]
    equal_all = equal_learning_selected(screen_records, levels)
    equal_confirmed = equal_learning_selected(confirmed_records, levels) if confirmed else {}
    test_front = source_at_target(method_fronts(configs), levels_of(configs, "target"))
    result = {
        "levels": levels,
        "level_fractions": list(LEVEL_FRACTIONS),
        "families": families,
        "screen_seeds": sorted(screen_seeds),
        "seeds_per_config": {
            c["label"]: len(c["seeds"]) for c in every_seed if len(c["seeds"]) > len(screen_seeds)
        },
        "runs": len({r["key"] for r in records}),
        "validation_selected": picks_all,
        "validation_selected_confirmed": picks_confirmed,
        "verdict_confirmed": verdict(picks_confirmed, families) if confirmed else [],
        "verdict_screen": verdict(picks_all, families),
        "equal_learning_selected": equal_all,
        "equal_learning_selected_confirmed": equal_confirmed,
        "verdict_equal_learning_confirmed": (
            verdict(equal_confirmed, families) if confirmed else []
        ),
        "verdict_equal_learning_screen": verdict(equal_all, families),
        "test_front_at_levels": test_front,
        "seconds_per_run": sorted({r["key"]: r["seconds"] for r in records}.values()),
        "environment": environment(),
    }
    write_result(out, "evidence.json", result)
    (out / "evidence.md").write_text(markdown(result))
    plot_small_multiples(configs, families, out / "evidence_fronts.png")
    if confirmed:
        plot_equal_learning(confirmed_records, families, out / "evidence_equal_learning.png")
    print("\n" + verdict_markdown(result))
    return {**result, "sweep_files": summary["files"]}


def plot_small_multiples(configs, families, path: Path) -> Path | None:
    """One panel per curvature variant: its test front against plain LoRA's and the best
    isotropic control's (best by validation score), forgetting (y, lower is better) against
    learning (x)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from lalora_curv.plotting import save_figure

    fronts = method_fronts(configs)
    levels = levels_of(configs)
    score = scores(configs, levels)
    iso = max((m for m in fronts if families[m] == "isotropic"), key=score.get, default=None)
    variants = sorted((m for m in fronts if families[m] == "curvature"), key=lambda m: -score[m])
    if not variants:
        return None
    cols = min(3, len(variants))
    rows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(4.2 * cols, 3.4 * rows),
        dpi=120,
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for ax, method in zip(axes.flat, variants, strict=False):
        for name, colour, style in ((PLAIN, "0.4", "--"), (iso, "C0", "-"), (method, "C3", "-")):
            if name is None or name not in fronts:
                continue
            f = fronts[name]
            x = [p["target"] for p in f]
            y = [-p["source_mean"] for p in f]
            ax.step(x, y, where="pre", color=colour, ls=style, lw=1.6, label=name)
            ax.errorbar(
                x,
                y,
                yerr=[p["source_mean_std"] for p in f],
                fmt="o",
                ms=3,
                color=colour,
                alpha=0.6,
                elinewidth=0.7,
                capsize=1.5,
            )
        ax.set_title(f"{method} (score {score[method]:+.3f})", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.flat[len(variants) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("GSM8K NLL decrease (learning)")
    for ax in axes[:, 0]:
        ax.set_ylabel("source NLL increase\n(forgetting)")
    fig.suptitle(
        "Test fronts (seed means +- sample std): each curvature variant against\n"
        f"plain LoRA and the best isotropic control ({iso})",
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def equal_learning_curves(
    records: list[dict[str, Any]], grid: list[float]
) -> dict[str, list[tuple[float, float, float, int]]]:
    """Per configuration (its label): ``(learning, mean, standard error, n)`` of the test
    forgetting at each learning of ``grid`` that every one of its seeds reaches, each seed
    read by :func:`crossing` (its checkpoints joined by straight lines)."""
    labels = {c["config"]: c["label"] for c in aggregate(records)}
    out = {}
    for config, curves in run_curves(records).items():
        line = []
        for x in grid:
            ys = [crossing(curve, x) for curve in curves["test"]]
            if None in ys:
                break
            values = [-y[1] for y in ys]  # forgetting: minus the source score
            mean = sum(values) / len(values)
            std = sample_std(values)
            line.append((x, mean, std / math.sqrt(len(values)), len(values)))
        out[labels[config]] = line
    return out


def plot_equal_learning(records, families, path: Path) -> Path | None:
    """The confirmed configurations' test forgetting (y) at exactly each learning (x): seed
    mean, band: two standard errors (the verdict's margin), up to the learning every seed
    of the configuration reaches in 200 steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from lalora_curv.plotting import save_figure

    top = max(r["target"] for r in records)
    grid = [top * i / 60 for i in range(1, 61)]
    curves = equal_learning_curves(records, grid)
    configs = aggregate(records)
    method_of = {c["label"]: c["method"] for c in configs}
    points_of = {c["label"]: c["points"] for c in configs}
    colours = {"plain": ["0.35"], "isotropic": ["C0", "C9", "C2"], "curvature": ["C3", "C1", "C4"]}
    used: dict[str, int] = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label in sorted(curves, key=lambda lb: (FAMILIES.index(families[method_of[lb]]), lb)):
        line = curves[label]
        if not line:
            continue
        fam = families[method_of[label]]
        colour = colours[fam][used.get(fam, 0) % len(colours[fam])]
        used[fam] = used.get(fam, 0) + 1
        x = [p[0] for p in line]
        y = [p[1] for p in line]
        ax.plot(x, y, color=colour, lw=1.8, ls="--" if fam == "plain" else "-",
                label=f"{label} ({line[0][3]} seeds)")  # fmt: skip
        # the measured checkpoints (seed means): the line between them is read
        marks = [(p["target"], -p["source_mean"]) for p in points_of[label]]
        marks = [(mx, my) for mx, my in marks if 0 < mx <= x[-1]]
        if marks:
            ax.plot(*zip(*marks, strict=True), "o", color=colour, ms=3.5)
        ax.fill_between(
            x, [p[1] - 2 * p[2] for p in line], [p[1] + 2 * p[2] for p in line],
            color=colour, alpha=0.18, lw=0,
        )  # fmt: skip
    ax.set_xlabel("GSM8K NLL decrease (learning), nats per token")
    ax.set_ylabel("source NLL increase (forgetting)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(
        "Forgetting at exactly equal learning, each run read on straight lines between its\n"
        "checkpoints (dots: seed means there); the 5-seed configurations, test split,\n"
        "band: mean +- 2 standard errors",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, path)


FAMILIES = ("plain", "isotropic", "curvature")


def _cell(p: dict[str, Any] | None) -> str:
    """``forgetting ± std (learning)`` of a seed-mean pick, then its setting and step."""
    if not p:
        return "-"
    settings = p["settings"] + ", " if p["settings"] else ""  # none if the method ran one
    return (
        f"{-p['source_mean']:.3f} ± {p['source_mean_std']:.3f} ({p['target']:.2f})"
        f"<br>{settings}step {p['step']}"
    )


def verdict_markdown(result: dict[str, Any], equal: bool = False) -> str:
    """The verdict table (on the confirmed seeds where stage 2 ran, else the screening's).

    ``equal``: the one at exactly equal learning (:func:`equal_learning_selected`'s picks).
    """
    prefix = "verdict_equal_learning_" if equal else "verdict_"
    rows = result[prefix + "confirmed"] or result[prefix + "screen"]
    seeds = max((r[f]["n"] for r in rows for f in FAMILIES if f in r), default=0)
    if equal:
        title = (
            f"At exactly equal learning ({seeds} seeds; each run read at the level between its "
            "checkpoints; settings picked on validation; test forgetting ± sample std, nats "
            "per token; the step at which the level is reached):"
        )
    else:
        title = (
            f"Verdict ({seeds} seeds; settings picked on validation; test forgetting ± sample "
            "std (test learning), nats per token):"
        )
    out = [
        title,
        "",
        f"| learning {'=' if equal else '>='} | plain LoRA | best isotropic control | "
        "best curvature | curvature - isotropic (2 SE) | |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[f]['method']}: {r[f]['forgetting']:.3f} ± {r[f]['forgetting_std']:.3f}"
            + (
                f", step ~{r[f]['step']}"
                if equal
                else f" ({r[f]['learning']:.2f}), step {r[f]['step']}"
            )
            if f in r
            else "- (never learns this much)"
            for f in FAMILIES
        ]
        diff, word = "-", ""
        if "standard_error" in r:
            diff = (
                f"{r['curvature_minus_isotropic_forgetting']:+.3f} ({2 * r['standard_error']:.3f})"
            )
            word = "tie"
            if r["curvature_wins"] or r["isotropic_wins"]:
                word = "**curvature**" if r["curvature_wins"] else "**isotropic**"
        out.append(f"| {r['level']:.2f} | {' | '.join(cells)} | {diff} | {word} |")
    return "\n".join(out) + "\n"


def markdown(result: dict[str, Any]) -> str:
    """The results page's tables (``evidence.md``): the verdict, then per method the
    validation-selected picks' test numbers and the test fronts read at the same levels."""
    fam, levels = result["families"], result["levels"]
    out = [verdict_markdown(result).rstrip("\n"), "", verdict_markdown(result, True).rstrip("\n")]
    if result["seeds_per_config"]:
        done = ", ".join(f"{label}: {n}" for label, n in sorted(result["seeds_per_config"].items()))
        state = (
            "complete"
            if result["verdict_confirmed"]
            else "not complete: the verdict is the screening's"
        )
        out += ["", f"Stage 2 ({state}); seeds run per confirmed configuration: {done}."]
    for title, table, sign in (
        ("Validation-selected, every method (screening seeds)", result["validation_selected"],
         ">="),
        ("At exactly equal learning, validation-selected, every method (screening seeds)",
         result["equal_learning_selected"], "="),
        ("Test fronts read at the levels (for comparison; selection on test)",
         result["test_front_at_levels"], ">="),
    ):  # fmt: skip
        out += ["", f"{title}:", ""]
        out.append("| method | " + " | ".join(f"learning {sign} {lv:.2f}" for lv in levels) + " |")
        out.append("|---" * (len(levels) + 1) + "|")
        for m in sorted(table, key=lambda m: (FAMILIES.index(fam.get(m, "curvature")), m)):
            out.append(f"| {m} | " + " | ".join(_cell(p) for p in table[m].values()) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "stage", nargs="?", default="all", choices=["all", "screen", "confirm", "report"]
    )
    add_data_dir_argument(parser)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--grid", type=Path, default=SCREEN)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="screen (or confirm) only these methods of the grid",
    )
    parser.add_argument("--configs-per-method", type=int, default=CONFIRM_CONFIGS)
    parser.add_argument("--curvature-picks", type=int, default=2)
    args = parser.parse_args()
    out: Path = args.out
    data_dir = data_dir_of(args)
    grid = yaml.safe_load(args.grid.read_text())
    screen_cells = expand_grid(grid)
    out.mkdir(parents=True, exist_ok=True)
    (out / "screen_grid.yaml").write_text(args.grid.read_text())
    t0 = time.perf_counter()
    if args.stage in ("all", "screen"):
        cells = screen_cells
        if args.methods:
            unknown = set(args.methods) - {c["method"] for c in screen_cells}
            if unknown:
                raise SystemExit(f"--methods: not in {args.grid.name}: {sorted(unknown)}")
            cells = [c for c in screen_cells if c["method"] in args.methods]
        counts = run_sweep(cells, out, workers=args.workers, data_dir=data_dir)
        print(f"screen: {counts} in {time.perf_counter() - t0:.0f} s")
    if args.stage in ("all", "confirm"):
        # chosen on the screening seeds only: the confirming runs must not move the choice
        screen_seeds = {c["seed"] for c in screen_cells}
        records = [r for r in read_runs(out / "runs.jsonl") if r["seed"] in screen_seeds]
        selection = confirm_selection(
            aggregate(records), args.configs_per_method, args.curvature_picks
        )
        write_result(out, "confirm_selection.json", selection)
        if args.methods:  # confirm these methods' picks only (the choice is unchanged)
            selection = {
                **selection,
                "methods": {m: c for m, c in selection["methods"].items() if m in args.methods},
            }
        cells = confirm_cells(screen_cells, selection)
        print(f"confirm: {len(cells)} cells for {list(selection['methods'])}")
        counts = run_sweep(cells, out, workers=args.workers, data_dir=data_dir)
        print(f"confirm: {counts} in {time.perf_counter() - t0:.0f} s")
    write_report(out, {c["seed"] for c in screen_cells})


if __name__ == "__main__":
    main()
