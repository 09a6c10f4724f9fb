"""Storage of the precisions' tensors (float32, bfloat16, K-FAC low rank + diagonal) and
deduplication."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import lalora_curv as lc
from helpers import BENCHMARKS, make_batches, make_model
from lalora_curv import artifact
from lalora_curv.precision.factors import DenseFactor, LowRankFactor

KFAC = ("kfac", "tri-kfac", "merged-kfac")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: bfloat16 rounds each factor entry to 8 significant bits (relative error <= 2^-9); both
#: factors of a Kronecker product are rounded, so a penalty may move by a few 2^-9
BF16_PENALTY_RTOL = 1e-2
FULL = 10**6  # a rank above every factor's size: keep every eigenpair


@pytest.fixture(scope="module")
def prec64():
    """float64 K-FAC factors of every module type, non-zero B0 (every block live)."""
    model = make_model(targets=ALL_TARGETS)
    return lc.fit_precision(
        model, make_batches(), structure="kfac", progress=False, stats_dtype=torch.float64
    )


def deltas(prec, n=10, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        {k: scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in prec.mode.items()}
        for _ in range(n)
    ]


def rel_errors(prec, ref, ds):
    got = torch.stack([prec.quad(d) for d in ds])
    want = torch.stack([ref.quad(d) for d in ds])
    return (got - want).abs() / want.abs()


def lowrank_reference(F: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force: the k leading eigenpairs of F plus the diagonal of what is left."""
    lam, Q = torch.linalg.eigh(F)
    order = lam.argsort(descending=True)[:k]
    top = Q[:, order] @ torch.diag(lam[order].clamp_min(0)) @ Q[:, order].T
    return top + torch.diag(torch.diagonal(F - top).clamp_min(0))


# ---------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("structure", KFAC)
def test_bfloat16_penalty_within_tolerance(prec64, structure):
    ref = prec64.with_structure(structure)
    bf = ref.with_storage("bfloat16")
    for name, C in ref.input_cov.items():
        stored = bf.input_cov[name]
        assert stored.dtype == torch.bfloat16
        assert bool(((stored.double() - C).abs() <= 2**-8 * C.abs()).all())
    err = rel_errors(bf, ref, deltas(ref))
    assert float(err.max()) < BF16_PENALTY_RTOL
    assert float(err.max()) > 0  # the rounding is real


@pytest.mark.parametrize("structure", KFAC)
def test_lowrank_at_full_rank_equals_float(prec64, structure):
    ref = prec64.with_structure(structure)
    low = ref.with_storage("lowrank", rank=FULL)
    assert low.storage == {"format": "lowrank", "dtype": "float64", "rank": 24}
    err = rel_errors(low, ref, deltas(ref))
    assert float(err.max()) < 1e-10


