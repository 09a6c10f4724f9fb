"""Shared fixtures: tiny float64 Llama + peft models and batches with padding and masking
(built by helpers.make_model and helpers.make_batches)."""

from __future__ import annotations

import logging

import pytest

from helpers import make_batches, make_model


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
