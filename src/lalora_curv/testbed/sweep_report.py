"""Fronts, curves and tables of a sweep's ``runs.jsonl`` (paper Figs. 2-5 and Table 1 style).

* :func:`aggregate`: per method configuration (every setting but the seed) and evaluation
  step, the mean and standard deviation over seeds of the mean source accuracy, of each
  source sub-domain's accuracy and of the target exact match;
* :func:`validation_selected`: per method and level of learning, the (configuration, step)
  chosen on the validation split, with its test numbers; :func:`equal_learning_selected`: the
  same read at exactly that learning, each run interpolated between its checkpoints
  (:func:`crossing`);
* :func:`pareto_front`: the points no other point beats on both axes (higher source accuracy
  *and* higher target exact match, one of them strictly);
* :func:`report`: each method's front over all its configurations and evaluation steps
  (seed-averaged points) -> ``pareto.png`` (and ``pareto_top.png``, zoomed on source
  accuracy >= 0.9, when some point lies below); accuracy against step per method ->
  ``curves.png``; ``table.csv`` and ``summary.json``: the final point of every configuration
  and, per method, the front's point of highest source accuracy with target >= a threshold.

Every record of ``runs.jsonl`` enters the plots: nothing is filtered.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lalora_curv.atomic import write_json, write_text
from lalora_curv.plotting import pyplot, save_figure

SETTINGS_SKIPPED_IN_LABELS = ("method", "kind", "seed", "benchmark")


def pareto_front(source: Sequence[float], target: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, by increasing target (ties: input order).

    Point ``i`` is dominated when some ``j`` has ``target_j >= target_i``,
    ``source_j >= source_i`` and one of them strictly greater. Sorted by decreasing target
    (then source), a point is on the front iff it has the largest source of its target and
    beats the largest source of every strictly larger target: ``O(n log n)``.
    """
    s, t = np.asarray(source, float), np.asarray(target, float)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"source and target must be 1-d of one length, got {s.shape}, {t.shape}")
    order = np.lexsort((-s, -t))  # by target desc, then source desc
    front, best_above, i = [], -math.inf, 0
    while i < len(order):
        j = i
        while j < len(order) and t[order[j]] == t[order[i]]:
            j += 1
        top = s[order[i]]  # the largest source at this target
        if top > best_above:
            front += [int(k) for k in order[i:j] if s[k] == top]
        best_above = max(best_above, top)
        i = j
    return sorted(front, key=lambda k: (t[k], k))


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (``ddof = 1``) over seeds.

    0 for a single seed (whose spread is unknown: every table states the number of seeds
    beside it).
    """
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _settings(cell: dict[str, Any], varying: Sequence[str]) -> str:
    """The settings that vary within the cell's method, as ``k=v`` words (``""``: none)."""
    return " ".join(
        f"{k}={cell[k]:g}" if isinstance(cell[k], float) else f"{k}={cell[k]}" for k in varying
    )


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per configuration, its points averaged over seeds.

    Each has ``method``, ``settings`` (the settings that vary within its method, ``k=v``
    words), ``label`` (the method, then its settings), ``cell``
    (without the seed), ``seeds`` and per step ``points``: ``step``, ``n``, mean and sample std
    (over seeds, :func:`sample_std`) of ``source_mean``, ``target``, each ``source/<domain>``
    and, where the records carry a validation split, ``val/source_mean`` and ``val/target``;
    and the seeds' mean ``lam``.
    """
    by_config: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_config[r["config"]].append(r)
    configs_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rs in by_config.values():
        cell = {k: v for k, v in rs[0]["cell"].items() if k != "seed"}
        configs_of[cell["method"]].append(cell)
    varying = {}
    for method, cells in configs_of.items():
        keys = sorted({k for c in cells for k in c} - set(SETTINGS_SKIPPED_IN_LABELS))
        varying[method] = [
            k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in cells}) > 1
        ]
    out = []
    for config, rs in by_config.items():
        cell = {k: v for k, v in rs[0]["cell"].items() if k != "seed"}
        steps: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in rs:
            steps[r["step"]].append(r)
        points = []
        for step in sorted(steps):
            group = steps[step]
            point: dict[str, Any] = {"step": step, "n": len(group)}
            values = {"source_mean": [r["source_mean"] for r in group]}
            values["target"] = [r["target"] for r in group]
            for domain in group[0]["source"]:
                values[f"source/{domain}"] = [r["source"][domain] for r in group]
            if all("val" in r for r in group):  # the validation split's, where measured
                values["val/source_mean"] = [r["val"]["source_mean"] for r in group]
                values["val/target"] = [r["val"]["target"] for r in group]
            for name, v in values.items():
                point[name] = float(np.mean(v))
                point[f"{name}_std"] = sample_std(v)
            point["lam"] = float(np.mean([r["lam"] for r in group]))
            points.append(point)
        settings = _settings(cell, varying[cell["method"]])
        out.append(
            {
                "config": config,
                "method": cell["method"],
                "settings": settings,
                "label": f"{cell['method']} {settings}".rstrip(),
                "cell": cell,
                "seeds": sorted({r["seed"] for r in rs}),
                "points": points,
            }
        )
    out.sort(key=lambda c: (c["method"], c["label"]))
    return out


def method_fronts(configs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per method: its front over all its configurations' seed-averaged points (every step).

    Each point has its configuration's ``label`` and ``config``.
    """
    points_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in configs:
        for p in c["points"]:
            points_of[c["method"]].append(
                {**p, "label": c["label"], "settings": c["settings"], "config": c["config"]}
            )
    fronts = {}
    for method, pts in points_of.items():
        idx = pareto_front([p["source_mean"] for p in pts], [p["target"] for p in pts])
        fronts[method] = [pts[i] for i in idx]
    return fronts


