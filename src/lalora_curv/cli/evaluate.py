"""``lalora-curv eval``: score a base model or an adapter on the source and target tasks.

Scored as lm-evaluation-harness scores them (see :mod:`lalora_curv.tasks.evaluate`); writes
``{"hellaswag": {"acc", "acc_norm", "n"}, "winogrande": {"acc", "n"}, "arc_challenge": {"acc",
"acc_norm", "n"}, "gsm8k": {"exact_match_strict", "exact_match_flexible", "n"}}`` atomically
to ``--output`` and/or ``OUT/results.json`` (with ``OUT/config.yaml``), and prints it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lalora_curv.cli._run import CliError, RunDir, atomic_write_text, split_names

EXAMPLES = """examples:
  lalora-curv eval --model ./llama --adapter runs/train-kfac/adapter \\
      --tasks hellaswag,winogrande,arc_challenge,gsm8k --data-dir ../shared/data \\
      --limit 100 --output results.json
  lalora-curv eval --model ./llama --tasks arc_challenge --data_dir ../shared/data \\
      --out runs/eval-base     # a run directory: config.yaml + results.json
"""


def evaluate(
    model: str,
    output: str | None = None,
    out: str | None = None,
    adapter: str | None = None,
    tasks: str | list[str] = "hellaswag,winogrande,arc_challenge,gsm8k",
    data_dir: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    num_fewshot: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Score a model (with a peft adapter) on hellaswag, winogrande, arc_challenge, gsm8k.

    Args:
        model: local path or hub id of a causal LM.
        output: JSON file to write (give it, --out, or both).
        out: run directory (config.yaml, results.json).
        adapter: a peft adapter directory, or a train run (its adapter/).
        tasks: tasks, comma-separated or a YAML list.
        data_dir: local task files in the original schemas (default: the Hugging Face hub).
        limit: the first N records per task.
        sample: a seeded random subset of N records per task.
        num_fewshot: GSM8K few-shot examples (the harness's gsm8k default is 5).
        seed: seed of the subset.
        batch_size: sequences per forward pass.
        max_new_tokens: GSM8K generation budget.
        progress: progress bars.

    Returns:
        ``{task: metrics}``.
    """
    if output is None and out is None:
        raise CliError("give --output FILE.json, --out DIR, or both")
    run = RunDir("eval", out, locals()) if out is not None else None
    from lalora_curv.cli._model import resolve_adapter
    from lalora_curv.tasks.evaluate import evaluate as score
    from lalora_curv.tasks.evaluate import load_model

    adapter_dir = str(resolve_adapter(adapter)) if adapter is not None else None
    lm, tokenizer = load_model(model, adapter_dir)
    results = score(
        lm,
        tokenizer,
        split_names(tasks),
        data_dir,
        limit=limit,
        sample=sample,
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        num_fewshot=num_fewshot,
        progress=progress,
    )
    text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    written = []
    if output is not None:
        atomic_write_text(Path(output), text)
        written.append(output)
    if run is not None:
        atomic_write_text(run / "results.json", text)
        written.append(str(run / "results.json"))
    print(text, end="")
    print(f"wrote {', '.join(written)}")
    return results