def test_lowrank_factor_matches_its_definition(prec64):
    low = prec64.with_storage("lowrank", rank=5)
    for name in prec64.modules:
        for dense, factor in (
            (prec64.input_cov[name][0], low.input_factors[name]),
            (prec64.grad_cov[name][0], low.grad_factors[name]),
        ):
            assert isinstance(factor, LowRankFactor) and factor.rank == min(5, dense.shape[0])
            approx = factor.dense()[0]
            torch.testing.assert_close(approx, lowrank_reference(dense, 5), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(torch.diagonal(approx), torch.diagonal(dense))  # kept
            assert float(torch.linalg.eigvalsh(approx).min()) > -1e-12  # PSD


@pytest.mark.parametrize("structure", KFAC)
def test_lowrank_error_decreases_with_rank(prec64, structure):
    ref = prec64.with_structure(structure)
    ds = deltas(ref, n=20)
    errors = [
        float(rel_errors(ref.with_storage("lowrank", rank=k), ref, ds).mean())
        for k in (1, 4, 12, 24)
    ]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[0] > 1e-2 and errors[3] < 1e-10


@pytest.mark.parametrize("structure", KFAC)
def test_lowrank_penalty_and_gradient_never_form_the_dense_factor(prec64, structure, monkeypatch):
    """The penalty of the compressed form equals the penalty of its densified twin, with the
    same autograd gradient, and runs without ever calling ``dense()``."""
    low = prec64.with_structure(structure).with_storage("lowrank", rank=3)
    twin = low.with_storage("float64")  # the same approximation, stored dense
    assert isinstance(twin.input_factors[next(iter(twin.modules))], DenseFactor)
    d = deltas(low, n=1)[0]
    want = twin.quad(d)
    grads_want = torch.autograd.grad(
        twin.quad({k: v.requires_grad_() for k, v in d.items()}), list(d.values())
    )

    def refuse(*a, **k):
        raise AssertionError("dense() called")

    monkeypatch.setattr(LowRankFactor, "dense", refuse)
    d = {k: v.detach().requires_grad_() for k, v in d.items()}
    got = low.quad(d)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for g, w in zip(torch.autograd.grad(got, list(d.values())), grads_want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_lowrank_penalty_of_a_model(prec64):
    model = make_model(targets=ALL_TARGETS)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    low = prec64.with_storage("lowrank", rank=4)
    torch.testing.assert_close(
        low.penalty(model), low.with_storage("float64").penalty(model), rtol=1e-10, atol=0
    )


# ---------------------------------------------------------------------------- algebra
def test_compressed_precisions_sum_scale_and_rebase(prec64):
    other = lc.fit_precision(
        make_model(targets=ALL_TARGETS),
        make_batches(seed=5),
        structure="kfac",
        progress=False,
        stats_dtype=torch.float64,
    )
    ds = deltas(prec64, n=3)
    # pooled low ranks of different k: zero-padded, equal to pooling their dense twins
    a, b = prec64.with_storage("lowrank", rank=3), other.with_storage("lowrank", rank=6)
    pooled = a + b
    assert pooled.storage["rank"] == 6 and len(pooled.weights) == 2
    dense_pool = a.with_storage("float64") + b.with_storage("float64")
    for d in ds:
        torch.testing.assert_close(pooled.quad(d), dense_pool.quad(d), rtol=1e-10, atol=0)
        torch.testing.assert_close((2.5 * a).quad(d), 2.5 * a.quad(d), rtol=1e-12, atol=0)
    bf = prec64.with_storage("bfloat16") + other.with_storage("bfloat16")
    assert bf.storage == {"format": "dense", "dtype": "bfloat16"}
    with pytest.raises(lc.IncompatiblePrecisionError, match=r"dense and lowrank.*with_storage"):
        prec64 + b


def test_compressed_precision_rebases(batches):
    zero = make_model(init_B_std=0.0, targets=ALL_TARGETS)
    prec = lc.fit_precision(zero, batches, progress=False, stats_dtype=torch.float64)
    target = make_model(init_B_std=0.0, targets=ALL_TARGETS, r=5, alpha=3.0, seed=7)
    low = prec.with_storage("lowrank", rank=4).rebase(target)
    want = prec.rebase(target).with_storage("lowrank", rank=4)
    assert low.storage == want.storage
    for d in deltas(low, n=3):
        torch.testing.assert_close(low.quad(d), want.quad(d), rtol=1e-10, atol=0)


def test_storage_conversions_and_errors(prec64):
    low = prec64.with_storage("lowrank", rank=6)
    lower = low.with_storage("lowrank", rank=2)  # truncating a truncation = truncating F
    direct = prec64.with_storage("lowrank", rank=2)
    for d in deltas(prec64, n=2):
        torch.testing.assert_close(lower.quad(d), direct.quad(d), rtol=1e-10, atol=0)
    with pytest.raises(lc.LaloraError, match=r"cannot raise the rank.*from 6 to 8"):
        low.with_storage("lowrank", rank=8)
    with pytest.raises(lc.LaloraError, match="unknown storage 'bf16'"):
        prec64.with_storage("bf16")
    with pytest.raises(lc.LaloraError, match="needs an integer rank >= 1"):
        prec64.with_storage("lowrank")
    with pytest.raises(lc.LaloraError, match="rank applies to storage 'lowrank' only"):
        prec64.with_storage("float32", rank=4)
    diag = lc.fit_precision(make_model(), make_batches(), structure="diag", progress=False)
    with pytest.raises(lc.LaloraError, match="no storage 'lowrank': a diagonal is one number"):
        diag.with_storage("lowrank", 4)
    moved = prec64.with_storage("bfloat16").to(dtype=torch.float32)
    assert moved.storage["dtype"] == "bfloat16" and moved.dtype == torch.float32


# ---------------------------------------------------------------------------- artifact
@pytest.mark.parametrize(
    ("storage", "rank"), [("float32", None), ("bfloat16", None), ("lowrank", 4)]
)
def test_round_trip_per_storage(tmp_path, storage, rank):
    model = make_model(dtype=torch.float32, targets=ALL_TARGETS)
    prec = lc.fit_precision(model, make_batches(), progress=False).with_storage(storage, rank)
    lc.save_precision(prec, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / artifact.METADATA_FILE).read_text())
    assert meta["storage"] == prec.storage
    assert meta["storage"]["format"] == ("lowrank" if rank else "dense")
    loaded = lc.load_precision(tmp_path / "a")
    lc.save_precision(loaded, tmp_path / "b")
    for f in (artifact.TENSORS_FILE, artifact.METADATA_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert loaded.storage == prec.storage
    for d in deltas(prec, n=2):
        assert torch.equal(loaded.quad(d), prec.quad(d))
    assert torch.equal(loaded.penalty(model), prec.penalty(model))


def payload_bytes(art) -> int:
    """Bytes of the tensor data in a safetensors file (file size minus its header)."""
    blob = (art / artifact.TENSORS_FILE).read_bytes()
    return len(blob) - 8 - int.from_bytes(blob[:8], "little")


@pytest.mark.parametrize(("storage", "rank"), [("float32", None), ("lowrank", 4)])
def test_dedup_stores_shared_input_factors_once(tmp_path, storage, rank):
    model = make_model(dtype=torch.float32, targets=ALL_TARGETS, init_B_std=0.0)
    prec = lc.fit_precision(model, make_batches(), progress=False).with_storage(storage, rank)
    lc.save_precision(prec, tmp_path / "full", dedup=False)
    lc.save_precision(prec, tmp_path / "dedup")
    meta = json.loads((tmp_path / "dedup" / artifact.METADATA_FILE).read_text())
    aliases = meta["tensor_aliases"]
    tensors = prec.all_tensors()

    def nbytes(names):
        return sum(tensors[n].numel() * tensors[n].element_size() for n in names)

    # content identity: exactly the aliased tensors are equal to their targets
    for alias, target in aliases.items():
        assert torch.equal(tensors[alias], tensors[target])
    input_names = [n for n in tensors if n.startswith("input_cov")]
    stored_inputs = [n for n in input_names if n not in aliases]
    # per layer q/k/v read one input and gate/up another: 7 modules, 4 distinct input factors
    with_stored_input = {n.split(".", 1)[1] for n in stored_inputs}
    assert len(with_stored_input) == 8
    assert len(stored_inputs) == 8 * (1 if storage == "float32" else 3)
    for layer in (0, 1):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            assert (
                sum(f"layers.{layer}." in m and m.endswith(group) for m in with_stored_input) == 1
            )
    # measured: the files differ by exactly the bytes of the aliased tensors
    assert payload_bytes(tmp_path / "full") - payload_bytes(tmp_path / "dedup") == nbytes(aliases)
    shared_in = [n for n in input_names if n in aliases]
    assert nbytes(input_names) - nbytes(shared_in) == nbytes(stored_inputs)
    assert nbytes(shared_in) > nbytes(stored_inputs) / 2  # 6/8 of the input bytes are gone
    a, b = lc.load_precision(tmp_path / "full"), lc.load_precision(tmp_path / "dedup")
    for name in prec.modules:
        for x, y in ((a.input_factors[name], b.input_factors[name]),):
            for k, t in x.tensors("f", name).items():
                assert torch.equal(t, y.tensors("f", name)[k])
    assert torch.equal(a.penalty(model), b.penalty(model))


def test_dedup_halves_the_input_bytes_of_q_and_v(tmp_path):
    model = make_model(dtype=torch.float32, targets=("q_proj", "v_proj"), init_B_std=0.0)
    prec = lc.fit_precision(model, make_batches(), progress=False)
    lc.save_precision(prec, tmp_path / "full", dedup=False)
    lc.save_precision(prec, tmp_path / "dedup")
    D = 16
    aliases = json.loads((tmp_path / "dedup" / artifact.METADATA_FILE).read_text())[
        "tensor_aliases"
    ]
    saved = payload_bytes(tmp_path / "full") - payload_bytes(tmp_path / "dedup")
    # per layer one of the two D x D float32 input factors (q and v read the same input); and
    # the zero B0 of layer 1 equal those of layer 0 (q: 16 x 3, v: 8 x 3)
    assert saved == 2 * D * D * 4 + (16 * 3 + 8 * 3) * 4
    assert sorted(k.split(".")[0] for k in aliases) == ["input_cov"] * 2 + ["mode"] * 2
    loaded = lc.load_precision(tmp_path / "dedup")
    q, v = (f"base_model.model.model.layers.0.self_attn.{m}" for m in ("q_proj", "v_proj"))
    assert loaded.input_factors[q].matrix is loaded.input_factors[v].matrix  # shared in memory
    assert torch.equal(loaded.input_cov[v], prec.input_cov[v])


def test_deduplicate_compares_content_not_names():
    x = torch.arange(6.0).reshape(2, 3)
    stored, aliases = artifact.deduplicate(
        {
            "input_cov.a": x,
            "input_cov.b": x.clone(),  # same content, other object: aliased
            "input_cov.c": x + 1e-6,  # other content
            "input_cov.d": x.double(),  # same values, other dtype: other bytes
            "input_cov.e": x.reshape(3, 2),  # same bytes, other shape
            "grad_cov.z": x.clone(),  # other name family, same content: aliased
        }
    )
    assert aliases == {"input_cov.a": "grad_cov.z", "input_cov.b": "grad_cov.z"}
    assert sorted(stored) == ["grad_cov.z", "input_cov.c", "input_cov.d", "input_cov.e"]


def rewrite(art, edit_tensors=None, edit_meta=None):
    """Tamper with an artifact consistently (valid safetensors, matching SHA-256)."""
    tensors = st_load((art / artifact.TENSORS_FILE).read_bytes())
    if edit_tensors:
        edit_tensors(tensors)
    blob = st_save(tensors, metadata={"format": f"{artifact.KIND}/{artifact.FORMAT_VERSION}"})
    (art / artifact.TENSORS_FILE).write_bytes(blob)
    meta = json.loads((art / artifact.METADATA_FILE).read_text())
    if edit_meta:
        edit_meta(meta)
    import hashlib

    meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    meta.pop("metadata_sha256", None)  # signed again: the value checks behind the digest
    meta["metadata_sha256"] = artifact.metadata_digest(meta)
    (art / artifact.METADATA_FILE).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def lowrank_art(tmp_path_factory):
    path = tmp_path_factory.mktemp("low") / "prec"
    model = make_model(dtype=torch.float32, targets=ALL_TARGETS)
    lc.save_precision(
        lc.fit_precision(model, make_batches(), progress=False).with_storage("lowrank", 4), path
    )
    return path


def first_key(art, prefix):
    names = sorted(st_load((art / artifact.TENSORS_FILE).read_bytes()))
    return next(k for k in names if k.startswith(prefix))


def _set(meta, key, value):
    meta[key] = value


def _negate(tensors, key):
    tensors[key] = -tensors[key] - 1


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda a, k: rewrite(a, None, lambda m: _set(m, "storage", {"format": "zip"})), "'zip'"),
        (
            lambda a, k: rewrite(
                a, None, lambda m: _set(m, "storage", {"format": "lowrank", "rank": 2})
            ),
            "'storage' says",
        ),
        (
            lambda a, k: rewrite(a, None, lambda m: _set(m, "storage", {"format": "dense"})),
            "'input_cov.* is missing",
        ),
        (
            lambda a, k: rewrite(a, lambda t: _negate(t, k("input_cov_eigvals"))),
            "negative entries",
        ),
        (
            lambda a, k: rewrite(
                a, lambda t: t.__setitem__(k("grad_cov_diag"), t[k("grad_cov_diag")].double())
            ),
            "different dtypes",
        ),
        (
            lambda a, k: rewrite(
                a, None, lambda m: _set(m, "tensor_aliases", {"input_cov_diag.x": "nope"})
            ),
            "refers to 'nope', which is not stored",
        ),
        (
            lambda a, k: rewrite(
                a, None, lambda m: _set(m, "tensor_aliases", {k("mode."): k("input_cov_diag")})
            ),
            "both stored and an alias",
        ),
        (lambda a, k: rewrite(a, None, lambda m: _set(m, "tensor_aliases", ["x"])), "must map"),
    ],
)
def test_corrupt_or_foreign_storage_metadata_rejected(tmp_path, lowrank_art, tamper, message):
    art = tmp_path / "x"
    art.mkdir()
    for f in lowrank_art.iterdir():
        (art / f.name).write_bytes(f.read_bytes())
    tamper(art, lambda prefix: first_key(art, prefix))
    with pytest.raises(lc.ArtifactError, match=message):
        lc.load_precision(art)