def source_at_target(
    fronts: dict[str, list[dict[str, Any]]], levels: Sequence[float]
) -> dict[str, dict[str, dict[str, Any] | None]]:
    """Per method and level ``T``: the front read at equal learning.

    Its front point of highest source accuracy among those with target >= ``T`` (``None``
    where the method never reaches ``T``): the comparison a reader of the Pareto plot makes.
    """
    out: dict[str, dict[str, dict[str, Any] | None]] = {}
    for method, front in sorted(fronts.items()):
        out[method] = {}
        for level in levels:
            eligible = [p for p in front if p["target"] >= level]
            best = max(eligible, key=lambda p: (p["source_mean"], p["target"]), default=None)
            out[method][f"{level:g}"] = best
    return out


def validation_selected(
    configs: list[dict[str, Any]], levels: Sequence[float]
) -> dict[str, dict[str, dict[str, Any] | None]]:
    """Per method and level ``T``: the (configuration, step) chosen on the *validation* split.

    It is the one of highest validation ``source_mean`` among those with validation
    ``target >= T`` (seed means), with its *test* numbers; ``None`` where no point reaches
    ``T`` on validation. The honest counterpart of :func:`source_at_target`, which reads the
    test split's own front (a selection on the numbers it reports).
    """
    points_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in configs:
        for p in c["points"]:
            if "val/target" in p:
                points_of[c["method"]].append(
                    {**p, "label": c["label"], "settings": c["settings"], "config": c["config"]}
                )
    out: dict[str, dict[str, dict[str, Any] | None]] = {}
    for method, pts in sorted(points_of.items()):
        out[method] = {}
        for level in levels:
            eligible = [p for p in pts if p["val/target"] >= level]
            best = max(
                eligible, key=lambda p: (p["val/source_mean"], p["val/target"]), default=None
            )
            out[method][f"{level:g}"] = best
    return out


