r"""``lalora-curv fit``: stage 1, a precision per source sub-dataset and their pooled sum.

For source sub-datasets ``s = 1..S`` with ``N_s`` supervised tokens and precisions ``P_s``
(mean Fisher per token), the pooled precision is (:meth:`Precision.__add__`)

.. math:: P = \sum_s N_s P_s \Big/ \sum_s N_s .

Run directory::

    OUT/config.yaml            the resolved arguments
    OUT/adapter_init/          the LoRA adapter at fitting time (the mode mu), peft format
    OUT/precision/<source>/    one artifact per source sub-dataset
    OUT/precision/sum/         their sum (EKFAC: one fit on all sources' batches)
    OUT/metrics.jsonl          one line per artifact: counts, seconds, trace
    OUT/spectra.png            the spectra of the sum (as ``lalora-curv inspect`` plots them)

Batches come from :func:`batch_sources`, a mapping ``{source name: batches}``: the named
tasks' records, or (``--self_generated N``) one source ``self-generated`` of ``N`` sequences
sampled from the base model itself (:func:`lalora_curv.self_generated_batches`), for when the
source data is not available; the artifact's metadata then records the sampling settings.

``--storage`` converts every artifact before it is saved (``prec.with_storage``); the sum is
pooled from the precisions as fitted and converted after, so ``sum`` is
``with_storage(sum_s N_s P_s / sum_s N_s)``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Literal

import torch

import lalora_curv as lc
from lalora_curv import checks
from lalora_curv.backends import resolve_backend
from lalora_curv.cli._model import (
    ADAPTER_INIT_DIR,
    PRECISION_DIR,
    SUM_NAME,
    Batch,
    Dtype,
    Quantization,
    check_tasks,
    dataset_sources,
    load_base,
    task_batches,
    with_adapter,
)
from lalora_curv.cli._run import CliError, RunDir, save_adapter, split_names
from lalora_curv.cli.inspect_precision import plot_spectra, precision_report
from lalora_curv.plotting import SKIPPED, pyplot
from lalora_curv.precision import REGISTRY

Structure = Literal[lc.STRUCTURES]  # type: ignore[valid-type]  (the registry's names)
Estimator = Literal["empirical", "mc", "batch-grad-squared"]
Backend = Literal["hooks", "curvlinops", "backpack", "laplace"]
Storage = Literal["float32", "float64", "bfloat16", "lowrank", "compact"]

EXAMPLES = """examples:
  lalora-curv fit --model ./llama --data_dir ../shared/data \\
      --sources winogrande,arc_challenge --limit 256 \\
      --structure kfac --estimator mc --mc_samples 4 --out runs/fit-kfac
  lalora-curv fit --model ./llama --sources hellaswag,winogrande,arc_challenge  # from the hub
  lalora-curv fit --config runs/fit-kfac/config.yaml --structure diag --out runs/fit-diag
  lalora-curv fit --model ./llama --data_dir ../shared/data --print_config > fit.yaml
  lalora-curv fit --model ./llama --self_generated 512 --max_length 256 \\
      --structure kfac --estimator mc --mc_samples 4 --out runs/fit-self   # no source data
  lalora-curv fit --model ./llama --data_dir ../shared/data --sources winogrande \\
      --storage lowrank --storage_rank 32 --out runs/fit-small   # factors: 32 eigenpairs + diag
"""


def check_storage(structure: str, storage: str | None, storage_rank: int | None) -> None:
    """Refuse a --storage / --storage_rank combination before anything is fitted.

    Whether the structure offers the storage is the library's answer
    (``Precision.check_storage``).
    """
    if storage is None:
        if storage_rank is not None:
            raise CliError("--storage_rank applies to --storage lowrank only (no --storage given)")
        return
    if storage in lc.STORAGE_PRESETS and storage_rank is not None:
        raise CliError(f"--storage {storage} is a preset with its own rank: no --storage_rank")
    if storage == "lowrank" and storage_rank is None:
        raise CliError("--storage lowrank needs --storage_rank K (eigenpairs kept per factor)")
    if storage not in ("lowrank", *lc.STORAGE_PRESETS) and storage_rank is not None:
        raise CliError(f"--storage_rank applies to --storage lowrank only, not {storage!r}")
    if storage_rank is not None and storage_rank < 1:
        raise CliError(f"--storage_rank must be >= 1, got {storage_rank}")
    REGISTRY[structure].check_storage(storage, storage_rank)


def batch_sources(
    tokenizer,
    sources: list[str],
    data_dir: str | None,
    split: Literal["train", "eval"],
    limit: int | None,
    batch_size: int,
    max_length: int,
) -> dict[str, list[Batch]]:
    """``{source name: supervised batches}``: each named task's records, formatted."""
    return task_batches(sources, tokenizer, data_dir, split, limit, batch_size, max_length)


