"""Nothing executes, nothing is lost, nothing is silently accepted: training checkpoints under
planted pickles, truncations, byte flips, kills and careless arguments (the artifacts' share:
tests/artifact/test_artifact_safety.py)."""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import lalora_curv as lc
from helpers import adapter_state, make_batches, train_setup
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


class Planted:
    """A pickle that, when loaded, writes a marker file (it stands for any shell command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


# ----------------------------------------------------------------- checkpoints without pickle
def test_training_state_round_trips_without_pickle():
    model, target, _ = train_setup()
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
    model, target, prec = train_setup()
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
    model, target, prec = train_setup()
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
    model, target, prec = train_setup()
    whole, _, _ = train_setup()
    lc.train(whole, target, prec, 1.0, max_steps=6, progress=False)
    lc.train(model, target, prec, 1.0, max_steps=6, checkpoint_dir=tmp_path, checkpoint_every=2,
             progress=False)  # fmt: skip
    # checkpoint-6 loses the end of its state file (a full disk), checkpoint-4 its adapter
    state = tmp_path / "checkpoint-6" / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    adapter = tmp_path / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-7])
    fresh, _, _ = train_setup()
    with caplog.at_level(logging.WARNING, logger="lalora_curv"):
        lc.train(fresh, target, prec, 1.0, max_steps=6, checkpoint_dir=tmp_path,
                 checkpoint_every=2, resume=True, progress=False)  # fmt: skip
    assert "checkpoint-6" in caplog.text and "corrupt or truncated" in caplog.text
    assert "checkpoint-4" in caplog.text
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    for n, p in adapter_state(fresh).items():  # steps 3..6 again: the uninterrupted result
        assert torch.equal(p, adapter_state(whole)[n]), n


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    model, target, prec = train_setup()
    lc.train(model, target, prec, 1.0, max_steps=2, checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "checkpoint-2" / COMPLETE_FILE).write_text("{not json")
    with pytest.raises(TrainingError, match=r"cannot resume: no usable checkpoint.*corrupt"):
        lc.train(model, target, prec, 1.0, max_steps=4, checkpoint_dir=tmp_path, resume=True,
                 progress=False)  # fmt: skip


def test_a_resumed_run_logs_every_step_once(tmp_path):
    model, target, prec = train_setup()
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
    model, target, prec = train_setup()
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