def crossing(
    curve: Sequence[tuple[float, float, float]], level: float
) -> tuple[float, float] | None:
    """``(step, y)`` where a run's learning curve first reaches ``level``, interpolated.

    ``curve``: ``(step, learning, y)`` by increasing step, the run's checkpoints joined by
    straight lines. Between the last checkpoint below ``level`` ``(s0, x0, y0)`` and the first
    at or above it ``(s1, x1, y1)``, at ``t = (level - x0) / (x1 - x0)``: ``y0 + t (y1 - y0)``
    (and ``s0 + t (s1 - s0)``). ``None`` if the run never reaches ``level``.
    """
    for i, (s1, x1, y1) in enumerate(curve):
        if x1 >= level:
            if i == 0:
                return s1, y1
            s0, x0, y0 = curve[i - 1]
            t = (level - x0) / (x1 - x0)
            return s0 + t * (s1 - s0), y0 + t * (y1 - y0)
    return None


def run_curves(records: list[dict[str, Any]]) -> dict[str, dict[str, list]]:
    """Per configuration: its runs' checkpoint curves, one per seed (:func:`crossing`'s input).

    Each curve is ``(step, target, source_mean)`` by increasing step. ``"test"``: on the test
    split; ``"val"``: on the validation split, ``None`` for a run whose records do not all
    carry one.
    """
    by_run: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_run[(r["config"], r["seed"])].append(r)
    out: dict[str, dict[str, list]] = defaultdict(lambda: {"test": [], "val": []})
    for (config, _), rs in by_run.items():
        rs = sorted(rs, key=lambda r: r["step"])
        out[config]["test"].append([(r["step"], r["target"], r["source_mean"]) for r in rs])
        val = [(r["step"], r["val"]["target"], r["val"]["source_mean"]) for r in rs if "val" in r]
        out[config]["val"].append(val if len(val) == len(rs) else None)
    return dict(out)


def equal_learning_selected(
    records: list[dict[str, Any]], levels: Sequence[float]
) -> dict[str, dict[str, dict[str, Any] | None]]:
    """Per method and level ``T``: the configuration chosen on validation, read at learning ``T``.

    Each run's source score at ``T`` is :func:`crossing`'s, on the validation and the test
    split separately (each split's own learning reaches ``T``). A configuration is eligible
    when every one of its seeds reaches ``T`` on validation; the one of highest seed-mean
    validation ``source_mean`` at ``T`` is chosen, and its test ``source_mean`` at ``T``
    reported: mean and sample std over the seeds whose test curve reaches ``T`` (``n``), with
    ``target = T`` and the mean test crossing ``step``. ``None`` where no configuration is
    eligible or no test curve reaches ``T``. Unlike :func:`validation_selected`, whose picks
    learn ``>= T`` (so differently per method), every pick here learns exactly ``T``: the
    comparison at equal learning, up to the straight lines between checkpoints.
    """
    named = {c["config"]: c for c in aggregate(records)}
    curves = run_curves(records)
    out: dict[str, dict[str, dict[str, Any] | None]] = {}
    for method in sorted({c["method"] for c in named.values()}):
        out[method] = {}
        for level in levels:
            best: dict[str, Any] | None = None
            for config, runs in curves.items():
                if named[config]["method"] != method or None in runs["val"]:
                    continue
                val = [crossing(curve, level) for curve in runs["val"]]
                if None in val:
                    continue
                val_mean = float(np.mean([v[1] for v in val]))
                if best is not None and val_mean <= best["val/source_mean"]:
                    continue
                test = [crossing(curve, level) for curve in runs["test"]]
                reached = [t for t in test if t is not None]
                best = {
                    "config": config,
                    "label": named[config]["label"],
                    "settings": named[config]["settings"],
                    "val/source_mean": val_mean,
                    "val/target": float(level),
                    "n": len(reached),
                    "target": float(level),
                    "target_std": 0.0,
                    "step": round(float(np.mean([t[0] for t in reached]))) if reached else None,
                    "source_mean": float(np.mean([t[1] for t in reached])) if reached else None,
                    "source_mean_std": sample_std([t[1] for t in reached]),
                }
            out[method][f"{level:g}"] = best if best is not None and best["n"] else None
    return out


