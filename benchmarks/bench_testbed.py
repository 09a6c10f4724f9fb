"""The embedded benchmark: plain LoRA against LALoRA (K-FAC, MC Fisher) at several lambdas.

One seed, one learning rate and step count (lr 3e-3, 1000 steps, LoRA r = 8 on every linear
module of the testbed's pretrained 2M-parameter Llama). Prints source accuracy (forgetting) and
target exact match (learning) per run, writes ``results/testbed.json`` and a trade-off plot
``results/testbed.png``. A single configuration is not a comparison of fronts: the sweep over
learning rates, steps and seeds that decides whether LALoRA beats plain LoRA is future work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench_core import environment, write_result
from lalora_curv.plotting import save_figure
from lalora_curv.testbed import pretrained
from lalora_curv.testbed.experiment import finetune

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lams", default="1e3,1e4,1e5,1e6")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="200 steps, two lambdas")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    steps, lams = args.steps, [float(x) for x in args.lams.split(",")]
    if args.quick:
        steps, lams = 200, lams[:2]
    runs = []
    for lam in [0.0, *lams]:
        model, tok, world = pretrained(0)
        result = finetune(
            model,
            tok,
            world,
            steps=steps,
            lr=args.lr,
            precision="kfac" if lam else None,
            strength=lam,
        )
        source = sum(result["after"]["source"].values()) / 3
        runs.append(
            {
                "method": "lalora-kfac-mc" if lam else "lora",
                "lam": lam,
                **result,
                "source_mean": source,
            }
        )
        print(
            f"{runs[-1]['method']:<15} lam {lam:>8.0e}: source accuracy "
            f"{source:.3f} (drop {result['source_drop']:+.3f}), target exact match "
            f"{result['after']['target']:.3f} (from {result['before']['target']:.3f})"
        )
    name = "testbed_quick" if args.quick else "testbed"
    write_result(
        args.out,
        name + ".json",
        {"runs": runs, "steps": steps, "lr": args.lr, "environment": environment()},
    )
    _plot(runs, args.out / (name + ".png"))
    print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.png')}")


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    base = runs[0]["before"]
    ax.scatter(
        [base["target"]],
        [sum(base["source"].values()) / 3],
        marker="*",
        s=150,
        color="black",
        label="pretrained model",
    )
    for i, r in enumerate(runs):
        colour = "tab:red" if r["method"] == "lora" else "tab:blue"
        label = "plain LoRA" if r["method"] == "lora" else f"K-FAC lam {r['lam']:.0e}"
        ax.scatter([r["after"]["target"]], [r["source_mean"]], color=colour, s=40)
        ax.annotate(
            label,
            (r["after"]["target"], r["source_mean"]),
            fontsize=7,
            xytext=(4, -12 if i % 2 else 5),
            textcoords="offset points",
        )
    ax.set_xlabel("target exact match (learning)")
    ax.set_ylabel("source accuracy (forgetting)")
    ax.set_title("Embedded benchmark: one lr (3e-3), one seed")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
