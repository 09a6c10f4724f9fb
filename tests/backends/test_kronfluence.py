"""kronfluence's K-FAC factor fitting equals ours on the equivalent statistic.

kronfluence is an optional, benchmark-only comparator (``benchmarks/kronfluence_kfac.py``); the
test is skipped without it.
"""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from helpers import make_batches, make_model

pytest.importorskip("kronfluence")
from kronfluence_kfac import KronfluenceKFAC  # benchmarks/ is on pytest's pythonpath


def test_kronfluence_factors_equal_the_hooks_factors():
    """Padding, masked prompts, several modules sharing an input; float64 statistics."""
    model = make_model(init_B_std=0.0)
    batches = make_batches()
    ours = lc.fit_precision(model, batches, progress=False, stats_dtype=torch.float64)
    kf = KronfluenceKFAC(model, batches, "empirical", dtype=torch.float64)
    kf.fit()
    theirs = kf.factors(ours.modules, ours.counts["supervised_tokens"])
    assert set(theirs) == set(ours.modules)
    for name in ours.modules:
        torch.testing.assert_close(theirs[name]["C_x"], ours.input_cov[name][0])
        torch.testing.assert_close(theirs[name]["G_h"], ours.grad_cov[name][0])
    # the normalisations differ: kronfluence divides the gradient sum by positions, not by N
    assert ours.counts["positions"] > ours.counts["supervised_tokens"]