def nice_levels(top: float, count: int = 9) -> list[float]:
    """Round levels ``step, 2 step, ... <= top``.

    ``step`` is the smallest of 0.05, 0.1, 0.2, 0.25, 0.5, 1 that gives at most ``count``
    levels (0.1, ..., 0.9 for accuracies).
    """
    for step in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0):
        n = math.floor(top / step + 1e-9)
        if n <= count:
            return [round(step * k, 10) for k in range(1, n + 1)]
    step = 10 ** math.ceil(math.log10(top / count))
    return [round(step * k, 10) for k in range(1, math.floor(top / step + 1e-9) + 1)]


def front_gap(point: dict[str, Any], front: Sequence[dict[str, Any]]) -> float | None:
    """How far ``point`` lies below ``front`` at equal or higher learning.

    The highest ``source_mean`` of a front point with ``target >= point["target"]`` minus the
    point's (> 0: the front keeps more source at that learning; <= 0: the point is on or
    beyond it); ``None`` when no front point learns as much.
    """
    above = [p["source_mean"] for p in front if p["target"] >= point["target"]]
    return max(above) - point["source_mean"] if above else None


def default_threshold(fronts: dict[str, list[dict[str, Any]]]) -> float:
    """``0.9 * min over methods of the method's best target``: every method has a point."""
    return 0.9 * min(max(p["target"] for p in front) for front in fronts.values())


def _row(kind: str, method: str, point: dict[str, Any], label: str, seeds: int) -> dict:
    return {
        "kind": kind,
        "method": method,
        "config": label,
        "step": point["step"],
        "seeds": seeds,
        "source": round(point["source_mean"], 4),
        "source_std": round(point["source_mean_std"], 4),
        "target": round(point["target"], 4),
        "target_std": round(point["target_std"], 4),
    }


