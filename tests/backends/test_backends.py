"""Backends agree with each other, and with laplace-torch's exact FullLaplace (float64)."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from helpers import fit64, make_batches, make_model, rel
from lalora_curv.adapter import find_lora_modules
from lalora_curv.exact import exact_curvature
from lalora_curv.export import to_laplace
from reference import exact_fisher

pytest.importorskip("curvlinops")
pytest.importorskip("backpack")
pytest.importorskip("laplace")

#: agreement between backends computing the same statistic
AGREE = 1e-6
#: label draws and tolerance where a Monte-Carlo estimate meets an exact reference
MC_SAMPLES = 2000
MC_RTOL = 0.12  # observed: K-FAC grad factor 0.046-0.047, per-sequence diag 0.015-0.040


@pytest.mark.parametrize("backend", ["curvlinops", "laplace"])
def test_kfac_backends_equal_hooks_on_the_empirical_fisher(model, batches, backend):
    """Padding, masked prompts and a non-zero B0 included."""
    ref = fit64(model, batches, structure="kfac")
    got = fit64(model, batches, structure="kfac", backend=backend)
    assert got.counts == ref.counts and got.metadata["backend"] == backend
    for name in ref.modules:
        assert rel(got.input_cov[name], ref.input_cov[name]) < AGREE
        assert rel(got.grad_cov[name], ref.grad_cov[name]) < AGREE
    d = {n: torch.randn_like(t) for n, t in ref.mode.items()}
    for structure in ("tri-kfac", "merged-kfac"):
        q_ref = ref.with_structure(structure).quad(d)
        assert abs(float(got.with_structure(structure).quad(d) - q_ref)) < AGREE * abs(float(q_ref))


@pytest.mark.parametrize("estimator", ["empirical", "mc"])
def test_backpack_equals_hooks_per_sequence_diag(model, batches, estimator):
    kw = {"estimator": estimator, "mc_samples": 3 if estimator == "mc" else 1, "seed": 5}
    ref = fit64(model, batches, structure="diag", granularity="sequence", **kw)
    got = fit64(model, batches, structure="diag", backend="backpack", **kw)
    assert got.metadata["granularity"] == "sequence"
    for name in ref.param_names:
        assert rel(got.diag[name], ref.diag[name]) < AGREE


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_backpack_second_order_cannot_run_on_peft_lora():
    """Canary: why DiagGGN is not offered. If BackPACK learns to run it through a peft LoRA
    layer, this fails, and the backend should offer it."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact
    from peft import LoraConfig, get_peft_model

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = (
                torch.nn.Linear(8, 16),
                torch.nn.ReLU(),
                torch.nn.Linear(16, 5),
            )

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["fc1", "fc2"])).base_model.model
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    for use_converter in (False, True):
        with pytest.raises(Exception, match=r"does not have an extension|control flow"):
            extended = extend(model, use_converter=use_converter)
            with backpack(DiagGGNExact()):
                loss_fn(extended(x), y).backward()


def test_backpack_leaves_no_trace(model, batches):
    handles = find_lora_modules(model)
    first = next(iter(handles.values()))
    first.lora_B.weight.grad = torch.ones_like(first.lora_B.weight)
    fit64(model, batches, structure="diag", backend="backpack")
    for h in handles.values():
        for m in (h.lora_A, h.lora_B):
            assert not m._forward_hooks and not m._backward_hooks
            assert not hasattr(m, "_backpack_extend") and not hasattr(m, "output")
            assert not hasattr(m.weight, "sum_grad_squared")
    assert torch.equal(first.lora_B.weight.grad, torch.ones_like(first.lora_B.weight))


@pytest.mark.slow  # MC_SAMPLES label draws through curvlinops / laplace-torch
@pytest.mark.parametrize("backend", ["curvlinops", "laplace"])
def test_mc_backends_converge_to_the_exact_fisher(backend):
    model = make_model()
    batch = make_batches(1, batch_size=1, seq_len=7, seed=5)[0]
    exact = exact_fisher(model, batch)
    got = fit64(
        model, [batch], structure="kfac", backend=backend, estimator="mc", mc_samples=MC_SAMPLES
    )
    for name, ex in exact.items():
        assert rel(got.grad_cov[name][0], ex["G_h"]) < MC_RTOL


def one_supervised_token_per_sequence(seed):
    batches = make_batches(2, batch_size=3, seq_len=8, seed=seed)
    for b in batches:
        keep = torch.zeros_like(b["labels"], dtype=torch.bool)
        keep[:, 5] = True
        b["labels"] = b["labels"].masked_fill(~keep, -100)
        b["attention_mask"][:] = 1
    return batches


