"""Training-step cost of the penalty: ``lalora_curv.train`` with and without it, side by side.

1. On the ~34M-parameter CPU Llama (hidden 512, 8 layers, vocabulary 8192) with LoRA r = 16 on
   q_proj and v_proj, batches of 4 x 256: time per optimizer step of ``lc.train`` without a
   precision and with each structure (lam = 1), medians over repeats, in one run.
2. Scaling of the K-FAC penalty relative to a training step,

   .. math:: \\text{ratio} = t_\\text{penalty fwd+bwd} / t_\\text{training step}

   (step: forward, backward and AdamW on the LoRA parameters of one batch of 4 x 256 tokens;
   medians over repeats, the spread as the penalty's quartiles over the step's median) along
   four axes around one point (hidden 512, r = 16, q_proj and v_proj, 2 layers), one axis
   varied at a time: the rank r in (4, 16, 64); the hidden size in (256, 512, 1024, 2048,
   4096); the adapted modules per layer, q,v (2) / q,k,v,o (4) / all seven linears (7); and
   the layers in (2, 4, 8). Models: ``tiny_llama`` with random weights, MLP 2.75 x hidden,
   heads of 64, vocabulary 2048 (the output head stays small, so the step is dominated by the
   layers; hidden 4096 has 2 x 205M layer parameters, 1.6 GB in float32). The penalty costs
   ``O(r (D_in^2 + D_out^2))`` per module against the step's ``O(tokens x parameters)``.
   ``--quick``: the same four axes at hidden 64-128, r 4-8, 1-2 layers, 2 x 32 tokens.

Writes ``results/train.json`` and the scaling plot ``results/train.png`` (``--quick``:
``train_quick.json``, ``train_quick.png``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import lalora_curv as lc
from bench_core import environment, timed, write_result
from lalora_curv.adapter import find_lora_modules
from lalora_curv.plotting import save_figure
from lalora_curv.toy import add_lora, random_batches, tiny_llama

HERE = Path(__file__).resolve().parent
QV = ("q_proj", "v_proj")
#: the adapted modules per layer along the modules axis
TARGET_SETS = (
    QV,
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)


def model_and_data(
    hidden: int,
    layers: int,
    rank: int,
    vocab: int,
    batch: int,
    seq: int,
    targets: tuple[str, ...] = QV,
):
    model = add_lora(
        tiny_llama(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(2.75 * hidden),
            num_layers=layers,
            num_heads=max(1, hidden // 64),
            num_kv_heads=max(1, hidden // 64),
        ),
        r=rank,
        alpha=rank,
        target_modules=targets,
        dropout=0.1,
    )
    data = random_batches(4, batch, seq, vocab, seed=0)
    return model, data


def step_times(model, data, precisions: dict, steps: int, repeats: int) -> dict[str, dict]:
    """Seconds per step of ``lc.train``, configurations interleaved round-robin over repeats
    (so drift in the machine's speed hits every configuration alike)."""
    samples: dict[str, list[float]] = {name: [] for name in precisions}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, prec in precisions.items():
            t0 = time.perf_counter()
            lc.train(
                model, data, prec, 1.0 if prec is not None else 0.0, max_steps=steps, progress=False
            )
            if repeat:
                samples[name].append((time.perf_counter() - t0) / steps)
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4, method="inclusive")
        out[name] = {
            "median_s": statistics.median(values),
            "q1_s": q[0],
            "q3_s": q[2],
            "n": len(values),
        }
    return out


@dataclass(frozen=True)
class Point:
    """One configuration of the scaling axes."""

    hidden: int
    rank: int
    targets: tuple[str, ...]
    layers: int


