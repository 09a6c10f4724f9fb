"""MIGU and MiLoRA against independent references; LALoRA at a MiLoRA init."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from helpers import make_batches, make_model
from lalora_curv.adapter import find_lora_modules
from lalora_curv.baselines import migu, milora_init
from lalora_curv.baselines.migu import row_mask


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_migu_gradients_equal_a_masked_branch_reference():
    """Reference: the LoRA branch output replaced by ``o * m + (o * (1 - m)).detach()`` with
    the mask from the layer's full output, computed by hand in a forward hook."""
    model = make_model()
    batch = make_batches(1)[0]
    handles = find_lora_modules(model)
    with migu(model, threshold=0.7):
        got = _grads(model, batch)

    masks, hooks = {}, []
    for name, h in handles.items():
        hooks.append(
            h.layer.register_forward_hook(
                lambda m, a, out, name=name: masks.__setitem__(
                    name, (lambda mag: mag > torch.quantile(mag, 0.7))(out.abs().sum((0, 1)))
                )
            )
        )
    with torch.no_grad():  # the masks (the hooks below do not change any forward value)
        model(**batch)
    for name, h in handles.items():
        hooks.append(
            h.lora_B.register_forward_hook(
                lambda m, a, out, name=name: out * masks[name] + (out * ~masks[name]).detach()
            )
        )
    want = _grads(model, batch)
    for h in hooks:
        h.remove()
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-10, atol=1e-12), n
    plain = _grads(model, batch)  # hooks gone: the context left nothing behind
    b_name = next(n for n in plain if "lora_B" in n)
    assert not torch.allclose(plain[b_name], got[b_name])
    frozen = (got[b_name] == 0).all(1)
    assert 0.5 < float(frozen.double().mean()) < 0.9  # ~70 % of rows frozen


def test_migu_threshold_zero_is_plain_lora_and_bad_threshold_named():
    model = make_model()
    batch = make_batches(1)[0]
    with migu(model, threshold=0.0):
        got = _grads(model, batch)
    want = _grads(model, batch)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    with pytest.raises(lc.LaloraError, match="threshold"), migu(model, threshold=1.0):
        pass


def test_row_mask_keeps_the_top_rows_by_l1_magnitude():
    out = torch.tensor([[[1.0, -4.0, 0.5, 2.0, 0.1]], [[1.0, 1.0, 0.5, -2.0, 0.1]]])
    # magnitudes 2, 5, 1, 4, 0.2 -> the 0.6-quantile is 2.0 (linear interpolation), keep > 2
    assert row_mask(out, 0.6).tolist() == [False, True, False, True, False]


def test_milora_keeps_the_function_and_uses_the_minor_components():
    model = make_model(init_B_std=0.0, r=2)
    batch = make_batches(1)[0]
    before = {
        n: h.layer.get_base_layer().weight.clone() for n, h in find_lora_modules(model).items()
    }
    with torch.no_grad():
        logits = model(**batch).logits
    milora_init(model)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, logits, atol=1e-10)
    for name, h in find_lora_modules(model).items():
        W = before[name]
        s = h.spec.scaling
        update = s * h.lora_B.weight @ h.lora_A.weight
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        minor = U[:, -2:] @ torch.diag(S[-2:]) @ Vh[-2:]
        assert torch.allclose(update, minor, atol=1e-10), name
        assert torch.allclose(h.layer.get_base_layer().weight + update, W, atol=1e-12)


def test_lalora_at_a_milora_init_has_a_and_cross_curvature():
    model = milora_init(make_model(init_B_std=0.0, r=2))
    prec = lc.fit_precision(model, make_batches(2), structure="tri-kfac", progress=False)
    assert prec.metadata["lora_B_init_zero"] is False
    name = next(iter(prec.modules))
    blocks = prec.blocks(name)
    assert float(blocks.lora_A_grad_cov.abs().sum()) > 0
    assert float(blocks.cross_grad_cov.abs().sum()) > 0
    delta = {n: 0.01 * torch.randn_like(t) for n, t in prec.mode.items()}
    only_a = {n: (d if "lora_A" in n else torch.zeros_like(d)) for n, d in delta.items()}
    assert float(prec.quad(only_a)) > 0  # A moves are penalised at this init


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_lalora_at_peft_nonzero_inits(init):
    """PiSSA/OLoRA change the base weights and start with B0 != 0: the precision's mode is that
    init, its penalty is zero there, and A moves are penalised."""
    from peft import LoraConfig, get_peft_model

    from lalora_curv.toy import tiny_llama

    base = tiny_llama(vocab_size=48, hidden_size=16, intermediate_size=24)  # peft: not float64
    model = get_peft_model(
        base,
        LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=init),
    )
    prec = lc.fit_precision(model, make_batches(2), structure="tri-kfac", progress=False)
    assert prec.metadata["lora_B_init_zero"] is False
    assert float(prec.penalty(model).detach()) == 0.0
    delta = {n: 0.01 * torch.randn_like(t) for n, t in prec.mode.items()}
    only_a = {n: (d if "lora_A" in n else torch.zeros_like(d)) for n, d in delta.items()}
    assert float(prec.quad(only_a)) > 0


def test_migu_masks_each_forward_with_its_own_rows():
    """Two forwards, one backward: each forward's gradient is masked by its own output's rows
    (the sum of the two separately masked gradients)."""
    model = make_model()
    b1, b2 = make_batches(2)
    with migu(model, threshold=0.7):
        model.zero_grad(set_to_none=True)
        (model(**b1).loss + model(**b2).loss).backward()
        both = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        g1, g2 = _grads(model, b1), _grads(model, b2)
    for n in both:
        assert torch.allclose(both[n], g1[n] + g2[n], rtol=1e-10, atol=1e-12), n


def test_milora_refuses_conv1d_layers():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    model = get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(lc.LaloraError, match="Conv1D"):
        milora_init(model)


@pytest.mark.parametrize("init", ["default", "pissa", "olora", "milora"])
def test_lora_adapter_keeps_the_function_at_every_init(init):
    from peft import LoraConfig

    from lalora_curv.baselines import lora_adapter
    from lalora_curv.toy import tiny_llama

    base = tiny_llama(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=24,
        num_heads=2,
        num_kv_heads=1,
        seed=0,
        dtype=torch.float32,  # peft's PiSSA/OLoRA refuse float64
    )
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = lora_adapter(base, config, init)
    assert config.init_lora_weights is True  # the caller's config is not changed
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    b0 = [h.lora_B.weight for h in find_lora_modules(model).values()]
    assert all(bool(b.any()) for b in b0) == (init != "default")
    assert not any(bool(b.any()) for b in b0) == (init == "default")
    with pytest.raises(lc.LaloraError, match="unknown init 'corda'"):
        lora_adapter(base, config, "corda")
