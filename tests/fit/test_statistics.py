"""Hooks-backend statistics against brute force from per-token autograd gradients (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

import lalora_curv as lc
from helpers import EXACT, fit64, make_batches, make_model
from lalora_curv.adapter import find_lora_modules
from reference import batch_grad_squared, brute_force, counts, token_data


def test_reference_per_token_gradients_sum_to_autograd(model, batches):
    """The reference's per-token gradients add up to the model's real parameter gradient."""
    ref = brute_force(model, batches[:1])
    handles = find_lora_modules(model)
    from reference import summed_nll

    b = batches[0]
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    params = [p for h in handles.values() for p in (h.lora_A.weight, h.lora_B.weight)]
    grads = torch.autograd.grad(summed_nll(logits, b), params)
    for i, name in enumerate(handles):
        torch.testing.assert_close(ref[name]["grad_A_sum"], grads[2 * i], **EXACT)
        torch.testing.assert_close(ref[name]["grad_B_sum"], grads[2 * i + 1], **EXACT)


def test_kfac_base_factors_match_brute_force(model, batches):
    prec = fit64(model, batches, "kfac")
    ref = brute_force(model, batches)
    for name in prec.modules:
        torch.testing.assert_close(prec.input_cov[name][0], ref[name]["C_x"], **EXACT)
        torch.testing.assert_close(prec.grad_cov[name][0], ref[name]["G_h"], **EXACT)
        assert ref[name]["G_h"].abs().max() > 1e-6  # a real, non-trivial check


def test_derived_lora_blocks_match_their_definitions(model, batches):
    """MATH.md consequence 2: every LoRA factor follows from C_x, G_h and (A0, B0, s)."""
    prec = fit64(model, batches, "tri-kfac")
    ref = brute_force(model, batches)
    for name in prec.modules:
        b = prec.blocks(name)
        r = ref[name]
        torch.testing.assert_close(b.lora_B_input_cov[0], r["C_u"], **EXACT)
        torch.testing.assert_close(b.cross_input_cov[0], r["C_xu"], **EXACT)
        torch.testing.assert_close(b.lora_B_grad_cov[0], r["G_B"], **EXACT)
        torch.testing.assert_close(b.lora_A_grad_cov[0], r["G_AA"], **EXACT)
        torch.testing.assert_close(b.cross_grad_cov[0], r["G_AB"], **EXACT)
        assert not b.b0_zero and r["G_AA"].abs().max() > 1e-8 and r["G_AB"].abs().max() > 1e-8


def test_per_token_diag_matches_brute_force(model, batches):
    prec = fit64(model, batches, "diag")
    ref = brute_force(model, batches)
    for name, spec in prec.modules.items():
        torch.testing.assert_close(prec.diag[spec.lora_A_name], ref[name]["diag_A"], **EXACT)
        torch.testing.assert_close(prec.diag[spec.lora_B_name], ref[name]["diag_B"], **EXACT)
        assert ref[name]["diag_A"].max() > 0


def test_per_sequence_diag_matches_brute_force(model, batches):
    prec = fit64(model, batches, "diag", granularity="sequence")
    ref = brute_force(model, batches)
    for name, spec in prec.modules.items():
        torch.testing.assert_close(prec.diag[spec.lora_A_name], ref[name]["seq_diag_A"], **EXACT)
        torch.testing.assert_close(prec.diag[spec.lora_B_name], ref[name]["seq_diag_B"], **EXACT)
    assert prec.metadata["granularity"] == "sequence"
    token = fit64(model, batches, "diag")
    name = prec.param_names[1]
    assert not torch.allclose(prec.diag[name], token.diag[name])  # a different statistic


def test_merged_diag_matches_brute_force(model, batches):
    prec = fit64(model, batches, "merged-diag")
    ref = brute_force(model, batches)
    for name in prec.modules:
        torch.testing.assert_close(prec.weight_diag[name], ref[name]["weight_diag"], **EXACT)


def test_batch_grad_squared_matches_autograd(model, batches):
    prec = fit64(model, batches, "diag", estimator="batch-grad-squared")
    ref = batch_grad_squared(model, batches)
    for name, value in ref.items():
        torch.testing.assert_close(prec.diag[name], value, **EXACT)


def test_ekfac_matches_its_definition(model, batches):
    """Eigenbases of the brute-force K-FAC factors; eigenvalues = mean squared per-token
    gradients in that basis."""
    prec = fit64(model, batches, "ekfac")
    ref = brute_force(model, batches)
    _, n_sup = counts(batches)
    per_token = {}
    for batch in batches:
        for name, d in token_data(model, batch).items():
            per_token.setdefault(name, []).append(d)
    blocks = []
    for name in prec.modules:
        r = ref[name]
        data = per_token[name]
        x, u = torch.cat([d.x for d in data]), torch.cat([d.u for d in data])
        g_A, g_B = torch.cat([d.g_A for d in data]), torch.cat([d.g_B for d in data])
        for a, g, C, G in ((x, g_A, r["C_x"], r["G_AA"]), (u, g_B, r["C_u"], r["G_B"])):
            Qa, Qg = torch.linalg.eigh(C)[1], torch.linalg.eigh(G)[1]
            lam = ((g @ Qg).square().T @ (a @ Qa).square()) / n_sup
            Q = torch.kron(Qg, Qa)
            blocks.append(Q @ torch.diag(lam.flatten()) @ Q.T)
    torch.testing.assert_close(prec.to_dense(), torch.block_diag(*blocks), rtol=1e-7, atol=1e-12)
    kfac = fit64(model, batches, "kfac")
    assert not torch.allclose(prec.to_dense(), kfac.to_dense())  # a different precision


def test_ekfac_needs_two_passes(model, batches):
    with pytest.raises(lc.LaloraError, match="makes 2 passes over the batches"):
        fit64(model, iter(batches), "ekfac")
    prec = fit64(model, batches, "ekfac")
    with pytest.raises(lc.IncompatiblePrecisionError, match="different eigenbases"):
        prec + prec
    d = {n: torch.randn_like(t) for n, t in prec.mode.items()}
    torch.testing.assert_close((0.5 * prec).quad(d), 0.5 * prec.quad(d))


def test_counts_by_hand():
    """Right and left padding, masked prompt, labels under padding: counted by hand."""
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]),
        # row 0: targets 5, 6 supervised (t = 2, 3); 7 and 8 sit on padding.
        # row 1: 9 on padding, 3 predicted from a pad position; 4, 5, 6 supervised.
        "labels": torch.tensor([[-100, -100, 5, 6, 7, 8], [9, 9, 3, 4, 5, 6]]),
    }
    # float32: transformers' eager attention gives NaN on fully masked rows in float64
    c = fit64(make_model(dtype=torch.float32), [batch, batch], "kfac").counts
    assert c == {
        "positions": 16,
        "supervised_tokens": 10,
        "sequences": 4,
        "batches": 2,
        "skipped_batches": 0,
    }


def test_padding_never_contributes():
    """Extra padding with arbitrary tokens and labels leaves every statistic unchanged."""
    model = make_model()
    batch = make_batches(1, batch_size=2, seq_len=8, seed=3)[0]
    g = torch.Generator().manual_seed(1)
    extra = 5
    padded = {
        "input_ids": torch.cat(
            [batch["input_ids"], torch.randint(0, 40, (2, extra), generator=g)], 1
        ),
        "attention_mask": torch.cat(
            [batch["attention_mask"], torch.zeros(2, extra, dtype=torch.long)], 1
        ),
        # labels at padding are not -100 on purpose: padding must still add no loss term
        "labels": torch.cat([batch["labels"], torch.randint(0, 40, (2, extra), generator=g)], 1),
    }
    for structure in ("kfac", "diag", "merged-diag"):
        a = fit64(model, [batch], structure)
        b = fit64(model, [padded], structure)
        for key, t in a.structure_tensors().items():
            torch.testing.assert_close(b.structure_tensors()[key], t, **EXACT)
        assert a.counts == b.counts


def test_left_padding_equals_no_padding():
    """Left padding (the usual batching for decoders) changes no statistic and no count, also
    when the labels under the padding are set. (float32: transformers' eager attention turns
    the fully masked rows of left padding into NaN in float64.)"""
    model = make_model(dtype=torch.float32)
    batch = make_batches(1, batch_size=1, seq_len=8, seed=4)[0]
    batch = {k: v[:, :8] for k, v in batch.items()}
    batch["attention_mask"][:] = 1
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, 1:3] = -100  # the first token keeps its label: after left padding a
    # pad position would predict it
    extra = 3
    left = {
        "input_ids": torch.cat([torch.full((1, extra), 7), batch["input_ids"]], 1),
        "attention_mask": torch.cat(
            [torch.zeros(1, extra, dtype=torch.long), batch["attention_mask"]], 1
        ),
        "labels": torch.cat([torch.full((1, extra), 3), batch["labels"]], 1),
    }
    for structure in ("kfac", "diag"):
        a = fit64(model, [batch], structure)
        b = fit64(model, [left], structure)
        assert a.counts == b.counts
        for key, t in a.structure_tensors().items():
            torch.testing.assert_close(b.structure_tensors()[key], t, rtol=1e-4, atol=1e-6)


def test_mc_samples_share_one_forward_and_are_seeded(model, batches):
    lora_A = next(iter(find_lora_modules(model).values())).lora_A
    calls = []
    hook = lora_A.register_forward_hook(lambda *a: calls.append(1))
    fit64(model, batches, "kfac", estimator="mc", mc_samples=5)
    hook.remove()
    assert len(calls) == len(batches)  # one forward per batch for all five label draws
    a = fit64(model, batches, "kfac", estimator="mc", mc_samples=3, seed=7)
    b = fit64(model, batches, "kfac", estimator="mc", mc_samples=3, seed=7)
    c = fit64(model, batches, "kfac", estimator="mc", mc_samples=3, seed=8)
    name = next(iter(a.modules))
    torch.testing.assert_close(a.grad_cov[name], b.grad_cov[name], rtol=0, atol=0)
    assert not torch.allclose(a.grad_cov[name], c.grad_cov[name])
    # input factors do not depend on labels
    torch.testing.assert_close(a.input_cov[name], c.input_cov[name], **EXACT)
    assert a.metadata["mc_samples"] == 3 and a.metadata["estimator"] == "mc"


class _Checkpointed(torch.nn.Module):
    """Runs a decoder layer under non-reentrant checkpointing even in eval mode."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


