"""Core cost benchmark: fitting and penalty time relative to plain training, side by side.

On a ~34M-parameter Llama (hidden 512, 8 layers, vocabulary 8192; random weights, built from a
config) with LoRA r = 16 on q_proj and v_proj, on the same batches in one run:

* fit time per batch of every structure x estimator / one plain forward+backward
  (goals: <= 1.10x for one label sample, empirical or MC; <= 0.55x per further MC sample);
* penalty forward+backward time of every structure / one training step (forward, backward,
  AdamW step; goal: <= 3%).

Every figure is the median over repeats with its interquartile range. Prints a table and writes
``results/core.json`` and ``results/environment.json`` (run ``python benchmarks/bench_core.py``;
``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lalora_curv as lc
from lalora_curv.atomic import write_text
from lalora_curv.toy import add_lora, random_batches, tiny_llama

HERE = Path(__file__).resolve().parent


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median and interquartile range of ``fn``'s wall time in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "n": len(times)}


#: the ~34M-parameter Llama of the CPU benchmarks
CPU_LLAMA = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1408,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
)
#: the tiny model every benchmark's --quick smoke run uses
QUICK_DIMS = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4
)


def write_result(out_dir: Path, name: str, data: dict) -> Path:
    """Write ``out_dir/name`` as sorted, indented JSON, atomically (lalora_curv.atomic)."""
    return write_text(Path(out_dir) / name, json.dumps(data, indent=2, sort_keys=True) + "\n")


def environment() -> dict[str, object]:
    import peft
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lalora_curv": lc.__version__,
        # other work on the machine skews timings: the 1, 5 and 15 minute load averages
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def goals(fits: dict, penalties: dict) -> dict[str, bool | float]:
    """The performance issue's goals, from the measured ratios (K-FAC, hooks backend)."""
    ratio = {k: v["ratio_to_plain"] for k, v in fits.items()}
    per_extra = (ratio["kfac/mcx4"] - ratio["kfac/mcx1"]) / 3  # each further label draw
    return {
        "fit_kfac_empirical_le_1.10x": ratio["kfac/empirical"] <= 1.10,
        "fit_kfac_mc_one_sample_le_1.10x": ratio["kfac/mcx1"] <= 1.10,
        "fit_kfac_per_extra_mc_sample": per_extra,
        "fit_kfac_per_extra_mc_sample_le_0.55x": per_extra <= 0.55,
        "penalty_kfac_le_3pct": penalties["kfac"]["ratio_to_step"] <= 0.03,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    if args.quick:
        dims = QUICK_DIMS
        batch_size, seq_len, repeats, rank = 2, 64, 2, 4
    else:
        dims = CPU_LLAMA
        batch_size, seq_len, repeats, rank = 4, 256, args.repeats, 16
    model = add_lora(tiny_llama(**dims), r=rank, alpha=rank, target_modules=("q_proj", "v_proj"))
    model.eval()  # dropout is zero anyway; fitting runs in eval mode too
    n_params = sum(p.numel() for p in model.parameters())
    batches = random_batches(4, batch_size, seq_len, dims["vocab_size"], seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def plain_forward_backward() -> None:
        for b in batches:
            model(**b).loss.backward()
        optimizer.zero_grad(set_to_none=True)

    def training_step() -> None:
        b = batches[0]
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(
        f"model: {n_params / 1e6:.1f}M parameters, LoRA r={rank} on q_proj,v_proj; "
        f"batches {len(batches)} x {batch_size} x {seq_len}"
    )
    results: dict[str, object] = {
        "model": {
            **dims,
            "parameters": n_params,
            "lora_rank": rank,
            "targets": ["q_proj", "v_proj"],
            "batch_size": batch_size,
            "seq_len": seq_len,
            "batches": len(batches),
        },
    }
    plain = timed(plain_forward_backward, repeats)
    step = timed(training_step, repeats)
    results["plain_forward_backward_per_batch_s"] = plain["median_s"] / len(batches)
    results["training_step_s"] = step

    fits = {}
    cases = [(s, "empirical", 1) for s in lc.STRUCTURES]
    cases += [
        ("kfac", "mc", 1),
        ("kfac", "mc", 4),
        ("diag", "mc", 1),
        ("diag", "batch-grad-squared", 1),
    ]
    for structure, estimator, samples in cases:

        def fit(structure=structure, estimator=estimator, samples=samples) -> None:
            lc.fit_precision(
                model,
                batches,
                structure=structure,
                estimator=estimator,
                mc_samples=samples,
                progress=False,
            )

        t = timed(fit, repeats)
        key = f"{structure}/{estimator}" + (f"x{samples}" if estimator == "mc" else "")
        fits[key] = {
            **t,
            "ratio_to_plain": t["median_s"] / plain["median_s"],
            "ratio_q1": t["q1_s"] / plain["median_s"],
            "ratio_q3": t["q3_s"] / plain["median_s"],
        }
        print(
            f"fit {key:<28} {fits[key]['ratio_to_plain']:6.3f}x plain fwd+bwd "
            f"(IQR {fits[key]['ratio_q1']:.3f}-{fits[key]['ratio_q3']:.3f})"
        )
    results["fit"] = fits

    penalties = {}
    for structure in lc.STRUCTURES:
        prec = lc.fit_precision(model, batches[:1], structure=structure, progress=False)
        with torch.no_grad():  # move away from the mode so every term is live
            for p in trainable:
                p.add_(1e-3 * torch.randn_like(p))

        def penalty_fwd_bwd(prec=prec) -> None:
            prec.penalty(model).backward()
            optimizer.zero_grad(set_to_none=True)

        t = timed(penalty_fwd_bwd, max(repeats * 4, 5), warmup=2)
        penalties[structure] = {**t, "ratio_to_step": t["median_s"] / step["median_s"]}
        print(
            f"penalty {structure:<24} {100 * penalties[structure]['ratio_to_step']:6.2f}% "
            "of a training step"
        )
    results["penalty"] = penalties
    results["goals"] = goals(fits, penalties)

    name = "core_quick.json" if args.quick else "core.json"
    write_result(args.out, name, results)
    write_result(args.out, "environment.json", environment())
    print(f"wrote {args.out / name} and {args.out / 'environment.json'}")


if __name__ == "__main__":
    main()
