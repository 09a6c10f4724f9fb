"""The real-text scenario: plain LoRA against LALoRA (K-FAC, MC Fisher) on GSM8K, measured in NLL.

A ~2M-parameter Llama with a 4096-token byte-level BPE, pretrained on the real source texts of
HellaSwag, WinoGrande and ARC-Challenge (cached after the first run), is fine-tuned with LoRA
(r = 8, every linear module) on GSM8K. Accuracies of such a tiny model on these tasks sit at
chance, so forgetting is the increase of the per-token NLL of held-out source text and learning
the decrease of the per-token NLL of GSM8K test answers. LALoRA fits a K-FAC precision with the
MC Fisher on each source task's held-in (pretraining) text and sums them; plain LoRA is also
measured every quarter of its run (its own early-stopping front). ``--selfgen-lams``: LALoRA
with the precision fitted instead on the base model's own samples of the same token count (no
source data), at the same strength relative to each precision's mean eigenvalue
(``lam_text * mean(P_text) / mean(P_self)``). One seed, one learning rate and step count. Prints a table, writes ``results/realtext.json`` and
``results/realtext.png``. Data: ``--data-dir`` (a folder laid out like ../shared/data, the
default where it exists) or ``--data-dir hub``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_core import environment, write_result
from lalora_curv.plotting import save_figure
from lalora_curv.strength import Strength
from lalora_curv.testbed import realtext as rt
from lalora_curv.testbed import realtext_data as rd

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data"


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``: the real-text scripts' data source (see :func:`data_dir_of`)."""
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"a folder laid out like ../shared/data, or 'hub' (default: {DEFAULT_DATA} if it "
        "exists, else the hub)",
    )


def data_dir_of(args: argparse.Namespace) -> str | None:
    """The folder ``--data-dir`` names (default: ../shared/data where it exists), or ``None``
    for the Hugging Face hub."""
    data_dir = args.data_dir or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else "hub")
    return None if data_dir == "hub" else data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir_argument(parser)
    parser.add_argument("--lams", default="100,1000,10000")
    parser.add_argument(
        "--selfgen-lams",
        default="1000",
        help="lambdas (on the text precision's scale) for the self-generated precision",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-sample", type=int, default=400, help="held-out texts per task")
    parser.add_argument("--quick", action="store_true", help="tiny model, 20 steps, one lambda")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    steps, lams = args.steps, [float(x) for x in args.lams.split(",")]
    selfgen_lams = [float(x) for x in args.selfgen_lams.split(",") if x]
    settings = None
    if args.quick:
        steps, lams, selfgen_lams = 20, lams[:1], lams[:1]
        settings = {"hidden": 32, "mlp": 64, "layers": 2, "steps": 20, "vocab": 1024}
    t0 = time.perf_counter()
    data = rd.RealText(data_dir_of(args), eval_sample=args.eval_sample)
    model, tok = rt.pretrained(data, settings)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    before = rt.evaluate(model, tok, data)
    print(
        f"pretrained model ({params / 1e6:.2f}M parameters, ready in {load_s:.0f} s): source "
        f"NLL {before['source_all']:.3f} {_fmt(before['source'])}, GSM8K NLL "
        f"{before['target']:.3f}"
    )
    runs = []
    cells = [("lora", 0.0), *[("lalora-kfac-mc", x) for x in lams]]
    cells += [("lalora-kfac-mc-selfgen", x) for x in selfgen_lams]
    text_scale = None  # the text precision's mean eigenvalue (seed 0, the same for every lam)
    for method, lam in cells:
        model, tok = rt.pretrained(data, settings, progress=False)
        t1 = time.perf_counter()
        selfgen = method.endswith("selfgen")
        if selfgen and text_scale is None:
            raise SystemExit("--selfgen-lams needs at least one --lams run for the scale")
        result = rt.finetune(
            model,
            tok,
            data,
            precision_structure="kfac" if lam else None,
            strength=Strength.relative(lam * text_scale) if selfgen else lam,
            source="self-generated" if selfgen else "texts",
            steps=steps,
            lr=args.lr,
            before=before,
            eval_every=None if lam else max(1, steps // 4),  # plain LoRA's own front
        )
        if lam and not selfgen:
            text_scale = result["mean_curvature"]
        runs.append({"method": method, "lam": lam, "seconds": time.perf_counter() - t1, **result})
        a = result["after"]
        print(
            f"{runs[-1]['method']:<22} lam {lam:>6.0e}: source NLL {a['source_all']:.3f} "
            f"({result['source_increase']:+.3f}) {_fmt(a['source'])}, GSM8K NLL "
            f"{a['target']:.3f} ({-result['target_decrease']:+.3f})"
        )
        for c in result.get("trajectory", [])[:-1]:
            print(
                f"{'':<15} step {c['step']:>4}: source NLL {c['source_all']:.3f} "
                f"({c['source_all'] - before['source_all']:+.3f}), GSM8K NLL {c['target']:.3f} "
                f"({c['target'] - before['target']:+.3f})"
            )
    name = "realtext_quick" if args.quick else "realtext"
    write_result(
        args.out,
        name + ".json",
        {
            "runs": runs,
            "before": before,
            "steps": steps,
            "lr": args.lr,
            "parameters": params,
            "pretrain": {**rt.PRETRAIN, **(settings or {})},
            "data": data.fingerprint(),
            "eval_sample": args.eval_sample,
            "environment": environment(),
        },
    )
    _plot(runs, args.out / (name + ".png"), args.lr, steps)
    print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.png')}")


def _fmt(nll: dict[str, float]) -> str:
    return "(" + ", ".join(f"{k} {v:.3f}" for k, v in nll.items()) + ")"


def _plot(runs: list[dict], path: Path, lr: float, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter([0], [0], marker="*", s=150, color="black", label="pretrained model")
    trajectory = runs[0].get("trajectory", [])
    if trajectory:  # plain LoRA's checkpoints: its own early-stopping front
        b = runs[0]["before"]
        x = [b["target"] - c["target"] for c in trajectory]
        y = [c["source_all"] - b["source_all"] for c in trajectory]
        ax.plot(x, y, "-o", color="tab:red", ms=3, alpha=0.5, label="plain LoRA checkpoints")
        for c, xi, yi in zip(trajectory[:-1], x, y, strict=False):
            ax.annotate(
                f"step {c['step']}",
                (xi, yi),
                fontsize=6,
                xytext=(-30, 4),
                textcoords="offset points",
                color="tab:red",
            )
    for i, r in enumerate(runs):
        colour = {"lora": "tab:red", "lalora-kfac-mc": "tab:blue"}.get(r["method"], "tab:green")
        label = {"lora": "plain LoRA", "lalora-kfac-mc": f"K-FAC lam {r['lam']:g}"}.get(
            r["method"], f"self-generated K-FAC lam~{r['lam']:g}"
        )
        ax.scatter([r["target_decrease"]], [r["source_increase"]], color=colour, s=40)
        green = colour == "tab:green"
        ax.annotate(
            label,
            (r["target_decrease"], r["source_increase"]),
            fontsize=7,
            color="tab:green" if green else "black",
            xytext=(-90, -45) if green else (4, -12 if i % 2 else 5),
            textcoords="offset points",
            arrowprops={"arrowstyle": "-", "color": "tab:green"} if green else None,
        )
    ax.set_xlabel("GSM8K test NLL decrease per token (learning)")
    ax.set_ylabel("held-out source NLL increase per token (forgetting)")
    ax.set_title(f"Real text, tiny Llama: one lr ({lr:g}), {steps} steps, one seed", fontsize=9)
    ax.margins(0.12)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