def test_bfloat16_artifact_storage_mismatch_rejected(tmp_path):
    prec = lc.fit_precision(make_model(dtype=torch.float32), make_batches(), progress=False)
    lc.save_precision(prec.with_storage("bfloat16"), tmp_path / "bf")
    rewrite(
        tmp_path / "bf",
        lambda t: t.update({k: v.float() for k, v in t.items() if "_cov." in k}),
    )
    with pytest.raises(lc.ArtifactError, match=r"'storage' says .*bfloat16.*float32"):
        lc.load_precision(tmp_path / "bf")


@pytest.mark.parametrize("structure", KFAC)
def test_trace_of_compressed_precisions(prec64, structure):
    low = prec64.with_structure(structure).with_storage("lowrank", rank=3)
    twin = low.with_storage("float64")
    assert low.trace() == pytest.approx(twin.trace(), rel=1e-10)
    if structure == "merged-kfac":  # tr G tr C, and the low-rank form keeps every diagonal
        assert low.trace() == pytest.approx(prec64.with_structure(structure).trace(), rel=1e-10)
    bf = prec64.with_structure(structure).with_storage("bfloat16")
    assert bf.trace() == pytest.approx(prec64.with_structure(structure).trace(), rel=1e-2)


# ---------------------------------------------------------------------------- other structures
OTHERS = ("diag", "merged-diag", "ekfac")
U = 2.0**-8  # bfloat16's unit roundoff: rounding to nearest with 8 significant bits


