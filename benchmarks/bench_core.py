"""Core cost benchmark: fitting and penalty time relative to plain training, side by side.

On a ~34M-parameter Llama (hidden 512, 8 layers, vocabulary 8192; random weights, built from a
config) with LoRA r = 16 on q_proj and v_proj, in one run, on two batch configurations
(:data:`CONFIGS`: 4 x 256 with padding and a masked prompt; 8 x 256 with a 64-token masked
prompt and no padding):

* fit time per batch / one plain forward+backward on the same batches: every structure x
  estimator on the first configuration, K-FAC (empirical, MC x 1, MC x 4) on both, and
  curvlinops' K-FAC beside ours on the unpadded one (goals: K-FAC <= 1.10x with the empirical
  Fisher and <= 1.12x with one MC draw on both, <= 0.5x per further MC draw);
* the *floor* of a K-FAC fit: 1 + the time of its factor products alone (``X^T X`` once per
  distinct layer input, ``G^T G`` per module, on tensors of the batch's shapes) / the plain
  forward+backward;
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
from lalora_curv.adapter import find_lora_modules
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


#: the batch configurations: name -> (batches, batch size, sequence length, padding fraction,
#: masked-prompt fraction, whether every structure runs or only K-FAC and curvlinops)
CONFIGS = {
    "4x256-padded": dict(batches=4, batch_size=4, seq_len=256, pad=0.25, prompt=0.25, every=True),
    "8x256-prompt": dict(batches=2, batch_size=8, seq_len=256, pad=0.0, prompt=0.25, every=False),
}
QUICK_CONFIGS = {
    "2x64-padded": dict(batches=2, batch_size=2, seq_len=64, pad=0.25, prompt=0.25, every=True),
    "2x64-prompt": dict(batches=2, batch_size=2, seq_len=64, pad=0.0, prompt=0.25, every=False),
}
#: the K-FAC fits every configuration times (backend, estimator, MC draws)
KFAC_CASES = [("hooks", "empirical", 1), ("hooks", "mc", 1), ("hooks", "mc", 4)]
CURVLINOPS_CASES = [("curvlinops", "empirical", 1), ("curvlinops", "mc", 1)]


def goals(configs: dict, penalties: dict) -> dict[str, bool | float]:
    """The performance issues' goals, from the measured ratios (K-FAC, hooks backend)."""
    out: dict[str, bool | float] = {}
    for name, c in configs.items():
        ratio = {k: v["ratio_to_plain"] for k, v in c["fit"].items()}
        per_extra = (ratio["kfac/mcx4"] - ratio["kfac/mcx1"]) / 3  # each further label draw
        out[f"{name}/fit_kfac_empirical_le_1.10x"] = ratio["kfac/empirical"] <= 1.10
        out[f"{name}/fit_kfac_mc_one_sample_le_1.12x"] = ratio["kfac/mcx1"] <= 1.12
        out[f"{name}/fit_kfac_per_extra_mc_sample"] = per_extra
        out[f"{name}/fit_kfac_per_extra_mc_sample_le_0.5x"] = per_extra <= 0.5
    out["penalty_kfac_le_3pct"] = penalties["kfac"]["ratio_to_step"] <= 0.03
    return out


def factor_products(batch: dict, model, rank: int, repeats: int) -> dict[str, float]:
    """The median time of one batch's K-FAC factor products alone, on random tensors.

    ``X^T X`` (n x D_in) once per layer (q and v share their input) and ``G^T G`` (n x D_out)
    per module, with ``n`` the batch's counted (non-padding) positions.
    """
    n = int(batch["attention_mask"].sum())
    handles = find_lora_modules(model)
    inputs = {}
    outputs = []
    for name, h in handles.items():
        layer = name.rsplit(".", 1)[0]
        inputs[layer] = h.lora_A.in_features
        outputs.append(h.lora_B.out_features)
    xs = [torch.randn(n, d) for d in inputs.values()]
    gs = [torch.randn(n, d) for d in outputs]

    def products() -> None:
        for t in xs + gs:
            t.T @ t

    return timed(products, repeats)


def ratio(t: dict[str, float], plain: dict[str, float]) -> dict[str, float]:
    """``t`` with its median and quartiles over the plain forward+backward's median."""
    return {
        **t,
        "ratio_to_plain": t["median_s"] / plain["median_s"],
        "ratio_q1": t["q1_s"] / plain["median_s"],
        "ratio_q3": t["q3_s"] / plain["median_s"],
    }


