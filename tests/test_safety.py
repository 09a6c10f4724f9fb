"""Nothing executes, nothing is lost, nothing is silently accepted: checkpoints and artifacts
under planted pickles, edits, truncations, byte flips, kills and careless arguments."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import lalora_curv as lc
from conftest import make_batches, make_model
from lalora_curv import artifact
from lalora_curv.checkpoint import (
    COMPLETE_FILE,
    LEGACY_STATE_FILE,
    STATE_FILE,
    CheckpointError,
    load_latest,
    read_checkpoint,
)
from lalora_curv.statefile import flatten, unflatten
from lalora_curv.train import TrainingError


def setup(seed=0):
    model = make_model(dtype=torch.float32, init_B_std=0.0, seed=seed)
    prec = lc.fit_precision(model, make_batches(2, seed=1), structure="kfac", progress=False)
    return model, make_batches(4, seed=2), prec


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Planted:
    """A pickle that, when loaded, writes a marker file (it stands for any shell command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


# ----------------------------------------------------------------- checkpoints without pickle
def test_training_state_round_trips_without_pickle():
    model, target, _ = setup()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**target[0]).loss.backward()
    opt.step()
    import random as pyrandom

    import numpy as np

    state = {
        "optimizer": opt.state_dict(),
        "rng": {"python": pyrandom.getstate(), "numpy": np.random.get_state()},  # noqa: NPY002
        "odd": {"inf": float("inf"), "tuple": (1, "a", None), 3: [True, 2.5]},
    }
    tensors, skeleton = flatten(state)
    blob = st_save(tensors)
    back = unflatten(json.loads(json.dumps(skeleton)), st_load(blob))
    assert back["odd"] == state["odd"]
    assert back["rng"]["python"] == state["rng"]["python"]
    assert back["rng"]["numpy"][0] == "MT19937"
    assert (back["rng"]["numpy"][1] == state["rng"]["numpy"][1]).all()
    for k, v in state["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(back["optimizer"]["state"][k][name], t)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


def test_a_planted_pickle_never_runs_on_resume(tmp_path):
    model, target, prec = setup()
    ckpts = tmp_path / "ckpt"
    lc.train(model, target, prec, 1.0, max_steps=2, checkpoint_dir=ckpts, progress=False)
    marker = tmp_path / "marker"
    # beside a good checkpoint: the pickle is not listed, never opened
    with open(ckpts / "checkpoint-2" / LEGACY_STATE_FILE, "wb") as f:
        pickle.dump(Planted(marker), f)
    lc.train(model, target, prec, 1.0, max_steps=3, checkpoint_dir=ckpts, resume=True,
             progress=False)  # fmt: skip
    assert not marker.exists()
    # an old-format checkpoint (pickle state only) is refused unread
    old = ckpts / "checkpoint-9"
    old.mkdir()
    with open(old / LEGACY_STATE_FILE, "wb") as f:
        pickle.dump(Planted(marker), f)
    (old / COMPLETE_FILE).write_text(json.dumps({"step": 9, "lr": 1e-3}))
    with pytest.raises(CheckpointError, match="pickle"):
        read_checkpoint(old)
    records = lc.train(
        model, target, prec, 1.0, max_steps=5, checkpoint_dir=ckpts, resume=True, progress=False
    )
    assert [r["step"] for r in records] == [4, 5]  # from checkpoint-3, the newest usable one
    assert not marker.exists()


def test_resume_refuses_another_precision_unless_forced(tmp_path, caplog):
    model, target, prec = setup()
    lc.train(model, target, prec, 1.0, max_steps=2, checkpoint_dir=tmp_path, progress=False)
    other = lc.fit_precision(model, make_batches(2, seed=7), structure="diag", progress=False)
    with pytest.raises(TrainingError, match="another precision_digest"):
        lc.train(model, target, other, 1.0, max_steps=4, checkpoint_dir=tmp_path, resume=True,
                 progress=False)  # fmt: skip
    with pytest.raises(TrainingError, match="another data_digest"):
        lc.train(model, target[::-1], prec, 1.0, max_steps=4, checkpoint_dir=tmp_path,
                 resume=True, progress=False)  # fmt: skip
    with pytest.raises(TrainingError, match="another seed"):
        lc.train(model, target, prec, 1.0, max_steps=4, checkpoint_dir=tmp_path, resume=True,
                 seed=5, progress=False)  # fmt: skip
    # the same precision saved and loaded again is the same precision
    again = lc.load_precision(lc.save_precision(prec, tmp_path / "p"))
    assert again.digest() == prec.digest() and other.digest() != prec.digest()
    records = lc.train(model, target, other, 1.0, max_steps=3, checkpoint_dir=tmp_path,
                       resume="force", progress=False)  # fmt: skip
    assert [r["step"] for r in records] == [3]
    assert "despite another precision_digest" in caplog.text


def test_a_truncated_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    model, target, prec = setup()
    whole, _, _ = setup()
    lc.train(whole, target, prec, 1.0, max_steps=6, progress=False)
    lc.train(model, target, prec, 1.0, max_steps=6, checkpoint_dir=tmp_path, checkpoint_every=2,
             progress=False)  # fmt: skip
    # checkpoint-6 loses the end of its state file (a full disk), checkpoint-4 its adapter
    state = tmp_path / "checkpoint-6" / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    adapter = tmp_path / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-7])
    fresh, _, _ = setup()
    with caplog.at_level(logging.WARNING, logger="lalora_curv"):
        lc.train(fresh, target, prec, 1.0, max_steps=6, checkpoint_dir=tmp_path,
                 checkpoint_every=2, resume=True, progress=False)  # fmt: skip
    assert "checkpoint-6" in caplog.text and "corrupt or truncated" in caplog.text
    assert "checkpoint-4" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    for n, p in adapter_state(fresh).items():  # steps 3..6 again: the uninterrupted result
        assert torch.equal(p, adapter_state(whole)[n]), n


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    model, target, prec = setup()
    lc.train(model, target, prec, 1.0, max_steps=2, checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "checkpoint-2" / COMPLETE_FILE).write_text("{not json")
    with pytest.raises(TrainingError, match=r"cannot resume: no usable checkpoint.*corrupt"):
        lc.train(model, target, prec, 1.0, max_steps=4, checkpoint_dir=tmp_path, resume=True,
                 progress=False)  # fmt: skip


