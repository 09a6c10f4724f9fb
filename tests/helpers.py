"""What tests in more than one folder share: the repository's paths, the tiny float64 Llama +
peft models and batches, a byte tokenizer, the float64 fit, random displacements, one torch
thread.

Importable as ``import helpers`` from every folder: pyproject's ``[tool.pytest.ini_options]``
puts ``tests`` (and ``benchmarks``, for the tests of benchmark scripts) on ``sys.path``.
Paths are computed here once, from this file, so a test's own depth in the tree never matters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lalora_curv as lc
from lalora_curv.toy import add_lora, random_batches, tiny_llama

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SRC = ROOT / "src"
DOCS = ROOT / "docs"
BENCHMARKS = ROOT / "benchmarks"
SWEEPS = ROOT / "sweeps"
#: stored artifacts checked by tests/artifact/test_fixtures.py (made by make_fixtures.py)
FIXTURES = TESTS / "fixtures"
#: the real task files, kept next to the repository (tests that need them skip without them)
DATA = ROOT.parent / "shared" / "data"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread inside, the caller's count restored after: as the sweep's workers and
    the distributed ranks run (and on some CPUs a second thread alone moves float64
    statistics by ~1e-9 relative, another reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: float64 agreement of two computations of the same quantity
EXACT = {"rtol": 1e-9, "atol": 1e-12}
VOCAB = 48


def make_model(
    init_B_std=0.3,
    r=3,
    alpha=6.0,
    targets=("q_proj", "v_proj", "down_proj"),
    seed=0,
    dtype=torch.float64,
    adapter="default",
    dropout=0.0,
    attn="eager",
):
    base = tiny_llama(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        seed=seed,
        dtype=dtype,
        attn_implementation=attn,
    )
    return add_lora(
        base,
        r=r,
        alpha=alpha,
        target_modules=targets,
        init_B_std=init_B_std,
        seed=seed + 1,
        adapter_name=adapter,
        dropout=dropout,
    ).to(dtype)


def make_batches(n=2, batch_size=3, seq_len=10, seed=0):
    return random_batches(
        n, batch_size, seq_len, VOCAB, seed=seed, pad_fraction=0.4, prompt_fraction=0.3
    )


def fit64(model, batches, structure="kfac", **kw):
    """``lc.fit_precision`` with float64 statistics and no progress bar."""
    kw.setdefault("progress", False)
    return lc.fit_precision(model, batches, structure=structure, stats_dtype=torch.float64, **kw)


def random_delta(prec, seed=0, scale=1.0):
    """A seeded standard-normal displacement (times ``scale``) of every tensor of ``prec``."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in prec.mode.items()
    }


def rel(a, b):
    """Relative error of ``a`` against the reference ``b`` (Frobenius norms)."""
    return float((a - b).norm() / b.norm())


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_setup(seed=0):
    """A float32 model at the default init, target batches and its source K-FAC precision."""
    model = make_model(dtype=torch.float32, init_B_std=0.0, seed=seed)
    prec = lc.fit_precision(model, make_batches(2, seed=1), structure="kfac", progress=False)
    return model, make_batches(4, seed=2), prec


def byte_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level: every text encodes, one token per byte, EOS (= pad) = 0, no BOS."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(["<eos>", *alphabet])}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