def test_per_sequence_diag_is_the_diagonal_of_laplace_torch_full_ef(model):
    """With one supervised token per sequence, a sequence's gradient is its token's, so the
    per-sequence diagonal is exactly the diagonal of the (token) empirical Fisher."""
    batches = one_supervised_token_per_sequence(seed=2)
    H = exact_curvature(model, batches, "ef")
    prec = fit64(model, batches, structure="diag", granularity="sequence")
    diag = torch.cat([prec.diag[n].flatten() for n in prec.param_names])
    exact = torch.diagonal(H)
    # float64 round-off is relative to the largest entries (the sums cancel): on some CPUs
    # entries 1e-5 of the largest differ by 1e-6 relative, 7e-11 of the largest
    scale = exact.abs().max().item()
    torch.testing.assert_close(diag, exact, rtol=AGREE, atol=1e-9 * scale)


@pytest.mark.slow  # MC_SAMPLES label draws per token
def test_mc_per_sequence_diag_converges_to_laplace_torch_exact_ggn(model):
    """E[(sum_t grad l_t(y ~ p))^2] = diag(GGN): cross-token terms vanish in expectation."""
    batches = make_batches(1, batch_size=2, seq_len=6, seed=3)
    H = exact_curvature(model, batches, "ggn")
    prec = fit64(
        model,
        batches,
        structure="diag",
        granularity="sequence",
        estimator="mc",
        mc_samples=MC_SAMPLES,
    )
    diag = torch.cat([prec.diag[n].flatten() for n in prec.param_names])
    assert rel(diag, torch.diagonal(H)) < MC_RTOL
    empirical = fit64(model, batches, structure="diag", granularity="sequence")
    emp = torch.cat([empirical.diag[n].flatten() for n in empirical.param_names])
    assert rel(emp, torch.diagonal(H)) > 2 * MC_RTOL  # the check can tell estimators apart


def test_ekfac_equals_curvlinops_ekfac_where_they_coincide():
    """curvlinops' EKFAC corrects eigenvalues with per-sequence gradients, ours with per-token
    ones; with one supervised token per sequence of two tokens they are the same gradient."""
    from curvlinops import EKFACLinearOperator

    from lalora_curv.backends.curvlinops import SupervisedLogits

    model = make_model()
    batches = make_batches(2, batch_size=4, seq_len=2, seed=7)
    for b in batches:
        b["attention_mask"][:] = 1
        b["labels"][:, 0] = -100
        b["labels"][:, 1] = b["input_ids"][:, 1]
    prec = fit64(model, batches, structure="ekfac")
    params = [
        p for h in find_lora_modules(model).values() for p in (h.lora_A.weight, h.lora_B.weight)
    ]
    data = []
    for b in batches:
        sup = torch.zeros(4, 1, dtype=torch.bool) | True
        data.append(
            (
                {
                    "input_ids": b["input_ids"],
                    "attention_mask": b["attention_mask"],
                    "supervised": sup,
                },
                b["labels"][:, 1],
            )
        )
    op = EKFACLinearOperator(
        SupervisedLogits(model),
        torch.nn.CrossEntropyLoss(reduction="sum"),
        params,
        data,
        fisher_type="empirical",
        num_per_example_loss_terms=1,
        batch_size_fn=lambda X: X["input_ids"].shape[0],
        check_deterministic=False,
    )
    dense = op @ torch.eye(op.shape[1], dtype=torch.float64)
    n = prec.counts["supervised_tokens"]
    assert rel(torch.as_tensor(dense) / n, prec.to_dense()) < AGREE


@pytest.mark.parametrize("structure", ["kfac", "diag", "tri-kfac"])
def test_export_to_laplace_torch(model, batches, structure):
    prec = fit64(model, batches, structure=structure)
    with pytest.warns(UserWarning, match="lacks the data-fit term"):
        la = to_laplace(prec, model, prior_precision=0.5)
    n = prec.counts["supervised_tokens"]
    expected = n * prec.to_dense() + 0.5 * torch.eye(prec.num_params, dtype=torch.float64)
    P = la.posterior_precision
    P = P.to_matrix() if hasattr(P, "to_matrix") else (torch.diag(P) if P.ndim == 1 else P)
    torch.testing.assert_close(P, expected, rtol=1e-8, atol=1e-10)
    params = prec.adapter_params(model)
    torch.testing.assert_close(
        la.mean, torch.cat([params[k].detach().flatten() for k in prec.param_names])
    )
    assert all(p.requires_grad for p in params.values())


def test_export_refuses_what_laplace_cannot_hold(model, batches):
    k = fit64(model, batches, structure="kfac")
    with pytest.raises(lc.LaloraError, match="no laplace-torch counterpart"):
        to_laplace(k.with_structure("merged-kfac"), model)
    with pytest.raises(lc.LaloraError, match="sum of Kronecker products"):
        to_laplace(k + k, model)


