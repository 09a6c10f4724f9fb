"""The paper's recipe on a real LLM: Sliwa et al. (ICML 2025), Table 1, in one call.

For any causal LM (the paper: Llama-3.2-3B; LoRA r = 32 on every linear module):

1. **fit**: a precision on each source task's *training* records (HellaSwag, WinoGrande,
   ARC-Challenge: the gold answer given its prompt), pooled by supervised tokens
   (``P = sum_s N_s P_s / sum_s N_s``), centred at the adapter's init;
2. **train** on GSM8K's training split: plain LoRA, LALoRA at each relative strength ``c``
   (``lambda = c / m(P)``, :meth:`~lalora_curv.strength.Strength.relative`), and the
   isotropic control (L2 to the init on every LoRA tensor) at the same ``c``;
3. **select on validation**: held-out training records of every task (never the test split)
   score each trained adapter; per family the strength with the highest *selection score*
   ``(source + target) / 2`` (mean source accuracy, GSM8K exact match; ties: the weaker
   strength) is kept;
4. **test**: the base model (the adapter at its init), plain LoRA and each family's pick on the
   evaluation splits of all four tasks, scored as lm-evaluation-harness does (zero-shot
   log-likelihood multiple choice; GSM8K greedy generation, strict and flexible match).

Where a task has no training split (HellaSwag among the local files), its evaluation records
are split three ways (validation, fitting, test: disjoint, seeded) and the summary says so.

Everything lands in ``out``: the adapter init (the mode), one precision artifact per source
and their sum, every trained adapter, ``variants.jsonl`` (one line per trained variant, with
its validation scores), ``results.json`` (picks, test scores, time and peak accelerator memory
of every stage), ``table.md``/``table.csv`` and ``recipe.png``. A run killed part way resumes
where it stopped: the precision is reused, finished variants are skipped, and a variant killed
in training continues from its last checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lalora_curv as lc
from lalora_curv.atomic import staged_dir, write_json, write_text
from lalora_curv.errors import LaloraError
from lalora_curv.plotting import pyplot, save_figure
from lalora_curv.precision import REGISTRY
from lalora_curv.tasks.data import TASKS, load_records
from lalora_curv.tasks.formatting import make_batches, supervised_examples
from lalora_curv.tasks.gsm8k import score_gsm8k
from lalora_curv.tasks.multiple_choice import multiple_choice_items
from lalora_curv.tasks.scoring import score_multiple_choice
from lalora_curv.train import latest_checkpoint

SOURCES = ("hellaswag", "winogrande", "arc_challenge")
TARGET = "gsm8k"
#: the metric lm-evaluation-harness reports first for each task (the paper's numbers)
PRIMARY = {
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_challenge": "acc_norm",
    "gsm8k": "exact_match_strict",
}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: the families trained besides plain LoRA
FAMILIES = ("lalora", "l2")
VARIANTS_FILE = "variants.jsonl"


class RecipeError(LaloraError):
    """The recipe's settings or data cannot make the run (what and why is named)."""


