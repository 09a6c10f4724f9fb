"""The setups a user brings: packed batches, left padding, compiled models, other architectures,
named adapters and trainable tensors beyond LoRA; each fits what the same data padded in an
eager Llama fits, or is refused by name (float64, real transformers/peft classes)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lalora_curv as lc
from helpers import fit64, make_model
from lalora_curv.adapter import find_lora_modules

EXACT = {"rtol": 1e-10, "atol": 1e-13}


def assert_same_precision(a: lc.Precision, b: lc.Precision) -> None:
    assert a.counts == b.counts
    ta, tb = a.structure_tensors(), b.structure_tensors()
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], **EXACT, msg=k)


def sequences(vocab=48, lengths=(7, 4, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def padded(seqs, left=False, prompt=2):
    """Rows of ``seqs`` padded to the longest (right or left), the first ``prompt`` tokens
    of each unsupervised."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
        lab = s.clone()
        lab[:prompt] = -100
        labels[i, sl] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed(seqs, prompt=2):
    """One row of the sequences back to back, position ids restarting at each (TRL's
    padding-free collator), no attention mask, and its cu_seq_lens."""
    ids = torch.cat(seqs).unsqueeze(0)
    positions = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    labels = []
    for s in seqs:
        lab = s.clone()
        lab[: max(prompt, 1)] = -100  # (the collator masks each sequence's first label)
        labels.append(lab)
    bounds = torch.tensor([0, *torch.cumsum(torch.tensor([len(s) for s in seqs]), 0).tolist()])
    return {
        "input_ids": ids,
        "labels": torch.cat(labels).unsqueeze(0),
        "position_ids": positions,
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
    }


@pytest.mark.parametrize("structure", ["kfac", "diag", "merged-diag"])
def test_packed_sequences_fit_what_the_same_sequences_padded_fit(structure):
    model = make_model(attn="sdpa")  # (eager attention's softmax is float32 always)
    seqs = sequences()
    ref = fit64(model, [padded(seqs)], structure)
    got = fit64(model, [packed(seqs)], structure)
    assert_same_precision(got, ref)
    assert got.counts["sequences"] == 3  # three sequences in one row
    # the library's own packing (with padding as a segment of its own) agrees too
    from lalora_curv.data import _packed

    rows = [(s.tolist(), [-100, -100, *s[2:].tolist()]) for s in seqs]
    mine = _packed(rows, batch_size=2, max_length=12, pad=0)
    assert "position_ids" in mine[0] and bool((mine[0]["attention_mask"] == 0).any())
    assert_same_precision(fit64(model, mine, structure), ref)


def test_packed_batches_without_position_ids_would_mix_sequences():
    """The check the test above relies on: dropping the position ids changes the statistics
    (sequences attending to each other), so equality is not an accident."""
    model = make_model(attn="sdpa")
    seqs = sequences()
    batch = packed(seqs)
    mixed = {k: v for k, v in batch.items() if k in ("input_ids", "labels")}
    ref = fit64(model, [padded(seqs)])
    got = fit64(model, [mixed])
    name = next(iter(got.modules))
    G, G_ref = got.grad_cov[name], ref.grad_cov[name]
    assert float((G - G_ref).abs().max()) > 1e-3 * float(G_ref.abs().max())


def test_inconsistent_cu_seq_lens_are_refused():
    batch = packed(sequences())
    batch["cu_seq_lens_q"] = torch.tensor([0, 5, 20])
    with pytest.raises(lc.BatchError, match=r"cu_seq_lens_q .* disagrees"):
        fit64(make_model(), [batch])
    del batch["position_ids"]
    with pytest.raises(lc.BatchError, match="without position_ids"):
        fit64(make_model(), [batch])


def test_packed_batches_refuse_per_sequence_squares_and_other_backends():
    batch = packed(sequences())
    with pytest.raises(lc.BatchError, match="packed"):
        fit64(make_model(), [batch], "diag", granularity="sequence")


