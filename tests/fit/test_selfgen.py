"""Self-generated source batches: exact sampling, masking, limits, and Fisher convergence."""

from __future__ import annotations

import itertools

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lalora_curv as lc
from lalora_curv.toy import add_lora, tiny_llama

PAD, EOS = 0, 1


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """``<pad>`` = 0, ``<eos>`` = 1 (no BOS: the sampler starts from EOS), words ``w2...``."""
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def lora_model(vocab_size: int, dtype=torch.float64, init_B_std=0.0, seed=0):
    base = tiny_llama(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        seed=seed,
        dtype=dtype,
    )
    # a spread-out predictive distribution, so that every token has visible mass
    with torch.no_grad():
        base.lm_head.weight.mul_(3.0)
    return add_lora(
        base, r=2, alpha=2.0, target_modules=("q_proj", "v_proj"), init_B_std=init_B_std
    ).to(dtype)


def test_seeded_and_independent_of_the_global_rng():
    model, tok = lora_model(12), word_tokenizer(12)
    a = lc.self_generated_batches(model, tok, 10, 8, seed=3, batch_size=4, progress=False)
    torch.manual_seed(12345)  # the global RNG must not matter
    b = lc.self_generated_batches(model, tok, 10, 8, seed=3, batch_size=4, progress=False)
    c = lc.self_generated_batches(model, tok, 10, 8, seed=4, batch_size=4, progress=False)
    assert [len(x["input_ids"]) for x in a] == [4, 4, 2]
    for x, y in zip(a, b, strict=True):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(x[key], y[key])
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))
    assert a.provenance["seed"] == 3 and a.provenance["num_sequences"] == 10


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_first_token_follows_the_full_softmax(temperature):
    """No top-k/top-p truncation: with 64 tokens, top-50 sampling would drop visible mass."""
    vocab = 64
    model, tok = lora_model(vocab, dtype=torch.float32), word_tokenizer(vocab)
    n = 20000
    batches = lc.self_generated_batches(
        model, tok, n, 2, temperature=temperature, seed=0, batch_size=5000, progress=False
    )
    first = torch.cat([b["input_ids"][:, 1] for b in batches])
    freq = torch.bincount(first, minlength=vocab).double() / n
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[EOS]])).logits[0, -1].double()
    p = torch.softmax(logits / temperature, -1)
    outside_top50 = p.sort(descending=True).values[50:].sum()
    assert outside_top50 > 0.05  # the test can tell full from top-k sampling
    tv = 0.5 * (freq - p).abs().sum()
    # sampling noise: E[TV] ~ 0.025 at n = 20000 here; top-50 truncation alone would add > 0.05
    assert tv < 0.05, tv


def test_eos_max_length_and_labels():
    model, tok = lora_model(6), word_tokenizer(6)
    batches = lc.self_generated_batches(model, tok, 200, 5, seed=1, batch_size=64, progress=False)
    ended, full = 0, 0
    for b in batches:
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        assert ids.shape[1] <= 5
        for row, m, lab in zip(ids, mask, labels, strict=True):
            length = int(m.sum())
            assert bool(m[:length].all()) and not bool(m[length:].any())  # right-padded
            assert int(row[0]) == EOS and int(lab[0]) == -100  # start token, unsupervised
            assert torch.equal(lab[1:length], row[1:length])  # every sampled token supervised
            assert bool((lab[length:] == -100).all())
            eos_at = (row[1:length] == EOS).nonzero()
            if len(eos_at):
                assert int(eos_at[0]) == length - 2  # EOS only as the last token
                ended += 1
            else:
                assert length == 5  # no EOS: stopped by max_length
                full += 1
    assert ended > 0 and full > 0  # both stopping rules were exercised


