"""The sweep's grid: a YAML file of methods and their settings, expanded into cells.

A *cell* is one training run: a method (``lora``, ``lalora``, ``migu``) with its settings and
a seed. The grid file maps each *method name* (one front in the plots) to its settings; a
list is swept, a scalar fixed; ``common`` applies to every method (a method's own entry
wins)::

    benchmark: {train_problems: 2000, test_problems: 300, pretrain_seed: 0, pretrain: {}}
    seeds: [0, 1, 2]
    common: {lr: [1.0e-3, 3.0e-3], steps: 1000, eval_every: 200, rank: 8, targets: all}
    methods:  # method name: its settings
      lora: {}
      lalora-kfac-mc: {method: lalora, structure: kfac, estimator: mc, c: [0.003, 0.03]}
      migu: {threshold: [0.5, 0.7]}

LALoRA's strength is one of

* ``lam``: the raw ``lambda`` of ``lam * (theta - mu)^T P (theta - mu)``;
* ``c``: ``lambda = c / m(P)`` with ``m(P) = tr(P) / num_params`` the mean curvature
  (:func:`lalora_curv.strength.mean_curvature`), dimensionless, so comparable
  across estimators and sources;
* ``budget``: ``epsilon`` nats per source token; ``lambda`` follows the dual ascent of
  :class:`lalora_curv.strength.Strength` (``Strength.budget``) from ``c / m(P)`` (``c`` default
  0.01).

:func:`expand_grid` checks every setting and combination (a :class:`GridError` names the
entry) and returns the cells, each keyed by :func:`cell_key` (a hash of its settings).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lalora_curv.baselines import INITS
from lalora_curv.errors import LaloraError
from lalora_curv.precision import REGISTRY
from lalora_curv.testbed import realtext_sweep
from lalora_curv.testbed.experiment import ALL_LINEAR
from lalora_curv.testbed.model import PRETRAIN

KINDS = ("lora", "lalora", "migu")
#: every structure the registry holds (the fitted ones and the data-free L2 controls)
STRUCTURES = tuple(REGISTRY)
ISOTROPIC = tuple(name for name, cls in REGISTRY.items() if not cls.fitted)  # the L2 controls
SCOPES = ("all", "lora_B")
ESTIMATORS = ("empirical", "mc", "batch-grad-squared")
SOURCES = ("facts", "self-generated")
#: settings of every method, with their defaults
COMMON = {
    "lr": 3e-3,
    "steps": 1000,
    "eval_every": 200,
    "rank": 8,
    "targets": "all",
    "init": "default",
}
#: each method's own settings, with their defaults (None: not set)
METHOD = {
    "lora": {},
    "lalora": {
        "structure": "kfac",
        "estimator": "mc",
        "mc_samples": 8,
        "source": "facts",
        "lam": None,
        "c": None,
        "budget": None,
        "scope": None,  # isotropic only: "all" (default there) or "lora_B"
    },
    "migu": {"threshold": 0.7},
}
BENCHMARK = {"pretrain_seed": 0, "pretrain": {}, "train_problems": 2000, "test_problems": 300}
SCENARIOS = ("embedded", "realtext")
DEFAULT_START_C = 0.01


class GridError(LaloraError):
    """A sweep grid is malformed; the message names the entry and the setting."""


def load_grid(path: str | Path) -> dict[str, Any]:
    """The grid of a YAML file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist")
    try:
        grid = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise GridError(f"grid file {path} is not valid YAML: {e}") from None
    if not isinstance(grid, dict):
        raise GridError(f"grid file {path}: expected a mapping, got {type(grid).__name__}")
    return grid


def _as_list(where: str, value: Any) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise GridError(f"{where}: an empty list sweeps nothing")
    return values