def tables(
    configs: list[dict[str, Any]], threshold: float | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of ``table.csv`` and ``summary.json``.

    Rows of ``kind`` ``final``: every configuration's last step; ``front``: per method, the
    front point of highest source accuracy with target >= ``threshold`` (default
    :func:`default_threshold`).
    """
    fronts = method_fronts(configs)
    if threshold is None:
        threshold = default_threshold(fronts)
    rows = [
        _row("final", c["method"], c["points"][-1], c["label"], len(c["seeds"])) for c in configs
    ]
    seeds_of = {c["config"]: len(c["seeds"]) for c in configs}
    best = {}
    for method, front in sorted(fronts.items()):
        eligible = [p for p in front if p["target"] >= threshold]
        if eligible:
            p = max(eligible, key=lambda p: (p["source_mean"], p["target"]))
            best[method] = p
            rows.append(_row("front", method, p, p["label"], seeds_of[p["config"]]))
    top = max(p["target"] for front in fronts.values() for p in front)
    levels = nice_levels(top)
    summary = {
        "threshold": threshold,
        "source_at_target": source_at_target(fronts, levels),
        "methods": {
            m: {
                "configs": sum(c["method"] == m for c in configs),
                "runs": sum(len(c["seeds"]) for c in configs if c["method"] == m),
                "front": fronts[m],
                "best_at_threshold": best.get(m),
            }
            for m in sorted(fronts)
        },
        "configs": configs,
    }
    if any("val/target" in p for c in configs for p in c["points"]):
        val_top = max(p["val/target"] for c in configs for p in c["points"])
        summary["validation_selected"] = validation_selected(configs, nice_levels(val_top))
    return rows, summary


def _colour(plt, i: int, n: int):
    """Matplotlib's default cycle for up to 10 lines, tab20 (20 distinct) beyond."""
    return f"C{i}" if n <= 10 else plt.get_cmap("tab20")(i % 20)


def plot_pareto(
    configs: list[dict[str, Any]],
    path: Path,
    *,
    xlabel: str = "target exact match (learning)",
    ylabel: str = "mean source accuracy (forgetting)",
    title: str = "learning-forgetting fronts (every evaluation, seed means)",
    y_sign: float = 1.0,
    legend_loc: str = "lower left",
    ylim: tuple[float, float] | None = None,
) -> Path | None:
    """Target exact match (x) against mean source accuracy (y), with each method's front.

    Every seed-averaged point faint, each method's front as a step line with its points' seed
    std as error bars.

    ``y_sign = -1`` draws ``-source_mean`` (e.g. a forgetting measure stored negated so that
    higher is better for :func:`pareto_front`): lower is then better on the y axis. ``ylim``
    zooms the y axis (the fronts are computed from every point all the same).
    """
    plt = pyplot()
    if plt is None:
        return None
    fronts = method_fronts(configs)
    many = len(fronts) > 6
    fig, ax = plt.subplots(figsize=(11, 7) if many else (7.5, 5.5), dpi=120)
    for i, method in enumerate(sorted(fronts)):
        colour = _colour(plt, i, len(fronts))
        pts = [p for c in configs if c["method"] == method for p in c["points"]]
        ax.scatter(
            [p["target"] for p in pts],
            [y_sign * p["source_mean"] for p in pts],
            s=12,
            alpha=0.25,
            color=colour,
        )
        front = fronts[method]
        x, y = [p["target"] for p in front], [y_sign * p["source_mean"] for p in front]
        ax.step(x, y, where="pre", color=colour, lw=1.8, label=f"{method} ({len(pts)} points)")
        ax.errorbar(
            x,
            y,
            xerr=[p["target_std"] for p in front],
            yerr=[p["source_mean_std"] for p in front],
            fmt="o",
            ms=4,
            color=colour,
            alpha=0.6,
            elinewidth=0.8,
            capsize=2,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    if many:  # beside the axes, where it hides no point
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, loc=legend_loc)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(
    configs: list[dict[str, Any]], path: Path, scenario: str = "embedded"
) -> Path | None:
    """Per method (rows): source accuracy and target exact match against the step.

    Real text: the source NLL increase and the GSM8K NLL decrease. Every configuration is a
    line (seed mean) with a band of one std.
    """
    plt = pyplot()
    if plt is None:
        return None
    methods = sorted({c["method"] for c in configs})
    fig, axes = plt.subplots(
        len(methods), 2, figsize=(11, 2.6 * len(methods) + 0.4), dpi=110, squeeze=False
    )
    for row, method in enumerate(methods):
        mine = [c for c in configs if c["method"] == method]
        for i, c in enumerate(mine):
            steps = [p["step"] for p in c["points"]]
            for ax, key in zip(axes[row], ("source_mean", "target"), strict=True):
                sign = -1.0 if scenario == "realtext" and key == "source_mean" else 1.0
                m = sign * np.array([p[key] for p in c["points"]])
                s = np.array([p[f"{key}_std"] for p in c["points"]])
                colour = _colour(plt, i, len(mine))
                label = c["settings"] or method
                ax.plot(steps, m, marker=".", color=colour, label=f"{label} (n={len(c['seeds'])})")
                ax.fill_between(steps, m - s, m + s, color=colour, alpha=0.15)
        left, right = (
            ("source NLL increase", "GSM8K NLL decrease")
            if scenario == "realtext"
            else ("source accuracy", "target exact match")
        )
        axes[row][0].set_ylabel(f"{method}\n{left}")
        axes[row][1].set_ylabel(right)
        axes[row][1].legend(fontsize=6, loc="best", ncol=1 + len(mine) // 8)
        for ax in axes[row]:
            ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    return save_figure(fig, path)


#: the axes of each scenario's plots (both stored higher-is-better)
AXES = {
    "embedded": {},
    "realtext": {
        "xlabel": "GSM8K test NLL decrease per token (learning, higher is better)",
        "ylabel": "held-out source NLL increase per token\n(forgetting, lower is better)",
        "title": "Real text: fronts over every setting and checkpoint (seed means)",
        "y_sign": -1.0,
        "legend_loc": "upper left",
    },
}


def report(
    records: list[dict[str, Any]], out: str | Path, threshold: float | None = None
) -> dict[str, Any]:
    """Write ``table.csv``, ``summary.json``, ``pareto.png`` and ``curves.png`` into ``out``.

    From every record; returns the summary plus ``rows`` and the written ``files``.
    """
    if not records:
        raise ValueError("no records: the sweep has not finished any cell")
    out = Path(out)
    configs = aggregate(records)
    rows, summary = tables(configs, threshold)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "table.csv", buffer.getvalue())
    write_json(out / "summary.json", summary)
    files = [out / "table.csv", out / "summary.json"]
    scenario = records[0]["cell"]["benchmark"].get("scenario", "embedded")
    if plot_pareto(configs, out / "pareto.png", **AXES[scenario]) is not None:
        files.append(out / "pareto.png")
    if plot_curves(configs, out / "curves.png", scenario) is not None:
        files.append(out / "curves.png")
    lowest = min(p["source_mean"] for c in configs for p in c["points"])
    if scenario == "embedded" and lowest < 0.9:  # the top crowds together: a zoomed copy
        zoomed = plot_pareto(
            configs,
            out / "pareto_top.png",
            title="learning-forgetting fronts, source accuracy >= 0.9",
            ylim=(0.9, 1.005),
        )
        if zoomed is not None:
            files.append(zoomed)
    return {**summary, "rows": rows, "files": [str(f) for f in files]}


def format_table(
    rows: list[dict[str, Any]],
    threshold: float,
    at_target: dict[str, dict[str, dict[str, Any] | None]] | None = None,
) -> str:
    """The rows as aligned text.

    The final points, then each method's best front point, then (``at_target``, from
    :func:`source_at_target`) each method's front read at levels of target exact match.
    """
    width = max(len(r["config"]) for r in rows) + 2
    lines = []
    for kind, title in (
        ("final", "final point of each configuration (mean +- std over seeds)"),
        ("front", f"best front point with target >= {threshold:.3f}, per method"),
    ):
        lines += [
            "",
            title,
            f"{'configuration':<{width}}{'step':>6}  {'source':>15}  {'target':>15}",
        ]
        for r in rows:
            if r["kind"] == kind:
                lines.append(
                    f"{r['config']:<{width}}{r['step']:>6}  {r['source']:.3f} +- {r['source_std']:.3f}"
                    f"  {r['target']:.3f} +- {r['target_std']:.3f}"
                )
    levels = list(next(iter(at_target.values()), {})) if at_target else []
    if levels:  # none when no method reaches target 0.1: no empty table
        name = max(len(m) for m in at_target) + 2
        lines += [
            "",
            "best source score (accuracy; on real text minus the NLL increase) on each "
            "method's front with target >= T (mean +- std)",
            f"{'method':<{name}}" + "".join(f"{'T=' + t:>16}" for t in levels),
        ]
        for method, by_level in at_target.items():
            cells = [
                f"{p['source_mean']:.3f} +- {p['source_mean_std']:.3f}" if p else "-"
                for p in by_level.values()
            ]
            lines.append(f"{method:<{name}}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines[1:])


__all__ = [
    "aggregate",
    "default_threshold",
    "format_table",
    "front_gap",
    "method_fronts",
    "nice_levels",
    "pareto_front",
    "report",
    "sample_std",
    "source_at_target",
    "tables",
    "validation_selected",
]