def test_prompts_are_masked_and_kept():
    model, tok = lora_model(12, dtype=torch.float32), word_tokenizer(12)
    prompts = ["w3 w4 w5", "w7"]
    batches = lc.self_generated_batches(
        model, tok, 6, 9, prompts=prompts, seed=0, batch_size=6, progress=False
    )
    (b,) = batches
    for i, (row, lab) in enumerate(zip(b["input_ids"], b["labels"], strict=True)):
        prompt = tok(prompts[i % 2])["input_ids"]
        assert row[: len(prompt)].tolist() == prompt
        assert bool((lab[: len(prompt)] == -100).all())
        assert int((lab != -100).sum()) >= 1
    assert batches.provenance["prompts"] == prompts


def test_greedy_limit_matches_transformers_generate_with_left_padding():
    """At a tiny temperature sampling is greedy decoding: the KV-cache loop (left-padded
    prompts of different lengths, position ids from the mask) must match ``generate``."""
    model, tok = lora_model(12, dtype=torch.float32), word_tokenizer(12)
    prompts = ["w3 w4 w5 w6", "w7", "w2 w9"]
    ours = lc.self_generated_batches(
        model, tok, 3, 9, prompts=prompts, temperature=1e-6, seed=0, progress=False
    )[0]
    base = model.get_base_model()
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p)["input_ids"]])
        ref = base.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_length=9,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )[0]
        got = ours["input_ids"][i][ours["attention_mask"][i].bool()]
        assert got.tolist() == ref[: len(got)].tolist()
        assert len(got) == len(ref) or int(got[-1]) == EOS


def test_samples_from_the_model_at_its_init_which_is_the_pretrained_one_under_milora():
    """MiLoRA moves the minor components of W into the adapter: the base weights alone are a
    residual model, the model at its init is the pretrained one, and so are the samples."""
    from lalora_curv.baselines import milora_init

    tok = word_tokenizer(12)
    pretrained = lora_model(12)
    moved = milora_init(lora_model(12))
    a = lc.self_generated_batches(pretrained, tok, 64, 8, seed=0, progress=False)
    b = lc.self_generated_batches(moved, tok, 64, 8, seed=0, progress=False)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"])
    with torch.no_grad(), moved.disable_adapter():  # what disabling would have sampled
        residual = moved(input_ids=torch.tensor([[EOS, 3]])).logits
    with torch.no_grad():
        assert not torch.allclose(residual, pretrained(input_ids=torch.tensor([[EOS, 3]])).logits)


def _sequences_with_probabilities(model, max_length, vocab):
    """Every sequence the sampler can return (start EOS, stop at EOS or max_length) and its
    probability under the model (at its adapter's init), by enumeration."""
    out = []
    with torch.no_grad():
        for n in range(1, max_length):
            for tail in itertools.product(range(vocab), repeat=n):
                if EOS in tail[:-1] or (n < max_length - 1 and tail[-1] != EOS):
                    continue
                seq = torch.tensor([[EOS, *tail]])
                logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1], -1)
                out.append((seq, float(logp.gather(1, seq[0, 1:, None]).sum().exp())))
    assert abs(sum(p for _, p in out) - 1.0) < 1e-9
    return out