def _check(where: str, key: str, value: Any) -> Any:
    """``value`` of setting ``key``, validated and normalised (a float lr, "all" targets)."""
    at = f"{where}.{key}"

    def number(kind: type, low: float, strict: bool = True):
        nonlocal value
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GridError(f"{at}: expected a number, got {value!r}")
        if kind is int and value != int(value):
            raise GridError(f"{at}: expected an integer, got {value!r}")
        if (value <= low) if strict else (value < low):
            raise GridError(f"{at}: must be {'>' if strict else '>='} {low}, got {value!r}")
        return kind(value)

    def choice(options: Iterable[str]):
        if value not in options:
            raise GridError(f"{at}: unknown {value!r}; valid: {', '.join(options)}")
        return value

    if key in ("lr", "budget"):
        return number(float, 0)
    if key in ("lam", "c"):
        return number(float, 0, strict=False)
    if key in ("steps", "eval_every", "rank", "mc_samples"):
        return number(int, 0)
    if key == "threshold":
        t = number(float, 0, strict=False)
        if t >= 1:
            raise GridError(f"{at}: a quantile in [0, 1), got {value!r}")
        return t
    if key == "targets":
        if value == "all":
            return value
        names = value.split(",") if isinstance(value, str) else None
        if not names or any(n.strip() not in ALL_LINEAR for n in names):
            raise GridError(
                f"{at}: 'all' or comma-separated modules of {', '.join(ALL_LINEAR)}; got {value!r}"
            )
        return ",".join(sorted(n.strip() for n in names))
    if key == "init":
        return choice(INITS)
    if key == "structure":
        return choice(STRUCTURES)
    if key == "estimator":
        return choice(ESTIMATORS)
    if key == "source":
        return choice(SOURCES)
    if key == "scope":
        return choice(SCOPES)
    raise AssertionError(key)


