"""Training-step cost of the penalty: ``lalora_curv.train`` with and without it, side by side.

1. On the ~34M-parameter CPU Llama (hidden 512, 8 layers, vocabulary 8192) with LoRA r = 16 on
   q_proj and v_proj, batches of 4 x 256: time per optimizer step of ``lc.train`` without a
   precision and with each structure (lam = 1), medians over repeats, in one run.
2. Scaling of the K-FAC penalty (forward+backward) relative to a training step, with the rank
   (4-64, hidden 512) and the hidden size (256-1024, r = 16), on 2-layer models.
Writes ``results/train.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import lalora_curv as lc
from bench_core import environment, timed, write_result
from lalora_curv.adapter import find_lora_modules
from lalora_curv.toy import add_lora, random_batches, tiny_llama

HERE = Path(__file__).resolve().parent


def model_and_data(hidden: int, layers: int, rank: int, vocab: int, batch: int, seq: int):
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
        target_modules=("q_proj", "v_proj"),
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


def penalty_ratio(hidden: int, rank: int, repeats: int, seq: int) -> dict[str, float]:
    model, data = model_and_data(hidden, 2, rank, 2048, 4, seq)
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
        "hidden": hidden,
        "rank": rank,
        "step_s": s["median_s"],
        "penalty_s": p["median_s"],
        "ratio": p["median_s"] / s["median_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        dims, steps, repeats, seq = (128, 2, 8, 512, 2, 32), 2, 2, 32
        ranks, hiddens = (4, 16), (128, 256)
    else:
        dims, steps, repeats, seq = (512, 8, 16, 8192, 4, 256), 3, args.repeats, 256
        ranks, hiddens = (4, 16, 64), (256, 512, 1024)
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
    scaling = []
    for rank in ranks:
        scaling.append(penalty_ratio(dims[0], rank, repeats, seq))
    for hidden in hiddens:
        if hidden != dims[0]:
            scaling.append(penalty_ratio(hidden, 16, repeats, seq))
    for row in scaling:
        print(
            f"  K-FAC penalty, hidden {row['hidden']:>5}, r {row['rank']:>3}: "
            f"{100 * row['ratio']:.2f} % of a training step"
        )
    result = {
        "model": dict(
            zip(("hidden", "layers", "rank", "vocab", "batch", "seq"), dims, strict=True)
        ),
        "steps_per_run": steps,
        "step_times": times,
        "penalty_scaling": scaling,
        "environment": environment(),
    }
    name = "train_quick.json" if args.quick else "train.json"
    write_result(args.out, name, result)
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