@pytest.fixture(scope="module")
def others64():
    """float64 diag, merged-diag and EKFAC precisions at a non-zero B0 (every block live)."""
    model = make_model()
    return model, {
        s: lc.fit_precision(
            model, make_batches(), structure=s, progress=False, stats_dtype=torch.float64
        )
        for s in OTHERS
    }


def ekfac_rounding_bound(prec, delta) -> torch.Tensor:
    """The worst-case penalty change of EKFAC's bfloat16 storage (ekfac.py's formula):
    ``sum Lambda (u (|R| + e S)^2 + e S (2 |R| + e S))``, ``e = 2u + u^2``."""
    e, total = 2 * U + U**2, torch.zeros((), dtype=torch.float64)
    for name in prec.param_names:
        Q_g, Q_a, lam, d = (
            prec.grad_eigvecs[name],
            prec.input_eigvecs[name],
            prec.eigenvalues[name],
            delta[name],
        )
        R = (Q_g.T @ d @ Q_a).abs()
        S = Q_g.abs().T @ d.abs() @ Q_a.abs()
        total = total + (lam * (U * (R + e * S) ** 2 + e * S * (2 * R + e * S))).sum()
    return total


@pytest.mark.parametrize("structure", OTHERS)
def test_bfloat16_storage_of_the_other_structures(others64, structure):
    model, precs = others64
    ref = precs[structure]
    bf = ref.with_storage("bfloat16")
    assert bf.storage == {"format": "dense", "dtype": "bfloat16"}
    assert ref.storage == {"format": "dense", "dtype": "float64"}
    stored, exact = bf.structure_tensors(), ref.structure_tensors()
    assert stored.keys() == exact.keys()
    for k, t in stored.items():  # every tensor rounded to nearest: |x~ - x| <= u |x|
        assert t.dtype == torch.bfloat16
        assert bool(((t.double() - exact[k]).abs() <= U * exact[k].abs()).all()), k
    errors = []
    for d in deltas(ref, n=10, scale=0.1):
        got, want = bf.quad(d), ref.quad(d)
        assert got.dtype == torch.float64  # computed in the mode's dtype
        if structure == "ekfac":
            bound = float(ekfac_rounding_bound(ref, d))
        else:  # sum D_i v_i^2 with D_i >= 0: each term moves by at most u of itself
            bound = U * float(want)
        assert abs(float(got - want)) <= bound * (1 + 1e-9), (float(got), float(want), bound)
        errors.append(abs(float(got - want)) / float(want))
    assert max(errors) > 0  # the rounding is real
    torch.testing.assert_close(
        bf.penalty(model), ref.penalty(model), rtol=U, atol=0
    )  # at the model's adapter (the mode): both 0
    torch.testing.assert_close(bf.trace(), ref.trace(), rtol=U, atol=0)
    if structure == "diag":  # the dense matrix: the rounded diagonal, in the compute dtype
        torch.testing.assert_close(bf.to_dense(), ref.to_dense(), rtol=U, atol=0)
    elif structure == "ekfac":  # the dense matrix is the stored tensors' quadratic form
        dense, d = bf.to_dense(), deltas(ref, n=1, seed=3)[0]
        v = torch.cat([d[n].flatten() for n in bf.param_names])
        assert dense.dtype == torch.float64
        torch.testing.assert_close(v @ dense @ v, bf.quad(d), rtol=1e-10, atol=0)