def _benchmark(grid: Mapping[str, Any]) -> dict[str, Any]:
    bench = grid.get("benchmark") or {}
    if not isinstance(bench, dict):
        raise GridError("benchmark: expected a mapping")
    scenario = bench.get("scenario", "embedded")
    if scenario not in SCENARIOS:
        raise GridError(f"benchmark.scenario: unknown {scenario!r}; valid: {', '.join(SCENARIOS)}")
    if scenario == "realtext":
        return _realtext_benchmark(bench)
    bench = {k: v for k, v in bench.items() if k != "scenario"}
    unknown = set(bench) - set(BENCHMARK)
    if unknown:
        raise GridError(
            f"benchmark: unknown setting(s) {sorted(unknown)}; valid: {list(BENCHMARK)}"
        )
    out = {**BENCHMARK, **bench}
    if not isinstance(out["pretrain"], dict) or set(out["pretrain"]) - set(PRETRAIN):
        raise GridError(f"benchmark.pretrain: a mapping of {list(PRETRAIN)}, got {out['pretrain']}")
    if isinstance(out["pretrain_seed"], bool) or not isinstance(out["pretrain_seed"], int):
        raise GridError(f"benchmark.pretrain_seed: an integer, got {out['pretrain_seed']!r}")
    for key in ("train_problems", "test_problems"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise GridError(f"benchmark.{key}: a positive integer, got {out[key]!r}")
    return out


def _realtext_benchmark(bench: Mapping[str, Any]) -> dict[str, Any]:
    """The real-text scenario's settings (:data:`realtext_sweep.BENCHMARK`), checked.

    With the shipped model's identity (so another model never reuses a cell's results).
    """
    unknown = set(bench) - set(realtext_sweep.BENCHMARK)
    if unknown:
        raise GridError(
            f"benchmark: unknown setting(s) {sorted(unknown)} for scenario realtext; valid: "
            f"{list(realtext_sweep.BENCHMARK)}"
        )
    out = {**realtext_sweep.BENCHMARK, **bench}
    for key in ("eval_sample", "fit_texts", "batch_size", "max_length"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise GridError(f"benchmark.{key}: a positive integer, got {out[key]!r}")
    if isinstance(out["val_sample"], bool) or not isinstance(out["val_sample"], int):
        raise GridError(f"benchmark.val_sample: an integer >= 1, got {out['val_sample']!r}")
    if out["val_sample"] < 1:
        raise GridError(f"benchmark.val_sample: an integer >= 1, got {out['val_sample']!r}")
    return {**out, "model": realtext_sweep.model_id()}


def expand_grid(grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The cells of ``grid``: per method, the product of its settings' lists, times the seeds.

    Every cell holds all its settings (defaults filled in, settings a method ignores dropped)
    plus ``method`` (the grid's name), ``kind``, ``seed`` and ``benchmark``; duplicates are
    removed, the order is the grid's.
    """
    unknown = set(grid) - {"benchmark", "seeds", "common", "methods"}
    if unknown:
        raise GridError(
            f"unknown top-level key(s) {sorted(unknown)}; valid: benchmark, seeds, common, methods"
        )
    bench = _benchmark(grid)
    seeds = [int(_check_seed(s)) for s in _as_list("seeds", grid.get("seeds", [0]))]
    common = grid.get("common") or {}
    if not isinstance(common, dict):
        raise GridError("common: expected a mapping of settings")
    methods = grid.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise GridError("methods: expected a mapping of method name -> settings, got none")
    cells, seen = [], set()
    for name, entry in methods.items():
        where = f"methods.{name}"
        entry = entry or {}
        if not isinstance(entry, dict):
            raise GridError(f"{where}: expected a mapping of settings, got {entry!r}")
        kind = entry.get("method", name)
        if kind not in KINDS:
            raise GridError(f"{where}.method: unknown {kind!r}; valid: {', '.join(KINDS)}")
        valid = {**COMMON, **METHOD[kind]}
        for source, settings in (("common", common), (where, entry)):
            bad = set(settings) - set(valid) - {"method"}
            if source == "common":
                bad -= {k for m in METHOD.values() for k in m}  # another method's setting
            if bad:
                raise GridError(
                    f"{source}: unknown setting(s) {sorted(bad)} for method {kind!r}; "
                    f"valid: {', '.join(valid)}"
                )
        if bench.get("scenario") == "realtext" and kind == "migu":
            raise GridError(f"{where}: method migu is not offered on the realtext scenario")
        merged = {k: v for k, v in {**common, **entry}.items() if k in valid and v is not None}
        names = list(valid)
        lists = [
            [_check(where, k, v) for v in _as_list(f"{where}.{k}", merged[k])]
            if k in merged
            else [valid[k]]
            for k in names
        ]
        for values in itertools.product(*lists):
            settings = dict(zip(names, values, strict=True))
            settings = _normalise(where, kind, settings)
            if bench.get("scenario") == "realtext" and settings["init"] != "default":
                raise GridError(f"{where}: the realtext scenario trains the default init only")
            for seed in seeds:
                cell = {"method": name, "kind": kind, **settings, "seed": seed, "benchmark": bench}
                key = cell_key(cell)
                if key not in seen:
                    seen.add(key)
                    cells.append(cell)
    return cells


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GridError(f"seeds: integers, got {seed!r}")
    return seed


def _normalise(where: str, kind: str, s: dict[str, Any]) -> dict[str, Any]:
    """Drop settings that do not apply; check the combinations."""
    if kind != "lalora":
        return s
    strengths = [k for k in ("lam", "c", "budget") if s[k] is not None]
    if strengths not in (["lam"], ["c"], ["budget"], ["c", "budget"]):
        raise GridError(
            f"{where}: a lalora method needs one strength: lam, c or budget (budget may "
            f"take c as its start); got {strengths or 'none'}"
        )
    if s["structure"] in ISOTROPIC:  # no data, no estimator: the settings do not apply
        if s["structure"] == "merged-isotropic" and s["scope"] not in (None, "all"):
            raise GridError(f"{where}: scope applies to structure isotropic only")
        if s["budget"] is not None:
            raise GridError(f"{where}: budget needs a per-token Fisher, not an isotropic control")
        s["scope"] = s["scope"] or "all"
        s["estimator"] = s["mc_samples"] = s["source"] = None
    elif s["scope"] is not None:
        raise GridError(f"{where}: scope applies to structure isotropic only")
    elif s["estimator"] == "batch-grad-squared" and s["structure"] != "diag":
        raise GridError(f"{where}: estimator batch-grad-squared needs structure diag")
    if s["estimator"] not in ("mc", None):
        s["mc_samples"] = 1
    if s["init"] != "default" and s["structure"] not in ("kfac", "tri-kfac", *ISOTROPIC):
        raise GridError(
            f"{where}: init {s['init']!r} (B0 != 0) with a penalty needs structure kfac or "
            f"tri-kfac, got {s['structure']!r}"
        )
    if s["budget"] is not None and s["c"] is None:
        s["c"] = DEFAULT_START_C
    if s["budget"] is not None and not s["c"] > 0:
        raise GridError(f"{where}: budget needs a start c > 0, got c = {s['c']}")
    if s["budget"] is not None and s["estimator"] == "batch-grad-squared":
        raise GridError(f"{where}: budget needs a per-token Fisher, not batch-grad-squared")
    return {k: v for k, v in s.items() if v is not None}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cell_key(cell: Mapping[str, Any]) -> str:
    """The cell's identity: a hash of all its settings (seed included)."""
    return _hash(dict(cell))


def config_key(cell: Mapping[str, Any]) -> str:
    """The configuration's identity: a hash of all the cell's settings but the seed."""
    return _hash({k: v for k, v in cell.items() if k != "seed"})
