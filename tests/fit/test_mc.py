"""The Monte-Carlo Fisher estimator is unbiased: it converges to the exact Fisher.

On a tiny vocabulary the exact expectation over labels drawn from the model is computable:
with ``J_{tau,t} = d logits_tau / d (lora_B output)_t`` and ``H_tau = diag(p_tau) - p_tau p_tau^T``,
``E[g_t g_t^T] = sum_tau J_{tau,t}^T H_tau J_{tau,t}`` (labels of different tokens are drawn
independently and the score has mean zero, so cross-token terms vanish).
"""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from helpers import make_batches, make_model, rel
from reference import exact_fisher

#: label draws of the Monte-Carlo fit
MC_SAMPLES = 3000
#: relative Frobenius error allowed after MC_SAMPLES draws (observed 0.014-0.05 over 3 seeds; the
#: empirical Fisher of the same batch is 0.6-2.2 away)
MC_RTOL = 0.1


@pytest.mark.slow  # 2 x MC_SAMPLES label draws, a backward each (minutes on 2 slow cores)
def test_mc_fisher_converges_to_the_exact_fisher():
    model = make_model(init_B_std=0.3)
    batch = make_batches(1, batch_size=1, seq_len=7, seed=5)[0]
    exact = exact_fisher(model, batch)
    kfac = lc.fit_precision(
        model,
        [batch],
        structure="kfac",
        estimator="mc",
        mc_samples=MC_SAMPLES,
        progress=False,
        stats_dtype=torch.float64,
    )
    diag = lc.fit_precision(
        model,
        [batch],
        structure="diag",
        estimator="mc",
        mc_samples=MC_SAMPLES,
        progress=False,
        stats_dtype=torch.float64,
    )
    few = lc.fit_precision(
        model,
        [batch],
        structure="kfac",
        estimator="mc",
        mc_samples=10,
        progress=False,
        stats_dtype=torch.float64,
    )
    for name, ex in exact.items():
        spec = kfac.modules[name]
        assert rel(kfac.grad_cov[name][0], ex["G_h"]) < MC_RTOL
        assert rel(diag.diag[spec.lora_B_name], ex["diag_B"]) < MC_RTOL
        # ten draws are far noisier: the tolerance is not loose enough to pass anything
        assert rel(few.grad_cov[name][0], ex["G_h"]) > rel(kfac.grad_cov[name][0], ex["G_h"])


#: draws per row in the sampler test; frequencies within SAMPLER_ATOL of the probabilities
SAMPLER_DRAWS = 20000
SAMPLER_ATOL = 0.015  # ~4 standard errors of a frequency near 0.5


def test_label_sampler_draws_from_the_softmax():
    from lalora_curv.backends.common import sample_labels

    logits = torch.tensor([[0.0, 1.0, 2.0, -1e4], [3.0, 0.0, 0.0, 0.0]], dtype=torch.float32)
    draws = sample_labels(logits, SAMPLER_DRAWS, torch.Generator().manual_seed(0))
    assert draws.shape == (SAMPLER_DRAWS, 2)
    freq = torch.stack([torch.bincount(draws[:, i], minlength=4) for i in range(2)]).double()
    freq /= SAMPLER_DRAWS
    torch.testing.assert_close(freq, torch.softmax(logits.double(), -1), rtol=0, atol=SAMPLER_ATOL)
    assert freq[0, 3] == 0  # a zero-probability token is never drawn
