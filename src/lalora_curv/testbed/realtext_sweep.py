"""Sweep cells on the real-text scenario (``benchmark: {scenario: realtext}`` in a grid).

A cell fine-tunes the shipped real-text model (:data:`lalora_curv.testbed.realtext.SHIPPED`)
with LoRA on GSM8K, as :func:`lalora_curv.testbed.realtext.finetune` does, and measures every
``eval_every`` steps from step 0 on both held-out splits: the *validation* split picks a
method's settings, the *test* split reports them. Its records use the sweep's
higher-is-better axes, in nats per token:

* ``target``: the GSM8K NLL decrease since step 0 (learning);
* ``source_mean``: minus the increase of the pooled source NLL (minus forgetting), and
  ``source``: the same per source task;
* ``val``: the same three on the validation split; ``nll``: the raw test NLLs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

from lalora_curv.strength import Strength
from lalora_curv.tasks.data import TaskDataError
from lalora_curv.testbed import realtext as rt
from lalora_curv.testbed import realtext_data as rd

#: the scenario's settings in a grid's ``benchmark``, with their defaults
BENCHMARK = {
    "scenario": "realtext",
    "eval_sample": 300,  # test texts per source task, and GSM8K test pairs
    "val_sample": 150,  # validation texts per source task, and GSM8K pairs
    "fit_texts": 128,  # pretraining texts per source task behind the precision
    "batch_size": 8,
    "max_length": 256,
}

_DATA: dict[tuple, rd.RealText] = {}  # per worker process: the texts, read once
_BEFORE: dict[tuple, dict[str, Any]] = {}  # and the untouched model's measurements


def model_id() -> str:
    """What identifies the shipped model in a cell's key: its settings' data and seed."""
    shipped = rt.shipped_settings()
    if shipped is None:
        raise TaskDataError(f"{rt.SHIPPED}: the shipped real-text model is missing")
    digest = hashlib.sha256(json.dumps(shipped["settings"], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def data(bench: Mapping[str, Any], data_dir: str | None) -> rd.RealText:
    """The scenario's texts for ``bench``'s samples, read once per process."""
    key = (data_dir, bench["eval_sample"], bench["val_sample"])
    if key not in _DATA:
        _DATA[key] = rd.RealText(
            data_dir, eval_sample=bench["eval_sample"], val_sample=bench["val_sample"]
        )
    return _DATA[key]


def _axes(before: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """The higher-is-better differences of a measurement ``now`` against ``before``."""
    return {
        "source": {t: before["source"][t] - now["source"][t] for t in rd.SOURCES},
        "source_mean": before["source_all"] - now["source_all"],
        "target": before["target"] - now["target"],
    }


def run_cell(
    cell: Mapping[str, Any], data_dir: str | None, key: str, config: str
) -> list[dict[str, Any]]:
    """Train one real-text cell; one record per checkpoint (step 0 first)."""
    t0 = time.perf_counter()
    bench = cell["benchmark"]
    texts = data(bench, data_dir)
    model, tok = rt.load_shipped()
    key_before = (data_dir, bench["eval_sample"], bench["val_sample"], bench["max_length"])
    if key_before not in _BEFORE:  # step 0 is every cell's (LoRA starts at B = 0: the base)
        _BEFORE[key_before] = rt.measure(model, tok, texts, bench["max_length"], validation=True)
    lalora = cell["kind"] == "lalora"
    structure = cell.get("structure") if lalora else None
    c = cell.get("c")
    result = rt.finetune(
        model,
        tok,
        texts,
        precision_structure=structure,
        scope=cell.get("scope", "all"),
        strength=(
            (Strength.relative(c) if c is not None else Strength.fixed(cell.get("lam", 0.0)))
            if lalora
            else 0.0
        ),
        source="self-generated" if cell.get("source") == "self-generated" else "texts",
        estimator=cell.get("estimator", "mc"),
        mc_samples=cell.get("mc_samples", 1),
        fit_texts=bench["fit_texts"],
        steps=cell["steps"],
        lr=cell["lr"],
        rank=cell["rank"],
        targets=tuple(rt.ALL_LINEAR if cell["targets"] == "all" else cell["targets"].split(",")),
        batch_size=bench["batch_size"],
        max_length=bench["max_length"],
        eval_every=cell["eval_every"],
        validation=True,
        before=_BEFORE[key_before],
        seed=cell["seed"],
    )
    before = result["before"]
    seconds = round(time.perf_counter() - t0, 2)
    records = []
    for point in [{"step": 0, **before}, *result["trajectory"]]:
        step = int(point["step"])
        records.append(
            {
                "key": key,
                "config": config,
                "method": cell["method"],
                "seed": cell["seed"],
                "step": step,
                **_axes(before, point),
                "val": _axes(before["val"], point["val"]),
                "nll": {"source_all": point["source_all"], "target": point["target"]},
                "lam": result["lam_applied"] if lalora else 0.0,
                "penalty": result["penalty_at"].get(step, 0.0) if lalora else None,
                "mean_curvature": result["mean_curvature"],
                "seconds": seconds,
                "cell": dict(cell),
            }
        )
    return records