def test_correct_under_non_reentrant_gradient_checkpointing(batches):
    plain = make_model()
    ckpt = make_model()
    layers = ckpt.base_model.model.model.layers
    for i in range(len(layers)):
        layers[i] = _Checkpointed(layers[i])
    fired = {"n": 0}
    lora_A = next(iter(find_lora_modules(ckpt).values())).lora_A
    hook = lora_A.register_forward_hook(lambda *a: fired.__setitem__("n", fired["n"] + 1))
    for structure in ("kfac", "diag"):
        a = fit64(plain, batches, structure)
        b = fit64(ckpt, batches, structure)
        assert list(a.modules) == [n.replace(".layer.", ".") for n in b.modules]
        for (ka, ta), tb in zip(
            a.structure_tensors().items(), b.structure_tensors().values(), strict=True
        ):
            torch.testing.assert_close(tb, ta, **EXACT, msg=ka)
    hook.remove()
    assert fired["n"] == 2 * 2 * len(batches)  # forward hooks really fired twice per batch


def test_low_precision_model_accumulates_in_float32(batches):
    model = make_model(dtype=torch.float64)
    ref = fit64(model, batches, "kfac")
    low = lc.fit_precision(
        copy.deepcopy(model).to(torch.bfloat16), batches, structure="kfac", progress=False
    )
    name = next(iter(ref.modules))
    assert low.input_cov[name].dtype == torch.float32 and low.dtype == torch.float32
    rel = (low.input_cov[name].double() - ref.input_cov[name]).norm() / ref.input_cov[name].norm()
    assert rel < 0.05
    rel = (low.grad_cov[name].double() - ref.grad_cov[name]).norm() / ref.grad_cov[name].norm()
    assert rel < 0.1


