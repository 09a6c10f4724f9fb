"""The precision artifact: byte-stable round trips, atomic writes, one clear error per problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lalora_curv as lc
from helpers import make_batches, make_model
from lalora_curv import artifact


def fit(model, structure="kfac", **kw):
    return lc.fit_precision(model, make_batches(), structure=structure, progress=False, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "prec"
    lc.save_precision(fit(make_model(dtype=torch.float32), sources=["toy-a"]), path)
    return path


def write_signed(art: Path, meta: dict) -> None:
    """Write edited metadata with its digest fixed up, as a newer version (or a forger) would:
    what the digest cannot catch, the value checks must."""
    meta = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    meta["metadata_sha256"] = artifact.metadata_digest(meta)
    (art / artifact.METADATA_FILE).write_text(json.dumps(meta))


def copy_artifact(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("structure", lc.STRUCTURES)
def test_round_trip_is_byte_stable_and_exact(tmp_path, structure):
    model = make_model(dtype=torch.float32)
    prec = fit(model, structure, sources=["toy"])
    if structure == "kfac":
        prec = prec + fit(model, structure, sources=["toy-2"])  # two components
    lc.save_precision(prec, tmp_path / "a")
    loaded = lc.load_precision(tmp_path / "a")
    lc.save_precision(loaded, tmp_path / "b")
    for name in (artifact.TENSORS_FILE, artifact.METADATA_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert type(loaded) is type(prec) and loaded.param_names == prec.param_names
    assert loaded.metadata == prec.metadata
    d = {n: torch.randn_like(t) for n, t in prec.mode.items()}
    assert torch.equal(loaded.quad(d), prec.quad(d))
    assert torch.equal(loaded.penalty(model), prec.penalty(model))


def test_metadata_contents(saved):
    meta = json.loads((saved / artifact.METADATA_FILE).read_text())
    assert meta["kind"] == artifact.KIND and meta["format_version"] == artifact.FORMAT_VERSION
    for key in (
        "library_version",
        "structure",
        "backend",
        "estimator",
        "mc_samples",
        "counts",
        "modules",
        "adapter",
        "sources",
        "created",
        "lora_B_init_zero",
        "base_model",
    ):
        assert key in meta, key
    assert meta["adapter"]["r"] == 3 and meta["adapter"]["lora_alpha"] == 6.0
    assert meta["sources"] == ["toy-a"]
    assert list(meta) == sorted(meta)  # sorted keys
    first = meta["modules"][0]
    assert first == {
        "name": "base_model.model.model.layers.0.self_attn.q_proj",
        "in_features": 16,
        "out_features": 16,
        "rank": 3,
        "scaling": 2.0,
    }


def test_loads_in_another_process(saved):
    code = textwrap.dedent(f"""
        import lalora_curv as lc
        p = lc.load_precision({str(saved)!r})
        print(p.structure, p.counts["supervised_tokens"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["kfac", str(lc.load_precision(saved).counts["supervised_tokens"])]


def test_missing_directory_and_files(tmp_path, saved):
    with pytest.raises(lc.ArtifactError, match="no such precision directory"):
        lc.load_precision(tmp_path / "nope")
    art = copy_artifact(saved, tmp_path / "x")
    (art / artifact.TENSORS_FILE).unlink()
    with pytest.raises(lc.ArtifactError, match=r"precision\.safetensors: missing"):
        lc.load_precision(art)


def test_corrupt_json(tmp_path, saved):
    art = copy_artifact(saved, tmp_path / "x")
    (art / artifact.METADATA_FILE).write_text("{not json")
    with pytest.raises(lc.ArtifactError, match="corrupt JSON"):
        lc.load_precision(art)


def test_truncated_tensors(tmp_path, saved):
    art = copy_artifact(saved, tmp_path / "x")
    blob = (art / artifact.TENSORS_FILE).read_bytes()
    (art / artifact.TENSORS_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(lc.ArtifactError, match="corrupt or truncated"):
        lc.load_precision(art)


def test_flipped_byte_detected(tmp_path, saved):
    art = copy_artifact(saved, tmp_path / "x")
    blob = bytearray((art / artifact.TENSORS_FILE).read_bytes())
    blob[-3] ^= 0xFF
    (art / artifact.TENSORS_FILE).write_bytes(bytes(blob))
    with pytest.raises(lc.ArtifactError, match="SHA-256 differs"):
        lc.load_precision(art)


def test_foreign_safetensors(tmp_path, saved):
    art = copy_artifact(saved, tmp_path / "x")
    save_file({"weight": torch.zeros(2)}, art / artifact.TENSORS_FILE)
    with pytest.raises(lc.ArtifactError, match="not written by lalora-curv"):
        lc.load_precision(art)


def test_foreign_json(tmp_path, saved):
    art = copy_artifact(saved, tmp_path / "x")
    (art / artifact.METADATA_FILE).write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    with pytest.raises(lc.ArtifactError, match="not a lalora-curv precision"):
        lc.load_precision(art)


def test_unknown_format_version(tmp_path, saved):
    art = copy_artifact(saved, tmp_path / "x")
    meta = json.loads((art / artifact.METADATA_FILE).read_text())
    meta["format_version"] = 99
    (art / artifact.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(lc.ArtifactError, match="unknown format version 99"):
        lc.load_precision(art)


def test_unknown_keys_dropped_with_warning(tmp_path, saved):
    art = copy_artifact(saved, tmp_path / "x")
    meta = json.loads((art / artifact.METADATA_FILE).read_text())
    meta["from_the_future"] = 1
    write_signed(art, meta)
    with pytest.warns(UserWarning, match="from_the_future"):
        prec = lc.load_precision(art)
    assert "from_the_future" not in prec.metadata


def test_files_from_different_saves(tmp_path, saved):
    other = tmp_path / "other"
    lc.save_precision(fit(make_model(dtype=torch.float32, seed=4)), other)
    art = copy_artifact(saved, tmp_path / "x")
    (art / artifact.TENSORS_FILE).write_bytes((other / artifact.TENSORS_FILE).read_bytes())
    with pytest.raises(lc.ArtifactError, match=r"does not match precision\.json"):
        lc.load_precision(art)


def test_non_finite_tensor(tmp_path):
    prec = fit(make_model(dtype=torch.float32), "diag")
    name = prec.param_names[1]
    prec.diag[name][0, 0] = float("nan")
    with pytest.raises(lc.ArtifactError, match=f"cannot save: tensor 'diag.{name}' has NaN/inf"):
        lc.save_precision(prec, tmp_path / "nan")
    # a forged file with a NaN (and both digests fixed up) is refused on load
    prec.diag[name][0, 0] = 1.0
    path = lc.save_precision(prec, tmp_path / "nan", dedup=False)
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    tensors = st_load((path / artifact.TENSORS_FILE).read_bytes())
    tensors[f"diag.{name}"][0, 0] = float("nan")
    blob = st_save(tensors, metadata={"format": f"{artifact.KIND}/{artifact.FORMAT_VERSION}"})
    (path / artifact.TENSORS_FILE).write_bytes(blob)
    meta = json.loads((path / artifact.METADATA_FILE).read_text())
    import hashlib

    meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    write_signed(path, meta)
    with pytest.raises(lc.ArtifactError, match=f"tensor 'diag.{name}' has NaN/inf"):
        lc.load_precision(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("component_weights", [-1.0], "component_weights"),
        ("component_weights", ["x"], "component_weights"),
        ("component_weights", [], "component_weights"),
        ("counts", {"supervised_tokens": -3}, "non-negative integers"),
        (
            "modules",
            [{"name": "m", "in_features": 2, "out_features": 2, "rank": 1, "scaling": -2.0}],
            "malformed module entry",
        ),
    ],
)
def test_implausible_metadata_values(tmp_path, saved, key, value, message):
    art = copy_artifact(saved, tmp_path / "x")
    meta = json.loads((art / artifact.METADATA_FILE).read_text())
    meta[key] = value
    write_signed(art, meta)
    with pytest.raises(lc.ArtifactError, match=message):
        lc.load_precision(art)


def test_nan_in_metadata(tmp_path, saved):
    art = copy_artifact(saved, tmp_path / "x")
    text = (art / artifact.METADATA_FILE).read_text()
    text = text.replace('"component_weights": [\n    1.0\n  ]', '"component_weights": [NaN]')
    assert "NaN" in text
    (art / artifact.METADATA_FILE).write_text(text)
    with pytest.raises(lc.ArtifactError, match="non-finite number NaN"):
        lc.load_precision(art)


def test_wrong_shape_in_metadata(tmp_path, saved):
    art = copy_artifact(saved, tmp_path / "x")
    meta = json.loads((art / artifact.METADATA_FILE).read_text())
    meta["modules"][0]["rank"] = 7
    write_signed(art, meta)
    with pytest.raises(lc.ArtifactError, match="has shape"):
        lc.load_precision(art)


def test_interrupted_save_keeps_the_old_artifact(tmp_path, monkeypatch):
    path = tmp_path / "prec"
    old = fit(make_model(dtype=torch.float32))
    lc.save_precision(old, path)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    new = fit(make_model(dtype=torch.float32, seed=3))

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        lc.save_precision(new, path)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["prec"]  # no staging directory left behind
    lc.save_precision(new, path)  # and a later save replaces it
    assert lc.load_precision(path).counts == new.counts


def test_crash_between_the_renames_restores_the_old_artifact(tmp_path, monkeypatch):
    path = tmp_path / "prec"
    lc.save_precision(fit(make_model(dtype=torch.float32)), path)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # old -> aside done; staging -> path fails
            raise OSError("power cut")
        real_rename(src, dst)

    from lalora_curv import atomic

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="power cut"):
        lc.save_precision(fit(make_model(dtype=torch.float32, seed=3)), path)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["prec"]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(lc.ArtifactError, match=r"holds files a precision does not write \(keep"):
        lc.save_precision(fit(make_model(dtype=torch.float32)), tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").read_text() == "x"


def test_penalty_on_mismatching_adapter(saved):
    prec = lc.load_precision(saved)
    with pytest.raises(
        lc.AdapterMismatchError, match=r"module '.*k_proj', which the precision does not cover"
    ):
        prec.penalty(
            make_model(dtype=torch.float32, targets=("q_proj", "k_proj", "v_proj", "down_proj"))
        )
    with pytest.raises(lc.AdapterMismatchError, match=r"'.*down_proj' has no LoRA adapter"):
        prec.penalty(make_model(dtype=torch.float32, targets=("q_proj", "v_proj")))
    with pytest.raises(lc.AdapterMismatchError, match=r"rank 5.*rebase"):
        prec.penalty(make_model(dtype=torch.float32, r=5))
    with pytest.raises(
        lc.AdapterMismatchError, match="no peft LoRA Linear module with adapter 'other'"
    ):
        prec.penalty(make_model(dtype=torch.float32), adapter_name="other")
    with pytest.raises(lc.LaloraError, match=r"non-zero lora_B \(B0 != 0\)"):
        prec.rebase(make_model(dtype=torch.float32, r=5))  # fitted at B0 != 0: not portable


def test_penalty_notices_a_replaced_adapter(saved):
    prec = lc.load_precision(saved)
    model = make_model(dtype=torch.float32)
    prec.penalty(model)  # resolves and caches the adapter's modules
    model.delete_adapter("default")
    from peft import LoraConfig

    model.add_adapter("default", LoraConfig(r=5, target_modules=["q_proj", "v_proj", "down_proj"]))
    with pytest.raises(lc.AdapterMismatchError, match="rank 5"):
        prec.penalty(model)


def test_penalty_on_another_base_model_shape(saved):
    from lalora_curv.toy import add_lora, tiny_llama

    other = add_lora(
        tiny_llama(hidden_size=24, intermediate_size=24, num_heads=2, num_kv_heads=1),
        r=3,
        alpha=6.0,
        target_modules=("q_proj", "v_proj", "down_proj"),
    )
    with pytest.raises(
        lc.AdapterMismatchError, match=r"down_proj. is 24x24 in the model but 16x24"
    ):
        lc.load_precision(saved).penalty(other)
