"""Shared fixtures: tiny float64 Llama + peft models and batches with padding and masking."""

from __future__ import annotations

import logging

import pytest
import torch

from lalora_curv.toy import add_lora, random_batches, tiny_llama

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


@pytest.fixture
def model():
    """LoRA on q, v and down_proj with a non-zero B0, so every block is non-zero."""
    return make_model()


@pytest.fixture
def zero_init_model():
    """The default peft init: B0 = 0."""
    return make_model(init_B_std=0.0)


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("lalora_curv").setLevel(logging.INFO)
    yield