def test_default_init_zero_blocks_logged_and_recorded(zero_init_model, batches, caplog):
    with caplog.at_level("INFO", logger="lalora_curv"):
        prec = fit64(zero_init_model, batches, "tri-kfac")
    assert prec.metadata["lora_B_init_zero"] is True
    assert sum("exactly zero" in r.message for r in caplog.records) == 1
    diag = fit64(zero_init_model, batches, "diag")
    for spec in diag.modules.values():
        assert not diag.diag[spec.lora_A_name].any()  # exactly zero, as MATH.md says
        assert diag.diag[spec.lora_B_name].any()
    for name in prec.modules:
        b = prec.blocks(name)
        assert b.b0_zero and not b.lora_A_grad_cov.any() and not b.cross_grad_cov.any()


def test_fitting_leaves_model_state_untouched(batches):
    model = make_model()
    model.train()
    dropout_module = model.base_model.model.model.layers[0].self_attn
    dropout_module.eval()  # a mixed train/eval state must be restored exactly
    handles = find_lora_modules(model)
    first = next(iter(handles.values()))
    first.lora_A.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    fit64(model, batches, "kfac", estimator="mc", mc_samples=2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None
    assert {n: m.training for n, m in model.named_modules()} == modes
    for h in handles.values():
        assert not h.lora_A._forward_hooks and not h.lora_B._forward_hooks


def test_hooks_removed_and_state_restored_after_an_error(batches):
    model = make_model()
    model.train()
    bad = [batches[0], {"input_ids": batches[0]["input_ids"]}]  # second batch lacks labels
    with pytest.raises(lc.BatchError, match="batch 1: missing 'labels'"):
        fit64(model, bad, "kfac")
    assert all(m.training for m in model.modules())
    for h in find_lora_modules(model).values():
        assert not h.lora_A._forward_hooks and not h.lora_B._forward_hooks


def test_token_data_reference_is_consistent(model, batches):
    """g_A = B^T g_B per token: the two probes of the reference agree with each other."""
    handles = find_lora_modules(model)
    for name, d in token_data(model, batches[0]).items():
        B = handles[name].lora_B.weight.detach()
        torch.testing.assert_close(d.g_A, d.g_B @ B, **EXACT)