def gpt2(dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=48, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    config.bos_token_id = config.eos_token_id = 1
    base = GPT2LMHeadModel(config).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
        model = get_peft_model(base, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for h in find_lora_modules(model).values():
            h.lora_B.weight.normal_(std=0.3)
    return model.to(dtype)


@pytest.mark.parametrize("structure", ["kfac", "diag"])
def test_gpt2_left_padding_fits_what_right_padding_fits(structure):
    """GPT-2's position embeddings are absolute: a left-padded row needs the positions of its
    unpadded self, which the fit derives from the attention mask."""
    model = gpt2()
    seqs = sequences()
    right = fit64(model, [padded(seqs)], structure)
    left = fit64(model, [padded(seqs, left=True)], structure)
    assert_same_precision(left, right)


def test_a_compiled_model_fits_what_the_eager_model_fits():
    model = make_model()
    batches = [padded(sequences())]
    eager = fit64(model, batches)
    compiled = torch.compile(model, backend="aot_eager")
    assert_same_precision(fit64(compiled, batches), eager)
    mc_eager = fit64(model, batches, estimator="mc", mc_samples=2, seed=3)
    mc_compiled = fit64(compiled, batches, estimator="mc", mc_samples=2, seed=3)
    assert_same_precision(mc_compiled, mc_eager)
    # and its penalty, through the compiled wrapper, is the eager one's
    torch.testing.assert_close(eager.penalty(compiled), eager.penalty(model), **EXACT)


def opt_model():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=48,
        hidden_size=16,
        ffn_dim=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base = OPTForCausalLM(config).double()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for h in find_lora_modules(model).values():
            h.lora_B.weight.normal_(std=0.3)
    return model.double()


def test_opt_fc1_fc2_see_flattened_tokens_and_fit_as_every_other_linear():
    """OPT feeds fc1/fc2 (batch * seq, features): K-FAC equals its definition from hand-made
    hooks (no padding, so every position counts)."""
    model = opt_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 48, (2, 6), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    prec = fit64(model, [batch])
    handles = find_lora_modules(model)
    assert any(n.endswith("fc1") for n in handles) and any(n.endswith("fc2") for n in handles)
    seen, outs = {}, {}
    hooks = []
    for name, h in handles.items():
        hooks.append(
            h.lora_A.register_forward_hook(
                lambda m, a, o, name=name: seen.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]))
            )
        )
        hooks.append(h.lora_B.register_forward_hook(
            lambda m, a, o, name=name: outs.__setitem__(name, o)
        ))  # fmt: skip
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
    )
    grads = torch.autograd.grad(loss, [outs[n] for n in handles])
    for hook in hooks:
        hook.remove()
    for (name, h), grad in zip(handles.items(), grads, strict=True):
        x = seen[name]
        gh = grad.reshape(-1, grad.shape[-1]) / h.spec.scaling
        torch.testing.assert_close(prec.input_cov[name][0], x.T @ x / x.shape[0], **EXACT)
        torch.testing.assert_close(prec.grad_cov[name][0], gh.T @ gh / 10, **EXACT)  # 2 x 5