@dataclass(frozen=True)
class RecipeConfig:
    """The recipe's settings (the paper's where it gives them).

    Attributes:
        fit_records: training records per source task the precision is fitted on.
        val_records: held-out records per task that select the strength.
        test_records: evaluation records per task (None: the whole evaluation split).
        train_records: GSM8K training examples (None: all but the validation ones).
        r: LoRA rank (the paper: 32).
        lora_alpha: LoRA alpha (scaling ``alpha / r``).
        target_modules: the adapted linear modules (default: every linear of a Llama).
        structure: the precision's structure (a fitted one: :data:`lalora_curv.STRUCTURES`).
        estimator: the Fisher estimator (:func:`lalora_curv.fit_precision`).
        mc_samples: label draws per token for ``estimator="mc"``.
        storage: the artifacts' storage (:meth:`~lalora_curv.Precision.with_storage`; None:
            as fitted, float32). A K-FAC artifact of Llama-3.2-3B with every linear adapted is
            about 29 GB per source in float32 (one ``D x D`` factor per distinct input and
            per module output); ``"bfloat16"`` halves it.
        cs: relative strengths ``c`` (``lambda = c / m(P)``) tried for LALoRA and the control.
        controls: ``("l2",)`` trains the isotropic control; ``()`` does not.
        lr: AdamW learning rate.
        epochs: passes over the GSM8K training examples.
        max_steps: optimizer steps (None: ``epochs`` passes).
        batch_size: sequences per batch (fitting and training).
        grad_accum_steps: micro-batches per optimizer step.
        warmup_steps: linear warm-up steps.
        max_length: tokens per sequence.
        mixed_precision: training autocast, ``"bf16"`` or ``"fp16"`` (None: off).
        eval_batch_size: sequences per forward pass when scoring.
        max_new_tokens: GSM8K generation budget.
        checkpoint_every: a training checkpoint every this many steps (resume after a crash).
        seed: the adapter init, the data splits and order, the MC labels.
    """

    fit_records: int = 500
    val_records: int = 200
    test_records: int | None = None
    train_records: int | None = None
    r: int = 32
    lora_alpha: float = 64.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    structure: str = "kfac"
    estimator: str = "mc"
    mc_samples: int = 1
    storage: str | None = None
    cs: tuple[float, ...] = (0.1, 1.0, 10.0)
    controls: tuple[str, ...] = ("l2",)
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum_steps: int = 1
    warmup_steps: int = 0
    max_length: int = 512
    mixed_precision: str | None = None
    eval_batch_size: int = 16
    max_new_tokens: int = 256
    checkpoint_every: int | None = 200
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("fit_records", "val_records", "r", "epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("test_records", "train_records", "max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise RecipeError(f"{name} must be >= 1 or None, got {value!r}")
        if not self.cs or any(not (isinstance(c, int | float) and c > 0) for c in self.cs):
            raise RecipeError(f"cs must be strengths > 0, got {self.cs!r}")
        unknown = [c for c in self.controls if c != "l2"]
        if unknown:
            raise RecipeError(f"unknown control {unknown[0]!r}; valid: l2")
        if not self.target_modules:
            raise RecipeError("target_modules is empty")
        if self.storage not in (None, "float32", "float64", "bfloat16"):
            raise RecipeError(
                f"storage {self.storage!r}: valid: float32, float64, bfloat16 (a low-rank "
                "storage is set with lalora-curv fit and loaded by lc.train)"
            )
        fitted = sorted(n for n, cls in REGISTRY.items() if cls.fitted)
        if self.structure not in fitted:
            raise RecipeError(
                f"structure {self.structure!r} is not a fitted curvature; valid: {fitted} "
                "(the isotropic control is trained as a baseline already)"
            )


@dataclass
class Splits:
    """Records per task and part (``fit``, ``val``, ``test``; GSM8K ``train``), and notes."""

    records: dict[str, dict[str, list[dict[str, Any]]]]
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """The number of records per task and part."""
        return {t: {k: len(v) for k, v in parts.items()} for t, parts in self.records.items()}


def recipe_splits(data_dir: str | Path | None, config: RecipeConfig) -> Splits:
    """Disjoint fitting, validation and test records of the four tasks (seeded).

    A source task's fitting and validation records come from its training split (shuffled
    with ``config.seed``), its test records are the evaluation split (the first
    ``test_records``: the harness's ``--limit``). A task with no training split here has its
    evaluation records shuffled and cut into validation, fitting and test parts. GSM8K: the
    validation records are held out of its training split, the rest trains.
    """
    rng = random.Random(config.seed)

    def shuffled(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        order = list(range(len(records)))
        rng.shuffle(order)
        return [records[i] for i in order]

    def first(records: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
        return records if n is None else records[:n]

    fit_n, val_n = config.fit_records, config.val_records
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    notes = []
    for task in SOURCES:
        if data_dir is None or TASKS[task][1] is not None:
            train = shuffled(load_records(task, data_dir, split="train"))
            if len(train) < fit_n + val_n:
                raise RecipeError(
                    f"{task}: {len(train)} training records cannot give {fit_n} fitting and "
                    f"{val_n} validation records; lower fit_records or val_records"
                )
            parts = {
                "fit": train[:fit_n],
                "val": train[fit_n : fit_n + val_n],
                "test": first(load_records(task, data_dir, split="eval"), config.test_records),
            }
        else:
            records = shuffled(load_records(task, data_dir, split="eval"))
            rest = records[val_n + fit_n :]
            if not rest:
                raise RecipeError(
                    f"{task} has no training split under {data_dir}: its {len(records)} "
                    f"evaluation records cannot give {val_n} validation, {fit_n} fitting and "
                    "any test records; lower fit_records or val_records, or load it from the hub"
                )
            parts = {
                "fit": records[val_n : val_n + fit_n],
                "val": records[:val_n],
                "test": first(rest, config.test_records),
            }
            notes.append(
                f"{task}: no training split in {data_dir}; its evaluation records are split "
                f"(seed {config.seed}) into {len(parts['val'])} validation, "
                f"{len(parts['fit'])} fitting and {len(rest)} test records"
                + (
                    f" (of which the first {len(parts['test'])} are scored)"
                    if config.test_records
                    else ""
                )
            )
        out[task] = parts
    train = shuffled(load_records(TARGET, data_dir, split="train"))
    if len(train) <= val_n:
        raise RecipeError(f"{TARGET}: {len(train)} training records leave none to train on")
    out[TARGET] = {
        "train": first(train[val_n:], config.train_records),
        "val": train[:val_n],
        "test": first(load_records(TARGET, data_dir, split="eval"), config.test_records),
    }
    return Splits(out, notes)


def score(
    model: nn.Module,
    tokenizer: Any,
    records: dict[str, list[dict[str, Any]]],
    config: RecipeConfig,
    progress: bool = False,
) -> dict[str, Any]:
    """Every task's metrics on ``records``, plus ``source``, ``target`` and ``selection``.

    The metrics are lm-evaluation-harness scoring, each with the ``seconds`` it took;
    ``source`` is the mean primary metric of the source tasks, ``target`` the GSM8K strict
    exact match and ``selection`` their mean.
    """
    metrics: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for task, recs in records.items():
                t0 = time.perf_counter()
                if task == TARGET:
                    metrics[task] = score_gsm8k(
                        model,
                        tokenizer,
                        recs,
                        config.max_new_tokens,
                        config.eval_batch_size,
                        progress=progress,
                    )
                else:
                    metrics[task] = score_multiple_choice(
                        model,
                        tokenizer,
                        multiple_choice_items(task, recs),
                        config.eval_batch_size,
                        progress,
                    )
                metrics[task]["seconds"] = round(time.perf_counter() - t0, 3)
    finally:
        model.train(was_training)
    source = [metrics[t][PRIMARY[t]] for t in SOURCES if t in metrics]
    metrics["source"] = sum(source) / len(source) if source else None
    metrics["target"] = metrics[TARGET][PRIMARY[TARGET]] if TARGET in metrics else None
    if metrics["source"] is not None and metrics["target"] is not None:
        metrics["selection"] = (metrics["source"] + metrics["target"]) / 2
    return metrics


@contextmanager
def stage(timings: dict[str, Any], name: str, device: torch.device) -> Iterator[None]:
    """Record the wall time (and on CUDA the peak allocated memory) of the enclosed work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    entry = {"seconds": round(time.perf_counter() - t0, 3)}
    if device.type == "cuda":
        entry["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    timings[name] = entry


def variant_names(config: RecipeConfig) -> list[tuple[str, str, float]]:
    """``(name, family, c)`` of every adapter the recipe trains, plain LoRA first."""
    out = [("lora", "lora", 0.0)]
    for family in ("lalora", *config.controls):
        out += [(f"{family}-c{c:g}", family, float(c)) for c in config.cs]
    return out


def pick(variants: Sequence[dict[str, Any]], family: str) -> dict[str, Any]:
    """The family's variant with the highest validation selection score.

    Ties: the weaker strength (a penalty that does not help on validation is not paid for).
    """
    mine = [v for v in variants if v["family"] == family]
    return max(mine, key=lambda v: (v["val"].get("selection") or 0.0, -v["c"]))


def run_recipe(
    model: nn.Module,
    tokenizer: Any,
    splits: Splits,
    config: RecipeConfig,
    out: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the recipe on ``model`` and write everything into ``out``.

    ``model`` is a peft model with a fresh LoRA adapter at its init. Returns the summary (also
    ``out/results.json``).
    """
    recipe = _Recipe(model, tokenizer, splits, config, Path(out), progress, log)
    prec = recipe.fit()
    val = {t: splits.records[t]["val"] for t in (*SOURCES, TARGET)}
    with stage(recipe.timings, "score base (validation)", recipe.device):
        base_val = score(model, tokenizer, val, config, progress)
    train_batches = recipe.batches(TARGET, "train", shuffle=True)
    penalties = {"lora": None, "lalora": prec, "l2": lc.isotropic_precision(model)}
    variants = _read_variants(recipe.out / VARIANTS_FILE)
    for name, family, c in variant_names(config):
        if name in variants:
            log(f"{name}: done earlier (validation source {variants[name]['val']['source']:.4f})")
            continue
        variants[name] = recipe.train_variant(name, family, c, penalties[family], train_batches)
        variants[name]["val"] = recipe.score_variant(name, val)
        with open(recipe.out / VARIANTS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(variants[name], sort_keys=True) + "\n")
        v = variants[name]
        log(
            f"{name}: validation source {v['val']['source']:.4f}, target "
            f"{v['val']['target']:.4f} (lambda {v['lam']})"
        )
    done = list(variants.values())
    picks = {"lora": variants["lora"], **{f: pick(done, f) for f in ("lalora", *config.controls)}}
    summary = {
        "config": asdict(config),
        "splits": splits.counts(),
        "notes": splits.notes,
        "precision": {
            "artifacts": sorted(str(p) for p in (recipe.out / "precision").iterdir()),
            "digest": prec.digest(),
        },
        "base_validation": base_val,
        "variants": done,
        "picks": {f: v["name"] for f, v in picks.items()},
        "test": recipe.test(picks),
        "stages": recipe.timings,
        "device": str(recipe.device),
        "device_name": torch.cuda.get_device_name(recipe.device)
        if recipe.device.type == "cuda"
        else "cpu",
    }
    recipe.write(summary)
    return summary


class _Recipe:
    """The recipe's stages on one model, writing into ``out``, timing each stage."""

    def __init__(self, model, tokenizer, splits, config, out: Path, progress, log) -> None:
        self.model, self.tokenizer, self.splits, self.config = model, tokenizer, splits, config
        self.out, self.progress, self.log = out, progress, log
        self.device = next(model.parameters()).device
        self.timings: dict[str, Any] = {}
        self.init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if not self.init:
            raise RecipeError("the model has no trainable (LoRA) parameters")
        out.mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        with staged_dir(out / "adapter_init") as tmp:
            model.save_pretrained(tmp)

    def batches(self, task: str, part: str, shuffle: bool) -> list[dict[str, torch.Tensor]]:
        """Supervised batches of one part of ``task``.

        Shuffled (seeded), or sorted by length, which pads less.
        """
        examples = supervised_examples(task, self.splits.records[task][part])
        if shuffle:
            random.Random(self.config.seed).shuffle(examples)
        else:
            examples.sort(key=lambda e: len(e[0]) + len(e[1]))
        made = make_batches(
            examples, self.tokenizer, self.config.batch_size, self.config.max_length
        )
        return [{k: v.to(self.device) for k, v in b.items()} for b in made]

    def reset(self) -> None:
        """The adapter back at its init (the mode)."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.init:
                    p.copy_(self.init[n])

    def fit(self) -> lc.Precision:
        """Fit one artifact per source and pool them in memory.

        An artifact an earlier run saved is reused; EKFAC, whose eigenbases differ between
        sources, is one fit on them all.
        """
        config = self.config
        poolable = REGISTRY[config.structure].poolable
        groups = {t: (t,) for t in SOURCES} if poolable else {"all": SOURCES}
        parts = []
        with stage(self.timings, "fit", self.device):
            for name, tasks in groups.items():
                path = self.out / "precision" / name
                p = _reuse_precision(path, config, self.log)
                if p is None:
                    p = lc.fit_precision(
                        self.model,
                        [b for t in tasks for b in self.batches(t, "fit", shuffle=False)],
                        structure=config.structure,
                        estimator=config.estimator,
                        mc_samples=config.mc_samples,
                        seed=config.seed,
                        sources=list(tasks),
                        progress=self.progress,
                    )
                    if config.storage is not None:
                        p = p.with_storage(config.storage)
                    lc.save_precision(p, path)
                parts.append(p.to("cpu"))  # the penalty moves it to the model's device once
                del p
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.log(
            f"precision: {config.structure}/{config.estimator} on {', '.join(SOURCES)} in "
            f"{self.out / 'precision'}"
        )
        return sum(parts[1:], parts[0])

    def train_variant(self, name, family, c, penalty, train_batches) -> dict[str, Any]:
        """Train one variant from the init and save its adapter.

        Continues from its checkpoint if a stopped run left one; returns its record without
        the validation scores.
        """
        self.reset()
        config, ckpt = self.config, self.out / "checkpoints" / name
        with stage(self.timings, f"train {name}", self.device):
            logs = lc.train(
                self.model,
                train_batches,
                penalty,
                lc.Strength.relative(c) if penalty is not None else 0.0,
                lr=config.lr,
                epochs=config.epochs,
                max_steps=config.max_steps,
                grad_accum_steps=config.grad_accum_steps,
                warmup_steps=config.warmup_steps,
                mixed_precision=config.mixed_precision,
                seed=config.seed,
                log_file=self.out / "logs" / f"{name}.jsonl",
                checkpoint_dir=ckpt,
                checkpoint_every=config.checkpoint_every,
                resume=latest_checkpoint(ckpt) is not None,
                progress=self.progress,
            )
        with staged_dir(self.out / "adapters" / name) as tmp:
            self.model.save_pretrained(tmp)
        last = logs[-1] if logs else {}
        return {
            "name": name,
            "family": family,
            "c": c,
            "lam": last.get("lam"),
            "steps": last.get("step"),
            "final_nll": last.get("nll"),
            "train": self.timings[f"train {name}"],
        }

    def score_variant(self, name: str, records: dict[str, list[dict[str, Any]]]) -> dict:
        with stage(self.timings, f"score {name} (validation)", self.device):
            return score(self.model, self.tokenizer, records, self.config, self.progress)

    def test(self, picks: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The base model (the adapter at its init) and each family's pick on the test parts."""
        records = {t: self.splits.records[t]["test"] for t in (*SOURCES, TARGET)}
        tested: dict[str, Any] = {}
        self.reset()
        with stage(self.timings, "score base (test)", self.device):
            tested["base"] = score(self.model, self.tokenizer, records, self.config, self.progress)
        for family, v in picks.items():
            _load_adapter_weights(self.model, self.out / "adapters" / v["name"], self.init)
            with stage(self.timings, f"score {v['name']} (test)", self.device):
                tested[family] = score(
                    self.model, self.tokenizer, records, self.config, self.progress
                )
        return tested

    def write(self, summary: dict[str, Any]) -> None:
        """results.json, the tables and the figure; say where they are."""
        out = self.out
        write_json(out / "results.json", summary)
        write_text(out / "table.md", table_markdown(summary))
        write_text(out / "table.csv", table_csv(summary))
        figure = plot_recipe(summary, out / "recipe.png")
        self.log(table_markdown(summary))
        for note in self.splits.notes:
            self.log(f"note: {note}")
        self.log(
            f"wrote {out / 'results.json'}, {out / 'table.md'}" + (f", {figure}" if figure else "")
        )


def _reuse_precision(path: Path, config: RecipeConfig, log: Callable[[str], None]):
    """The precision an earlier run into the same ``out`` saved at ``path``, if it matches.

    It must match ``config``.
    """
    if not (path / "precision.json").is_file():
        return None
    prec = lc.load_precision(path)
    meta = prec.metadata
    storage = (meta.get("storage") or {}).get("dtype")
    if (meta.get("structure"), meta.get("estimator")) != (config.structure, config.estimator) or (
        config.storage is not None and storage != config.storage
    ):
        raise RecipeError(
            f"{path} holds a {meta.get('structure')}/{meta.get('estimator')} precision "
            f"stored as {storage}, not {config.structure}/{config.estimator}"
            f"{'' if config.storage is None else ' stored as ' + config.storage}: give this "
            "run another out"
        )
    log(f"reusing the precision fitted earlier: {path}")
    return prec


def _read_variants(path: Path) -> dict[str, dict[str, Any]]:
    """Finished variants of an earlier run (a half-written last line is dropped)."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[record["name"]] = record
    return out


def _load_adapter_weights(model: nn.Module, path: Path, init: dict[str, torch.Tensor]) -> None:
    """Copy a saved adapter's LoRA weights into ``model``'s trainable parameters."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if any(k == n for n in init)]
    if missing:
        raise RecipeError(f"{path}: the saved adapter lacks {missing[0]}")


LABELS = {"base": "base model", "lora": "plain LoRA", "lalora": "LALoRA", "l2": "L2 to the init"}


def _rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for family, m in summary["test"].items():
        name = summary["picks"].get(family, "-")
        rows.append(
            [
                LABELS.get(family, family),
                name,
                *(f"{m[t][PRIMARY[t]]:.4f}" for t in (*SOURCES, TARGET)),
                f"{m['source']:.4f}",
            ]
        )
    return rows


HEADER = ["method", "pick", *(f"{t} {PRIMARY[t]}" for t in (*SOURCES, TARGET)), "source mean"]


def table_markdown(summary: dict[str, Any]) -> str:
    """The test table: each family's validation pick on every task."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(summary)]
    return "\n".join(lines) + "\n"


def table_csv(summary: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HEADER)
    writer.writerows(_rows(summary))
    return buffer.getvalue()


def plot_recipe(summary: dict[str, Any], path: Path) -> Path | None:
    """Validation (every variant, the picks ringed) and test (the picks and the base).

    In the plane of GSM8K exact match (learning) and mean source accuracy (forgetting).
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_val, ax_test) = plt.subplots(1, 2, figsize=(10, 4.2), sharey=False)
    colors = {"lora": "tab:gray", "lalora": "tab:blue", "l2": "tab:orange", "base": "black"}
    picked = set(summary["picks"].values())
    for family in ("lora", "lalora", "l2"):
        mine = [v for v in summary["variants"] if v["family"] == family]
        if not mine:
            continue
        xs = [v["val"]["target"] for v in mine]
        ys = [v["val"]["source"] for v in mine]
        ax_val.plot(xs, ys, "o-", color=colors[family], label=LABELS[family])
        for v, x, y in zip(mine, xs, ys, strict=True):
            if v["c"]:
                ax_val.annotate(
                    f"c={v['c']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
            if v["name"] in picked:
                ax_val.plot([x], [y], "o", ms=13, mfc="none", color=colors[family])
    base = summary["base_validation"]
    ax_val.plot([base["target"]], [base["source"]], "k*", ms=10, label="base model")
    ax_val.set_title("validation: every variant (ringed: the picks)")
    for family, m in summary["test"].items():
        ax_test.plot(
            [m["target"]],
            [m["source"]],
            "*" if family == "base" else "o",
            ms=10,
            color=colors.get(family, "tab:green"),
            label=LABELS.get(family, family),
        )
    ax_test.set_title("test: each family's validation pick")
    for ax in (ax_val, ax_test):
        ax.set_xlabel("GSM8K exact match (learning)")
        ax.set_ylabel("mean source accuracy (forgetting: lower)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = [
    "PRIMARY",
    "SOURCES",
    "TARGET",
    "RecipeConfig",
    "RecipeError",
    "Splits",
    "pick",
    "recipe_splits",
    "run_recipe",
    "score",
    "variant_names",
]