@pytest.mark.parametrize("structure", OTHERS)
def test_round_trip_of_the_other_structures_per_storage(tmp_path, structure):
    model = make_model(dtype=torch.float32)
    fitted = lc.fit_precision(model, make_batches(), structure=structure, progress=False)
    assert fitted.storage == {"format": "dense", "dtype": "float32"}
    with torch.no_grad():  # away from the mode
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    for storage in ("bfloat16", "float64"):
        prec = fitted.with_storage(storage)
        lc.save_precision(prec, tmp_path / storage)
        meta = json.loads((tmp_path / storage / artifact.METADATA_FILE).read_text())
        assert meta["storage"] == {"format": "dense", "dtype": storage} == prec.storage
        loaded = lc.load_precision(tmp_path / storage)
        assert loaded.storage == prec.storage
        assert all(t.dtype == getattr(torch, storage) for t in loaded.structure_tensors().values())
        lc.save_precision(loaded, tmp_path / "again")
        for f in (artifact.TENSORS_FILE, artifact.METADATA_FILE):
            assert (tmp_path / storage / f).read_bytes() == (tmp_path / "again" / f).read_bytes()
        for d in deltas(prec, n=2):
            assert torch.equal(loaded.quad(d), prec.quad(d))
        assert torch.equal(loaded.penalty(model), prec.penalty(model))
        tol = U if storage == "bfloat16" else 1e-6
        torch.testing.assert_close(prec.penalty(model), fitted.penalty(model), rtol=tol, atol=0)
    # the storage the metadata names is checked against the tensors
    rewrite(tmp_path / "bfloat16", lambda t: t.update({k: v.float() for k, v in t.items()}))
    with pytest.raises(lc.ArtifactError, match=r"'storage' says .*bfloat16.*float32"):
        lc.load_precision(tmp_path / "bfloat16")


