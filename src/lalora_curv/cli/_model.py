"""What several commands share: loading a model and its adapter, finding artifacts, task batches."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lalora_curv.cli._run import CliError, split_names
from lalora_curv.errors import LaloraError
from lalora_curv.tasks.data import TASKS, TaskDataError, load_records
from lalora_curv.tasks.formatting import make_batches, supervised_examples

Dtype = Literal["float32", "bfloat16", "float16", "float64"]
Batch = dict[str, Tensor]

#: where a fit run keeps the adapter init (the mode mu) and its precision artifacts
ADAPTER_INIT_DIR = "adapter_init"
PRECISION_DIR = "precision"
SUM_NAME = "sum"
#: where a train run keeps its final adapter
ADAPTER_DIR = "adapter"


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise CliError(f"--device {device!r}: {e}") from None


Quantization = Literal["4bit", "8bit"]


def quantization_config(quantization: str | None, dtype: Dtype):
    """The ``BitsAndBytesConfig`` of transformers for ``--quantization``, or None.

    QLoRA: the base in 4 or 8 bits, the LoRA weights and the statistics in ``dtype``.
    """
    if quantization is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise CliError(
            f"--quantization {quantization} needs bitsandbytes: pip install 'lalora-curv[quant]'"
        ) from None
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=getattr(torch, dtype))
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise CliError(f"--quantization {quantization!r}: valid: 4bit, 8bit")


def load_base(
    model: str, dtype: Dtype, device: str, quantization: str | None = None
) -> tuple[nn.Module, object]:
    """``AutoModelForCausalLM`` and its tokenizer from a local path or a hub id.

    In 4 or 8 bits with ``quantization``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_looking = model.startswith(("/", ".", "~")) or model.count("/") > 1
    if local_looking and not Path(model).expanduser().exists():
        raise CliError(f"--model {model}: no such directory")
    quant = quantization_config(quantization, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        if quant is None:
            base = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
        else:  # placed by bitsandbytes on the device it quantizes for
            base = AutoModelForCausalLM.from_pretrained(
                model, quantization_config=quant, device_map=_device_map(device)
            )
    except (OSError, ValueError) as e:
        raise CliError(
            f"--model {model}: cannot load a causal LM and its tokenizer ({e})"
        ) from None
    return (base if quant is not None else base.to(resolve_device(device))), tokenizer


def _device_map(device: str) -> dict[str, str]:
    return {"": str(resolve_device(device))}


def resolve_adapter(path: str) -> str:
    """The adapter ``path`` names, as a directory or a hub id.

    A peft adapter directory, a fit run (its ``adapter_init/``), a train run (its
    ``adapter/``), or a hub id (``owner/name``, when no such local path exists).
    """
    p = Path(path)
    for candidate in (p, p / ADAPTER_INIT_DIR, p / ADAPTER_DIR):
        if (candidate / "adapter_config.json").is_file():
            return str(candidate)
    if not p.exists() and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path):
        return path  # a hub id
    raise CliError(
        f"--adapter {path}: no peft adapter there (no adapter_config.json), nor a fit run's "
        f"{ADAPTER_INIT_DIR}/ or a train run's {ADAPTER_DIR}/"
    )


def resolve_precision(path: str) -> Path:
    """A precision artifact directory, or a fit run (its pooled ``precision/sum/``)."""
    p = Path(path)
    for candidate in (p, p / PRECISION_DIR / SUM_NAME):
        if (candidate / "precision.json").is_file():
            return candidate
    what = "no such directory" if not p.exists() else "no precision.json there"
    raise CliError(
        f"--precision {path}: {what}; pass a precision artifact directory or a fit run "
        f"directory (its {PRECISION_DIR}/{SUM_NAME}/ is used)"
    )


def with_adapter(
    base: nn.Module,
    adapter: str | None,
    r: int,
    lora_alpha: float,
    target_modules: str | list[str],
    lora_dropout: float,
    seed: int,
    init: str = "default",
) -> nn.Module:
    """The base model with a trainable LoRA adapter: loaded from ``adapter``, or a new one.

    A new adapter is drawn after ``torch.manual_seed(seed)``, so the same seed gives the same
    init: ``init="default"`` is peft's (``A`` Kaiming-uniform, ``B = 0``); ``"pissa"`` and
    ``"olora"`` are peft's principal-SVD and QR inits, ``"milora"``
    :func:`lalora_curv.baselines.milora_init` (minor singular components). Those three
    replace each base weight ``W`` by ``W - s B0 A0`` so the function is unchanged at init.
    """
    from peft import LoraConfig, PeftModel

    from lalora_curv.baselines import INITS, lora_adapter

    if init not in INITS:
        raise CliError(f"--init {init!r}: valid: {', '.join(INITS)}")
    if adapter is not None:
        if init != "default":
            raise CliError(
                f"--init {init} makes a new adapter; it cannot be combined with --adapter"
            )
        where = resolve_adapter(adapter)
        try:
            return PeftModel.from_pretrained(base, where, is_trainable=True)
        except (OSError, ValueError) as e:
            raise CliError(f"--adapter {adapter}: cannot load a peft adapter ({e})") from None
    targets = split_names(target_modules)
    if not targets:
        raise CliError("--target_modules is empty; name the linear layers to adapt")
    if r < 1:
        raise CliError(f"--r must be >= 1, got {r}")
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=lora_dropout
    )
    try:
        peft_model = lora_adapter(base, config, init)
    except (ValueError, LaloraError) as e:
        raise CliError(
            f"cannot make a LoRA adapter (--init {init}, --r {r}, --target_modules "
            f"{','.join(targets)}): {e}"
        ) from None
    return peft_model


