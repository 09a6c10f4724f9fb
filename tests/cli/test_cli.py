"""``lalora-curv`` fit -> inspect -> train -> eval end to end on a saved tiny Llama.

The references are independent of the command line: the same batches built with the task
helpers and ``lc.fit_precision`` called directly, the pooled precision from its defining
formula, eigenvalues and traces from ``torch.linalg`` on the stored factors and on the dense
precision, the trained adapter loaded back with peft.
"""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lalora_curv as lc
from helpers import byte_tokenizer, make_batches, make_model, random_delta
from lalora_curv.__main__ import main
from lalora_curv.cli import COMMANDS, normalise_argv
from lalora_curv.cli.fit import Structure
from lalora_curv.tasks import load_records
from lalora_curv.tasks.formatting import make_batches as task_batches
from lalora_curv.tasks.formatting import supervised_examples
from lalora_curv.toy import tiny_llama

REL = 1e-6  # float32 statistics, the same batches and seeds: equal up to summation order
SOURCES = ("winogrande", "arc_challenge")


def _record(task: str, i: int) -> dict:
    """A short record of ``task`` in its original schema (the byte tokenizer: 1 token/byte)."""
    a, b = i % 5 + 1, i % 3 + 2
    if task == "winogrande":
        names = ("Tom", "Ann", "Bo", "Kim")
        x, y = names[i % 4], names[(i + 1) % 4]
        return {
            "qID": f"w{i}",
            "sentence": f"{x} gave {y} {a} cups because _ was thirsty.",
            "option1": x,
            "option2": y,
            "answer": "2",
        }
    if task == "arc_challenge":
        choices = [{"text": str(a + b + d), "label": "ABCD"[d]} for d in range(4)]
        return {
            "id": f"a{i}",
            "question": {"stem": f"What is {a}+{b}?", "choices": choices},
            "answerKey": "A",
        }
    if task == "gsm8k":
        return {
            "question": f"Jo has {a} pens and gets {b}. How many?",
            "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}",
        }
    return {  # hellaswag
        "ind": i,
        "activity_label": "Cooking",
        "ctx_a": f"A cook cuts {a} onions.",
        "ctx_b": "she",
        "ctx": f"A cook cuts {a} onions. she",
        "split": "val",
        "split_type": "indomain",
        "label": i % 4,
        "endings": ["fries them.", "sings.", "sleeps.", "runs off."],
        "source_id": f"h{i}",
    }


