"""``lalora-curv sweep``: a grid of methods x settings x seeds (embedded benchmark or real text).

The grid file (YAML, format in docs/cli.md and :mod:`lalora_curv.testbed.grid`) expands to
cells (one training run each); the cells not yet in ``OUT/runs.jsonl`` run in ``--workers``
processes and each one's evaluations (step 0 and every ``eval_every`` steps) are appended as
it finishes, so an interrupted sweep resumes where it stopped. Then, from every record:

    OUT/config.yaml      the resolved arguments
    OUT/grid.yaml        the grid as given
    OUT/runs.jsonl       one JSON object per cell and evaluation step
    OUT/pareto.png       source accuracy vs target exact match, each method's front
    OUT/curves.png       source and target accuracy against the step, per method
    OUT/table.csv        mean +- std over seeds: final points, best front point per method
    OUT/summary.json     the same, the fronts and every configuration's curve
"""

from __future__ import annotations

from typing import Any

import yaml

from lalora_curv.atomic import write_text
from lalora_curv.cli._run import CliError, RunDir, data_source
from lalora_curv.plotting import SKIPPED, pyplot
from lalora_curv.testbed.grid import GridError, cell_key, expand_grid, load_grid
from lalora_curv.testbed.sweep import SweepError, read_runs, run_sweep
from lalora_curv.testbed.sweep_report import format_table, report

EXAMPLES = """examples:
  lalora-curv sweep --grid sweeps/demo.yaml --out runs/sweep-demo
  lalora-curv sweep --grid sweeps/front.yaml --out runs/front --workers 2   # hours; resumable
  lalora-curv sweep --grid sweeps/front.yaml --out runs/front --dry_run     # count the cells
"""


def run_grid(
    grid: dict[str, Any],
    run: RunDir,
    workers: int,
    threshold: float | None,
    progress: bool,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Expand, run (resuming), report and print; shared by ``sweep`` and ``demo``."""
    try:
        cells = expand_grid(grid)
    except GridError as e:
        raise CliError(f"--grid: {e}") from None
    write_text(run / "grid.yaml", yaml.safe_dump(grid, sort_keys=False))
    failure = None
    try:
        counts = run_sweep(cells, run.path, workers=workers, progress=progress, data_dir=data_dir)
        print(
            f"{counts['cells']} cells: {counts['done']} already in {run / 'runs.jsonl'}, "
            f"{counts['ran']} trained now"
        )
    except SweepError as e:  # report the finished cells first, then fail
        failure = e
    keys = {cell_key(c) for c in cells}  # records of cells no longer in the grid stay out
    records = [r for r in read_runs(run / "runs.jsonl") if r["key"] in keys]
    if failure is not None and not records:
        raise CliError(str(failure)) from None
    result = report(records, run.path, threshold)
    print(format_table(result["rows"], result["threshold"], result["source_at_target"]))
    print("\nfiles: " + ", ".join(result["files"]))
    if pyplot() is None:
        print(SKIPPED)
    if failure is not None:
        raise CliError(f"{failure}\n(the table and plots above cover the finished cells)")
    return result


def sweep(
    grid: str,
    out: str = "runs/sweep",
    workers: int = 2,
    threshold: float | None = None,
    dry_run: bool = False,
    progress: bool = True,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Run a grid of fine-tuning runs; fronts, curves and tables.

    On the embedded benchmark, or the real-text scenario with
    ``benchmark: {scenario: realtext}``.

    Args:
        grid: the grid, a YAML file (per method name: its settings, a list is swept).
        out: run directory; running again into it skips the cells already in runs.jsonl.
        workers: processes training cells at once (one torch thread each).
        threshold: target exact match of the table's best front point per method (default:
            0.9 x the smallest of the methods' best target).
        dry_run: print the cells and stop.
        progress: progress bar over the cells.
        data_dir: the real-text scenario's data, a folder laid out like ../shared/data
            (``hub``: the Hugging Face hub); required by a realtext grid.

    Returns:
        The summary (also OUT/summary.json), with the table rows and the written files.
    """
    args = dict(locals())
    if workers < 1:
        raise CliError(f"--workers must be >= 1, got {workers}")
    try:
        spec = load_grid(grid)
        cells = expand_grid(spec)
    except GridError as e:
        raise CliError(f"--grid: {e}") from None
    realtext = any(c["benchmark"].get("scenario") == "realtext" for c in cells)
    if realtext and data_dir is None:
        raise CliError(
            "--data_dir: a realtext grid reads the benchmark files: give a folder laid out "
            "like ../shared/data, or 'hub'"
        )
    data_dir = data_source(data_dir)
    if dry_run:
        for cell in cells:
            shown = {k: v for k, v in cell.items() if k != "benchmark"}
            print(" ".join(f"{k}={v}" for k, v in shown.items()))
        print(f"{len(cells)} cells")
        return {"cells": cells}
    run = RunDir("sweep", out, args, fresh_metrics=False)
    return run_grid(spec, run, workers, threshold, progress, data_dir)
