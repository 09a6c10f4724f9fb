"""The ``curvlinops`` backend: K-FAC factors from curvlinops' ``KFACLinearOperator``.

curvlinops (Dangel et al.) computes token-level ("expand") K-FAC factors for the ``lora_A``
and ``lora_B`` Linear layers. It has no label masking and no padding mask, so:

* a wrapper module returns only the logits of supervised positions, ``(M, vocab)``, with the
  matching labels ``(M,)``; the loss is ``CrossEntropyLoss(reduction="sum")``, our summed NLL;
* a batch with padding is split into its sequences, each cropped to its real tokens (one
  operator per piece), so padding never reaches an input factor.

Its factors are read through the public ``state_dict()`` (curvlinops 3.0.x) and converted into
our raw sums: the lora_A input covariance (a mean over the piece's positions) times the number
of positions is ``sum_t x_t x_t^T``; the lora_B gradient covariance (``reduction="sum"``,
already averaged over MC samples) divided by ``s^2`` is ``sum_t g_t g_t^T``.
Every K-FAC structure then follows from these two base factors. The type-2 Fisher is not
offered (one backward per vocabulary entry; biased for causal LMs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from lalora_curv.adapter import LoraHandle
from lalora_curv.backends.common import (
    FitRequest,
    SupervisedLogits,
    check_labels,
    derive_seed,
    fit_loop,
    fitting_state,
    hooks_restored,
    only_lora_trainable,
    unpadded_pieces,
)
from lalora_curv.batches import PreparedBatch
from lalora_curv.statistics import LoraStatistics, ModuleSums


def collect_statistics(
    model: nn.Module,
    handles: dict[str, LoraHandle],
    batches: Iterable[Mapping[str, Tensor]],
    request: FitRequest,
) -> LoraStatistics:
    """Base K-FAC sums (``input_cov``, ``grad_cov``) computed by curvlinops."""
    estimator, mc_samples, seed, dtype = (
        request.estimator,
        request.mc_samples,
        request.seed,
        request.dtype,
    )
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac import FisherType, KFACType

    wrapper = SupervisedLogits(model)
    names = {id(m): n for n, m in wrapper.named_modules()}
    params = [p for h in handles.values() for p in (h.lora_A.weight, h.lora_B.weight)]
    fisher_type = {"empirical": FisherType.EMPIRICAL, "mc": FisherType.MC}[estimator]
    sums = {name: ModuleSums() for name in handles}
    device = params[0].device
    pieces_seen = [0]

    def process(batch: PreparedBatch, index: int) -> None:
        for X, y, positions in unpadded_pieces(batch, "curvlinops"):
            check_labels(y, model, index)
            size = X["input_ids"].shape[0]
            operator = KFACLinearOperator(
                wrapper,
                nn.CrossEntropyLoss(reduction="sum"),
                params,
                [(X, y)],
                fisher_type=fisher_type,
                mc_samples=mc_samples if estimator == "mc" else 1,
                kfac_approx=KFACType.EXPAND,
                seed=derive_seed(seed, "piece", pieces_seen[0]) % 2**31,
                num_data=size,
                num_per_example_loss_terms=max(1, y.numel() // size),
                batch_size_fn=lambda X: X["input_ids"].shape[0],
                check_deterministic=False,
            )
            pieces_seen[0] += 1
            operator.compute_kronecker_factors()
            state = operator.state_dict()
            input_covs, grad_covs = state["input_covariances"], state["gradient_covariances"]
            for name, h in handles.items():
                s = h.spec.scaling
                # curvlinops divides the input covariance by num_data * sequence length
                x_cov = input_covs[names[id(h.lora_A)]].to(dtype) * positions
                g_cov = grad_covs[names[id(h.lora_B)]].to(dtype) / s**2
                sums[name].add("input_cov", x_cov)
                sums[name].add("grad_cov", g_cov)

    with fitting_state(model, handles), only_lora_trainable(model, handles), hooks_restored(model):
        stats = fit_loop(batches, process, device, request)
    stats.modules = sums
    return stats
