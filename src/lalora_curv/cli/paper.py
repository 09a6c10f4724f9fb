"""``lalora-curv paper``: the paper's Table 1 recipe on a real LLM, one command.

Fits a precision on HellaSwag, WinoGrande and ARC-Challenge training records (pooled), trains
plain LoRA, LALoRA and the isotropic control on GSM8K, picks each one's strength on held-out
validation records and scores the picks on the test splits of all four tasks
(:mod:`lalora_curv.testbed.paper`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml

from lalora_curv.cli._model import Dtype, Quantization, load_base, with_adapter
from lalora_curv.cli._run import CliError, RunDir, split_names
from lalora_curv.cli.fit import Estimator, Structure
from lalora_curv.errors import LaloraError
from lalora_curv.tasks.data import TaskDataError

EXAMPLES = """examples:
  lalora-curv paper --model meta-llama/Llama-3.2-3B --out runs/paper --mixed_precision bf16 \\
      --dtype bfloat16                                  # the paper's setting (hub data)
  lalora-curv paper --model ./llama --data_dir ../shared/data --out runs/paper-small \\
      --fit_records 64 --val_records 32 --test_records 100 --max_steps 50
  lalora-curv paper --config runs/paper/config.yaml     # resume a stopped run
"""


def paper(
    model: str,
    out: str = "runs/paper",
    data_dir: str | None = None,
    fit_records: int = 500,
    val_records: int = 200,
    test_records: int | None = None,
    train_records: int | None = None,
    r: int = 32,
    lora_alpha: float = 64.0,
    target_modules: str | list[str] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    structure: Structure = "kfac",
    estimator: Estimator = "mc",
    mc_samples: int = 1,
    storage: Literal["float32", "float64", "bfloat16"] | None = None,
    cs: str | list[float] = "0.1,1,10",
    controls: str | list[str] = "l2",
    lr: float = 2e-4,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 8,
    grad_accum_steps: int = 1,
    warmup_steps: int = 0,
    max_length: int = 512,
    mixed_precision: Literal["bf16", "fp16"] | None = None,
    eval_batch_size: int = 16,
    max_new_tokens: int = 256,
    checkpoint_every: int | None = 200,
    seed: int = 0,
    dtype: Dtype = "float32",
    device: str = "auto",
    quantization: Quantization | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The paper's recipe: fit, train on GSM8K, select on validation, score all four tasks.

    The precision is fitted on the three source tasks.

    Args:
        model: local path or hub id of a causal LM (the paper: meta-llama/Llama-3.2-3B).
        out: run directory; running again into it resumes (the precision and finished
            variants are reused, a variant stopped in training continues from its checkpoint).
        data_dir: local task files in the original schemas (default: the Hugging Face hub).
            HellaSwag has no local training split: its evaluation records are then split into
            validation, fitting and test parts.
        fit_records: training records per source task to fit the precision on.
        val_records: held-out records per task that select each method's strength.
        test_records: the first N evaluation records per task (null: all).
        train_records: GSM8K training examples (null: all but the validation ones).
        r: LoRA rank (the paper: 32).
        lora_alpha: LoRA alpha.
        target_modules: linear layers to adapt, comma-separated or a YAML list.
        structure: precision structure.
        estimator: Fisher estimator.
        mc_samples: label draws per token for estimator "mc".
        storage: the artifacts' storage (null: float32 as fitted; bfloat16 halves the
            bytes: about 15 GB per source for Llama-3.2-3B with every linear adapted).
        cs: relative strengths c (lambda = c / mean eigenvalue of the precision) tried for
            LALoRA and for each control, comma-separated.
        controls: baselines besides plain LoRA: "l2" (L2 to the init on every LoRA tensor),
            or "" for none.
        lr: AdamW learning rate.
        epochs: passes over the GSM8K training examples.
        max_steps: optimizer steps (default: epochs over the data).
        batch_size: sequences per batch (fitting and training).
        grad_accum_steps: micro-batches per optimizer step.
        warmup_steps: linear warm-up steps.
        max_length: tokens per sequence.
        mixed_precision: autocast for training ("bf16" on GPUs that have it).
        eval_batch_size: sequences per forward pass when scoring.
        max_new_tokens: GSM8K generation budget.
        checkpoint_every: a training checkpoint every this many steps (null: only at the end).
        seed: seed of the adapter init, the splits, the data order and the MC labels.
        dtype: model weights' dtype (bfloat16 for a 3B model on one GPU).
        device: "auto" (CUDA when available), "cpu", "cuda:0", ...
        quantization: load the base in "4bit" or "8bit" (QLoRA; needs bitsandbytes).
        progress: progress bars.

    Returns:
        The summary (also OUT/results.json).
    """
    # every refusal before --out (perhaps an earlier run) is touched
    config_args = dict(locals())
    from lalora_curv.testbed.paper import VARIANTS_FILE, RecipeConfig, recipe_splits, run_recipe

    _check_resumable(Path(out), config_args, VARIANTS_FILE)
    try:
        strengths = tuple(float(c) for c in split_names(cs))
    except ValueError:
        raise CliError(f"--cs {cs!r}: strengths must be numbers, e.g. 0.1,1,10") from None
    try:
        config = RecipeConfig(
            fit_records=fit_records,
            val_records=val_records,
            test_records=test_records,
            train_records=train_records,
            r=r,
            lora_alpha=lora_alpha,
            target_modules=tuple(split_names(target_modules)),
            structure=structure,
            estimator=estimator,
            mc_samples=mc_samples,
            storage=storage,
            cs=strengths,
            controls=tuple(split_names(controls)),
            lr=lr,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            grad_accum_steps=grad_accum_steps,
            warmup_steps=warmup_steps,
            max_length=max_length,
            mixed_precision=mixed_precision,
            eval_batch_size=eval_batch_size,
            max_new_tokens=max_new_tokens,
            checkpoint_every=checkpoint_every,
            seed=seed,
        )
        splits = recipe_splits(data_dir, config)
    except (LaloraError, TaskDataError) as e:
        raise CliError(str(e)) from None
    base, tokenizer = load_base(model, dtype, device, quantization)
    peft_model = with_adapter(base, None, r, lora_alpha, list(config.target_modules), 0.0, seed)
    run = RunDir("paper", out, config_args, fresh_metrics=False)
    for task, counts in splits.counts().items():
        print(f"{task:<14} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    try:
        return run_recipe(peft_model, tokenizer, splits, config, run.path, progress)
    except LaloraError as e:
        raise CliError(str(e)) from None


#: options that may change between a run and its resumption
RESUME_FREE = ("progress", "device", "out")


def _check_resumable(out: Path, config: dict[str, Any], variants_file: str) -> None:
    """Refuse to resume into ``out`` a run made with other settings.

    Its precision and finished variants would be mixed with this one's.
    """
    earlier = out / "config.yaml"
    if not earlier.is_file() or not (out / variants_file).is_file():
        return
    try:
        old = yaml.safe_load(earlier.read_text()) or {}
    except yaml.YAMLError:
        raise CliError(f"--out {out}: its config.yaml is not readable YAML") from None
    new = yaml.safe_load(
        yaml.safe_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()})
    )
    changed = sorted(
        k for k in set(old) | set(new) if k not in RESUME_FREE and old.get(k) != new.get(k)
    )
    if changed:
        raise CliError(
            f"--out {out} holds a paper run with other settings ("
            + ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in changed)
            + "); resume it with --config OUT/config.yaml or give this run another --out"
        )
