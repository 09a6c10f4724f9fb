"""Source curvature without source data, on the embedded benchmark.

Plain LoRA against LALoRA (K-FAC, MC Fisher with 8 draws) whose precision is fitted on
(a) the real source facts or (b) the base model's own unconditional samples holding the same
number of supervised tokens, at three penalty strengths ``c`` (``lam = c / mean_curvature(P)``:
the two precisions' raw scales differ by orders of magnitude), 3 seeds each (LoRA init, data
order, MC draws and samples), lr 3e-3, 1000 steps, r = 8 on every linear module. Writes
``results/selfgen.json`` (every run) and ``results/selfgen.png``; finished runs are kept and
skipped when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench_core import environment, write_result
from lalora_curv.plotting import save_figure
from lalora_curv.strength import Strength
from lalora_curv.testbed import pretrained
from lalora_curv.testbed.experiment import finetune

HERE = Path(__file__).resolve().parent
LABELS = {"none": "plain LoRA", "facts": "source facts", "self-generated": "self-generated"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strengths", default="0.003,0.01,0.03")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="100 steps, one seed, one c")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    strengths = [float(x) for x in args.strengths.split(",")]
    seeds, steps = range(args.seeds), args.steps
    if args.quick:
        strengths, seeds, steps = strengths[1:2], range(1), 100
    name = "selfgen_quick" if args.quick else "selfgen"
    path = args.out / (name + ".json")
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    done = {(r["source"], r["c"], r["seed"]) for r in runs if r["steps"] == steps}
    cells = [("none", 0.0)] + [(s, c) for s in ("facts", "self-generated") for c in strengths]
    for seed in seeds:
        for source, c in cells:
            if (source, c, seed) in done:
                continue
            model, tok, world = pretrained(0)
            result = finetune(
                model,
                tok,
                world,
                precision=None if source == "none" else "kfac",
                source="facts" if source == "none" else source,
                strength=Strength.relative(c),
                steps=steps,
                lr=args.lr,
                seed=seed,
            )
            source_acc = sum(result["after"]["source"].values()) / 3
            runs.append(
                {"source": source, "c": c, "seed": seed, "steps": steps, "lr": args.lr}
                | result
                | {"source_mean": source_acc}
            )
            print(
                f"seed {seed} {LABELS[source]:<15} c {c:<6}: source accuracy {source_acc:.3f}, "
                f"target exact match {result['after']['target']:.3f} "
                f"(lam {result['lam_applied']:.3g}, {result['source_tokens']} source tokens)",
                flush=True,
            )
            write_result(args.out, name + ".json", {"runs": runs, "environment": environment()})
    table = summary(runs, steps)
    for row in table:
        print(
            f"{LABELS[row['source']]:<15} c {row['c']:<6} source {row['source_mean']:.3f} "
            f"+- {row['source_std']:.3f}  target {row['target_mean']:.3f} "
            f"+- {row['target_std']:.3f}  ({row['seeds']} seeds)"
        )
    write_result(
        args.out, name + ".json", {"runs": runs, "summary": table, "environment": environment()}
    )
    plot(runs, table, args.out / (name + ".png"), steps, args.lr)
    print(f"wrote {path} and {args.out / (name + '.png')}")


def summary(runs: list[dict], steps: int) -> list[dict]:
    """Mean and standard deviation over seeds of each (source, c) cell."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        if r["steps"] == steps:
            cells.setdefault((r["source"], r["c"]), []).append(r)
    rows = []
    for (source, c), rs in cells.items():
        src = [r["source_mean"] for r in rs]
        tgt = [r["after"]["target"] for r in rs]
        rows.append(
            {
                "source": source,
                "c": c,
                "seeds": len(rs),
                "source_mean": statistics.fmean(src),
                "source_std": statistics.stdev(src) if len(src) > 1 else 0.0,
                "target_mean": statistics.fmean(tgt),
                "target_std": statistics.stdev(tgt) if len(tgt) > 1 else 0.0,
                "source_tokens": statistics.fmean(r["source_tokens"] for r in rs),
            }
        )
    return rows


def plot(runs: list[dict], table: list[dict], path: Path, steps: int, lr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"none": "tab:red", "facts": "tab:blue", "self-generated": "tab:green"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    base = runs[0]["before"]
    ax.scatter(
        [base["target"]],
        [sum(base["source"].values()) / 3],
        marker="*",
        s=150,
        color="black",
        label="pretrained model",
    )
    for r in runs:
        if r["steps"] == steps:
            ax.scatter(
                r["after"]["target"], r["source_mean"], color=colours[r["source"]], s=12, alpha=0.35
            )
    for row in table:
        ax.errorbar(
            row["target_mean"],
            row["source_mean"],
            xerr=row["target_std"],
            yerr=row["source_std"],
            fmt="o",
            color=colours[row["source"]],
            capsize=3,
            label=LABELS[row["source"]]
            if row["c"] in (0.0, min(r["c"] for r in table if r["c"]))
            else None,
        )
        if row["c"]:
            ax.annotate(
                f"c={row['c']:g}",
                (row["target_mean"], row["source_mean"]),
                fontsize=7,
                color=colours[row["source"]],
                xytext=(5, 5) if row["source"] == "self-generated" else (5, -11),
                textcoords="offset points",
            )
    ax.set_xlabel("target exact match (learning)")
    ax.set_ylabel("source accuracy (forgetting)")
    ax.set_title(
        f"Precision from source facts vs self-generated samples\n(lr {lr}, {steps} steps; mean +- std over seeds, faint: each run)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
