"""GPU profile: fitting and penalty costs on a Llama-3.2-3B-shaped model (random weights).

No checkpoint can be downloaded on the accelerator machine, so the model is built from a config
with Llama-3.2-3B's shapes (hidden 3072, 28 layers, 24 heads / 8 KV heads, MLP 8192,
vocabulary 128256) directly on the GPU in bfloat16, with LoRA r = 16 on q, k, v, o, gate, up,
down. On the same batches in one run (CUDA-synchronised medians over repeats):

* fit time per batch of K-FAC (empirical, MC x1) and DIAG (hooks backend, float32 statistics on
  the bfloat16 model) / one plain forward+backward;
* penalty forward+backward of every structure / one training step (forward, backward, AdamW);
* peak GPU memory of fitting / of a training step; artifact bytes of the K-FAC precision.

Without a CUDA device the script prints that it is skipped and exits 0 (``--profile tiny
--device cpu`` runs the same code path at tiny shapes anywhere, as a smoke test). Writes
``results/gpu.json`` (``gpu_tiny.json`` for the smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lalora_curv as lc
from bench_core import environment, timed, write_result

HERE = Path(__file__).resolve().parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROFILES = {
    "3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        batch_size=8,
        seq_len=512,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        batch_size=2,
        seq_len=32,
    ),
}


def build(profile: dict, device: torch.device, dtype: torch.dtype, rank: int):
    config = LlamaConfig(
        hidden_size=profile["hidden_size"],
        intermediate_size=profile["intermediate_size"],
        num_hidden_layers=profile["num_hidden_layers"],
        num_attention_heads=profile["num_attention_heads"],
        num_key_value_heads=profile["num_key_value_heads"],
        vocab_size=profile["vocab_size"],
        max_position_embeddings=max(2048, profile["seq_len"]),
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype, on the device: no 12 GB CPU copy
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS))
    return get_peft_model(base, lora).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "GPU profile skipped: no CUDA device (run with --profile tiny --device cpu to smoke-test)"
        )
        return
    profile = PROFILES[args.profile]
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    model = build(profile, device, dtype, args.rank)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(
            0, profile["vocab_size"], (profile["batch_size"], profile["seq_len"]), generator=g
        )
        batches.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": ids.to(device),
            }
        )
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def peak(fn) -> float | None:
        if device.type != "cuda":
            return None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync()
        return torch.cuda.max_memory_allocated(device) / 2**30

    def plain() -> None:
        for b in batches:
            model(**b).loss.backward()
        optimizer.zero_grad(set_to_none=True)
        sync()

    def step() -> None:
        model(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    print(
        f"{args.profile} on {device} ({dtype}): {n_params / 1e9:.2f}B parameters, LoRA r={args.rank} "
        f"on {len(TARGETS)} module types; batches 2 x {profile['batch_size']} x {profile['seq_len']}"
    )
    result: dict = {
        "profile": {**profile, "rank": args.rank, "targets": TARGETS, "parameters": n_params},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
    }
    t_plain, t_step = timed(plain, args.repeats), timed(step, args.repeats)
    result["plain_forward_backward_s"] = t_plain
    result["training_step_s"] = t_step
    result["peak_gib"] = {"training_step": peak(step)}
    fits = {}
    for structure, estimator in (("kfac", "empirical"), ("kfac", "mc"), ("diag", "empirical")):

        def fit(structure=structure, estimator=estimator):
            p = lc.fit_precision(
                model, batches, structure=structure, estimator=estimator, progress=False
            )
            sync()
            return p

        t = timed(fit, args.repeats)
        key = f"{structure}/{estimator}"
        fits[key] = {**t, "ratio_to_plain": t["median_s"] / t_plain["median_s"]}
        result["peak_gib"][f"fit {key}"] = peak(fit)
        print(f"fit {key:<16} {fits[key]['ratio_to_plain']:.3f}x plain forward+backward")
    result["fit"] = fits
    penalties, sizes = {}, {}
    for structure in ("kfac", "tri-kfac", "merged-kfac", "diag"):
        prec = lc.fit_precision(model, batches[:1], structure=structure, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = lc.save_precision(prec, Path(tmp) / structure)
            sizes[structure] = sum(f.stat().st_size for f in path.iterdir())
        with torch.no_grad():
            for p in trainable:
                p.add_(1e-3 * torch.randn_like(p))

        def pen(prec=prec) -> None:
            prec.penalty(model).backward()
            optimizer.zero_grad(set_to_none=True)
            sync()

        t = timed(pen, max(args.repeats * 2, 5), warmup=2)
        penalties[structure] = {**t, "ratio_to_step": t["median_s"] / t_step["median_s"]}
        print(
            f"penalty {structure:<12} {100 * penalties[structure]['ratio_to_step']:.3f} % of a training step; artifact {sizes[structure] / 1e6:.1f} MB"
        )
    result["penalty"] = penalties
    result["artifact_bytes"] = sizes
    if device.type == "cuda":
        ratios = [v for k, v in result["peak_gib"].items() if k.startswith("fit")]
        print(
            f"peak memory: training step {result['peak_gib']['training_step']:.1f} GiB, fits {', '.join(f'{x:.1f}' for x in ratios)} GiB"
        )
    name = "gpu.json" if args.profile == "3b" else f"gpu_{args.profile}.json"
    write_result(
        args.out,
        name,
        {
            **result,
            "environment": environment(),
            "argv": sys.argv[1:],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        },
    )
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
