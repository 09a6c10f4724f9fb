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

from lalora_curv.atomic import write_text
from lalora_curv.cli._run import CliError, RunDir, split_names

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
    config = dict(locals())  # (before the imports below join the locals)
    from lalora_curv.cli._model import check_tasks, resolve_adapter
    from lalora_curv.tasks.evaluate import evaluate as score
    from lalora_curv.tasks.evaluate import load_model

    # every refusal before any work (and before --out, perhaps an earlier run, is touched)
    if output is None and out is None:
        raise CliError("give --output FILE.json, --out DIR, or both")
    names = split_names(tasks)
    check_tasks(names, "--tasks")
    if output is not None:
        target = Path(output)
        if target.is_dir():
            raise CliError(f"--output {output} is a directory; give a file name (results.json)")
        if not target.parent.is_dir():
            raise CliError(f"--output {output}: the folder {target.parent} does not exist")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise CliError(f"--data_dir {data_dir}: no such folder")
    for name, value, minimum in (
        ("limit", limit, 1),
        ("sample", sample, 1),
        ("batch_size", batch_size, 1),
        ("max_new_tokens", max_new_tokens, 1),
        ("num_fewshot", num_fewshot, 0),
    ):
        if value is not None and value < minimum:
            raise CliError(f"--{name} must be >= {minimum}, got {value}")
    adapter_dir = str(resolve_adapter(adapter)) if adapter is not None else None
    lm, tokenizer = load_model(model, adapter_dir)
    run = RunDir("eval", out, config) if out is not None else None
    results = score(
        lm,
        tokenizer,
        names,
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
        write_text(Path(output), text)
        written.append(output)
    if run is not None:
        write_text(run / "results.json", text)
        written.append(str(run / "results.json"))
    print(text, end="")
    print(f"wrote {', '.join(written)}")
    return results
