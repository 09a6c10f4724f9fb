"""Your own data: TRL's four dataset formats from JSONL/parquet/CSV files, every supervised token
counted by hand, packing, and the command line from a file to a fitted and a trained adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lalora_curv as lc
from helpers import byte_tokenizer
from lalora_curv.__main__ import main
from lalora_curv.data import (
    DatasetError,
    dataset_batches,
    detect_format,
    has_generation_markers,
    load_examples,
    tokenize_example,
)
from lalora_curv.toy import add_lora, tiny_llama

# helpers.byte_tokenizer: one token per byte, so every count below is a byte count
END = "<|end|>"
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}" + END + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MARKED_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{{ m['content'] }}" + END + "{% endgeneration %}{% else %}<|{{ m['role'] }}|>"
    "{{ m['content'] }}" + END + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def n(text: str) -> int:
    return len(text.encode())


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "six, 6"},
]
EXAMPLES = {
    "language-modeling": [{"text": "the cat sat"}, {"text": "a much longer line of text here"}],
    "prompt-completion": [
        {"prompt": "Q: 1+1?\nA:", "completion": " 2"},
        {"prompt": "Q: capital of France?\nA:", "completion": " Paris"},
    ],
    "conversational": [{"messages": CHAT}, {"messages": CHAT[:3]}],
    "conversational-prompt-completion": [
        {"prompt": CHAT[:2], "completion": [CHAT[2]]},
        {"prompt": CHAT[:4], "completion": [CHAT[4]]},
    ],
}


def expected_supervised(fmt: str, ex: dict) -> int:
    """Supervised tokens counted from the texts themselves (the fit's count: a label at
    position 0 predicts nothing)."""
    if fmt == "language-modeling":
        return n(ex["text"]) + 1 - 1  # + EOS, minus the first token
    if fmt == "prompt-completion":
        return n(ex["completion"]) + 1  # + EOS
    if fmt == "conversational":
        turns = [m for m in ex["messages"] if m["role"] == "assistant"]
        return sum(n(m["content"]) + n(END) for m in turns)
    return sum(n(m["content"]) + n(END) for m in ex["completion"])


@pytest.mark.parametrize("template", [PLAIN_TEMPLATE, MARKED_TEMPLATE], ids=["prefix", "markers"])
@pytest.mark.parametrize("fmt", sorted(EXAMPLES))
def test_every_format_supervises_exactly_its_tokens(fmt, template):
    tok = byte_tokenizer(template)
    assert has_generation_markers(tok) == (template is MARKED_TEMPLATE)
    for ex in EXAMPLES[fmt]:
        assert detect_format(ex) == fmt
        ids, labels = tokenize_example(ex, tok)
        assert len(ids) == len(labels)
        supervised = [t for t in labels[1:] if t != -100]
        assert len(supervised) == expected_supervised(fmt, ex)
        # and they are the right tokens: the assistant's words (and the end marks), EOS last
        text = tok.decode([t for t in labels if t != -100])
        if fmt.startswith("conversational"):
            answers = [m["content"] for m in (ex.get("messages") or ex["completion"])]
            answers = [a for a, m in zip(answers, ex.get("messages") or ex["completion"],
                                         strict=True) if m["role"] == "assistant"]  # fmt: skip
            assert text == "".join(a + END for a in answers)
        elif fmt == "prompt-completion":
            assert text == ex["completion"] + "<eos>"


def test_batches_from_files_of_each_kind_count_every_supervised_token(tmp_path):
    tok = byte_tokenizer(PLAIN_TEMPLATE)
    import pandas as pd

    for fmt, examples in EXAMPLES.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in examples))
        batches = dataset_batches(path, tok, batch_size=3, max_length=512)
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        assert total == sum(expected_supervised(fmt, e) for e in examples), fmt
        packed = dataset_batches(path, tok, batch_size=3, max_length=512, packing=True)
        assert "position_ids" in packed[0]
        model = add_lora(tiny_llama(vocab_size=len(tok), hidden_size=16, intermediate_size=24,
                                    num_heads=2, num_kv_heads=1), r=2)  # fmt: skip
        a = lc.fit_precision(model, batches, progress=False)
        b = lc.fit_precision(model, packed, progress=False)
        assert a.counts["supervised_tokens"] == b.counts["supervised_tokens"] == total
        assert a.counts["sequences"] == b.counts["sequences"] == len(examples)
    frame = pd.DataFrame(EXAMPLES["prompt-completion"])
    frame.to_parquet(tmp_path / "pc.parquet")
    frame.to_csv(tmp_path / "pc.csv", index=False)
    for name in ("pc.parquet", "pc.csv"):
        assert load_examples(tmp_path / name) == EXAMPLES["prompt-completion"]
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, ex in enumerate(EXAMPLES["language-modeling"]):
        (folder / f"{i}.jsonl").write_text(json.dumps(ex) + "\n")
    assert load_examples(folder) == EXAMPLES["language-modeling"]


def test_truncation_keeps_the_start_and_packing_never_splits_an_example():
    tok = byte_tokenizer(PLAIN_TEMPLATE)
    long = [{"text": "x" * 40}, {"text": "y" * 5}, {"text": "z" * 5}]
    (batch,) = dataset_batches(long, tok, batch_size=3, max_length=10, sort_by_length=False)
    assert batch["input_ids"].shape == (3, 10)
    assert tok.decode(batch["input_ids"][0]) == "x" * 10
    rows = dataset_batches(long, tok, batch_size=8, max_length=14, packing=True)[0]
    # 10 + 6 > 14: the 10-token "x" row, then "y" and "z" (6 tokens each) share one
    assert rows["input_ids"].shape[0] == 2
    assert rows["position_ids"][1].tolist() == [*range(6), *range(6), 0, 1]


def test_bad_data_is_refused_by_name(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(DatasetError, match="no supported format"):
        dataset_batches([{"question": "?"}], tok)
    with pytest.raises(DatasetError, match="example 1 is 'prompt-completion'"):
        dataset_batches([{"text": "a"}, {"prompt": "b", "completion": "c"}], tok)
    with pytest.raises(DatasetError, match="needs a tokenizer with a chat template"):
        dataset_batches([{"messages": CHAT}], tok)
    with pytest.raises(DatasetError, match="every message needs 'role' and 'content'"):
        dataset_batches([{"messages": [{"text": "hi"}]}], byte_tokenizer(PLAIN_TEMPLATE))
    with pytest.raises(DatasetError, match="no example has a supervised token"):
        dataset_batches([{"prompt": "a" * 20, "completion": "b"}], tok, max_length=8)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no \.jsonl, \.json, \.parquet or \.csv"):
        dataset_batches(tmp_path, tok)
    with pytest.raises(DatasetError, match="no such file"):
        dataset_batches("./missing.jsonl", tok)


def test_a_template_that_renders_a_turn_differently_is_refused():
    odd = (
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}<|{{ m['role'] }}|>"
        "{{ m['content'] }}" + END + "{% endfor %}"
    )
    with pytest.raises(DatasetError, match="renders turn 2 differently"):
        tokenize_example({"messages": CHAT}, byte_tokenizer(odd))


def save_workspace(root: Path) -> Path:
    tok = byte_tokenizer(PLAIN_TEMPLATE)
    model = tiny_llama(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_heads=2,
                       num_kv_heads=1)  # fmt: skip
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def test_fit_and_train_on_your_own_jsonl_files_from_the_command_line(tmp_path, capsys):
    model = save_workspace(tmp_path)
    files = {}
    for fmt, examples in EXAMPLES.items():
        files[fmt] = tmp_path / f"{fmt}.jsonl"
        files[fmt].write_text("".join(json.dumps(e) + "\n" for e in examples * 3))
    common = ["--model", str(model), "--r", "2", "--lora_alpha", "4", "--batch_size", "2",
              "--device", "cpu", "--no_progress"]  # fmt: skip
    sources = ",".join(str(files[f]) for f in ("conversational", "prompt-completion"))
    fit_out = tmp_path / "fit"
    assert main(["fit", *common, "--dataset", sources, "--out", str(fit_out)]) == 0
    names = sorted(p.name for p in (fit_out / "precision").iterdir())
    assert names == ["conversational", "prompt-completion", "sum"]
    tok = byte_tokenizer(PLAIN_TEMPLATE)
    for fmt in ("conversational", "prompt-completion"):
        prec = lc.load_precision(fit_out / "precision" / fmt)
        expected = sum(expected_supervised(fmt, e) for e in EXAMPLES[fmt] * 3)
        assert prec.counts["supervised_tokens"] == expected
    pooled = lc.load_precision(fit_out / "precision" / "sum")
    assert pooled.metadata["sources"] == ["conversational", "prompt-completion"]
    train_out = tmp_path / "train"
    args = ["train", *common, "--adapter", str(fit_out), "--precision", str(fit_out),
            "--lam", "10", "--dataset", str(files["conversational-prompt-completion"]),
            "--max_steps", "2", "--packing", "--out", str(train_out)]  # fmt: skip
    assert main(args) == 0
    log = [json.loads(x) for x in (train_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[-1]["penalty"] > 0
    assert (train_out / "adapter" / "adapter_model.safetensors").is_file()
    del tok
    capsys.readouterr()
    assert main(["fit", *common, "--dataset", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "f2")]) == 1  # fmt: skip
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "f2").exists()


def test_training_on_packed_rows_sees_each_example_alone():
    """lc.train's NLL of a packed batch equals the NLL of the same examples padded."""
    tok = byte_tokenizer(PLAIN_TEMPLATE)
    model = add_lora(tiny_llama(vocab_size=len(tok), hidden_size=16, intermediate_size=24,
                                num_heads=2, num_kv_heads=1, dtype=torch.float64,
                                attn_implementation="sdpa"), r=2).double()  # fmt: skip
    with torch.no_grad():  # sharp attention: the context matters to every prediction
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.base_layer.weight", "k_proj.weight")):
                p.mul_(30.0)
    examples = EXAMPLES["prompt-completion"] * 2
    padded = dataset_batches(examples, tok, batch_size=4, max_length=64)
    packed = dataset_batches(examples, tok, batch_size=4, max_length=64, packing=True)
    assert len(padded) == len(packed) == 1
    a = lc.train(model, padded, lr=0.0, max_steps=1, progress=False)[0]["nll"]
    b = lc.train(model, packed, lr=0.0, max_steps=1, progress=False)[0]["nll"]
    assert a == pytest.approx(b, rel=1e-5)  # (transformers' loss is taken in float32)
    mixed = [{k: v for k, v in packed[0].items() if k in ("input_ids", "labels")}]
    c = lc.train(model, mixed, lr=0.0, max_steps=1, progress=False)[0]["nll"]
    assert abs(c - a) > 100 * abs(b - a) + 1e-3 * a  # without the position ids they would mix