def check_tasks(tasks: list[str], option: str) -> None:
    if not tasks:
        raise CliError(f"{option} is empty; valid tasks: {', '.join(sorted(TASKS))}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise CliError(f"{option}: unknown task {unknown[0]!r}; valid: {', '.join(sorted(TASKS))}")


def task_batches(
    tasks: list[str],
    tokenizer,
    data_dir: str | None,
    split: Literal["train", "eval"],
    limit: int | None,
    batch_size: int,
    max_length: int,
    shuffle_seed: int | None = None,
    option: str = "--sources",
) -> dict[str, list[Batch]]:
    """Supervised batches per task, prompt and padding labelled -100.

    The ``(prompt, target)`` pairs of
    :func:`~lalora_curv.tasks.formatting.supervised_examples`.

    Args:
        tasks: task names (hellaswag, winogrande, arc_challenge, gsm8k).
        tokenizer: the model's tokenizer.
        data_dir: local files in the original schemas; ``None`` loads from the hub.
        split: ``"train"`` or ``"eval"`` records.
        limit: the first ``limit`` records of each task.
        batch_size: sequences per batch (at least 1).
        max_length: tokens per sequence (at least 2); a longer example loses the start of its
            prompt.
        shuffle_seed: shuffle each task's examples with this seed before batching.
        option: the command-line option that named the tasks (for error messages).
    """
    check_tasks(tasks, option)
    if batch_size < 1 or max_length < 2:
        raise CliError(
            f"need --batch_size >= 1 and --max_length >= 2, got {batch_size}, {max_length}"
        )
    out: dict[str, list[Batch]] = {}
    for task in tasks:
        if split == "train" and data_dir is not None and TASKS[task][1] is None:
            raise CliError(
                f"{task} has no local training split under {data_dir}; fit it on its "
                "evaluation split (--split eval, then evaluate on other records) or load it "
                "from the hub (no --data_dir)"
            )
        try:
            records = load_records(task, data_dir, split=split, limit=limit)
        except TaskDataError as e:
            raise CliError(str(e)) from None
        if not records:
            raise CliError(f"{task}: no records (--limit {limit}?)")
        examples = supervised_examples(task, records)
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(examples)
        out[task] = make_batches(examples, tokenizer, batch_size=batch_size, max_length=max_length)
    return out


def dataset_name(source: str) -> str:
    """The source name of a dataset (its artifact's folder).

    A file's stem, a folder's name, a hub id with ``/`` as ``--``.
    """
    p = Path(source).expanduser()
    if p.exists():
        return p.stem if p.is_file() else p.name
    return source.replace("/", "--")


def dataset_sources(
    datasets: list[str],
    tokenizer,
    split: str,
    config: str | None,
    limit: int | None,
    batch_size: int,
    max_length: int,
    packing: bool,
    shuffle_seed: int | None = None,
    option: str = "--dataset",
) -> dict[str, list[Batch]]:
    """``{name: supervised batches}`` of each dataset.

    See :func:`lalora_curv.data.dataset_batches`: text, prompt-completion or conversational
    examples from a file, folder or hub id.
    """
    from lalora_curv.data import DatasetError, dataset_batches

    names = [dataset_name(d) for d in datasets]
    if len(set(names)) != len(names):
        raise CliError(f"{option}: two datasets share the name {names} (their artifacts' folders)")
    if SUM_NAME in names:
        raise CliError(
            f"{option}: a dataset named {SUM_NAME!r} would overwrite the pooled precision"
        )
    out = {}
    for name, source in zip(names, datasets, strict=True):
        try:
            out[name] = dataset_batches(
                source,
                tokenizer,
                batch_size=batch_size,
                max_length=max_length,
                packing=packing,
                split=split,
                config=config,
                limit=limit,
                shuffle_seed=shuffle_seed,
            )
        except DatasetError as e:
            raise CliError(f"{option} {source}: {e}") from None
    return out