def test_bfloat16_diagonals_pool_scale_and_move(others64):
    model, precs = others64
    diag = precs["diag"]
    other = lc.fit_precision(
        model, make_batches(seed=5), structure="diag", progress=False, stats_dtype=torch.float64
    )
    pooled = diag.with_storage("bfloat16") + other.with_storage("bfloat16")
    assert pooled.storage["dtype"] == "bfloat16"
    exact = diag + other
    for n, t in pooled.diag.items():  # pooled in float64, rounded once more on storing
        want = exact.diag[n]
        assert bool(((t.double() - want).abs() <= (2 * U + U**2) * want.abs()).all())
    scaled = 3.0 * precs["ekfac"].with_storage("bfloat16")
    assert scaled.storage["dtype"] == "bfloat16"
    d = deltas(diag, n=1)[0]
    torch.testing.assert_close(
        scaled.quad(d), 3.0 * precs["ekfac"].with_storage("bfloat16").quad(d), rtol=U, atol=0
    )
    moved = precs["merged-diag"].with_storage("bfloat16").to(dtype=torch.float32)
    assert moved.storage["dtype"] == "bfloat16" and moved.dtype == torch.float32
    widened = precs["ekfac"].with_storage("bfloat16").with_storage("float64")
    assert widened.storage["dtype"] == "float64"
    assert torch.equal(widened.quad(d), precs["ekfac"].with_storage("bfloat16").quad(d))


