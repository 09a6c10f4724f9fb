"""Sequential tasks: ``Precision.recentred`` and ``online_laplace`` against dense references."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from helpers import EXACT, fit64, make_batches, make_model, random_delta
from lalora_curv.adapter import find_lora_modules
from reference import merge_jacobian


def moved_mode(prec, seed=1, scale=0.3):
    """Another point of the same adapter, with every lora_B non-zero."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype)
        for n, t in prec.mode.items()
    }


def set_adapter(model, mode):
    with torch.no_grad():
        for h in find_lora_modules(model).values():
            for which in ("A", "B"):
                name = getattr(h.spec, f"lora_{which}_name")
                getattr(h, f"lora_{which}").weight.copy_(mode[name])


@pytest.mark.parametrize("structure", ["diag", "ekfac"])
def test_recentring_a_lora_space_quadratic_keeps_it_and_moves_the_centre(structure):
    model, batches = make_model(), make_batches()
    prec = fit64(model, batches, structure)
    mode = moved_mode(prec)
    moved = prec.recentred(mode)
    torch.testing.assert_close(moved.to_dense(), prec.to_dense(), **EXACT)
    for n, t in mode.items():
        assert torch.equal(moved.mode[n], t)
    # the penalty at mode + d is the old quadratic form of d
    d = random_delta(prec, 3)
    set_adapter(model, {n: mode[n] + d[n] for n in mode})
    torch.testing.assert_close(moved.penalty(model), prec.quad(d), **EXACT)
    assert moved.metadata["recentred"] is True


def test_recentred_kfac_blocks_are_the_merge_jacobian_sandwich_at_the_new_mode():
    """From base-layer factors (G, C) the tri-K-FAC block at (A, B) is J^T (G (x) C) J with J
    the autograd Jacobian of W = s B A at that point: recentring derives it at the new mode."""
    zero = make_model(init_B_std=0.0)
    tri = fit64(zero, make_batches(), "tri-kfac")
    mode = moved_mode(tri)
    moved = tri.recentred(mode)
    P = moved.to_dense()
    offset = 0
    for name, spec in moved.modules.items():
        J = merge_jacobian(mode[spec.lora_A_name], mode[spec.lora_B_name], spec.scaling)
        ref = J.T @ torch.kron(tri.grad_cov[name][0], tri.input_cov[name][0]) @ J
        n, n_a = J.shape[1], spec.rank * spec.in_features
        torch.testing.assert_close(P[offset : offset + n, offset : offset + n], ref, **EXACT)
        # at B0 = 0 the (A, A) block was exactly zero (MATH.md); at B != 0 it is not
        assert tri.to_dense()[offset : offset + n_a, offset : offset + n_a].abs().max() == 0
        assert ref[:n_a, :n_a].abs().max() > 1e-3 * ref[n_a:, n_a:].abs().max()
        offset += n
    assert offset == P.shape[0]


@pytest.mark.parametrize("structure", ["diag", "kfac", "tri-kfac", "merged-kfac", "merged-diag"])
def test_online_laplace_is_the_decayed_count_weighted_sum_at_the_new_mode(structure):
    model, batches = make_model(init_B_std=0.0), make_batches()
    source = fit64(model, batches[:1], structure)
    set_adapter(model, moved_mode(source))  # "after training on task 1"
    task = fit64(model, batches[1:], structure)
    decay = 0.6
    online = lc.online_laplace(source, task, decay=decay)
    n_s, n_t = source.counts["supervised_tokens"], task.counts["supervised_tokens"]
    moved = source.recentred(task.mode)
    for seed in range(3):
        d = random_delta(source, seed)
        ref = (decay * n_s * moved.quad(d) + n_t * task.quad(d)) / (n_s + n_t)
        torch.testing.assert_close(online.quad(d), ref, **EXACT)
    for n, t in task.mode.items():
        assert torch.equal(online.mode[n], t)
    assert online.counts["supervised_tokens"] == n_s + n_t
    assert online.metadata["online"] == [{"decay": decay, "tokens": n_t}]
    assert float(online.penalty(model).detach()) == 0.0  # centred on theta_1


def test_ekfac_has_no_online_update():
    model, batches = make_model(), make_batches()
    a, b = fit64(model, batches[:1], "ekfac"), fit64(model, batches[1:], "ekfac")
    # not the pooling advice for source data ("fit one EKFAC precision on all source batches"),
    # which cannot apply to tasks fitted at different modes
    with pytest.raises(lc.IncompatiblePrecisionError, match="online_laplace has no 'ekfac' update"):
        lc.online_laplace(a, b)


def test_online_chain_of_three_tasks_and_artifact_round_trip(tmp_path):
    model, batches = make_model(init_B_std=0.0), make_batches(n=3)
    prec = fit64(model, batches[:1], "kfac")
    assert prec.metadata["lora_B_init_zero"] is True
    for t, batch in enumerate(batches[1:], start=1):
        set_adapter(model, moved_mode(prec, seed=t, scale=0.1))
        prec = lc.online_laplace(prec, fit64(model, [batch], "kfac"), decay=0.5)
    assert [o["decay"] for o in prec.metadata["online"]] == [0.5, 0.5]
    # statistics of a model with B != 0 are in the sum: it is no longer portable
    assert prec.metadata["lora_B_init_zero"] is False
    with pytest.raises(lc.LaloraError, match="non-zero lora_B"):
        prec.rebase(model)
    loaded = lc.load_precision(lc.save_precision(prec, tmp_path / "online"))
    d = random_delta(prec, 7)
    torch.testing.assert_close(loaded.quad(d), prec.quad(d), **EXACT)
    assert loaded.metadata["online"] == prec.metadata["online"]
    assert loaded.metadata["recentred"] is True


def test_online_laplace_and_recentred_reject_bad_input():
    model, batches = make_model(), make_batches()
    kfac, diag = fit64(model, batches, "kfac"), fit64(model, batches, "diag")
    for bad in (0, 1.5, -0.1, True, "1"):
        with pytest.raises(lc.LaloraError, match="decay must be in"):
            lc.online_laplace(kfac, kfac, decay=bad)
    with pytest.raises(lc.IncompatiblePrecisionError, match="same structure"):
        lc.online_laplace(kfac, diag)
    with pytest.raises(lc.IncompatiblePrecisionError, match="different estimator"):
        lc.online_laplace(kfac, fit64(model, batches, "kfac", estimator="mc"))
    name = kfac.param_names[0]
    with pytest.raises(lc.IncompatiblePrecisionError, match="lacks parameter"):
        kfac.recentred({n: t for n, t in kfac.mode.items() if n != name})
    with pytest.raises(lc.IncompatiblePrecisionError, match="another rank"):
        kfac.recentred({**kfac.mode, name: torch.zeros(2, 2, dtype=torch.float64)})
    with pytest.raises(lc.LaloraError, match="not finite"):
        kfac.recentred({**kfac.mode, name: torch.full_like(kfac.mode[name], float("nan"))})
    other = make_model(targets=("q_proj",))
    with pytest.raises(lc.IncompatiblePrecisionError):
        lc.online_laplace(kfac, fit64(other, batches, "kfac"))