def test_mixture_of_experts_lora_on_expert_parameters_is_refused_by_name():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    ids = torch.randint(3, 48, (1, 6))
    batch = [{"input_ids": ids, "labels": ids}]
    model = get_peft_model(MixtralForCausalLM(config), LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(lc.LaloraError, match=r"mlp\.gate' is a LoRA on parameters.*experts"):
        lc.fit_precision(model, batch, progress=False)
    experts = get_peft_model(
        MixtralForCausalLM(config),
        LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"]),
    )
    with pytest.raises(lc.LaloraError, match=r"mlp\.experts' is a LoRA on parameters"):
        lc.fit_precision(experts, batch, progress=False)
    # the working alternative the message names
    attention = get_peft_model(
        MixtralForCausalLM(config),
        LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    prec = lc.fit_precision(attention, batch, progress=False)
    assert len(prec.modules) == 4


def two_adapters():
    model = make_model(init_B_std=0.0)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    return model


def test_train_and_fit_refuse_an_adapter_that_is_not_active():
    model = two_adapters()  # "default" is active
    batch = padded(sequences())
    with pytest.raises(lc.LaloraError, match="'second' is not the model's active adapter"):
        lc.fit_precision(model, [batch], adapter_name="second", progress=False)
    with pytest.raises(lc.TrainingError, match="'second' is not the model's active adapter"):
        lc.train(model, [batch], adapter_name="second", max_steps=1, progress=False)


def test_train_with_adapter_name_trains_exactly_that_adapter(tmp_path):
    model = two_adapters()
    model.set_adapter("second")
    batch = padded(sequences())
    prec = lc.fit_precision(model, [batch], adapter_name="second", progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    lc.train(model, [batch], prec, 1.0, lr=1e-2, max_steps=2, adapter_name="second",
             checkpoint_dir=tmp_path, progress=False)  # fmt: skip
    for n, p in model.named_parameters():
        if "lora_" in n:  # the named adapter moved, the other one did not
            assert (not torch.equal(p, before[n])) == (".second." in n), n
    # the checkpoint holds the trained adapter
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "checkpoint-2" / "second" / "adapter_model.safetensors")
    trained = {n.replace(".second", ""): p for n, p in model.named_parameters() if ".second." in n}
    assert set(saved) == set(trained)
    for n, t in saved.items():
        assert torch.equal(trained[n].detach().to(t.dtype), t), n


@pytest.mark.parametrize(
    "extra",
    [
        {"modules_to_save": ["lm_head"]},
        {"bias": "lora_only"},
        {"bias": "all"},
        {"trainable_token_indices": [3, 4]},
    ],
)
def test_trainable_tensors_beyond_lora_are_named_not_left_free(extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True)  # fmt: skip
    base = LlamaForCausalLM(config).double()  # (biased projections: bias="lora_only" has work)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **extra))
    batch = padded(sequences())
    with pytest.raises(lc.LaloraError, match="tensors that a LoRA precision does not cover"):
        lc.fit_precision(model, [batch], progress=False)
    prec = lc.fit_precision(model, [batch], progress=False, allow_unpenalised=True)
    free = prec.metadata["unpenalised"]
    assert free and all(p.requires_grad for n, p in model.named_parameters() if n in free)
    lc.train(model, [batch], prec, 1.0, max_steps=1, progress=False)  # the named ones pass
    other = copy.deepcopy(model)
    prec_strict = lc.fit_precision(other, [batch], progress=False, allow_unpenalised=True)
    meta = prec_strict.metadata
    meta["unpenalised"] = free[:-1]
    trimmed = type(prec_strict).from_tensors(
        prec_strict.modules, prec_strict.mode, prec_strict.structure_tensors(), meta
    )
    with pytest.raises(lc.TrainingError, match="tensors the precision does not cover"):
        lc.train(other, [batch], trimmed, 1.0, max_steps=1, progress=False)


def _architecture(name: str):
    """A tiny random model of each family (float64, eager attention)."""
    import transformers as tr

    common = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    configs = {
        "mistral": (tr.MistralConfig, tr.MistralForCausalLM, common),
        "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM, common),
        "qwen3": (tr.Qwen3Config, tr.Qwen3ForCausalLM, {**common, "head_dim": 8}),
        "gemma": (tr.GemmaConfig, tr.GemmaForCausalLM, {**common, "head_dim": 8}),
        "gemma2": (tr.Gemma2Config, tr.Gemma2ForCausalLM, {**common, "head_dim": 8}),
        "phi3": (tr.Phi3Config, tr.Phi3ForCausalLM, {**common, "pad_token_id": 0}),
        "gpt_neox": (
            tr.GPTNeoXConfig,
            tr.GPTNeoXForCausalLM,
            {k: v for k, v in common.items() if k != "num_key_value_heads"},
        ),
        "falcon": (
            tr.FalconConfig,
            tr.FalconForCausalLM,
            {
                "vocab_size": 48,
                "hidden_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "new_decoder_architecture": True,
                "num_kv_heads": 1,
            },
        ),
    }
    config_cls, model_cls, kw = configs[name]
    config = config_cls(**kw, attn_implementation="eager")
    torch.manual_seed(0)
    base = model_cls(config).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for h in find_lora_modules(model).values():
            h.lora_B.weight.normal_(std=0.3)
    return model.double()


ARCHITECTURES = ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "falcon"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_fits_its_brute_force_statistics(arch):
    """Each family with LoRA on all-linear: the K-FAC factors and the per-token diagonal
    equal the float64 per-token autograd reference (padding and a masked prompt included)."""
    from reference import brute_force

    model = _architecture(arch)
    batches = [padded(sequences(lengths=(7, 4, 9)))]
    ref = brute_force(model, batches)
    kfac = fit64(model, batches)
    diag = fit64(model, batches, "diag")
    assert len(kfac.modules) >= 4
    for name, spec in kfac.modules.items():
        b = kfac.blocks(name)
        torch.testing.assert_close(b.input_cov[0], ref[name]["C_x"], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(kfac.grad_cov[name][0], ref[name]["G_h"], rtol=1e-8, atol=1e-14)
        torch.testing.assert_close(
            diag.diag[spec.lora_B_name], ref[name]["diag_B"], rtol=1e-8, atol=1e-14
        )


def test_rslora_scaling_is_the_one_peft_applies():
    """rsLoRA scales by alpha / sqrt(r): the specs carry peft's scaling, and K-FAC's lora_B
    block still equals the brute-force one."""
    from lalora_curv.toy import tiny_llama
    from reference import brute_force

    base = tiny_llama(vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=1,
                      num_heads=2, num_kv_heads=1, dtype=torch.float64)  # fmt: skip
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    model = get_peft_model(base, config).double()
    torch.manual_seed(2)
    with torch.no_grad():
        for h in find_lora_modules(model).values():
            h.lora_B.weight.normal_(std=0.3)
    batches = [padded(sequences())]
    prec = fit64(model, batches, "tri-kfac")
    ref = brute_force(model, batches)
    for name, spec in prec.modules.items():
        assert spec.scaling == pytest.approx(8 / 4**0.5)
        torch.testing.assert_close(
            prec.blocks(name).lora_B_grad_cov[0], ref[name]["G_B"], rtol=1e-8, atol=1e-14
        )
