"""A grid of fine-tuning runs on a testbed scenario, run in worker processes, resumable.

Each cell of a grid (:mod:`lalora_curv.testbed.grid`: a method with its settings and a seed)
trains once to ``steps`` and evaluates at step 0 and every ``eval_every`` steps (and at the
end): source accuracy per sub-domain and their mean (forgetting), target exact match
(learning). Every evaluation is a point of the method's learning-forgetting front: early
stopping is part of a method. The seed sets the adapter's init, the Monte-Carlo labels and
the order of the training problems; the pretrained model is the benchmark's.

:func:`run_sweep` appends each finished cell's records to ``OUT/runs.jsonl`` (the whole file
rewritten atomically) and skips cells already there (key: a hash of the cell's settings).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lalora_curv.atomic import write_text
from lalora_curv.errors import LaloraError
from lalora_curv.strength import Strength
from lalora_curv.testbed import realtext_sweep
from lalora_curv.testbed.experiment import ALL_LINEAR, WorldScenario
from lalora_curv.testbed.finetune import Penalty, finetune
from lalora_curv.testbed.grid import cell_key, config_key
from lalora_curv.testbed.model import pretrained

RUNS_FILE = "runs.jsonl"


class SweepError(LaloraError):
    """Some cells of a sweep failed; the finished ones were written."""


# ---------------------------------------------------------------------------------- one cell
def _targets(targets: str) -> list[str]:
    return list(ALL_LINEAR) if targets == "all" else targets.split(",")


def run_cell(
    cell: Mapping[str, Any], progress: bool = False, data_dir: str | None = None
) -> list[dict[str, Any]]:
    """Train one cell and return one record per evaluation (step 0 first).

    ``data_dir``: the real-text scenario's data (a folder laid out like ../shared/data,
    ``None``: the hub).
    """
    if cell["benchmark"].get("scenario") == "realtext":
        return realtext_sweep.run_cell(cell, data_dir, cell_key(cell), config_key(cell))
    t0 = time.perf_counter()
    bench = cell["benchmark"]
    model, tok, world = pretrained(bench["pretrain_seed"], bench["pretrain"], progress=False)
    penalty = None
    if cell["kind"] == "lalora":
        if "lam" in cell:
            strength = Strength.fixed(cell["lam"])
        elif cell.get("budget") is not None:
            strength = Strength.budget(cell["budget"], start_c=cell["c"])
        else:
            strength = Strength.relative(cell["c"])
        penalty = Penalty(
            cell["structure"],
            strength,
            scope=cell.get("scope", "all"),
            source=cell.get("source", "facts"),
            estimator=cell.get("estimator", "mc"),
            mc_samples=cell.get("mc_samples", 8),
        )
    run = finetune(
        model,
        WorldScenario(world, tok, bench["train_problems"], bench["test_problems"], shuffle=True),
        penalty=penalty,
        lr=cell["lr"],
        steps=cell["steps"],
        rank=cell["rank"],
        targets=_targets(cell["targets"]),
        init=cell["init"],
        migu_threshold=cell["threshold"] if cell["kind"] == "migu" else None,
        eval_every=cell["eval_every"],
        seed=cell["seed"],
        progress=progress,
    )
    prec, lam = run.precision, run.lam
    scale = run.mean_curvature if prec is not None and "lam" not in cell else None
    lam_at, penalty_at = run.lam_at, run.penalty_at
    evals = [(0, run.before)] + [(p["step"], p) for p in run.trajectory]
    seconds = round(time.perf_counter() - t0, 2)
    key, config_id = cell_key(cell), config_key(cell)
    records = []
    for step, metrics in evals:
        source = dict(metrics["source"])
        records.append(
            {
                "key": key,
                "config": config_id,
                "method": cell["method"],
                "seed": cell["seed"],
                "step": int(step),
                "source": source,
                "source_mean": sum(source.values()) / len(source),
                "target": metrics["target"],
                "lam": lam_at.get(step, lam) if prec is not None else 0.0,
                # (theta - mu)^T P (theta - mu) as lc.train logs it (before that step's
                # update); half of it is the projected source-NLL rise a budget bounds
                "penalty": penalty_at.get(step, 0.0) if prec is not None else None,
                "mean_curvature": scale,
                "seconds": seconds,
                "cell": dict(cell),
            }
        )
    return records


def one_thread() -> None:
    """Worker initialiser: one torch thread (2 threads on 2 shared cores is ~15x slower)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _quiet()


def _quiet() -> None:
    """In a worker: no per-cell loading bars or library deprecation notes.

    They would clutter the sweep's bar.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


# ---------------------------------------------------------------------------------- the sweep
def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``runs.jsonl`` (none if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    """Append ``records`` to ``path`` atomically: the whole file is rewritten, then renamed."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    new = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records)
    write_text(path, old + new)


def run_sweep(
    cells: list[dict[str, Any]],
    out: str | Path,
    workers: int = 2,
    progress: bool = True,
    data_dir: str | None = None,
) -> dict[str, int]:
    """Run the cells not yet in ``OUT/runs.jsonl`` and append each one's records as it finishes.

    The cells run in ``workers`` processes (spawned, one torch thread each; ``workers=1``: in
    this process). ``data_dir``: the real-text scenario's data (``None``: the Hugging Face hub).

    Returns ``{"cells": all, "done": already there, "ran": trained now}``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / RUNS_FILE
    done = {r["key"] for r in read_runs(runs)}
    todo = [c for c in cells if cell_key(c) not in done]
    # the longest first, so that the last cells do not leave a worker idle
    todo.sort(key=lambda c: -c["steps"] * (2 if c["kind"] == "lalora" else 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the parent's pretraining and workers=1 too
    try:
        for bench in {json.dumps(c["benchmark"], sort_keys=True) for c in todo}:
            b = json.loads(bench)  # pretrain (once, cached) before the workers load it
            if b.get("scenario") != "realtext":  # (that scenario's model is shipped)
                pretrained(b["pretrain_seed"], b["pretrain"], progress=progress)
        bar = tqdm(total=len(todo), disable=not progress, desc="sweep cells", unit="cell")
        failed: list[tuple[dict[str, Any], BaseException]] = []
        if workers == 1 or len(todo) <= 1:
            for cell in todo:
                try:
                    _append(runs, run_cell(cell, data_dir=data_dir))
                except Exception as err:  # reported after the other cells
                    failed.append((cell, err))
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(workers, mp_context=context, initializer=one_thread)
            try:
                futures = {pool.submit(run_cell, cell, False, data_dir): cell for cell in todo}
                for future in as_completed(futures):
                    try:
                        _append(runs, future.result())
                    except Exception as err:  # reported after the other cells
                        failed.append((futures[future], err))
                    bar.update()
            finally:  # ^C: the queued cells do not start; finished ones are already written
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        torch.set_num_threads(threads)
    bar.close()
    if failed:
        lines = "\n".join(
            f"  {c['method']} lr={c['lr']} seed={c['seed']} (key {cell_key(c)}): "
            f"{type(e).__name__}: {e}"
            for c, e in failed
        )
        raise SweepError(
            f"{len(failed)} of {len(todo)} cells failed (the others are in {runs}; "
            f"re-running the sweep retries only the failed ones):\n{lines}"
        ) from failed[0][1]
    return {"cells": len(cells), "done": len(cells) - len(todo), "ran": len(todo)}
