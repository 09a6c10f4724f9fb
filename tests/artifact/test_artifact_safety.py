"""Nothing is silently accepted: precision artifacts under edits (digests re-signed as a forger
would), truncations, byte flips, overflows, kills between renames and careless re-saves (the
checkpoints' share: tests/training/test_checkpoint_safety.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import lalora_curv as lc
from helpers import make_batches, make_model
from lalora_curv import artifact


def fit(model=None, structure="kfac"):
    model = model or make_model(dtype=torch.float32)
    return lc.fit_precision(model, make_batches(), structure=structure, progress=False)


def resign(path: Path, meta_edit=None, tensor_edit=None) -> None:
    """Edit an artifact and fix both digests up, as a deliberate forger would: what the
    digests cannot catch, the value checks must."""
    tensors = st_load((path / artifact.TENSORS_FILE).read_bytes())
    if tensor_edit:
        tensor_edit(tensors)
    blob = st_save(tensors, metadata={"format": f"{artifact.KIND}/{artifact.FORMAT_VERSION}"})
    (path / artifact.TENSORS_FILE).write_bytes(blob)
    meta = json.loads((path / artifact.METADATA_FILE).read_text())
    if meta_edit:
        meta_edit(meta)
    meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["metadata_sha256"] = artifact.metadata_digest(meta)
    (path / artifact.METADATA_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(structure="tri-kfac"), "does not match its digest"),
        (lambda m: m.update(scale=2.0), "does not match its digest"),
        (lambda m: m["counts"].update(supervised_tokens=1), "does not match its digest"),
        (lambda m: m.update(format_version=True), "unknown format version True"),
    ],
)
def test_any_metadata_edit_is_refused(tmp_path, edit, message):
    path = lc.save_precision(fit(), tmp_path / "p")
    meta = json.loads((path / artifact.METADATA_FILE).read_text())
    edit(meta)
    (path / artifact.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(lc.ArtifactError, match=message):
        lc.load_precision(path)


@pytest.mark.parametrize(
    ("meta_edit", "tensor_edit", "message"),
    [
        (lambda m: m.update(scale="abc"), None, "'scale' must be a positive finite number"),
        (lambda m: m.update(scale=-1.0), None, "'scale' must be a positive finite number"),
        (
            None,
            lambda t: t.update({k: -v for k, v in t.items() if k.startswith("grad_cov.")}),
            "negative diagonal",
        ),
        (
            None,
            lambda t: [
                t.update({k: v - 3 * torch.eye(v.shape[-1]) * v.diagonal(dim1=-2, dim2=-1).max()})
                for k, v in list(t.items())
                if k.startswith("input_cov.")
            ],
            "negative diagonal|not positive semi-definite",
        ),
        (
            None,
            lambda t: [
                t.update({k: v + torch.triu(torch.ones_like(v), 1)})
                for k, v in list(t.items())
                if k.startswith("input_cov.")
            ],
            "not symmetric",
        ),
        (
            None,
            lambda t: t.update({k: t[k].double() for k in [min(k for k in t if "mode." in k)]}),
            "one float dtype",
        ),
    ],
)
def test_values_behind_the_digest_are_checked(tmp_path, meta_edit, tensor_edit, message):
    path = lc.save_precision(fit(), tmp_path / "p", dedup=False)
    resign(path, meta_edit, tensor_edit)
    with pytest.raises(lc.ArtifactError, match=message):
        lc.load_precision(path)


def test_an_overflowing_number_in_the_metadata_is_refused(tmp_path):
    path = lc.save_precision(fit(), tmp_path / "p")
    text = (path / artifact.METADATA_FILE).read_text()
    (path / artifact.METADATA_FILE).write_text(text.replace('"scale": 1.0', '"scale": 1e999'))
    with pytest.raises(lc.ArtifactError, match="non-finite number 1e999"):
        lc.load_precision(path)


def test_a_negative_diagonal_is_refused(tmp_path):
    path = lc.save_precision(fit(structure="diag"), tmp_path / "p", dedup=False)
    resign(path, tensor_edit=lambda t: t.update({k: -v - 1 for k, v in t.items() if "diag." in k}))
    with pytest.raises(lc.ArtifactError, match="negative entries"):
        lc.load_precision(path)


def test_a_format_1_artifact_still_loads_with_a_warning(tmp_path):
    prec = fit()
    path = lc.save_precision(prec, tmp_path / "p")
    meta = json.loads((path / artifact.METADATA_FILE).read_text())
    meta["format_version"] = 1
    del meta["metadata_sha256"]
    (path / artifact.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="format-1 artifact"):
        loaded = lc.load_precision(path)
    assert loaded.digest() == prec.digest()


def test_save_refuses_non_finite_precisions(tmp_path):
    prec = fit()
    with pytest.raises(lc.LaloraError, match="finite factor"):
        _ = float("inf") * prec
    with pytest.raises(lc.ArtifactError, match="overflow"):
        lc.save_precision(
            (1e39 * prec), tmp_path / "p"
        )  # K-FAC: its component weight overflows float32
    with pytest.raises(lc.ArtifactError, match="NaN/inf"):
        lc.save_precision(
            (1e39 * fit(structure="diag")), tmp_path / "p"
        )  # diag: its tensors overflow
    assert not (tmp_path / "p").exists()
    assert not list(tmp_path.iterdir())  # no staging left either


def test_resave_never_deletes_other_files(tmp_path):
    prec = fit()
    path = lc.save_precision(prec, tmp_path / "p")
    (path / "NOTES.md").write_text("how I fitted it")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(lc.ArtifactError, match=r"holds files a precision does not write \(NOTES"):
        lc.save_precision(prec, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_leftovers_of_a_killed_save_are_cleaned_and_an_old_copy_is_named(tmp_path):
    prec = fit()
    path = lc.save_precision(prec, tmp_path / "p")
    # a kill between the renames: no p, the previous artifact moved aside as .p.<x>.old
    moved = tmp_path / ".p.abc123.old"
    os.rename(path, moved)
    (tmp_path / ".p.def456.tmp").mkdir()  # and a half-built staging folder
    with pytest.raises(lc.ArtifactError, match=r"\.p\.abc123\.old holds the artifact"):
        lc.load_precision(path)
    lc.save_precision(prec, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # both cleaned
    assert lc.load_precision(path).digest() == prec.digest()


@pytest.mark.parametrize("structure", ["kfac", "diag", "ekfac", "isotropic"])
def test_artifact_fuzz_loads_verified_or_raises_an_artifact_error(tmp_path, structure):
    """Random truncations and byte flips of both files: every load raises ArtifactError or
    returns the saved precision exactly (its digest); never another exception type."""
    model = make_model(dtype=torch.float32)
    prec = (
        lc.isotropic_precision(model)
        if structure == "isotropic"
        else fit(model, structure=structure)
    )
    good = lc.save_precision(prec, tmp_path / "good")
    rng = random.Random(structure)
    names = [artifact.TENSORS_FILE, artifact.METADATA_FILE]
    refused = 0
    for case in range(80):
        work = tmp_path / f"c{case}"
        shutil.copytree(good, work)
        f = work / names[case % 2]
        data = bytearray(f.read_bytes())
        if (case // 2) % 2:
            data = data[: rng.randrange(len(data))]
        else:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
        try:
            loaded = lc.load_precision(work)
        except lc.ArtifactError:
            refused += 1
        else:
            assert loaded.digest() == prec.digest()
        shutil.rmtree(work)
    assert refused >= 70
