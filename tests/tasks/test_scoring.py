"""Log-likelihood scoring against an unbatched reference on a tiny model and tokenizer."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from lalora_curv.tasks.multiple_choice import MultipleChoiceItem
from lalora_curv.tasks.scoring import encode_pair, loglikelihoods, score_multiple_choice
from lalora_curv.toy import tiny_llama

CHARS = string.ascii_letters + string.digits + " .,:?!\n$#"


@pytest.fixture(scope="module")
def tok():
    vocab = {c: i for i, c in enumerate(["<eos>", *CHARS])}
    characters = Tokenizer(models.BPE(vocab, []))
    characters.decoder = decoders.Fuse()  # decode by concatenating characters
    return PreTrainedTokenizerFast(
        tokenizer_object=characters, eos_token="<eos>", pad_token="<eos>"
    )


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(vocab_size=len(tok), dtype=torch.float64, seed=3)


def reference(model, tok, context, continuation):
    """Unbatched, unpadded: encode, one forward, sum the continuation's log-probabilities."""
    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0], -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_encode_pair_moves_trailing_spaces(tok):
    def text(ids):
        return "".join(tok.convert_ids_to_tokens(ids))

    ctx, cont = encode_pair(tok, "Answer: ", "42")
    assert text(ctx) == "Answer:" and text(cont) == " 42"
    ctx, cont = encode_pair(tok, "", "hi")
    assert ctx == [tok.eos_token_id] and text(cont) == "hi"


def test_batched_loglikelihoods_equal_the_unbatched_reference(model, tok):
    requests = [
        ("Question: What is 2?\nAnswer:", " 2"),
        ("Q", " a much longer answer here."),
        ("Sarah was better so Maria", " always won."),
        ("", "start"),
        ("mid length context", " x"),
    ]
    got = loglikelihoods(model, tok, requests, batch_size=3)
    want = [reference(model, tok, c, x) for c, x in requests]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-9, atol=1e-9)
    assert all(v < 0 for v in got)


def test_acc_and_acc_norm(model, tok, monkeypatch):
    items = [
        MultipleChoiceItem(("c",) * 3, (" a", " bbbb", " cc"), 1, True),
        MultipleChoiceItem(("c",) * 3, (" a", " bbbb", " cc"), 0, True),
    ]
    import lalora_curv.tasks.scoring as scoring

    # log-likelihoods -1, -2, -3: acc picks " a"; per character -0.5, -0.4, -1: acc_norm " bbbb"
    monkeypatch.setattr(scoring, "loglikelihoods", lambda *a, **k: [-1.0, -2.0, -3.0] * 2)
    result = score_multiple_choice(model, tok, items)
    assert result == {"acc": 0.5, "acc_norm": 0.5, "n": 2}
    # acc_norm divides by the choice without its joining space, as the harness does:
    # " abcd" wins with -3.9 / 4 = -0.975 > -2 / 2; counting the space, " ab" would win
    monkeypatch.setattr(scoring, "loglikelihoods", lambda *a, **k: [-2.0, -3.9])
    pair = [MultipleChoiceItem(("c", "c"), (" ab", " abcd"), 1, True)]
    assert score_multiple_choice(model, tok, pair) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    wino = [MultipleChoiceItem(("a", "b"), (" x", " x"), 0, False)]
    monkeypatch.setattr(scoring, "loglikelihoods", lambda *a, **k: [-1.0, -2.0])
    assert score_multiple_choice(model, tok, wino) == {"acc": 1.0, "n": 1}


def test_gsm8k_generation_is_cut_at_the_stop_sequence_and_scored(model, tok, monkeypatch):
    from lalora_curv.tasks.gsm8k import generate_answers, score_gsm8k, truncate_at_stop

    assert truncate_at_stop("42.\nQuestion: next") == "42.\n"
    real = generate_answers(
        model, tok, ["Question: 1?\nAnswer:", "Q"], max_new_tokens=5, batch_size=2
    )
    assert len(real) == 2 and tok.padding_side == "right"  # restored

    continuation = [tok.convert_tokens_to_ids(c) for c in " It is $18.\nQuestion: 5"]

    def fake_generate(input_ids, attention_mask, **kwargs):
        tail = torch.tensor([continuation] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    records = [
        {"question": "q", "answer": "work\n#### 18"},
        {"question": "q", "answer": "work\n#### 19"},
    ]
    result = score_gsm8k(model, tok, records, batch_size=2)
    assert result == {"exact_match_strict": 0.0, "exact_match_flexible": 0.5, "n": 2}


def test_generation_without_a_pad_token(model, tok):
    from lalora_curv.tasks.gsm8k import generate_answers

    pad = tok.pad_token
    tok.pad_token = None  # Llama's and GPT-2's tokenizers have none
    try:
        out = generate_answers(
            model, tok, ["Question: 1?\nAnswer:", "Q"], max_new_tokens=3, batch_size=2
        )
        assert len(out) == 2 and tok.pad_token is None  # EOS padded, setting restored
    finally:
        tok.pad_token = pad


def test_empty_task_gives_null_metrics(model, tok):
    from lalora_curv.tasks.gsm8k import score_gsm8k

    assert score_gsm8k(model, tok, []) == {
        "exact_match_strict": None,
        "exact_match_flexible": None,
        "n": 0,
    }
