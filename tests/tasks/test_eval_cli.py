"""``lalora-curv eval`` end to end: a saved tiny model, a peft adapter and the real task files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers import DATA, byte_tokenizer
from lalora_curv.toy import tiny_llama


@pytest.mark.skipif(not DATA.is_dir(), reason="the shared data is absent")
def test_eval_command_writes_the_contract_json(tmp_path):
    tok = byte_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "results.json"
    cmd = [
        sys.executable,
        "-m",
        "lalora_curv",
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--adapter",
        str(tmp_path / "adapter"),
        "--tasks",
        "hellaswag,winogrande,arc_challenge,gsm8k",
        "--data-dir",
        str(DATA),
        "--limit",
        "3",
        "--max-new-tokens",
        "3",
        "--output",
        str(out),
        "--no-progress",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results) == {"hellaswag", "winogrande", "arc_challenge", "gsm8k"}
    assert set(results["hellaswag"]) == {"acc", "acc_norm", "n"}
    assert set(results["winogrande"]) == {"acc", "n"}
    assert set(results["gsm8k"]) == {"exact_match_strict", "exact_match_flexible", "n"}
    for metrics in results.values():
        assert metrics["n"] == 3
        assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "n")
    assert torch.isfinite(torch.tensor(results["arc_challenge"]["acc"]))


def test_eval_command_names_a_bad_task(tmp_path):
    tok = byte_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lalora_curv",
            "eval",
            "--model",
            str(tmp_path / "m"),
            "--tasks",
            "mmlu",
            "--output",
            str(tmp_path / "o.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "unknown task 'mmlu'" in done.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "", "--output", "OUT/o.json"], "--tasks is empty"),
        (["--tasks", "arc_challenge", "--output", "OUT"], "is a directory; give a file name"),
        (["--tasks", "arc_challenge", "--output", "OUT/no/o.json"], "does not exist"),
        (["--tasks", "arc_challenge", "--output", "OUT/o.json", "--limit", "0"], "--limit"),
    ],
)
def test_eval_refuses_before_any_work(tmp_path, capsys, extra, message):
    """Refused before the model is even loaded (no model there: a refusal after loading
    would name the model instead), nothing written."""
    from lalora_curv.__main__ import main

    args = [x.replace("OUT", str(tmp_path)) for x in extra]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["eval", "--model", str(tmp_path / "no-model"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(not DATA.is_dir(), reason="the shared data is absent")
def test_supervised_batches_mask_prompts_and_fit(tmp_path):
    import lalora_curv as lc
    from lalora_curv.tasks import load_records
    from lalora_curv.tasks.formatting import make_batches, supervised_examples

    tok = byte_tokenizer()
    records = load_records("gsm8k", DATA, limit=3)
    examples = supervised_examples("gsm8k", records)
    assert examples[0][0].startswith("Question: ") and examples[0][1].endswith(
        records[0]["answer"].split("####")[-1].strip()
    )
    batches = make_batches(examples, tok, batch_size=2, max_length=4096)
    first = batches[0]
    n_prompt = len(tok(examples[0][0].rstrip(), add_special_tokens=False)["input_ids"])
    row = first["labels"][0]
    assert (row[:n_prompt] == -100).all() and (
        row[n_prompt : first["attention_mask"][0].sum()] != -100
    ).all()
    supervised = first["input_ids"][0][row != -100]
    assert tok.decode(supervised[:-1]) == examples[0][1]  # the target, then EOS
    assert supervised[-1] == tok.eos_token_id
    assert (first["labels"][first["attention_mask"] == 0] == -100).all()
    short = make_batches(examples[:1], tok, max_length=16)[0]  # the prompt loses its start
    assert short["input_ids"].shape[1] == 16 and (short["labels"][0] != -100).all()
    arc = make_batches(
        supervised_examples("arc_challenge", load_records("arc_challenge", DATA, limit=4)), tok, 2
    )
    model = get_peft_model(
        tiny_llama(vocab_size=len(tok)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    prec = lc.fit_precision(model, arc, structure="kfac", progress=False, sources=["arc"])
    assert prec.counts["sequences"] == 4
