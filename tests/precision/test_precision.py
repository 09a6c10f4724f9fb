"""Quadratic forms, dense matrices, penalty gradients and the MATH.md identities (float64)."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from helpers import EXACT, fit64, make_batches, make_model, random_delta
from lalora_curv.adapter import find_lora_modules
from reference import merge_jacobian

QUADRATIC = ("diag", "kfac", "tri-kfac", "ekfac")


def flat(prec, delta):
    return torch.cat([delta[n].flatten() for n in prec.param_names])


@pytest.fixture(scope="module")
def kfac_nonzero():
    return fit64(make_model(), make_batches(), "kfac")


@pytest.mark.parametrize("structure", QUADRATIC)
def test_quad_equals_dense_quadratic_form(model, batches, structure):
    prec = fit64(model, batches, structure)
    P = prec.to_dense()
    assert P.shape == (prec.num_params, prec.num_params)
    torch.testing.assert_close(P, P.T, **EXACT)
    for seed in range(3):
        d = random_delta(prec, seed)
        v = flat(prec, d)
        torch.testing.assert_close(prec.quad(d), v @ P @ v, **EXACT)


def test_tri_kfac_dense_is_merge_jacobian_sandwich(kfac_nonzero):
    """B-TRI-K-FAC = J^T (G_h (x) C_x) J with J the autograd Jacobian of W = s B A."""
    tri = kfac_nonzero.with_structure("tri-kfac")
    kfac = kfac_nonzero
    P_tri, P_kfac = tri.to_dense(), kfac.to_dense()
    offset = 0
    for name, spec in tri.modules.items():
        A0, B0 = tri.mode[spec.lora_A_name], tri.mode[spec.lora_B_name]
        J = merge_jacobian(A0, B0, spec.scaling)
        base = torch.kron(tri.grad_cov[name][0], tri.input_cov[name][0])  # row-major vec(W)
        ref = J.T @ base @ J
        n_a, n = spec.rank * spec.in_features, J.shape[1]
        block = P_tri[offset : offset + n, offset : offset + n]
        torch.testing.assert_close(block, ref, **EXACT)
        # B-K-FAC is the block-diagonal part of the same matrix
        ref_kfac = ref.clone()
        ref_kfac[:n_a, n_a:] = 0
        ref_kfac[n_a:, :n_a] = 0
        torch.testing.assert_close(
            P_kfac[offset : offset + n, offset : offset + n], ref_kfac, **EXACT
        )
        assert ref[:n_a, n_a:].abs().max() > 1e-8  # the cross block is really non-zero
        offset += n
    assert offset == P_tri.shape[0]


@pytest.mark.parametrize("structure", [*QUADRATIC, "merged-kfac", "merged-diag"])  # all
def test_penalty_gradient_matches_autograd_of_reference(model, batches, structure):
    prec = fit64(model, batches, structure)
    handles = find_lora_modules(model)
    d = random_delta(prec, 1, scale=0.1)
    with torch.no_grad():
        for h in handles.values():
            h.lora_A.weight += d[h.spec.lora_A_name]
            h.lora_B.weight += d[h.spec.lora_B_name]
    params = prec.adapter_params(model)
    r = prec.penalty(model)
    grads = torch.autograd.grad(r, [params[n] for n in prec.param_names])
    got = torch.cat([g.flatten() for g in grads])
    if prec.quadratic:
        P = prec.to_dense()
        v = flat(prec, d)
        torch.testing.assert_close(r, v @ P @ v, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got, 2 * P @ v, rtol=1e-8, atol=1e-12)
    else:  # degree 4: autograd through an independent dense evaluation of the definition
        theta = flat(prec, {n: params[n].detach() for n in prec.param_names}).requires_grad_(True)
        ref = merged_reference(prec, theta)
        (ref_grad,) = torch.autograd.grad(ref, theta)
        torch.testing.assert_close(r, ref, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got, ref_grad, rtol=1e-8, atol=1e-12)


def merged_reference(prec, theta):
    """sum over modules of vec(dW)^T M vec(dW), dW = s (B A - B0 A0), M dense."""
    total, offset = 0.0, 0
    for name, spec in prec.modules.items():
        n_a, n_b = spec.rank * spec.in_features, spec.out_features * spec.rank
        A = theta[offset : offset + n_a].view(spec.rank, spec.in_features)
        B = theta[offset + n_a : offset + n_a + n_b].view(spec.out_features, spec.rank)
        offset += n_a + n_b
        A0, B0 = prec.mode[spec.lora_A_name], prec.mode[spec.lora_B_name]
        dW = (spec.scaling * (B @ A - B0 @ A0)).flatten()
        if prec.structure == "merged-kfac":
            M = torch.kron(prec.grad_cov[name][0], prec.input_cov[name][0])
        else:
            M = torch.diag(prec.weight_diag[name].flatten())
        total = total + dW @ M @ dW
    return total


def test_merged_kfac_equals_tri_kfac_to_first_order(kfac_nonzero):
    """merged = tri + O(eps^3): the relative gap shrinks linearly with the displacement."""
    tri = kfac_nonzero.with_structure("tri-kfac")
    merged = kfac_nonzero.with_structure("merged-kfac")
    gaps = []
    for eps in (1e-1, 1e-2, 1e-3):
        d = random_delta(tri, 2, scale=eps)
        q_tri, q_merged = tri.quad(d), merged.quad(d)
        gaps.append(float((q_merged - q_tri).abs() / q_tri))
    assert gaps[0] > 1e-4  # they do differ at finite displacement
    assert 5 < gaps[0] / gaps[1] < 20 and 5 < gaps[1] / gaps[2] < 20


def test_merged_kfac_equals_kfac_at_default_init(zero_init_model, batches):
    """At B0 = 0 and A = A0: merged-kfac == kfac == tri-kfac exactly."""
    kfac = fit64(zero_init_model, batches, "kfac")
    d = random_delta(kfac, 3)
    d = {n: (t if "lora_B" in n else torch.zeros_like(t)) for n, t in d.items()}
    for other in ("tri-kfac", "merged-kfac"):
        torch.testing.assert_close(kfac.with_structure(other).quad(d), kfac.quad(d), **EXACT)
    assert kfac.quad(d) > 0


def test_merged_kfac_is_gauge_invariant(kfac_nonzero):
    """r_W depends on (A, B) only through B A: (B M, M^-1 A) has the same penalty."""
    merged = kfac_nonzero.with_structure("merged-kfac")
    tri = kfac_nonzero.with_structure("tri-kfac")
    d = random_delta(merged, 4, scale=0.3)
    g = torch.Generator().manual_seed(0)
    moved = {}
    for spec in merged.modules.values():
        r = spec.rank
        M = torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(
            r, r, generator=g, dtype=torch.float64
        )
        A = merged.mode[spec.lora_A_name] + d[spec.lora_A_name]
        B = merged.mode[spec.lora_B_name] + d[spec.lora_B_name]
        moved[spec.lora_A_name] = torch.linalg.solve(M, A) - merged.mode[spec.lora_A_name]
        moved[spec.lora_B_name] = B @ M - merged.mode[spec.lora_B_name]
    torch.testing.assert_close(merged.quad(moved), merged.quad(d), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(tri.quad(moved), tri.quad(d))  # the linearisation is not


def test_scaling_and_pooling(batches):
    model = make_model()
    a = fit64(model, batches[:1], "kfac")
    b = fit64(model, batches[1:], "kfac")
    both = a + b
    na, nb = a.counts["supervised_tokens"], b.counts["supervised_tokens"]
    assert both.counts["supervised_tokens"] == na + nb
    assert both.counts["batches"] == 2 and len(both.weights) == 2
    for seed in range(2):
        d = random_delta(a, seed)
        torch.testing.assert_close(
            both.quad(d), (na * a.quad(d) + nb * b.quad(d)) / (na + nb), **EXACT
        )
        torch.testing.assert_close((0.5 * a).quad(d), 0.5 * a.quad(d), **EXACT)
        torch.testing.assert_close((a * 2).quad(d), 2 * a.quad(d), **EXACT)
    P = both.to_dense()
    torch.testing.assert_close(P, (na * a.to_dense() + nb * b.to_dense()) / (na + nb), **EXACT)
    assert (0.5 * a).metadata["scale"] == 0.5
    assert (0.5 * a + 0.5 * b).metadata["scale"] == 0.5
    assert (0.5 * a + b).metadata["scale"] is None  # mixed scales have no single factor


@pytest.mark.parametrize("structure", ["diag", "merged-diag"])
def test_pooled_diagonal_equals_fit_on_union(batches, structure):
    model = make_model()
    a = fit64(model, batches[:1], structure)
    b = fit64(model, batches[1:], structure)
    union = fit64(model, batches, structure)
    for k, t in union.structure_tensors().items():
        torch.testing.assert_close((a + b).structure_tensors()[k], t, **EXACT)
    assert (a + b).counts == union.counts


@pytest.mark.parametrize("structure", ["diag", "kfac", "merged-kfac"])
def test_fit_pooled_precision_is_the_token_weighted_sum_of_one_fit_per_source(batches, structure):
    model = make_model()
    a, b = fit64(model, batches[:1], structure), fit64(model, batches[1:], structure)
    pooled = lc.fit_pooled_precision(
        model, {"a": batches[:1], "b": batches[1:]}, structure, stats_dtype=torch.float64,
        progress=False,
    )  # fmt: skip
    na, nb = a.counts["supervised_tokens"], b.counts["supervised_tokens"]
    for seed in range(2):  # (merged-kfac has no dense matrix: its quadratic form is quartic)
        d = random_delta(a, seed)
        want = (na * a.quad(d) + nb * b.quad(d)) / (na + nb)
        torch.testing.assert_close(pooled.quad(d), want, **EXACT)
    assert pooled.metadata["sources"] == ["a", "b"] and pooled.counts == (a + b).counts


def test_ekfac_does_not_pool_so_fit_pooled_precision_fits_it_once_on_every_source(batches):
    """Two EKFAC fits have two eigenbases: ``+`` refuses, the pooled fit is one fit on all."""
    model = make_model()
    a, b = fit64(model, batches[:1], "ekfac"), fit64(model, batches[1:], "ekfac")
    assert not lc.EKFACPrecision.poolable and lc.KFACPrecision.poolable
    with pytest.raises(lc.IncompatiblePrecisionError, match="different eigenbases"):
        a + b
    pooled = lc.fit_pooled_precision(
        model, {"a": batches[:1], "b": batches[1:]}, "ekfac", stats_dtype=torch.float64,
        progress=False,
    )  # fmt: skip
    union = fit64(model, batches, "ekfac")
    torch.testing.assert_close(pooled.to_dense(), union.to_dense(), **EXACT)
    assert pooled.metadata["sources"] == ["a", "b"]
    assert pooled.counts["supervised_tokens"] == (
        a.counts["supervised_tokens"] + b.counts["supervised_tokens"]
    )


def test_fit_pooled_precision_refuses_what_it_cannot_honour(batches):
    model = make_model()
    for kw, match in (
        ({"sources": ["x"]}, "no 'sources'"),
        ({"max_batches": 1}, "no 'max_batches'"),
    ):
        with pytest.raises(lc.LaloraError, match=match):
            lc.fit_pooled_precision(model, {"a": batches}, "kfac", progress=False, **kw)
    with pytest.raises(lc.LaloraError, match="batches_by_source is empty"):
        lc.fit_pooled_precision(model, {}, "kfac")
    with pytest.raises(lc.LaloraError, match="structure"):
        lc.fit_pooled_precision(model, {"a": batches}, "blockdiag", progress=False)


def test_incompatible_sums_raise(batches):
    model = make_model()
    k = fit64(model, batches, "kfac")
    with pytest.raises(lc.IncompatiblePrecisionError, match="'diag' precision to a 'kfac'"):
        k + fit64(model, batches, "diag")
    with pytest.raises(lc.IncompatiblePrecisionError, match="different estimator"):
        k + fit64(model, batches, "kfac", estimator="mc")
    other = make_model(targets=("q_proj", "k_proj"))
    with pytest.raises(lc.IncompatiblePrecisionError, match="different modules"):
        k + fit64(other, batches, "kfac")
    reseeded = make_model(seed=0)
    with torch.no_grad():
        next(iter(find_lora_modules(reseeded).values())).lora_A.weight.add_(1.0)
    with pytest.raises(lc.IncompatiblePrecisionError, match="different modes"):
        k + fit64(reseeded, batches, "kfac")
    with pytest.raises(lc.LaloraError, match=">= 0"):
        -1.0 * k


def test_token_and_sequence_diagonals_do_not_pool(batches):
    """Squares of per-token and of per-sequence gradients are different statistics: a sum (or
    an online update) of one with the other is refused, not silently averaged."""
    model = make_model()
    token = fit64(model, batches, "diag")
    sequence = fit64(model, batches, "diag", granularity="sequence")
    assert token.metadata["granularity"] == "token"
    assert sequence.metadata["granularity"] == "sequence"
    assert not torch.allclose(token.diag[token.param_names[0]], sequence.diag[token.param_names[0]])
    for pool in (lambda: token + sequence, lambda: lc.online_laplace(sequence, token)):
        with pytest.raises(lc.IncompatiblePrecisionError, match="different granularity"):
            pool()
    same = fit64(model, batches, "diag", granularity="sequence")
    assert (sequence + same).metadata["granularity"] == "sequence"


@pytest.mark.parametrize("structure", ["kfac", "tri-kfac", "merged-kfac", "merged-diag"])
def test_rebase_serves_another_rank_alpha_and_seed(batches, structure):
    """At B0 = 0 the base factors do not depend on the adapter: a fit on a rank-3 adapter,
    re-based onto a rank-5 adapter with another alpha and seed, equals a fit on that adapter."""
    small = make_model(init_B_std=0.0, r=3, alpha=6.0, seed=0)
    big = make_model(init_B_std=0.0, r=5, alpha=20.0, seed=0)
    with torch.no_grad():  # same base weights, other LoRA init
        for h in find_lora_modules(big).values():
            h.lora_A.weight.normal_(0, 0.5)
    rebased = fit64(small, batches, structure).rebase(big)
    direct = fit64(big, batches, structure)
    assert rebased.modules == direct.modules and rebased.metadata["rebased"] is True
    d = random_delta(direct, 5, scale=0.2)
    torch.testing.assert_close(rebased.quad(d), direct.quad(d), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rebased.penalty(big), direct.penalty(big), rtol=1e-9, atol=1e-12)
    assert rebased.metadata["adapter"]["r"] == 5


@pytest.mark.parametrize("structure", ["kfac", "merged-diag"])
def test_rebase_onto_a_nonzero_b0_adapter_keeps_the_precision_portable(batches, structure):
    """The B0 = 0 flag describes where the statistics were measured, not the new mode: a fit at
    B0 = 0 re-based onto a B0 != 0 adapter (PiSSA-like) re-bases again onto any adapter, and
    equals the direct re-base there."""
    prec = fit64(make_model(init_B_std=0.0), batches, structure)
    nonzero, other = make_model(init_B_std=0.3, seed=1), make_model(init_B_std=0.0, seed=2)
    assert prec.metadata["lora_B_init_zero"] is True
    via = prec.rebase(nonzero)
    assert via.metadata["lora_B_init_zero"] is True
    assert (via + prec.rebase(nonzero)).metadata["lora_B_init_zero"] is True
    again, direct = via.rebase(other), prec.rebase(other)
    d = random_delta(direct, 3, scale=0.2)
    torch.testing.assert_close(again.quad(d), direct.quad(d), rtol=1e-12, atol=0)
    # a fit at B0 != 0 still cannot move
    with pytest.raises(lc.LaloraError, match="non-zero lora_B"):
        fit64(nonzero, batches, structure).rebase(other)


def test_diag_cannot_rebase(model, batches):
    with pytest.raises(lc.LaloraError, match="cannot be re-based"):
        fit64(model, batches, "diag").rebase(model)


def test_merged_structures_have_no_dense_matrix(kfac_nonzero):
    with pytest.raises(lc.LaloraError, match="degree 4"):
        kfac_nonzero.with_structure("merged-kfac").to_dense()


def test_penalty_is_zero_at_the_mode_and_positive_away(model, batches):
    for structure in lc.STRUCTURES:
        prec = fit64(model, batches, structure)
        assert float(prec.penalty(model).detach()) == 0.0
        assert float(prec.quad(random_delta(prec, 0))) > 0


def test_quad_rejects_bad_deltas(kfac_nonzero):
    d = random_delta(kfac_nonzero)
    name = kfac_nonzero.param_names[0]
    with pytest.raises(lc.LaloraError, match="lacks parameter"):
        kfac_nonzero.quad({k: v for k, v in d.items() if k != name})
    with pytest.raises(lc.LaloraError, match="does not cover"):
        kfac_nonzero.quad({**d, "foo.lora_A.weight": torch.zeros(1)})
    with pytest.raises(lc.LaloraError, match="has shape"):
        kfac_nonzero.quad({**d, name: torch.zeros(2, 2, dtype=torch.float64)})


@pytest.mark.parametrize("init_B_std", [0.0, 0.3])
@pytest.mark.parametrize("structure", ["diag", "kfac", "tri-kfac", "ekfac"])
def test_trace_equals_the_dense_trace(batches, structure, init_B_std):
    model = make_model(init_B_std=init_B_std)
    prec = fit64(model, batches[:1], structure)
    if structure != "ekfac":  # pooled: K = 2 components for the K-FAC family
        prec = prec + fit64(model, batches[1:], structure)
    dense = float(prec.to_dense().diagonal().sum())
    assert prec.trace() == pytest.approx(dense, rel=1e-10)
    assert sum(prec.module_trace(n) for n in prec.modules) == pytest.approx(prec.trace())


def test_merged_traces_are_over_the_merged_update(kfac_nonzero, batches, model):
    """merged-kfac: tr(sum_k w_k G_k (x) C_k); merged-diag: sum of D_W."""
    merged = kfac_nonzero.with_structure("merged-kfac")
    want = sum(
        w * torch.trace(torch.kron(merged.grad_cov[n][k], merged.input_cov[n][k]))
        for n in merged.modules
        for k, w in enumerate(merged.weights)
    )
    assert merged.trace() == pytest.approx(float(want), rel=1e-10)
    md = lc.fit_precision(model, batches, structure="merged-diag", progress=False)
    assert md.trace() == pytest.approx(float(sum(t.sum() for t in md.weight_diag.values())))