FILES = {
    "winogrande": ("winogrande/train_m.jsonl", "winogrande/dev.jsonl"),
    "arc_challenge": (
        "arc_challenge/ARC-Challenge-Train.jsonl",
        "arc_challenge/ARC-Challenge-Test.jsonl",
    ),
    "gsm8k": ("gsm8k/train.jsonl", "gsm8k/test.jsonl"),
    "hellaswag": ("hellaswag/hellaswag.jsonl",),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny Llama with a byte tokenizer, and small task files in the original schemas."""
    root = tmp_path_factory.mktemp("cli")
    tok = byte_tokenizer()
    model = tiny_llama(
        vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1
    )
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for task, files in FILES.items():
        for offset, name in enumerate(files):
            path = root / "data" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps(_record(task, i + 10 * offset)) for i in range(6)]
            path.write_text("\n".join(lines) + "\n")
    return {"root": root, "model": root / "model", "data": root / "data"}


def fit_args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--model",
        str(ws["model"]),
        "--data-dir",
        str(ws["data"]),
        "--sources",
        ",".join(SOURCES),
        "--limit",
        "4",
        "--batch_size",
        "2",
        "--r",
        "2",
        "--lora_alpha",
        "4",
        "--target_modules",
        "q_proj,v_proj",
        "--estimator",
        "mc",
        "--mc_samples",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(workspace) -> Path:
    out = workspace["root"] / "fit"
    assert main(fit_args(workspace, out)) == 0
    return out


@pytest.fixture(scope="module")
def direct(workspace, fitted) -> dict[str, lc.Precision]:
    """``lc.fit_precision`` on the batches the fit run built, from its saved init."""
    model = _peft_model(workspace, fitted / "adapter_init")
    tok = byte_tokenizer()
    fits = {}
    for task in SOURCES:
        records = load_records(task, workspace["data"], split="train", limit=4)
        batches = task_batches(supervised_examples(task, records), tok, 2, 512)
        fits[task] = lc.fit_precision(
            model, batches, "kfac", estimator="mc", mc_samples=2, seed=3, progress=False
        )
    return fits


def _peft_model(ws, adapter: Path):
    base = AutoModelForCausalLM.from_pretrained(ws["model"])
    return PeftModel.from_pretrained(base, adapter, is_trainable=True)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    return abs(float(a) - float(b)) <= rel * abs(float(b))


def test_fit_writes_one_artifact_per_source_equal_to_a_direct_fit(workspace, fitted, direct):
    assert (fitted / "config.yaml").is_file() and (fitted / "spectra.png").is_file()
    metrics = [json.loads(x) for x in (fitted / "metrics.jsonl").read_text().splitlines()]
    assert [m["artifact"] for m in metrics] == [*SOURCES, "sum"]

    torch.manual_seed(3)  # the documented init: peft's default after manual_seed(seed)
    fresh = get_peft_model(
        AutoModelForCausalLM.from_pretrained(workspace["model"]),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    for task in SOURCES:
        saved = lc.load_precision(fitted / "precision" / task)
        assert saved.counts == direct[task].counts and saved.counts["sequences"] == 4
        assert saved.metadata["sources"] == [task]
        delta = random_delta(saved)
        assert _close(saved.quad(delta), direct[task].quad(delta))
        for m in saved.modules:  # and factor by factor
            for got, want in (
                (saved.input_cov, direct[task].input_cov),
                (saved.grad_cov, direct[task].grad_cov),
            ):
                torch.testing.assert_close(got[m], want[m], rtol=REL, atol=1e-12)
        for name, mu in saved.mode.items():  # mu is the saved init, which is seed 3's
            assert torch.equal(mu, dict(fresh.named_parameters())[_live(name)].detach())
        assert (
            metrics[SOURCES.index(task)]["counts/supervised_tokens"]
            == saved.counts["supervised_tokens"]
        )

    # the sum: P = (N_w P_w + N_a P_a) / (N_w + N_a), checked on the penalty, and it is `+`
    total = lc.load_precision(fitted / "precision" / "sum")
    n = {t: direct[t].counts["supervised_tokens"] for t in SOURCES}
    delta = random_delta(total, seed=1)
    expected = sum(n[t] * direct[t].quad(delta) for t in SOURCES) / sum(n.values())
    assert _close(total.quad(delta), expected)
    parts = [lc.load_precision(fitted / "precision" / t) for t in SOURCES]
    assert _close(total.quad(delta), (parts[0] + parts[1]).quad(delta), 1e-12)
    assert total.counts["supervised_tokens"] == sum(n.values())


def test_fit_pools_ekfac_as_one_fit_on_every_source(workspace, tmp_path):
    """EKFAC fits cannot be added (their eigenbases differ): the sum is one fit on all."""
    out = tmp_path / "fit"
    assert main(fit_args(workspace, out, "--structure", "ekfac")) == 0
    model = _peft_model(workspace, out / "adapter_init")
    tok = byte_tokenizer()
    batches = []
    for task in SOURCES:
        records = load_records(task, workspace["data"], split="train", limit=4)
        batches += task_batches(supervised_examples(task, records), tok, 2, 512)
    want = lc.fit_pooled_precision(
        model,
        {t: batches[2 * i : 2 * i + 2] for i, t in enumerate(SOURCES)},
        "ekfac", estimator="mc", mc_samples=2, seed=3, progress=False,
    )  # fmt: skip
    total = lc.load_precision(out / "precision" / "sum")
    assert total.metadata["sources"] == list(SOURCES) and total.counts == want.counts
    delta = random_delta(total)
    assert _close(total.quad(delta), want.quad(delta))
    part = lc.load_precision(out / "precision" / SOURCES[0])
    assert not _close(part.quad(delta), total.quad(delta))  # a per-source fit is not the sum


@pytest.mark.parametrize(("storage", "rank"), [("bfloat16", None), ("lowrank", 3)])
def test_fit_saves_every_artifact_in_the_chosen_storage(workspace, direct, tmp_path, storage, rank):
    extra = ["--storage", storage] + (["--storage_rank", str(rank)] if rank else [])
    assert main(fit_args(workspace, tmp_path / "fit", *extra)) == 0
    metrics = [json.loads(x) for x in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    # the sum is pooled as fitted, then converted
    want = {**direct, "sum": direct[SOURCES[0]] + direct[SOURCES[1]]}
    for i, (name, prec) in enumerate(want.items()):
        want[name] = prec = prec.with_storage(storage, rank)
        saved = lc.load_precision(tmp_path / "fit" / "precision" / name)
        assert saved.storage == prec.storage == metrics[i]["storage"]
        assert saved.storage == (
            {"format": "lowrank", "dtype": "float32", "rank": rank}
            if rank
            else {"format": "dense", "dtype": "bfloat16"}
        )
        assert saved.counts == prec.counts
        for got, ref in (
            (saved.input_factors, prec.input_factors),
            (saved.grad_factors, prec.grad_factors),
        ):
            for m in saved.modules:
                a, b = got[m].dense(torch.float64), ref[m].dense(torch.float64)
                # the same float32 statistics up to summation order; bfloat16 may round
                # them to neighbouring values (one unit in the 8th bit, 2^-7 relative)
                tol = 2**-7 if storage == "bfloat16" else 1e-4
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
        delta = random_delta(saved, seed=i)
        assert _close(saved.quad(delta), prec.quad(delta), 1e-3 if storage == "bfloat16" else 1e-5)


def test_fit_storage_options_are_checked_before_fitting(workspace, tmp_path, capsys):
    def fails(extra: list[str], message: str) -> None:
        assert main(fit_args(workspace, tmp_path / "f", *extra)) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (tmp_path / "f" / "precision").exists()  # nothing was fitted

    fails(["--storage", "lowrank"], "--storage lowrank needs --storage_rank K")
    fails(
        ["--storage", "bfloat16", "--storage_rank", "4"],
        "--storage_rank applies to --storage lowrank only, not 'bfloat16'",
    )
    fails(["--storage_rank", "4"], "--storage_rank applies to --storage lowrank only")
    fails(["--storage", "lowrank", "--storage_rank", "0"], "--storage_rank must be >= 1, got 0")
    fails(  # the library's refusal, as Precision.with_storage words it
        ["--structure", "ekfac", "--storage", "lowrank", "--storage_rank", "4"],
        "a 'ekfac' precision has no storage 'lowrank': its eigenbases",
    )
    with pytest.raises(SystemExit) as e:
        main(fit_args(workspace, tmp_path / "f", "--storage", "fp8"))
    assert e.value.code == 2 and "storage" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("fit", ["--storage", "lowrank"], "--storage lowrank needs --storage_rank K"),
        ("fit", ["--sources", "winogrande,sum"], "'sum' is reserved for the pooled precision"),
        ("fit", ["--sources", "winogrande,winogrande"], "names a source twice"),
        ("train", ["--lam", "-1"], "--lam must be >= 0"),
        ("train", ["--migu_threshold", "1.0"], "--migu_threshold must be in [0, 1)"),
        ("train", ["--init", "pissa", "--adapter", "x"], "cannot be combined with --adapter"),
        # refused only after loading (the model, the data, the precision): still untouched
        ("fit", ["--sources", "winogrande,mmlu"], "unknown task 'mmlu'"),
        ("fit", ["--mc_samples", "0"], "--mc_samples must be >= 1"),
        ("fit", ["--max_batches", "0"], "--max_batches must be >= 1"),
        ("fit", ["--backend", "backpack", "--structure", "kfac"], "not available here"),
        ("fit", ["--estimator", "batch-grad-squared"], "only defines a diagonal"),
        ("fit", ["--data_dir", "/nowhere"], "--data_dir /nowhere: no such folder"),
        ("train", ["--task", "mmlu"], "unknown task 'mmlu'"),
        ("train", ["--precision", "/nowhere", "--lam", "1"], "no such directory"),
        ("train", ["--precision", "CORRUPT", "--lam", "1"], "corrupt"),
        ("train", ["--grad_accum_steps", "0"], "--grad_accum_steps must be >= 1"),
        ("train", ["--lr", "-1"], "--lr must be >= 0"),
        ("train", ["--max_grad_norm", "0"], "--max_grad_norm must be > 0"),
        ("train", ["--checkpoint_every", "-1"], "--checkpoint_every must be >= 1"),
        ("train", ["--max_steps", "0"], "--max_steps must be >= 1"),
        ("train", ["--adapter", "/nowhere"], "no peft adapter there"),
    ],
)
def test_refused_arguments_leave_an_earlier_run_directory_alone(
    workspace, tmp_path, capsys, command, extra, message
):
    """A refused run leaves an existing run directory byte for byte as it was (its config,
    metrics, saved adapters), and says why in one line, without a traceback."""
    out = tmp_path / "earlier"
    (out / "adapter_init").mkdir(parents=True)
    before = {
        ".lalora-curv-command": f"{command}\n",
        "config.yaml": "lr: 0.001\n",
        "metrics.jsonl": "{}\n",
        "adapter_init/adapter_model.safetensors": "weights",
    }
    for name, text in before.items():
        (out / name).write_text(text)
    if "CORRUPT" in extra:
        corrupt = tmp_path / "corrupt"
        corrupt.mkdir()
        (corrupt / "precision.json").write_text("{not json")
        (corrupt / "precision.safetensors").write_bytes(b"\0" * 16)
        extra = tuple(str(corrupt) if x == "CORRUPT" else x for x in extra)

    def digest(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file()}  # fmt: skip

    snapshot = digest(out)
    args = (fit_args if command == "fit" else _train_args)(workspace, out, *extra)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("lalora-curv: error:")]
    assert len(errors) == 1 and message in errors[0], err  # one line says it all
    assert digest(out) == snapshot


def test_fit_on_self_generated_samples_records_how_they_were_drawn(workspace, tmp_path, capsys):
    out = tmp_path / "self"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Question:\n\nAnswer:\n")
    args = [
        "fit",
        "--model",
        str(workspace["model"]),
        "--self_generated",
        "5",
        "--prompts",
        str(prompts),
        "--max_length",
        "14",
        "--batch_size",
        "2",
        "--r",
        "2",
        "--estimator",
        "mc",
        "--seed",
        "4",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    saved = lc.load_precision(out / "precision" / "self-generated")
    assert saved.metadata["sources"] == ["self-generated"]
    (settings,) = saved.metadata["self_generated"]
    assert settings["num_sequences"] == 5 and settings["max_length"] == 14
    assert settings["prompts"] == ["Question:", "Answer:"] and settings["seed"] == 4
    # the reference: the library on the saved init, with the same settings
    model = _peft_model(workspace, out / "adapter_init")
    batches = lc.self_generated_batches(
        model,
        byte_tokenizer(),
        5,
        14,
        ["Question:", "Answer:"],
        seed=4,
        batch_size=2,
        progress=False,
    )
    direct = lc.fit_precision(model, batches, "kfac", estimator="mc", seed=4, progress=False)
    assert saved.counts == direct.counts
    delta = random_delta(saved)
    assert _close(saved.quad(delta), direct.quad(delta))
    summed = lc.load_precision(out / "precision" / "sum")
    assert summed.metadata["self_generated"] == [settings]
    (tmp_path / "empty.txt").write_text("\n")
    bad = list(args)
    bad[bad.index(str(prompts))] = str(tmp_path / "empty.txt")
    bad[-1] = str(tmp_path / "bad")
    assert main(bad) == 1
    assert "holds no prompt" in capsys.readouterr().err


def _live(param_name: str) -> str:
    """peft's saved key -> the live parameter name of the default adapter."""
    return param_name.replace(".weight", ".default.weight")


def test_config_file_gives_the_run_the_flags_gave(workspace, fitted, tmp_path):
    config = yaml.safe_load((fitted / "config.yaml").read_text())
    assert config["sources"] == ",".join(SOURCES) and config["mc_samples"] == 2
    out = tmp_path / "again"
    assert main(["fit", "--config", str(fitted / "config.yaml"), "--out", str(out)]) == 0
    again = yaml.safe_load((out / "config.yaml").read_text())
    assert again == {**config, "out": str(out)}
    for name in (*SOURCES, "sum"):
        a = load_file(fitted / "precision" / name / "precision.safetensors")
        b = load_file(out / "precision" / name / "precision.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_inspect_reports_the_factors_spectra_and_traces(fitted, tmp_path, capsys):
    for name, components in (("winogrande", 1), ("sum", 2)):
        out = tmp_path / name
        assert (
            main(["inspect", "--precision", str(fitted / "precision" / name), "--out", str(out)])
            == 0
        )
        report = json.loads((out / "report.json").read_text())
        assert (out / "spectra.png").is_file() and (out / "config.yaml").is_file()
        prec = lc.load_precision(fitted / "precision" / name)
        assert report["metadata"]["counts"] == prec.counts
        for module, m in report["modules"].items():
            for k in range(components):
                tag = "" if components == 1 else f"[{k}]"
                for factor, stored in (("input_cov", prec.input_cov), ("grad_cov", prec.grad_cov)):
                    got = torch.tensor(
                        m["factors"][factor + tag]["eigenvalues"], dtype=torch.float64
                    )
                    want = torch.linalg.eigvalsh(stored[module][k].double()).flip(0)
                    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        dense = prec.to_dense().double()
        assert report["trace"] == pytest.approx(float(dense.trace()), rel=1e-5)
    printed = capsys.readouterr().out
    assert "input_cov[1]" in printed and "grad_cov" in printed and "kfac" in printed


@pytest.mark.parametrize("structure", lc.STRUCTURES)
def test_inspect_every_structure(structure, tmp_path):
    model, batches = make_model(), make_batches()  # float64, B0 != 0: every block non-zero
    prec = lc.fit_precision(model, batches, structure, progress=False, stats_dtype=torch.float64)
    lc.save_precision(prec, tmp_path / "p")
    assert main(["inspect", "--precision", str(tmp_path / "p"), "--out", str(tmp_path / "i")]) == 0
    report = json.loads((tmp_path / "i" / "report.json").read_text())
    assert (tmp_path / "i" / "spectra.png").is_file()
    dense = prec.to_dense() if prec.quadratic else None
    if dense is not None:  # the reported spectra are the dense precision's, block by block
        assert report["trace"] == pytest.approx(float(dense.trace()), rel=1e-10)
    for name, spec in prec.modules.items():
        factors = report["modules"][name]["factors"]
        if structure in ("diag", "ekfac"):
            for p, key in ((spec.lora_A_name, "lora_A"), (spec.lora_B_name, "lora_B")):
                got = torch.tensor(factors[key]["eigenvalues"], dtype=torch.float64)
                want = torch.linalg.eigvalsh(_param_block(prec, dense, p)).flip(0)
                torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
        elif structure == "merged-diag":
            got = torch.tensor(factors["weight_diag"]["eigenvalues"], dtype=torch.float64)
            want = prec.weight_diag[name].flatten().sort(descending=True).values
            torch.testing.assert_close(got, want)
            assert report["modules"][name]["trace"] == pytest.approx(float(want.sum()))
        else:
            for key, stored in (("input_cov", prec.input_cov), ("grad_cov", prec.grad_cov)):
                got = torch.tensor(factors[key]["eigenvalues"], dtype=torch.float64)
                want = torch.linalg.eigvalsh(stored[name][0]).flip(0)
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
            if structure == "merged-kfac":  # tr(G (x) C) = tr G tr C on the merged update
                C, G = prec.input_cov[name][0], prec.grad_cov[name][0]
                assert report["modules"][name]["trace"] == pytest.approx(
                    float(torch.kron(G, C).trace()), rel=1e-10
                )


def _param_block(prec: lc.Precision, dense: torch.Tensor, param: str) -> torch.Tensor:
    """The diagonal block of one parameter in the dense precision (order ``param_names``)."""
    sizes = [prec.mode[n].numel() for n in prec.param_names]
    start = sum(sizes[: prec.param_names.index(param)])
    size = prec.mode[param].numel()
    return dense[start : start + size, start : start + size].double()


def test_train_starts_at_the_fit_init_and_saves_a_peft_adapter(workspace, fitted, tmp_path):
    out = tmp_path / "train"
    args = ["train", "--model", str(workspace["model"]), "--adapter", str(fitted)]
    args += ["--precision", str(fitted), "--lam", "10", "--data-dir", str(workspace["data"])]
    args += ["--limit", "4", "--batch_size", "2", "--max_steps", "3", "--lr", "1e-2"]
    args += ["--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "nll" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["penalty"] == 0.0  # theta = mu at step 1: started from the fit's init
    assert steps[-1]["penalty"] > 0.0
    assert (out / "training.png").is_file() and (out / "config.yaml").is_file()

    trained = _peft_model(workspace, out / "adapter")
    init = load_file(fitted / "adapter_init" / "adapter_model.safetensors")
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert init.keys() == final.keys()
    assert any(not torch.equal(init[k], final[k]) for k in init)
    total = lc.load_precision(fitted / "precision" / "sum")
    with torch.no_grad():
        assert float(total.penalty(trained)) > 0.0

    results = tmp_path / "eval"
    eval_args = ["eval", "--model", str(workspace["model"]), "--adapter", str(out)]
    eval_args += ["--tasks", "winogrande,arc_challenge,gsm8k", "--data-dir", str(workspace["data"])]
    eval_args += ["--limit", "2", "--max-new-tokens", "2", "--no-progress", "--out", str(results)]
    assert main(eval_args) == 0
    scores = json.loads((results / "results.json").read_text())
    assert {t: s["n"] for t, s in scores.items()} == {
        "winogrande": 2,
        "arc_challenge": 2,
        "gsm8k": 2,
    }
    assert (results / "config.yaml").is_file()


def test_train_rebases_a_kfac_precision_onto_a_new_adapter(workspace, fitted, tmp_path, capsys):
    out = tmp_path / "train"
    args = ["train", "--model", str(workspace["model"]), "--r", "3", "--lora_alpha", "6"]
    args += ["--seed", "7", "--precision", str(fitted), "--lam", "10", "--max_steps", "2"]
    args += ["--data-dir", str(workspace["data"]), "--limit", "2", "--batch_size", "2"]
    args += ["--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert "re-based" in capsys.readouterr().out  # another rank and seed than the fit's
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["penalty"] == 0.0 and steps[1]["penalty"] > 0.0  # mu = the new init


def _train_args(ws, out, *extra):
    args = ["train", "--model", str(ws["model"]), "--r", "2", "--lora_alpha", "4"]
    args += ["--data-dir", str(ws["data"]), "--limit", "4", "--batch_size", "2"]
    return [*args, "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("init", ["pissa", "olora", "milora"])
def test_train_with_a_residual_init_saves_an_adapter_for_the_original_base(
    workspace, tmp_path, init
):
    """PiSSA/OLoRA/MiLoRA change the base weights to W - s B0 A0; the saved adapter is peft's
    rank-2r conversion [B, -B0][A; A0] for the original base. At lr 0 it must leave the
    original model's function exactly as it was; trained, it must change it."""
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(workspace["model"])
    reference = _logits(base, ids)
    for lr, changes in (("0", False), ("1e-2", True)):
        out = tmp_path / f"train-{lr}"
        assert (
            main(_train_args(workspace, out, "--init", init, "--lr", lr, "--max_steps", "3")) == 0
        )
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["lora_alpha"] == 8  # s = alpha / r unchanged
        init_weights = load_file(out / "adapter_init" / "adapter_model.safetensors")
        saved = load_file(out / "adapter" / "adapter_model.safetensors")
        for key, t in init_weights.items():  # the second half is the init: -B0 and A0
            half = saved[key][:, 2:] if "lora_B" in key else saved[key][2:]
            torch.testing.assert_close(half, -t if "lora_B" in key else t)
        loaded = _peft_model(workspace, out / "adapter")
        got = _logits(loaded, ids)
        if changes:
            assert (got - reference).abs().max() > 1e-4
        else:
            torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)


def test_train_rebases_a_default_init_precision_onto_a_pissa_adapter(
    workspace, fitted, tmp_path, capsys
):
    out = tmp_path / "pissa-kfac"
    args = _train_args(workspace, out, "--init", "pissa", "--precision", str(fitted))
    assert main([*args, "--lam", "10", "--max_steps", "2", "--lr", "1e-2"]) == 0
    assert "re-based" in capsys.readouterr().out
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["penalty"] == 0.0 and steps[1]["penalty"] > 0.0
    # at PiSSA's non-zero B0 the lora_A block of the re-based precision is not zero
    prec = lc.load_precision(fitted / "precision" / "sum")
    base = AutoModelForCausalLM.from_pretrained(workspace["model"])
    torch.manual_seed(0)
    pissa = get_peft_model(
        base,
        LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
        ),
    )
    rebased = prec.rebase(pissa)
    d = {n: torch.zeros_like(t) for n, t in rebased.mode.items()}
    name = next(n for n in d if "lora_A" in n)
    d[name] = torch.randn_like(d[name])
    assert float(rebased.quad(d)) > 0 and float(prec.quad(d)) == 0.0


def test_train_with_migu_updates_only_the_masked_rows(workspace, fitted, tmp_path, capsys):
    out = tmp_path / "migu"
    args = _train_args(workspace, out, "--adapter", str(fitted), "--migu_threshold", "0.7")
    assert main([*args, "--max_steps", "1", "--lr", "1e-2", "--max_grad_norm", "null"]) == 0
    init = load_file(fitted / "adapter_init" / "adapter_model.safetensors")
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    for key in (k for k in init if "lora_B" in k):
        rows = (final[key] != init[key]).any(dim=1)
        top = -(-3 * len(rows) // 10)  # ceil(0.3 D): the rows above the 0.7-quantile
        assert 0 < int(rows.sum()) <= top < len(rows), (key, rows)  # one step, one mask
    assert main(_train_args(workspace, tmp_path / "bad", "--migu_threshold", "1.0")) == 1
    assert "--migu_threshold must be in [0, 1), got 1.0" in capsys.readouterr().err
    bad = _train_args(workspace, tmp_path / "bad", "--adapter", str(fitted), "--init", "pissa")
    assert main(bad) == 1
    assert "cannot be combined with --adapter" in capsys.readouterr().err


def test_train_resumes_from_its_checkpoints(workspace, fitted, tmp_path):
    out = tmp_path / "train"
    args = ["train", "--model", str(workspace["model"]), "--adapter", str(fitted)]
    args += ["--precision", str(fitted), "--lam", "10", "--data-dir", str(workspace["data"])]
    args += ["--limit", "4", "--batch_size", "2", "--checkpoint_every", "1", "--lr", "1e-2"]
    args += ["--device", "cpu", "--no-progress", "--out", str(out)]
    assert main([*args, "--max_steps", "3"]) == 0
    whole = load_file(out / "adapter" / "adapter_model.safetensors")
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (out / "metrics.jsonl").unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint-3")
    assert main([*args, "--max_steps", "3", "--resume"]) == 0
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [3]  # steps 1-2 came from checkpoint-2
    assert resumed[0]["nll"] == pytest.approx(first[2]["nll"], rel=1e-6)
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(whole[k], again[k], rtol=1e-5, atol=1e-7) for k in whole)


def test_bad_inputs_exit_with_a_message_naming_them(workspace, fitted, tmp_path, capsys):
    def fails(args: list[str], message: str) -> None:
        assert main(args) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

    fails(
        fit_args(workspace, tmp_path / "f", "--sources", "winogrande,mmlu"), "unknown task 'mmlu'"
    )
    fails(
        fit_args(workspace, tmp_path / "f", "--sources", "hellaswag"),
        "hellaswag has no local training split",
    )
    train = ["train", "--model", str(workspace["model"]), "--adapter", str(fitted)]
    train += ["--data-dir", str(workspace["data"]), "--limit", "2", "--max_steps", "1"]
    train += ["--device", "cpu", "--no-progress", "--out", str(tmp_path / "t")]
    fails([*train, "--precision", str(tmp_path / "nowhere"), "--lam", "1"], "no such directory")
    fails([*train, "--lam", "1"], "--lam > 0 (or --c, --source_nll_budget) needs --precision")
    fails([*train, "--out", str(fitted)], "is a fit run directory; give train its own --out")

    other = get_peft_model(  # another base model: hidden size 24 instead of 16
        tiny_llama(vocab_size=len(byte_tokenizer()), hidden_size=24, num_heads=2, num_kv_heads=1),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[5, 6, 7, 8]])}
    lc.save_precision(lc.fit_precision(other, [batch], progress=False), tmp_path / "other")
    fails(
        [*train, "--precision", str(tmp_path / "other"), "--lam", "1"],
        "does not fit this model's adapter",
    )
    fails([*train, "--model", str(tmp_path / "no-model")], "no-model: no such directory")

    with pytest.raises(SystemExit) as e:  # a value outside the choices: jsonargparse says so
        main(fit_args(workspace, tmp_path / "f", "--structure", "full"))
    assert e.value.code == 2 and "structure" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"lalora-curv {command} --" in text and "--config" in text


def test_option_spellings_and_choices():
    assert normalise_argv(["--data-dir", "a-b", "--no-progress", "--max-new-tokens=3", "-1"]) == [
        "--data_dir",
        "a-b",
        "--no_progress",
        "--max_new_tokens=3",
        "-1",
    ]
    assert typing.get_args(Structure) == lc.STRUCTURES