def self_generated_source(
    model,
    tokenizer,
    num_sequences: int,
    max_length: int,
    prompts: str | None,
    temperature: float,
    seed: int,
    batch_size: int,
    progress: bool,
) -> dict[str, lc.SelfGeneratedBatches]:
    """``{"self-generated": batches}`` sampled from the base model (prompts from a file)."""
    lines = None
    if prompts is not None:
        path = Path(prompts)
        if not path.is_file():
            raise CliError(f"--prompts {prompts}: no such file")
        lines = [x.strip() for x in path.read_text().splitlines() if x.strip()]
        if not lines:
            raise CliError(f"--prompts {prompts}: the file holds no prompt")
    return {
        "self-generated": lc.self_generated_batches(
            model,
            tokenizer,
            num_sequences,
            max_length,
            prompts=lines,
            temperature=temperature,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
    }


def check_source_names(sources: str | list[str]) -> None:
    """Refuse the reserved name and repeated names in ``--sources``.

    Checked before any run directory is touched.
    """
    names = split_names(sources)
    if SUM_NAME in names:
        raise CliError(f"--sources: {SUM_NAME!r} is reserved for the pooled precision")
    if len(set(names)) != len(names):
        raise CliError(f"--sources names a source twice: {names}")


def check_fit_options(o: dict) -> None:
    """Refuse what ``fit`` cannot run, naming the option (nothing is loaded or written yet)."""
    check_storage(o["structure"], o["storage"], o["storage_rank"])
    check_source_names(o["sources"])
    try:
        for name, minimum, optional in (
            ("limit", 1, True),
            ("batch_size", 1, False),
            ("max_length", 2, False),
            ("r", 1, False),
            ("mc_samples", 1, False),
            ("max_batches", 1, True),
            ("self_generated", 1, True),
            ("seed", None, False),
        ):
            checks.integer(f"--{name}", o[name], minimum, optional=optional)
        checks.number("--lora_alpha", o["lora_alpha"], 0.0, strict=True)
        checks.number("--lora_dropout", o["lora_dropout"], 0.0)
        checks.number("--temperature", o["temperature"], 0.0, strict=True)
        if not o["lora_dropout"] < 1:
            raise CliError(f"--lora_dropout must be < 1, got {o['lora_dropout']}")
        resolve_backend(o["backend"], o["structure"], o["estimator"], None)
        if o["mc_samples"] != 1 and o["estimator"] != "mc":
            raise CliError(f"--mc_samples {o['mc_samples']} applies to --estimator mc only")
    except lc.LaloraError as e:
        raise CliError(str(e)) from None
    if o["dataset"] is not None and o["self_generated"] is not None:
        raise CliError("--dataset and --self_generated are two sources of data: give one")
    if o["dataset"] is not None and not split_names(o["dataset"]):
        raise CliError("--dataset is empty; give a file, a folder or a hub id")
    if o["prompts"] is not None and o["self_generated"] is None:
        raise CliError("--prompts applies to --self_generated only")
    if o["prompts"] is not None and not Path(o["prompts"]).is_file():
        raise CliError(f"--prompts {o['prompts']}: no such file")
    if o["data_dir"] is not None and not Path(o["data_dir"]).is_dir():
        raise CliError(f"--data_dir {o['data_dir']}: no such folder")


def fit(
    model: str,
    out: str = "runs/fit",
    sources: str | list[str] = "hellaswag,winogrande,arc_challenge",
    data_dir: str | None = None,
    split: Literal["train", "eval"] = "train",
    limit: int | None = 256,
    batch_size: int = 4,
    max_length: int = 512,
    adapter: str | None = None,
    r: int = 16,
    lora_alpha: float = 32.0,
    target_modules: str | list[str] = "q_proj,v_proj",
    lora_dropout: float = 0.0,
    structure: Structure = "kfac",
    estimator: Estimator = "empirical",
    mc_samples: int = 1,
    backend: Backend = "hooks",
    max_batches: int | None = None,
    seed: int = 0,
    stats_dtype: Literal["float32", "float64"] = "float32",
    dtype: Dtype = "float32",
    device: str = "auto",
    progress: bool = True,
    self_generated: int | None = None,
    prompts: str | None = None,
    temperature: float = 1.0,
    storage: Storage | None = None,
    storage_rank: int | None = None,
    dataset: str | list[str] | None = None,
    dataset_split: str = "train",
    dataset_config: str | None = None,
    packing: bool = False,
    quantization: Quantization | None = None,
) -> dict[str, lc.Precision]:
    """Fit a Laplace precision of a LoRA adapter on each source sub-dataset, and their sum.

    Args:
        model: local path or hub id of a causal LM.
        out: run directory.
        sources: source tasks, comma-separated or a YAML list (hellaswag, winogrande,
            arc_challenge; gsm8k too).
        data_dir: local task files in the original schemas (default: the Hugging Face hub).
        split: records to fit on: "train" or "eval" (HellaSwag has no local train file).
        limit: the first N records of each source (null: all).
        batch_size: sequences per batch.
        max_length: tokens per sequence (longer prompts lose their start).
        adapter: start from this peft adapter (a directory, or a fit or train run) instead of
            a new one from r, lora_alpha, target_modules, lora_dropout.
        r: LoRA rank.
        lora_alpha: LoRA alpha (scaling alpha / r).
        target_modules: linear layers to adapt, comma-separated or a YAML list.
        lora_dropout: LoRA dropout (fitting runs in eval mode; training uses it).
        structure: precision structure.
        estimator: Fisher estimator ("batch-grad-squared": diag only).
        mc_samples: label draws per token for estimator "mc".
        backend: statistics backend.
        max_batches: at most this many batches per source.
        seed: seed of the adapter init and of the Monte-Carlo labels.
        stats_dtype: accumulation dtype of the statistics.
        dtype: model weights' dtype.
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...
        progress: progress bars.
        self_generated: instead of --sources, sample this many sequences from the base model
            (at the adapter's init) and fit on them: curvature without source data.
        prompts: with --self_generated, a text file of prompts to continue (one per line;
            their tokens are not supervised); default: unconditional samples from BOS.
        temperature: with --self_generated, the sampling temperature (1.0: the model's own
            distribution).
        storage: save every precision in this storage (``prec.with_storage``): float32,
            float64, bfloat16 (half the bytes of float32), lowrank (each K-FAC factor as its
            --storage_rank leading eigenpairs plus a diagonal), or compact (lowrank at the
            rank that keeps a Llama-3.2-3B K-FAC artifact within 300 MB); default: as fitted.
            On a trained model low rank misses much of the penalty fine-tuning meets at small
            ranks (docs/benchmarks.md): bfloat16 is the safer way to halve the bytes.
        storage_rank: the eigenpairs kept per factor with --storage lowrank.
        dataset: instead of --sources, your own data: a .jsonl/.json/.parquet/.csv file, a
            folder of them, or a hub id, with "text", "prompt"+"completion" or "messages"
            examples (TRL's formats; docs/your-data.md); several (comma-separated or a YAML
            list) are several sources, each its own artifact, pooled into sum.
        dataset_split: the split of a hub dataset.
        dataset_config: the configuration of a hub dataset.
        packing: pack the examples into rows of --max_length tokens (position ids restart
            at each example) instead of padding them.
        quantization: load the base in 4bit or 8bit (QLoRA, bitsandbytes: pip install
            'lalora-curv[quant]'); LoRA weights and statistics stay in --dtype.

    Returns:
        ``{source: precision, ..., "sum": pooled precision}``, in the saved storage.
    """
    # every refusal before --out (perhaps an earlier run) is touched: check, load, then write
    config = dict(locals())
    check_fit_options(config)
    names = split_names(sources)
    if self_generated is None and dataset is None:
        check_tasks(names, "--sources")
    base, tokenizer = load_base(model, dtype, device, quantization)
    peft_model = with_adapter(base, adapter, r, lora_alpha, target_modules, lora_dropout, seed)
    if dataset is not None:
        batches = dataset_sources(
            split_names(dataset),
            tokenizer,
            dataset_split,
            dataset_config,
            limit,
            batch_size,
            max_length,
            packing,
        )
        names = list(batches)
    elif self_generated is None:
        batches = batch_sources(tokenizer, names, data_dir, split, limit, batch_size, max_length)
    else:
        batches = self_generated_source(
            peft_model,
            tokenizer,
            self_generated,
            max_length,
            prompts,
            temperature,
            seed,
            batch_size,
            progress,
        )
        names = list(batches)
    run = RunDir("fit", out, config)
    init_dir = save_adapter(peft_model, run / ADAPTER_INIT_DIR)
    print(f"adapter init (the mode mu): {init_dir}")
    settings = dict(
        structure=structure,
        backend=backend,
        estimator=estimator,
        mc_samples=mc_samples,
        max_batches=max_batches,
        progress=progress,
        seed=seed,
        stats_dtype=getattr(torch, stats_dtype),
    )

    stored: dict[str, lc.Precision] = {}

    def save_one(name: str, prec: lc.Precision, record: dict) -> Path:
        """Convert ``prec`` to the chosen storage, save it and log it."""
        if storage is not None:
            prec = prec.with_storage(storage, storage_rank)
        stored[name] = prec
        path = lc.save_precision(prec, run / PRECISION_DIR / name)
        run.log(
            {
                "artifact": name,
                "path": str(path),
                **record,
                "trace": precision_report(prec, spectra=False)["trace"],
                "storage": prec.metadata.get("storage"),
                **{f"counts/{k}": v for k, v in prec.counts.items()},
            }
        )
        return path

    def fit_one(name: str, source_batches: list[Batch], sources: list[str]) -> lc.Precision:
        t0 = time.perf_counter()
        prec = lc.fit_precision(peft_model, source_batches, sources=sources, **settings)
        seconds = time.perf_counter() - t0
        path = save_one(name, prec, {"seconds": round(seconds, 4)})
        print(
            f"fitted {structure} on {name:<14} {prec.counts.get('supervised_tokens', 0):>8} "
            f"supervised tokens in {seconds:6.2f}s -> {path}"
        )
        return prec

    if storage in ("lowrank", *lc.STORAGE_PRESETS):
        print(
            "note: low rank keeps the top of each factor's spectrum and only the diagonal of "
            "the rest; on a trained model fine-tuning moves in that rest, where the penalty "
            "can be off by tens of percent at small ranks (docs/benchmarks.md, 'Low rank on "
            "trained spectra'); bfloat16 halves the bytes within 2^-8"
        )
    fitted = {name: fit_one(name, b, [name]) for name, b in batches.items()}
    if not REGISTRY[structure].poolable and len(fitted) > 1:
        # EKFAC eigenbases differ between data sets: the pooled precision is one fit on all
        fit_one(SUM_NAME, [x for b in batches.values() for x in b], names)
    else:  # pooled as fitted, then converted: the sum's storage sees the exact sum
        parts = list(fitted.values())
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        path = save_one(SUM_NAME, total, {})
        print(f"pooled {'+'.join(names)} -> {path}")
    for old in (run / PRECISION_DIR).iterdir():  # artifacts of an earlier run into this --out
        if old.name not in stored and (old / "precision.json").is_file():
            shutil.rmtree(old)
    plot = plot_spectra(precision_report(stored[SUM_NAME]), run / "spectra.png")
    if plot is None and pyplot() is None:
        print(SKIPPED)
    print(
        f"run directory: {run.path} (config.yaml, metrics.jsonl{', spectra.png' if plot else ''})"
    )
    return stored
