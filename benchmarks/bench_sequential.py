"""Sequential tasks on the embedded benchmark: plain LoRA, LALoRA with the source precision
only, and the online Laplace update (:func:`lalora_curv.online_laplace`).

Source facts -> task 1 (word problems) -> task 2 (how many stones each entity holds), one
adapter, r = 8 on every linear module, ``--steps`` per task at ``--lr`` (2e-3: plain LoRA's
best rate on the single-task front, docs/results.md), K-FAC MC Fisher (8 draws), relative
strength ``c``, 3 seeds, every 100 steps evaluated. Runs go to worker processes with one
torch thread each. Writes ``results/sequential.json`` (every run's curve, finished runs are
kept and skipped when the script runs again) and ``results/sequential.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from bench_core import environment, write_result
from lalora_curv.plotting import save_figure
from lalora_curv.testbed import pretrained
from lalora_curv.testbed.sequential import run_sequential

HERE = Path(__file__).resolve().parent
LABELS = {
    "lora": "plain LoRA",
    "lalora": "LALoRA, source precision only",
    "online": "LALoRA, online Laplace",
}
COLOURS = {"lora": "tab:red", "lalora": "tab:blue", "online": "tab:green"}
METRICS = (("source_mean", "source facts (accuracy)"), ("task1", "task 1 (exact match)"))
METRICS += (("task2", "task 2 (exact match)"),)


def one_run(method: str, seed: int, c: float, decay: float, steps: int, lr: float) -> dict:
    torch.set_num_threads(1)
    model, tok, world = pretrained(0, progress=False)
    run = run_sequential(
        model, tok, world, method=method, c=c, decay=decay, steps=steps, lr=lr, seed=seed
    )
    return run | {"steps": steps, "lr": lr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500, help="per task")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--c", type=float, default=0.01)
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="40 steps per task, one seed")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    seeds, steps = range(args.seeds), args.steps
    if args.quick:
        seeds, steps = range(1), 40
    name = "sequential_quick" if args.quick else "sequential"
    path = args.out / (name + ".json")
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    key = lambda r: (r["method"], r["seed"], r["c"], r["decay"], r["steps"], r["lr"])  # noqa: E731
    done = {key(r) for r in runs}
    todo = [
        (m, s, args.c, args.decay, steps, args.lr)
        for s in seeds
        for m in LABELS
        if (m, s, args.c, args.decay, steps, args.lr) not in done
    ]
    pretrained(0)  # once, cached, before the workers load it
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, args.workers), mp_context=context) as pool:
        futures = [pool.submit(one_run, *cell) for cell in todo]
        for future in as_completed(futures):
            run = future.result()
            runs.append(run)
            end = run["curve"][-1]
            print(
                f"seed {run['seed']} {LABELS[run['method']]:<30}: source {end['source_mean']:.3f}"
                f"  task 1 {end['task1']:.3f}  task 2 {end['task2']:.3f}"
                f"  (lam {', '.join(f'{x:.3g}' for x in run['lam'])})",
                flush=True,
            )
            write_result(args.out, name + ".json", {"runs": runs, "environment": environment()})
    mine = [r for r in runs if key(r)[2:] == (args.c, args.decay, steps, args.lr)]
    table = summary(mine, steps)
    print(f"after both tasks ({steps} steps each, lr {args.lr}, c {args.c}, decay {args.decay}):")
    for row in table:
        print(
            f"  {LABELS[row['method']]:<30} "
            + "  ".join(f"{m} {row[m]:.3f} +- {row[m + '_std']:.3f}" for m, _ in METRICS)
            + f"  ({row['seeds']} seeds)"
        )
    write_result(
        args.out, name + ".json", {"runs": runs, "summary": table, "environment": environment()}
    )
    plot(mine, args.out / (name + ".png"), steps)
    print(f"wrote {path} and {args.out / (name + '.png')}")


def summary(runs: list[dict], steps: int) -> list[dict]:
    """Mean and standard deviation over seeds of the final point of each method."""
    rows = []
    for method in LABELS:
        ends = [r["curve"][-1] for r in runs if r["method"] == method]
        if not ends:
            continue
        row: dict = {"method": method, "seeds": len(ends), "steps_per_task": steps}
        for m, _ in METRICS:
            values = [e[m] for e in ends]
            row[m] = statistics.fmean(values)
            row[m + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        # end of task 1 too: what stage 2 then keeps or loses
        mids = [
            next(p for p in r["curve"] if p["step"] == steps) for r in runs if r["method"] == method
        ]
        row["task1_after_stage1"] = statistics.fmean(p["task1"] for p in mids)
        rows.append(row)
    return rows


def plot(runs: list[dict], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110, sharex=True)
    for ax, (metric, title) in zip(axes, METRICS, strict=True):
        for method, label in LABELS.items():
            curves = [r["curve"] for r in runs if r["method"] == method]
            if not curves:
                continue
            x = [p["step"] for p in curves[0]]
            ys = [[p[metric] for p in c] for c in curves]
            mean = [statistics.fmean(v) for v in zip(*ys, strict=True)]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*ys, strict=True)]
            ax.plot(x, mean, color=COLOURS[method], label=f"{label} ({len(curves)} seeds)")
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                color=COLOURS[method],
                alpha=0.15,
            )
        ax.axvline(steps, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step (task 1, then task 2)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Sequential tasks on the embedded benchmark (mean +- std over seeds)")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