def penalty_ratio(point: Point, vocab: int, batch: int, seq: int, repeats: int) -> dict:
    """The K-FAC penalty's forward+backward time over a training step's, at ``point``."""
    model, data = model_and_data(
        point.hidden, point.layers, point.rank, vocab, batch, seq, point.targets
    )
    prec = lc.fit_precision(model, data[:1], structure="kfac", progress=False)
    with torch.no_grad():
        for h in find_lora_modules(model).values():
            h.lora_B.weight.normal_(0, 1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(**data[0]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def penalty() -> None:
        prec.penalty(model).backward()
        opt.zero_grad(set_to_none=True)

    s, p = timed(step, repeats), timed(penalty, repeats * 4, warmup=2)
    return {
        **asdict(point),
        "targets": list(point.targets),
        "modules": len(prec.modules),
        "step_s": s["median_s"],
        "penalty_s": p["median_s"],
        "ratio": p["median_s"] / s["median_s"],
        "ratio_q1": p["q1_s"] / s["median_s"],
        "ratio_q3": p["q3_s"] / s["median_s"],
    }


def scaling(
    origin: Point, axes: dict[str, tuple], vocab: int, batch: int, seq: int, repeats: int
) -> list[dict]:
    """``penalty_ratio`` along each axis from ``origin``, one axis varied at a time; each row
    names its ``axes`` (the origin is measured once and belongs to every axis)."""
    rows: dict[Point, dict] = {}
    for axis, values in axes.items():
        for value in values:
            point = replace(origin, **{axis: value})
            if point not in rows:
                rows[point] = penalty_ratio(point, vocab, batch, seq, repeats)
                rows[point]["axes"] = []
                row = rows[point]
                print(
                    f"  K-FAC penalty, hidden {row['hidden']:>5}, r {row['rank']:>3}, "
                    f"{row['layers']} layers x {','.join(t[0] for t in point.targets)}: "
                    f"{100 * row['ratio']:.2f} % of a training step"
                )
            rows[point]["axes"].append(axis)
    return list(rows.values())


AXIS_LABELS = {
    "rank": "LoRA rank r",
    "hidden": "hidden size",
    "targets": "adapted modules per layer",
    "layers": "layers",
}


def plot_scaling(rows: list[dict], path: Path) -> Path:
    """One panel per axis: the penalty's share of a training step (median, quartile bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(AXIS_LABELS), figsize=(4 * len(AXIS_LABELS), 3.4))
    for ax, (axis, label) in zip(panels, AXIS_LABELS.items(), strict=True):
        points = sorted(
            (r for r in rows if axis in r["axes"]),
            key=lambda r: len(r["targets"]) if axis == "targets" else r[axis],
        )
        x = [len(r["targets"]) if axis == "targets" else r[axis] for r in points]
        y = [100 * r["ratio"] for r in points]
        err = [
            [100 * (r["ratio"] - r["ratio_q1"]) for r in points],
            [100 * (r["ratio_q3"] - r["ratio"]) for r in points],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
        if axis in ("rank", "hidden"):
            ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("K-FAC penalty fwd+bwd / training step (%)")
    origin = next(r for r in rows if len(r["axes"]) == len(AXIS_LABELS))
    fig.suptitle(
        f"one axis varied at a time from hidden {origin['hidden']}, r {origin['rank']}, "
        f"{len(origin['targets'])} modules x {origin['layers']} layers"
    )
    fig.tight_layout()
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        dims, steps, repeats = (128, 2, 8, 512, 2, 32), 2, 2
        origin, vocab, batch, seq = Point(64, 4, QV, 1), 512, 2, 32
        axes = {
            "rank": (4, 8),
            "hidden": (64, 128),
            "targets": TARGET_SETS,
            "layers": (1, 2),
        }
    else:
        dims, steps, repeats = (512, 8, 16, 8192, 4, 256), 3, args.repeats
        origin, vocab, batch, seq = Point(512, 16, QV, 2), 2048, 4, 256
        axes = {
            "rank": (4, 16, 64),
            "hidden": (256, 512, 1024, 2048, 4096),
            "targets": TARGET_SETS,
            "layers": (2, 4, 8),
        }
    model, data = model_and_data(*dims)
    source = random_batches(2, 4, dims[5], dims[3], seed=1)
    precisions: dict = {"none": None}
    for structure in lc.STRUCTURES:
        precisions[structure] = lc.fit_precision(model, source, structure=structure, progress=False)
    times = step_times(model, data, precisions, steps, repeats)
    base = times["none"]["median_s"]
    print(f"plain LoRA step {base:.3f} s")
    for name, t in times.items():
        t["overhead"] = t["median_s"] / base - 1
        if name != "none":
            print(
                f"  with {name:<12} penalty: {t['median_s']:.3f} s per step, "
                f"{100 * t['overhead']:+.1f} %"
            )
    del model, data  # free the core model before the largest scaling models
    rows = scaling(origin, axes, vocab, batch, seq, repeats)
    result = {
        "model": dict(
            zip(("hidden", "layers", "rank", "vocab", "batch", "seq"), dims, strict=True)
        ),
        "steps_per_run": steps,
        "step_times": times,
        "penalty_scaling": rows,
        "penalty_scaling_setup": {
            "origin": {**asdict(origin), "targets": list(origin.targets)},
            "axes": {
                k: [list(v) if isinstance(v, tuple) else v for v in vs] for k, vs in axes.items()
            },
            "vocab": vocab,
            "batch": batch,
            "seq": seq,
        },
        "environment": environment(),
    }
    name = "train_quick" if args.quick else "train"
    write_result(args.out, f"{name}.json", result)
    plot = plot_scaling(rows, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json, {plot}")


if __name__ == "__main__":
    main()