def measure_config(model, name: str, cfg: dict, vocab: int, rank: int, repeats: int) -> dict:
    """Plain forward+backward, the fits and the factor-product floor on one configuration."""
    batches = random_batches(
        cfg["batches"],
        cfg["batch_size"],
        cfg["seq_len"],
        vocab,
        seed=0,
        pad_fraction=cfg["pad"],
        prompt_fraction=cfg["prompt"],
    )
    trainable = [p for p in model.parameters() if p.requires_grad]

    def plain_forward_backward() -> None:
        for b in batches:
            model(**b).loss.backward()
        for p in trainable:
            p.grad = None

    print(f"{name}: {cfg['batches']} batches x {cfg['batch_size']} x {cfg['seq_len']}")
    plain = timed(plain_forward_backward, repeats)
    cases = [("hooks", s, "empirical", 1) for s in lc.STRUCTURES] if cfg["every"] else []
    cases += [(b, "kfac", e, k) for b, e, k in KFAC_CASES]
    if cfg["every"]:
        cases += [("hooks", "diag", "mc", 1), ("hooks", "diag", "batch-grad-squared", 1)]
    if cfg["pad"] == 0:  # curvlinops sees a padded batch one sequence at a time
        cases += [(b, "kfac", e, k) for b, e, k in CURVLINOPS_CASES]
    fits = {}
    for backend, structure, estimator, samples in dict.fromkeys(cases):  # kfac/empirical once

        def fit(backend=backend, structure=structure, estimator=estimator, k=samples) -> None:
            lc.fit_precision(
                model,
                batches,
                structure=structure,
                estimator=estimator,
                mc_samples=k,
                backend=backend,
                progress=False,
            )

        key = f"{structure}/{estimator}" + (f"x{samples}" if estimator == "mc" else "")
        key = key if backend == "hooks" else f"{backend} {key}"
        fits[key] = ratio(timed(fit, repeats), plain)
        print(
            f"  fit {key:<32} {fits[key]['ratio_to_plain']:6.3f}x plain fwd+bwd "
            f"(IQR {fits[key]['ratio_q1']:.3f}-{fits[key]['ratio_q3']:.3f})"
        )
    products = [factor_products(b, model, rank, repeats) for b in batches]
    floor = 1 + sum(t["median_s"] for t in products) / plain["median_s"]
    print(f"  K-FAC floor (1 + factor products / plain fwd+bwd): {floor:.3f}x")
    return {
        **cfg,
        "plain_forward_backward_per_batch_s": plain["median_s"] / len(batches),
        "fit": fits,
        "kfac_floor": floor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    if args.quick:
        dims, configs, repeats, rank = QUICK_DIMS, QUICK_CONFIGS, 2, 4
    else:
        dims, configs, repeats, rank = CPU_LLAMA, CONFIGS, args.repeats, 16
    model = add_lora(tiny_llama(**dims), r=rank, alpha=rank, target_modules=("q_proj", "v_proj"))
    model.eval()  # dropout is zero anyway; fitting runs in eval mode too
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    print(f"model: {n_params / 1e6:.1f}M parameters, LoRA r={rank} on q_proj,v_proj")
    results: dict[str, object] = {
        "model": {
            **dims,
            "parameters": n_params,
            "lora_rank": rank,
            "targets": ["q_proj", "v_proj"],
        },
    }
    measured = {
        name: measure_config(model, name, cfg, dims["vocab_size"], rank, repeats)
        for name, cfg in configs.items()
    }
    results["configs"] = measured

    first = next(iter(configs.values()))
    batches = random_batches(
        first["batches"],
        first["batch_size"],
        first["seq_len"],
        dims["vocab_size"],
        seed=0,
        pad_fraction=first["pad"],
        prompt_fraction=first["prompt"],
    )

    def training_step() -> None:
        model(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = timed(training_step, repeats)
    results["training_step_s"] = step
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
    results["goals"] = goals(measured, penalties)
    for goal, value in results["goals"].items():
        print(f"goal {goal}: {value if isinstance(value, bool) else round(value, 3)}")

    name = "core_quick.json" if args.quick else "core.json"
    write_result(args.out, name, results)
    write_result(args.out, "environment.json", environment())
    print(f"wrote {args.out / name} and {args.out / 'environment.json'}")


if __name__ == "__main__":
    main()
