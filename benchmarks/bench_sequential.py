"""Sequential tasks on the embedded benchmark: plain LoRA, LALoRA with the source precision
only, and the online Laplace update (:func:`lalora_curv.online_laplace`).

Source facts -> task 1 (word problems) -> task 2 (how many stones each entity holds), one
adapter, r = 8 on every linear module, ``--steps`` (task 1 and task 2: 1000 and 300) at
``--lr`` (2e-3: plain LoRA's best rate on the single-task front, docs/results.md), K-FAC MC
Fisher (8 draws), relative strengths ``c`` in ``--cs`` (both stages), 3 seeds, every 100
steps evaluated. Runs go to worker processes with one torch thread each. Writes
``results/sequential.json`` (every run's curve, finished runs are kept and skipped when the
script runs again) and ``results/sequential.png``."""

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
ORDER = {m: i for i, m in enumerate(LABELS)}
METRICS = (("source_mean", "source facts (accuracy)"), ("task1", "task 1 (exact match)"))
METRICS += (("task2", "task 2 (exact match)"),)


def one_run(method: str, seed: int, c: float, decay: float, steps: tuple, lr: float) -> dict:
    torch.set_num_threads(1)
    model, tok, world = pretrained(0, progress=False)
    run = run_sequential(
        model, tok, world, method=method, c=c, decay=decay, steps=steps, lr=lr, seed=seed
    )
    return run | {"steps": list(steps), "lr": lr}


def cell_of(method: str, seed: int, c: float, decay: float, steps, lr: float) -> tuple:
    """A run's identity: only the settings its method uses (plain LoRA has no c, only the
    online update a decay), so another --cs or --decay does not re-run the others."""
    c = 0.0 if method == "lora" else float(c)
    decay = float(decay) if method == "online" else 1.0
    steps = (int(steps),) * 2 if isinstance(steps, int) else tuple(int(x) for x in steps)
    return (method, int(seed), c, decay, steps, float(lr))


def key(run: dict) -> tuple:
    return cell_of(run["method"], run["seed"], run["c"], run["decay"], run["steps"], run["lr"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", default="1000,300", help="steps of task 1 and task 2")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--cs", default="0.01,0.1,1", help="relative strengths c (LALoRA)")
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="40 + 20 steps, one seed, one c")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    seeds, cs = range(args.seeds), [float(x) for x in args.cs.split(",")]
    steps = tuple(int(x) for x in args.steps.split(","))
    if args.quick:
        seeds, steps, cs = range(1), (40, 20), cs[:1]
    name = "sequential_quick" if args.quick else "sequential"
    path = args.out / (name + ".json")
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    wanted = {
        cell_of(m, s, c, args.decay, steps, args.lr)
        for s in seeds
        for m in LABELS
        for c in (cs if m != "lora" else [0.0])
    }
    done = {key(r) for r in runs}
    todo = sorted(wanted - done)
    pretrained(0)  # once, cached, before the workers load it
    context = multiprocessing.get_context("spawn")
    failed = []
    with ProcessPoolExecutor(max(1, args.workers), mp_context=context) as pool:
        futures = {pool.submit(one_run, *cell): cell for cell in todo}
        for future in as_completed(futures):
            try:
                run = future.result()
            except Exception as err:  # the others go on; re-running retries this one
                failed.append((futures[future], err))
                print(f"FAILED {futures[future]}: {type(err).__name__}: {err}", flush=True)
                continue
            runs.append(run)
            end = run["curve"][-1]
            print(
                f"seed {run['seed']} {LABELS[run['method']]:<30} c {run['c']:<5}: source "
                f"{end['source_mean']:.3f}  task 1 {end['task1']:.3f}  task 2 {end['task2']:.3f}"
                f"  (lam {', '.join(f'{x:.3g}' for x in run['lam'])})",
                flush=True,
            )
            write_result(args.out, name + ".json", {"runs": runs, "environment": environment()})
    mine = [r for r in runs if key(r) in wanted]
    table = summary(mine, steps)
    print(f"after both tasks ({steps[0]} + {steps[1]} steps, lr {args.lr}, decay {args.decay}):")
    for row in table:
        print(
            f"  {LABELS[row['method']]:<30} c {row['c']:<5} "
            + "  ".join(f"{m} {row[m]:.3f} +- {row[m + '_std']:.3f}" for m, _ in METRICS)
            + f"  (task 1 after stage 1 {row['task1_after_stage1']:.3f}; {row['seeds']} seeds)"
        )
    write_result(
        args.out, name + ".json", {"runs": runs, "summary": table, "environment": environment()}
    )
    plot(mine, args.out / (name + ".png"), steps)
    print(f"wrote {path} and {args.out / (name + '.png')}")
    if failed:
        raise SystemExit(f"{len(failed)} runs failed (the others are saved; run again to retry)")


def configs(runs: list[dict]) -> list[tuple[str, float]]:
    """The (method, c) pairs of ``runs``: plain LoRA first, then by method and strength."""
    return sorted({(r["method"], key(r)[2]) for r in runs}, key=lambda m: (ORDER[m[0]], m[1]))


def summary(runs: list[dict], steps: tuple[int, int]) -> list[dict]:
    """Mean and standard deviation over seeds of the final point of each (method, c), and
    task 1's exact match at the end of stage 1 (what stage 2 then keeps or loses)."""
    rows = []
    for method, c in configs(runs):
        mine = [r for r in runs if (r["method"], key(r)[2]) == (method, c)]
        row: dict = {"method": method, "c": c, "seeds": len(mine), "steps": list(steps)}
        for m, _ in METRICS:
            values = [r["curve"][-1][m] for r in mine]
            row[m] = statistics.fmean(values)
            row[m + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        mids = [next(p for p in r["curve"] if p["step"] == steps[0])["task1"] for r in mine]
        row["task1_after_stage1"] = statistics.fmean(mids)
        rows.append(row)
    return rows


def plot(runs: list[dict], path: Path, steps: tuple[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110, sharex=True)
    pairs = configs(runs)
    styles = ("-", "--", ":", "-.")
    cs = sorted({c for m, c in pairs if m != "lora"})
    for ax, (metric, title) in zip(axes, METRICS, strict=True):
        for method, c in pairs:
            curves = [r["curve"] for r in runs if (r["method"], key(r)[2]) == (method, c)]
            x = [p["step"] for p in curves[0]]
            ys = [[p[metric] for p in curve] for curve in curves]
            mean = [statistics.fmean(v) for v in zip(*ys, strict=True)]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*ys, strict=True)]
            label = LABELS[method] + ("" if method == "lora" else f", c = {c:g}")
            style = "-" if method == "lora" else styles[cs.index(c) % len(styles)]
            colour = COLOURS[method]
            ax.plot(x, mean, style, color=colour, label=f"{label} ({len(curves)} seeds)")
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(x, lo, hi, color=colour, alpha=0.08)
        ax.axvline(steps[0], color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step (task 1, then task 2)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("Sequential tasks on the embedded benchmark (mean +- std over seeds)")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    save_figure(fig, path)


if __name__ == "__main__":
    main()