def test_a_resumed_run_logs_every_step_once(tmp_path):
    model, target, prec = setup()
    log = tmp_path / "log.jsonl"
    lc.train(model, target, prec, 1.0, max_steps=4, checkpoint_dir=tmp_path / "c",
             checkpoint_every=2, log_file=log, progress=False)  # fmt: skip
    # a kill after step 3's record, before its checkpoint: drop checkpoint-4, keep the log
    shutil.rmtree(tmp_path / "c" / "checkpoint-4")
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3]) + "\n")
    lc.train(model, target, prec, 1.0, max_steps=4, checkpoint_dir=tmp_path / "c",
             checkpoint_every=2, log_file=log, resume=True, progress=False)  # fmt: skip
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_fuzz_every_damage_is_named_or_harmless(tmp_path):
    """Truncations and byte flips of every checkpoint file: reading raises CheckpointError
    (a LaloraError) or returns exactly what was saved; never another exception."""
    model, target, prec = setup()
    lc.train(model, target, prec, 1.0, max_steps=1, checkpoint_dir=tmp_path / "c", progress=False)
    good = tmp_path / "c" / "checkpoint-1"
    info, _ = read_checkpoint(good)
    files = sorted(p.relative_to(good) for p in good.rglob("*") if p.is_file())
    rng = random.Random(0)
    outcomes = {"refused": 0, "intact": 0}
    for case in range(120):
        work = tmp_path / f"w{case}" / "checkpoint-1"
        shutil.copytree(good, work)
        target_file = work / rng.choice(files)
        data = bytearray(target_file.read_bytes())
        if case % 2 and data:
            data = data[: rng.randrange(len(data))]
        elif data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        target_file.write_bytes(bytes(data))
        try:
            got_info, _ = read_checkpoint(work)
        except CheckpointError:
            outcomes["refused"] += 1
        else:
            assert got_info == info
            outcomes["intact"] += 1
        shutil.rmtree(work.parent)
    assert outcomes["refused"] >= 110, outcomes  # (a flip inside JSON whitespace is harmless)
    assert load_latest(tmp_path / "c")[0] == good


# ------------------------------------------------------------------------------ artifacts
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