@pytest.mark.slow  # thousands of sampled sequences
def test_fisher_on_samples_converges_to_the_expectation_under_the_model():
    """Statistics fitted on N sampled sequences -> the exact expectation over the model's
    sequence distribution (ratio of expected sums to expected counts), by enumeration of
    all sequences of a 6-token vocabulary up to 4 tokens."""
    vocab, max_length = 6, 4
    model, tok = lora_model(vocab, init_B_std=0.5), word_tokenizer(vocab)
    exact: dict[str, dict[str, torch.Tensor]] = {"kfac": {}, "diag": {}}
    weights = {"positions": 0.0, "supervised_tokens": 0.0}
    for seq, p in _sequences_with_probabilities(model, max_length, vocab):
        batch = {"input_ids": seq, "attention_mask": torch.ones_like(seq), "labels": seq.clone()}
        batch["labels"][0, 0] = -100
        for structure in exact:
            prec = lc.fit_precision(model, [batch], structure=structure, progress=False)
            for key, t in prec.structure_tensors().items():
                count = "positions" if key.startswith("input_cov") else "supervised_tokens"
                add = p * prec.counts[count] * t
                exact[structure][key] = exact[structure].get(key, 0) + add
        for count in weights:
            weights[count] += p * prec.counts[count]
    for tensors in exact.values():
        for key in tensors:
            count = "positions" if key.startswith("input_cov") else "supervised_tokens"
            tensors[key] = tensors[key] / weights[count]

    def error(n: int, seed: int) -> float:
        batches = lc.self_generated_batches(
            model, tok, n, max_length, seed=seed, batch_size=500, progress=False
        )
        worst = 0.0
        for structure, ref in exact.items():
            prec = lc.fit_precision(model, batches, structure=structure, progress=False)
            for key, t in prec.structure_tensors().items():
                worst = max(worst, float((t - ref[key]).norm() / ref[key].norm()))
        return worst

    small, large = error(100, 0), error(4000, 1)
    assert large < 0.08, large  # named tolerance: 8 % relative Frobenius error at N = 4000
    assert large < small / 2, (small, large)  # ~1/sqrt(N): 6.3x fewer samples, >2x the error


def test_fit_records_the_sampling_settings_and_sums_keep_them(tmp_path):
    model, tok = lora_model(12), word_tokenizer(12)
    gen = lc.self_generated_batches(model, tok, 8, 6, seed=5, progress=False)
    prec = lc.fit_precision(model, gen, structure="kfac", estimator="mc", progress=False)
    meta = prec.metadata
    assert meta["sources"] == ["self-generated"]
    assert meta["self_generated"] == [gen.provenance]
    assert gen.provenance["supervised_tokens"] == meta["counts"]["supervised_tokens"]
    loaded = lc.load_precision(lc.save_precision(prec, tmp_path / "p"))
    assert loaded.metadata["self_generated"] == [gen.provenance]
    real = [{k: v for k, v in b.items()} for b in gen]  # plain list: no provenance
    both = prec + lc.fit_precision(model, real, structure="kfac", estimator="mc", progress=False)
    assert both.metadata["self_generated"] == [gen.provenance]
    assert both.metadata["sources"] == ["self-generated"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_sequences": 0}, "num_sequences"),
        ({"temperature": 0.0}, "temperature"),
        ({"max_length": 1}, "max_length"),
        ({"prompts": "w3"}, "prompts"),
        ({"batch_size": 0}, "batch_size"),
        ({"prompts": ["w3", ""]}, "prompt 1"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    model, tok = lora_model(12), word_tokenizer(12)
    args = {"num_sequences": 4, "max_length": 6, **kwargs}
    with pytest.raises(lc.LaloraError, match=message):
        lc.self_generated_batches(model, tok, progress=False, **args)


def test_first_tokens_keeps_whole_sequences_up_to_a_token_count():
    model, tok = lora_model(12), word_tokenizer(12)
    batches = lc.self_generated_batches(model, tok, 20, 8, seed=2, batch_size=6, progress=False)
    counts = [int(n) for b in batches for n in (b["labels"] != -100).sum(1)]
    for want in (1, counts[0], counts[0] + 1, sum(counts[:9]), sum(counts), 10**6):
        kept = batches.first_tokens(want)
        rows = sum(len(b["labels"]) for b in kept)
        got = sum(counts[:rows])
        assert kept.provenance["supervised_tokens"] == got
        assert kept.provenance["num_sequences"] == rows
        assert got >= min(want, sum(counts))  # enough tokens ...
        assert rows == len(counts) or sum(counts[: rows - 1]) < want  # ... with no extra row
        flat = torch.cat([b["input_ids"][:, :2] for b in kept])
        first = torch.cat([b["input_ids"][:, :2] for b in batches])[:rows]
        assert torch.equal(flat, first)  # a prefix, in order
