"""Stored artifacts as regression fixtures: what an earlier lalora-curv saved still loads, as
the same precision, to the same penalty.

tests/fixtures/ holds one artifact per structure of the registry (plus a float32 precision,
the bfloat16 and low-rank storages and a format-1 artifact), a stored displacement and the
expected values, all made by tests/fixtures/make_fixtures.py. These tests fail when the
on-disk format (what is written, or how the stored bytes are read) or a penalty formula
changes. Regenerating the fixtures is then a deliberate format change: it belongs in the
commit that makes the change, says why, and keeps the fixtures of an older format version
(see make_fixtures.py).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lalora_curv as lc
from helpers import FIXTURES
from lalora_curv import artifact

EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
ARTIFACTS = EXPECTED["artifacts"]
#: a recomputed penalty may differ from the stored one by summation order only
RTOL = {"float64": 1e-6, "float32": 1e-5}


@pytest.fixture(scope="module")
def delta() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / EXPECTED["displacement"])


def load(name: str) -> lc.Precision:
    """The stored artifact ``name``; a format-1 one loads with its warning, a newer one with
    none."""
    path = FIXTURES / "artifacts" / name
    if ARTIFACTS[name]["format_version"] == 1:
        with pytest.warns(UserWarning, match="format-1 artifact"):
            return lc.load_precision(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return lc.load_precision(path)


def test_the_fixtures_cover_every_structure_and_the_current_format_version():
    """A new structure or a new format version comes with its fixture."""
    assert {e["structure"] for e in ARTIFACTS.values()} == set(lc.REGISTRY)
    assert max(e["format_version"] for e in ARTIFACTS.values()) == artifact.FORMAT_VERSION
    for e in ARTIFACTS.values():
        assert e["format_version"] in artifact.READABLE_VERSIONS


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_a_stored_artifact_loads_to_its_structure_digest_and_penalty(name, delta):
    expected = ARTIFACTS[name]
    stored = json.loads((FIXTURES / "artifacts" / name / artifact.METADATA_FILE).read_text())
    assert stored["kind"] == artifact.KIND
    assert stored["format_version"] == expected["format_version"]
    prec = load(name)
    assert type(prec) is lc.REGISTRY[expected["structure"]]
    assert prec.structure == expected["structure"]
    assert str(prec.dtype).removeprefix("torch.") == expected["dtype"]
    assert prec.metadata.get("storage") == expected["storage"]
    assert prec.digest() == expected["digest"]  # every tensor, read from the stored bytes
    torch.testing.assert_close(
        prec.quad(delta),
        torch.tensor(expected["penalty"], dtype=prec.dtype),
        rtol=RTOL[expected["dtype"]],
        atol=0.0,
    )


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_a_stored_artifact_saved_again_is_the_same_artifact(name, delta, tmp_path):
    """Re-saved by this version: the same files (a format-1 one becomes the current format),
    loading again to the same precision and penalty."""
    prec = load(name)
    again = lc.save_precision(prec, tmp_path / name)
    reloaded = lc.load_precision(again)
    assert reloaded.digest() == prec.digest()
    assert torch.equal(reloaded.quad(delta), prec.quad(delta))
    stored = FIXTURES / "artifacts" / name
    if ARTIFACTS[name]["format_version"] == artifact.FORMAT_VERSION:
        for f in (artifact.TENSORS_FILE, artifact.METADATA_FILE):
            assert (again / f).read_bytes() == (stored / f).read_bytes(), f
    else:
        meta = json.loads((again / artifact.METADATA_FILE).read_text())
        assert meta["format_version"] == artifact.FORMAT_VERSION
