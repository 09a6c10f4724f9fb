"""Every backend on the same batches in one run: fit time and peak memory per statistic.

A Llama with random weights (hidden 256, 4 layers, vocabulary 4096; ~6M parameters), LoRA r = 8
on q_proj and v_proj, 4 batches of 4 x 128 tokens without padding (curvlinops and laplace-torch
would split padded batches into sequences), the first quarter of each row a masked prompt.
Times are medians over repeats, relative to a plain forward+backward of the same batches
measured in the same process. Peak memory: each case runs in a fresh subprocess whose large
allocations are mmapped (``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors leave the resident
set); the kernel's resident high-water mark is reset (``/proc/self/clear_refs``) just before
the case, and the figure is that mark minus the resident memory at the reset, relative to the
same figure for a plain forward+backward. kronfluence's K-FAC factor fitting (an optional
comparator, ``benchmarks/kronfluence_kfac.py``) runs on the same batches, and its factors are
checked against ours on the equivalent statistic. Writes ``results/backends.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import lalora_curv as lc
from bench_core import QUICK_DIMS, environment, timed, write_result
from lalora_curv.toy import add_lora, random_batches, tiny_llama

HERE = Path(__file__).resolve().parent
CASES = [  # (backend, structure, estimator, granularity)
    ("hooks", "kfac", "empirical", "token"),
    ("curvlinops", "kfac", "empirical", "token"),
    ("laplace", "kfac", "empirical", "token"),
    ("kronfluence", "kfac", "empirical", "token"),
    ("hooks", "kfac", "mc", "token"),
    ("curvlinops", "kfac", "mc", "token"),
    ("laplace", "kfac", "mc", "token"),
    ("kronfluence", "kfac", "mc", "token"),
    ("hooks", "diag", "empirical", "token"),
    ("hooks", "diag", "empirical", "sequence"),
    ("backpack", "diag", "empirical", "sequence"),
    ("backpack", "diag", "mc", "sequence"),
]


def setup(quick: bool):
    dims = (
        QUICK_DIMS
        if quick
        else dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=704,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
        )
    )
    seq = 32 if quick else 128
    model = add_lora(tiny_llama(**dims), r=8, alpha=8, target_modules=("q_proj", "v_proj"))
    model.eval()
    batches = random_batches(4, 4, seq, dims["vocab_size"], seed=0, pad_fraction=0.0)
    return model, batches, dims, seq


def plain(model, batches) -> None:
    for b in batches:
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)


def run_case(model, batches, case) -> None:
    backend, structure, estimator, granularity = case
    lc.fit_precision(
        model,
        batches,
        structure=structure,
        backend=backend,
        estimator=estimator,
        granularity=granularity,
        progress=False,
    )


def prepare(model, batches, case) -> Callable[[], None]:
    """The case as a function of no arguments; kronfluence (a comparator, not one of our
    backends) wraps a copy of the model once, outside the timed fit."""
    if case[0] == "kronfluence":
        from kronfluence_kfac import KronfluenceKFAC

        return KronfluenceKFAC(model, batches, case[2]).fit
    return lambda: run_case(model, batches, case)


def kronfluence_agreement(model, batches) -> dict[str, float]:
    """Largest relative Frobenius difference between kronfluence's factors (our normalisation)
    and the hooks backend's, empirical Fisher, float64 statistics."""
    from kronfluence_kfac import KronfluenceKFAC

    ours = lc.fit_precision(model, batches, progress=False, stats_dtype=torch.float64)
    kf = KronfluenceKFAC(model, batches, "empirical", dtype=torch.float64)
    kf.fit()
    theirs = kf.factors(ours.modules, ours.counts["supervised_tokens"])

    def rel(a, b) -> float:
        return float((a.double() - b).norm() / b.norm())

    return {
        "input_cov_max_rel_diff": max(
            rel(theirs[n]["C_x"], ours.input_cov[n][0]) for n in ours.modules
        ),
        "grad_cov_max_rel_diff": max(
            rel(theirs[n]["G_h"], ours.grad_cov[n][0]) for n in ours.modules
        ),
    }


def proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(index: int, quick: bool) -> None:
    """Print this case's peak resident memory above the resident memory before it."""
    import backpack  # noqa: F401  (imports are not the case's memory)
    import curvlinops  # noqa: F401
    import kronfluence  # noqa: F401
    import laplace  # noqa: F401

    model, batches, _, _ = setup(quick)
    plain(model, batches[:1])
    case = (lambda: plain(model, batches)) if index < 0 else prepare(model, batches, CASES[index])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark (VmHWM) to the current RSS
    before = proc_status_bytes("VmRSS")
    case()
    peak = proc_status_bytes("VmHWM")
    print(json.dumps({"peak_above_start_bytes": max(peak - before, 0)}))


def measure_memory(index: int, quick: bool) -> int:
    cmd = [sys.executable, __file__, "--memory-case", str(index)] + (["--quick"] if quick else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_above_start_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-case", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.memory_case is not None:
        memory_child(args.memory_case, args.quick)
        return
    torch.manual_seed(0)
    model, batches, dims, seq = setup(args.quick)
    repeats = 2 if args.quick else args.repeats
    base = timed(lambda: plain(model, batches), repeats)
    base_mem = measure_memory(-1, args.quick)
    print(
        f"plain forward+backward: {base['median_s'] / len(batches):.3f} s per batch, "
        f"peak memory +{base_mem / 2**20:.0f} MiB"
    )
    rows = []
    for i, case in enumerate(CASES):
        t = timed(prepare(model, batches, case), repeats)
        mem = measure_memory(i, args.quick)
        row = {
            "backend": case[0],
            "structure": case[1],
            "estimator": case[2],
            "granularity": case[3],
            **t,
            "time_ratio": t["median_s"] / base["median_s"],
            "time_ratio_q1": t["q1_s"] / base["median_s"],
            "time_ratio_q3": t["q3_s"] / base["median_s"],
            "peak_memory_bytes": mem,
            "memory_ratio": mem / max(base_mem, 1),
        }
        rows.append(row)
        print(
            f"{case[0]:<12}{case[1]:<6}{case[2]:<10}{case[3]:<9} "
            f"{row['time_ratio']:6.2f}x time ({row['time_ratio_q1']:.2f}-"
            f"{row['time_ratio_q3']:.2f})  {row['memory_ratio']:5.2f}x memory"
        )
    result = {
        "model": {
            **dims,
            "lora_rank": 8,
            "targets": ["q_proj", "v_proj"],
            "batches": len(batches),
            "batch_size": 4,
            "seq_len": seq,
        },
        "plain_forward_backward": {**base, "peak_memory_bytes": base_mem},
        "cases": rows,
        "kronfluence_agreement": kronfluence_agreement(model, batches),
        "environment": environment(),
    }
    agreement = result["kronfluence_agreement"]
    print(
        "kronfluence vs hooks factors (float64, our normalisation), largest relative "
        f"difference: {agreement}"
    )
    if max(agreement.values()) > 1e-10:
        raise SystemExit(f"kronfluence's factors differ from ours: {agreement}")
    name = "backends_quick.json" if args.quick else "backends.json"
    write_result(args.out, name, result)
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
