"""The paper's recipe (``lalora-curv paper``) on Llama-3.2-3B shapes: time and memory per stage.

No checkpoint can be downloaded on the accelerator machine, so the model is built from a config
with Llama-3.2-3B's shapes (random weights, bfloat16, on the GPU) and given the shipped
real-text tokenizer; LoRA r = 32 on every linear module, K-FAC with the MC Fisher, artifacts
in bfloat16. The recipe runs end to end on the real task files with small limits
(:func:`lalora_curv.testbed.paper.run_recipe`: fit on three sources, train plain LoRA, LALoRA
and the L2 control, score validation and test), recording each stage's wall time and peak GPU
memory. Its rates (seconds per fitted record, per training step, per scored record of each
task) are extrapolated to the recipe's defaults (500 fitting records per source, one epoch of
GSM8K at batch 8, three strengths per family, 200 validation records per task, every test
record), which is what ``docs/training.md`` states. Random weights: the numbers (accuracies)
mean nothing; the times and memory do, except GSM8K generation, which runs to
``max_new_tokens`` here and stops at the answer for a trained model (an upper bound).

    python benchmarks/bench_paper.py --data-dir ../shared/data             # on a GPU
    python benchmarks/bench_paper.py --profile tiny --device cpu           # smoke test

Writes ``results/paper_gpu.json`` (``paper_tiny.json`` for the smoke run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench_core import environment, write_result
from bench_gpu import PROFILES
from bench_realtext import add_data_dir_argument, data_dir_of
from lalora_curv.testbed.paper import (
    ALL_LINEAR,
    SOURCES,
    TARGET,
    RecipeConfig,
    recipe_splits,
    run_recipe,
)

HERE = Path(__file__).resolve().parent
#: the recipe's defaults the rates are extrapolated to (RecipeConfig's, and full test splits)
FULL = {
    "fit_records": 500,
    "val_records": 200,
    "gsm8k_train": 7473 - 200,
    "variants": 7,  # plain LoRA + 3 strengths x (LALoRA, L2)
    "test": {"hellaswag": 10042, "winogrande": 1267, "arc_challenge": 1172, "gsm8k": 1319},
}


def build(profile: dict, device: torch.device, dtype: torch.dtype, vocab: int, r: int):
    config = LlamaConfig(
        hidden_size=profile["hidden_size"],
        intermediate_size=profile["intermediate_size"],
        num_hidden_layers=profile["num_hidden_layers"],
        num_attention_heads=profile["num_attention_heads"],
        num_key_value_heads=profile["num_key_value_heads"],
        vocab_size=max(profile["vocab_size"], vocab),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(ALL_LINEAR))
    return get_peft_model(base, lora)


def extrapolate(summary: dict, config: RecipeConfig) -> dict:
    """Hours of each stage at the recipe's defaults, from this run's rates."""
    stages = summary["stages"]
    fitted = sum(summary["splits"][t]["fit"] for t in SOURCES)
    fit_rate = stages["fit"]["seconds"] / fitted
    train = [v for k, v in stages.items() if k.startswith("train ")]
    steps = config.max_steps or 1
    step_rate = sum(t["seconds"] for t in train) / (len(train) * steps)
    per_record = {}
    for task in (*SOURCES, TARGET):
        seconds = [v["val"][task]["seconds"] / v["val"][task]["n"] for v in summary["variants"]]
        per_record[task] = sum(seconds) / len(seconds)
    val_one = sum(per_record[t] * FULL["val_records"] for t in per_record)
    test_one = sum(per_record[t] * n for t, n in FULL["test"].items())
    steps_full = FULL["gsm8k_train"] // config.batch_size
    hours = {
        "fit (3 x 500 records)": fit_rate * 3 * FULL["fit_records"] / 3600,
        f"train ({FULL['variants']} variants x {steps_full} steps)": step_rate
        * steps_full
        * FULL["variants"]
        / 3600,
        f"validation ({FULL['variants'] + 1} x 4 x 200 records)": val_one
        * (FULL["variants"] + 1)
        / 3600,
        "test (4 models x every test record)": test_one * 4 / 3600,
    }
    return {
        "rates": {
            "fit_seconds_per_record": fit_rate,
            "train_seconds_per_step": step_rate,
            "score_seconds_per_record": per_record,
        },
        "hours_at_defaults": hours,
        "total_hours_at_defaults": sum(hours.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="3b")
    parser.add_argument("--device", default="cuda")
    add_data_dir_argument(parser)
    parser.add_argument("--fit-records", type=int, default=64)
    parser.add_argument("--val-records", type=int, default=32)
    parser.add_argument("--test-records", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--storage", default="bfloat16")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--run-dir", type=Path, default=None, help="the recipe's output")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("recipe profile skipped: no CUDA device (--profile tiny --device cpu smoke-tests)")
        return
    data_dir = data_dir_of(args)
    profile = PROFILES[args.profile]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        str(files("lalora_curv.testbed").joinpath("realtext_model"))
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(profile, device, dtype, len(tokenizer), args.rank)
    n_params = sum(p.numel() for p in model.parameters())
    config = RecipeConfig(
        fit_records=args.fit_records,
        val_records=args.val_records,
        test_records=args.test_records,
        train_records=args.steps * 8,
        r=args.rank,
        lora_alpha=2 * args.rank,
        storage=args.storage,
        cs=(1.0,),
        max_steps=args.steps,
        batch_size=8,
        max_length=512,
        mixed_precision="bf16" if device.type == "cuda" else None,
        eval_batch_size=16,
        max_new_tokens=args.max_new_tokens,
        checkpoint_every=None,
    )
    splits = recipe_splits(data_dir, config)
    print(
        f"{args.profile} on {device} ({dtype}): {n_params / 1e9:.2f}B parameters, LoRA r="
        f"{args.rank} on every linear; splits {splits.counts()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / "paper"
        summary = run_recipe(model, tokenizer, splits, config, run_dir, progress=False)
        artifact_bytes = {
            p.name: sum(f.stat().st_size for f in p.iterdir())
            for p in (run_dir / "precision").iterdir()
        }
    result = {
        "profile": {**profile, "rank": args.rank, "parameters": n_params},
        "device": summary["device_name"],
        "dtype": str(dtype),
        "config": summary["config"],
        "splits": summary["splits"],
        "stages": summary["stages"],
        "artifact_bytes": artifact_bytes,
        **extrapolate(summary, config),
        "environment": environment(),
        "argv": sys.argv[1:],
    }
    for name, stage in summary["stages"].items():
        peak = f", peak {stage['peak_gib']:.1f} GiB" if "peak_gib" in stage else ""
        print(f"{name:<32} {stage['seconds']:8.1f} s{peak}")
    for name, hours in result["hours_at_defaults"].items():
        print(f"at the defaults: {name:<44} {hours:7.2f} h")
    print(f"at the defaults: total {result['total_hours_at_defaults']:.1f} h")
    name = "paper_gpu.json" if args.profile == "3b" else f"paper_{args.profile}.json"
    write_result(args.out, name, result)
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
