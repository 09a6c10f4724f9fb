"""Bad input to fit_precision gets a clear error naming the problem."""

from __future__ import annotations

import logging

import pytest
import torch

import lalora_curv as lc
from helpers import make_batches, make_model


@pytest.fixture(scope="module")
def model():
    return make_model(dtype=torch.float32)


def fit(model, batches, **kw):
    kw.setdefault("progress", False)
    return lc.fit_precision(model, batches, **kw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"structure": "full"}, "unknown structure 'full'; valid: "),
        ({"backend": "kronfluence"}, "unknown backend 'kronfluence'; valid: \\['backpack', "),
        ({"estimator": "type2"}, "type-2 Fisher needs one backward pass per vocabulary entry"),
        (
            {"backend": "backpack", "structure": "diag", "estimator": "diag-ggn-exact"},
            "cannot run through a peft LoRA layer",
        ),
        ({"structure": "kfac", "granularity": "sequence"}, "only defined for structure='diag'"),
        ({"granularity": "chunk"}, "unknown granularity 'chunk'"),
        ({"backend": "backpack", "structure": "kfac"}, "backend 'backpack' supports structures"),
        ({"backend": "curvlinops", "structure": "diag"}, "backend 'curvlinops' supports"),
        (
            {"backend": "backpack", "structure": "diag", "granularity": "token"},
            "granularity 'token' is not available here",
        ),
        ({"estimator": "fisher"}, "unknown estimator 'fisher'"),
        ({"structure": "kfac", "estimator": "batch-grad-squared"}, "only defines a diagonal"),
        ({"estimator": "empirical", "mc_samples": 4}, "applies only to estimator='mc'"),
        ({"estimator": "mc", "mc_samples": 0}, "mc_samples must be >= 1"),
        ({"estimator": "mc", "mc_samples": True}, "mc_samples must be an integer"),
        ({"estimator": "mc", "mc_samples": 2.0}, "mc_samples must be an integer"),
        ({"stats_dtype": torch.float16}, "stats_dtype"),
        ({"max_batches": 0}, "max_batches"),
        ({"seed": "abc"}, "seed must be an integer"),
        ({"progress": "no"}, "progress must be True or False"),
        ({"structure": None}, "structure must be a non-empty string"),
        ({"sources": [3]}, "sources must be a name or a list of names"),
        ({"adapter_name": "nope"}, "no peft LoRA Linear module with adapter 'nope'"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(lc.LaloraError, match=message):
        fit(model, make_batches(1), **kwargs)


def good():
    return make_batches(1)[0]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"input_ids": good()["input_ids"]}, "batch 0: missing 'labels' \\(for plain"),
        ({"labels": good()["labels"]}, "batch 0: missing 'input_ids'"),
        ({**good(), "labels": good()["labels"][:, :-1]}, "labels shape .* != input_ids shape"),
        ({**good(), "attention_mask": good()["attention_mask"][:1]}, "attention_mask shape"),
        ({**good(), "attention_mask": good()["attention_mask"] * 2}, "only 0 and 1"),
        ({**good(), "input_ids": good()["input_ids"].float()}, "integer tensors"),
        (
            {**good(), "input_ids": good()["input_ids"][0], "labels": good()["labels"][0]},
            "must be \\(batch, seq\\)",
        ),
        ({**good(), "labels": good()["labels"].clamp(min=0) + 1000}, "outside \\[0, 48\\)"),
        (
            {**good(), "input_ids": good()["input_ids"] + 48},
            "outside the model's vocabulary \\[0, 48\\)",
        ),
        ({**good(), "input_ids": good()["input_ids"] - 100}, "input_ids holds token id -"),
        ({**good(), "labels": good()["labels"].clamp(min=0) - 7}, "not -100"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_bad_batches(model, batch, message):
    with pytest.raises(lc.BatchError, match=message):
        fit(model, [batch])


@pytest.mark.parametrize("batches", [None, {"input_ids": 1}, 3])
def test_batches_that_are_not_an_iterable_of_batches(model, batches):
    with pytest.raises(lc.LaloraError, match="batches must be an iterable of batch dicts"):
        fit(model, batches)


def test_all_labels_masked_everywhere_raises(model):
    b = good()
    b["labels"] = torch.full_like(b["labels"], -100)
    with pytest.raises(lc.CurvatureError, match="no supervised token in 2 batches"):
        fit(model, [b, b])


def test_a_masked_batch_is_skipped_with_a_warning(model, caplog):
    b = good()
    masked = {**b, "labels": torch.full_like(b["labels"], -100)}
    with caplog.at_level(logging.WARNING, logger="lalora_curv"):
        prec = fit(model, [masked, b], structure="diag")
    assert "batch 0 has no supervised token" in caplog.text
    ref = fit(model, [b], structure="diag")
    assert prec.counts["skipped_batches"] == 1 and prec.counts["batches"] == 2
    for k, t in ref.structure_tensors().items():
        torch.testing.assert_close(prec.structure_tensors()[k], t)


def test_non_finite_model_raises():
    model = make_model(dtype=torch.float32)
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(lc.CurvatureError, match="the source loss is nan"):
        fit(model, make_batches(1))


def test_max_batches_and_generators(model):
    batches = make_batches(3)
    a = fit(model, (b for b in batches), max_batches=2)
    b = fit(model, batches[:2])
    assert a.counts == b.counts
    for k, t in b.structure_tensors().items():
        torch.testing.assert_close(a.structure_tensors()[k], t)


def test_inactive_adapter_is_named():
    model = make_model(dtype=torch.float32)
    with model.disable_adapter(), pytest.raises(lc.LaloraError, match="did not run"):
        fit(model, make_batches(1))


def test_int32_labels_are_accepted(model):
    b = good()
    b32 = {k: v.to(torch.int32) for k, v in b.items()}
    ref, got = fit(model, [b]), fit(model, [b32])
    for k, t in ref.structure_tensors().items():
        torch.testing.assert_close(got.structure_tensors()[k], t)


def test_embedding_lora_is_rejected_not_skipped():
    from lalora_curv.toy import add_lora, tiny_llama

    model = add_lora(tiny_llama(), target_modules=("q_proj", "embed_tokens"))
    with pytest.raises(lc.LaloraError, match=r"embed_tokens.*not a linear LoRA layer"):
        fit(model, make_batches(1))


def test_fsdp1_wrapped_models_are_rejected_and_fsdp2_is_the_way():
    """FSDP1's flat parameters hide the LoRA weights (FSDP2, fully_shard, is supported: see
    tests/training/test_distributed.py)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    # (a real FSDP1 wrap needs an accelerator; the instance check is what matters)
    wrapped = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapped)
    wrapped._fsdp_wrapped_module = make_model(dtype=torch.float32)
    with pytest.raises(lc.LaloraError, match=r"FSDP1.*fully_shard"):
        fit(wrapped, make_batches(1))


def test_unsupported_lora_variants_are_rejected():
    from peft import LoraConfig, get_peft_model

    from lalora_curv.toy import tiny_llama

    dora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(lc.LaloraError, match="LoRA variant"):
        fit(dora, make_batches(1))