def padded_with_an_unsupervised_row(dtype=torch.float64):
    batches = make_batches(2, seed=4)
    batches[0]["labels"][1] = -100  # a padded batch whose second sequence has no loss term
    return batches


@pytest.mark.parametrize("backend", ["curvlinops", "laplace"])
def test_kfac_backends_count_unsupervised_sequences_like_hooks(model, backend):
    batches = padded_with_an_unsupervised_row()
    assert not bool(batches[0]["attention_mask"].all())
    ref = fit64(model, batches, structure="kfac")
    got = fit64(model, batches, structure="kfac", backend=backend)
    for name in ref.modules:
        assert rel(got.input_cov[name], ref.input_cov[name]) < AGREE
        assert rel(got.grad_cov[name], ref.grad_cov[name]) < AGREE


@pytest.mark.parametrize("backend", ["curvlinops", "laplace"])
def test_kfac_backends_handle_left_padding(backend):
    model = make_model(dtype=torch.float32)  # eager attention: NaN on masked rows in float64
    batches = make_batches(2, seed=6)
    for b in batches:  # turn right padding into left padding
        for key in b:
            b[key] = torch.stack(
                [
                    torch.roll(row, int((m == 0).sum()))
                    for row, m in zip(b[key], b["attention_mask"], strict=True)
                ]
            )
    assert not bool(batches[0]["attention_mask"][:, 0].all())
    ref = lc.fit_precision(model, batches, structure="kfac", progress=False)
    got = lc.fit_precision(model, batches, structure="kfac", backend=backend, progress=False)
    for name in ref.modules:
        assert rel(got.input_cov[name], ref.input_cov[name]) < 1e-4
        assert rel(got.grad_cov[name], ref.grad_cov[name]) < 1e-4


def test_backpack_with_trainable_base_and_input_gradients(batches):
    model = make_model()
    model.enable_input_require_grads()
    model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(lc.LaloraError, match="lm_head"):  # trained but not penalised: named
        fit64(model, batches, structure="diag", granularity="sequence")
    kw = {"allow_unpenalised": True}
    ref = fit64(model, batches, structure="diag", granularity="sequence", **kw)
    got = fit64(model, batches, structure="diag", backend="backpack", **kw)
    assert got.metadata["unpenalised"] == ["base_model.model.lm_head.weight"]
    for name in ref.param_names:
        assert rel(got.diag[name], ref.diag[name]) < AGREE
    assert model.base_model.model.lm_head.weight.grad is None
    assert model.base_model.model.lm_head.weight.requires_grad


@pytest.mark.parametrize("backend", ["curvlinops", "laplace", "backpack"])
def test_upstream_hooks_removed_when_a_fit_fails(model, batches, backend):
    calls = []

    def fail_on_second_forward(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    counts = {
        m: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    }
    handle = model.base_model.model.model.register_forward_pre_hook(fail_on_second_forward)
    structure = "diag" if backend == "backpack" else "kfac"
    with pytest.raises(RuntimeError, match="boom"):
        fit64(model, batches, structure=structure, backend=backend)
    handle.remove()
    after = {
        m: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    }
    assert after == counts
    assert all(p.grad is None for p in model.parameters())


def test_piece_seeds_do_not_overlap_between_neighbouring_seeds():
    from lalora_curv.backends.common import derive_seed

    seeds = {derive_seed(s, "piece", k) for s in range(20) for k in range(20)}
    assert len(seeds) == 400


def test_laplace_backend_states_laplace_torch_limitations(model, batches):
    from lalora_curv.backends import laplace as backend

    backend._WARNED[0] = False
    with pytest.warns(UserWarning, match="rescales each batch's input factor by len"):
        fit64(model, batches, structure="kfac", backend="laplace")


def test_curvlinops_still_exposes_the_factors_the_backend_reads():
    """The curvlinops backend reads ``KFACLinearOperator.state_dict()``'s
    ``input_covariances`` and ``gradient_covariances`` (curvlinops 3.0's public state; later
    versions drop them, hence the pin ``<3.1``): if an upgrade changes that, this fails first,
    by name."""
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    X, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    op = KFACLinearOperator(
        net, torch.nn.CrossEntropyLoss(reduction="sum"), list(net.parameters()), [(X, y)],
        check_deterministic=False,
    )  # fmt: skip
    op.compute_kronecker_factors()
    state = op.state_dict()
    assert {"input_covariances", "gradient_covariances"} <= set(state), sorted(state)
    assert set(state["input_covariances"]) == {"0"} and set(state["gradient_covariances"]) == {"0"}
    # the input factor of a bias-carrying layer is (in + 1)^2: its last row is the bias's
    assert state["input_covariances"]["0"].shape in ((3, 3), (4, 4))