@pytest.mark.parametrize(
    ("structure", "reason"),
    [
        ("diag", "a diagonal is one number per LoRA parameter, with no factor to truncate"),
        ("merged-diag", "a diagonal is one number per base weight"),
        ("ekfac", "its eigenbases Q_g, Q_a are orthogonal matrices, not PSD factors"),
    ],
)
def test_lowrank_refused_where_it_is_not_natural(others64, structure, reason):
    prec = others64[1][structure]
    message = f"a {structure!r} precision has no storage 'lowrank': {reason}"
    for check in (
        lambda: prec.with_storage("lowrank", 4),
        lambda: type(prec).check_storage("lowrank", 4),
    ):
        with pytest.raises(lc.LaloraError, match=re.escape(message)):
            check()
    with pytest.raises(lc.LaloraError, match="rank applies to storage 'lowrank' only"):
        prec.with_storage("bfloat16", rank=4)
    with pytest.raises(lc.LaloraError, match="unknown storage 'bf16'"):
        prec.with_storage("bf16")


def test_the_compact_preset_is_the_benchmarks_3b_choice():
    """``compact`` is lowrank at the rank bench_lowrank chose for Llama-3.2-3B (the largest
    within 300 MB), and behaves as that storage."""
    result = json.loads((BENCHMARKS / "results" / "lowrank.json").read_text())
    assert lc.STORAGE_PRESETS["compact"] == ("lowrank", result["recommended"]["k"])
    assert result["recommended"]["bytes_3b"] <= 300e6
    prec = lc.fit_precision(make_model(dtype=torch.float32), make_batches(), progress=False)
    a, b = prec.with_storage("compact"), prec.with_storage("lowrank", 48)
    assert a.storage == b.storage
    for k, t in a.structure_tensors().items():
        assert torch.equal(t, b.structure_tensors()[k])
    with pytest.raises(lc.LaloraError, match="sets its own rank"):
        prec.with_storage("compact", 3)
    with pytest.raises(lc.LaloraError, match="no storage 'lowrank'"):
        lc.fit_precision(make_model(dtype=torch.float32), make_batches(), structure="diag",
                         progress=False).with_storage("compact")  # fmt: skip
