"""The isotropic controls against dense brute force and peft's own merged update (float64)."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from helpers import make_model
from lalora_curv.adapter import find_lora_modules

EXACT = {"rtol": 1e-10, "atol": 1e-12}


def displace(model, seed=0, scale=0.1, only=None):
    """Move the adapter's tensors (those whose name ends with ``only``, default every one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for h in find_lora_modules(model).values():
            for name, p in (("lora_A", h.lora_A.weight), ("lora_B", h.lora_B.weight)):
                if only is None or name == only:
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def peft_delta_weights(model) -> dict[str, torch.Tensor]:
    """``s B A`` per module from peft's own ``get_delta_weight`` (the reference)."""
    return {n: h.layer.get_delta_weight("default") for n, h in find_lora_modules(model).items()}


@pytest.mark.parametrize("scope", ["all", "lora_B"])
def test_isotropic_penalty_is_the_squared_distance_to_the_init(scope):
    model = make_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    prec = lc.isotropic_precision(model, scope=scope, dtype=torch.float64)
    assert prec.scope == scope
    assert prec.penalty(model).item() == 0.0
    displace(model)
    now = {n: p for n, p in model.named_parameters() if "lora_" in n}
    ref = sum((now[n] - init[n]).square().sum() for n in init if scope == "all" or "lora_B" in n)
    torch.testing.assert_close(prec.penalty(model), ref, **EXACT)
    # and the dense matrix is the identity on the penalised tensors
    P = prec.to_dense()
    params = prec.adapter_params(model)
    v = torch.cat([(params[n] - prec.mode[n]).flatten() for n in prec.param_names])
    torch.testing.assert_close(v @ P @ v, ref, **EXACT)
    expected_diag = torch.cat(
        [
            torch.full((prec.mode[n].numel(),), 1.0 if scope == "all" or "lora_B" in n else 0.0)
            for n in prec.param_names
        ]
    ).double()
    torch.testing.assert_close(P, torch.diag(expected_diag), **EXACT)


def test_lora_B_scope_ignores_lora_A():
    model = make_model()
    prec = lc.isotropic_precision(model, scope="lora_B", dtype=torch.float64)
    displace(model, only="lora_A")
    assert prec.penalty(model).item() == 0.0
    displace(model, only="lora_B")
    assert prec.penalty(model).item() > 0.0


def test_penalty_gradient_is_twice_the_weighted_displacement():
    model = make_model()
    prec = 3.0 * lc.isotropic_precision(model, dtype=torch.float64)
    displace(model)
    params = prec.adapter_params(model)
    grads = torch.autograd.grad(prec.penalty(model), list(params.values()))
    for (n, p), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(g, 6.0 * (p - prec.mode[n]), **EXACT)


@pytest.mark.parametrize("init_B_std", [0.0, 0.3])
def test_merged_isotropic_is_the_frobenius_norm_of_peft_merged_update(init_B_std):
    model = make_model(init_B_std=init_B_std)
    before = peft_delta_weights(model)
    prec = lc.isotropic_precision(model, "merged-isotropic", dtype=torch.float64)
    assert prec.penalty(model).item() == 0.0
    displace(model)
    after = peft_delta_weights(model)
    ref = sum((after[n] - before[n]).square().sum() for n in before)
    torch.testing.assert_close(prec.penalty(model), ref, **EXACT)
    # gauge invariance: B M, M^-1 A leaves the merged update and the penalty unchanged
    with torch.no_grad():
        for h in find_lora_modules(model).values():
            r = h.spec.rank
            M = torch.eye(r, dtype=torch.float64) + 0.3 * torch.ones(r, r, dtype=torch.float64)
            h.lora_B.weight.copy_(h.lora_B.weight @ M)
            h.lora_A.weight.copy_(torch.linalg.solve(M, h.lora_A.weight))
    torch.testing.assert_close(prec.penalty(model), ref, **EXACT)


def test_traces_count_the_penalised_entries():
    model = make_model()
    full = lc.isotropic_precision(model, dtype=torch.float64)
    b_only = lc.isotropic_precision(model, scope="lora_B", dtype=torch.float64)
    merged = lc.isotropic_precision(model, "merged-isotropic", dtype=torch.float64)
    specs = full.modules.values()
    assert full.trace() == full.num_params
    assert b_only.trace() == sum(s.out_features * s.rank for s in specs)
    assert merged.trace() == sum(s.out_features * s.in_features for s in specs)
    assert (2.5 * full).trace() == pytest.approx(2.5 * full.num_params, rel=1e-12)


@pytest.mark.parametrize("structure", ["isotropic", "merged-isotropic"])
def test_save_load_sum_and_scale(tmp_path, structure):
    model = make_model()
    prec = lc.isotropic_precision(model, structure, dtype=torch.float64)
    displace(model)
    value = prec.penalty(model)
    loaded = lc.load_precision(lc.save_precision(prec, tmp_path / "p"))
    assert type(loaded) is type(prec)
    torch.testing.assert_close(loaded.penalty(model), value, **EXACT)
    torch.testing.assert_close((prec + loaded).penalty(model), value, **EXACT)  # a mean
    torch.testing.assert_close((4 * prec).penalty(model), 4 * value, **EXACT)
    assert (4 * prec).metadata["scale"] == 4.0
    with pytest.raises(lc.IncompatiblePrecisionError, match="cannot add"):
        _ = prec + lc.fit_precision(
            model,
            [{"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2, 3]])}],
            structure="kfac",
            progress=False,
        )


def test_edited_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    prec = lc.isotropic_precision(make_model(), dtype=torch.float64)
    path = lc.save_precision(prec, tmp_path / "p")
    tensors = load_file(path / "precision.safetensors")
    key = next(k for k in tensors if k.startswith("isotropic."))
    tensors[key] = -tensors[key]
    # re-written by hand (digest fixed up) to reach the value check behind the digest
    import hashlib
    import json

    from lalora_curv import artifact
    from lalora_curv.artifact import KIND

    save_file(tensors, path / "precision.safetensors", metadata={"format": f"{KIND}/1"})
    meta = json.loads((path / "precision.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256(
        (path / "precision.safetensors").read_bytes()
    ).hexdigest()
    meta["metadata_sha256"] = artifact.metadata_digest(meta)
    (path / "precision.json").write_text(json.dumps(meta))
    with pytest.raises(lc.ArtifactError, match=">= 0"):
        lc.load_precision(path)


def test_rebase_onto_another_rank_and_init():
    model = make_model(r=3)
    prec = lc.isotropic_precision(model, dtype=torch.float64)
    other = make_model(r=5, init_B_std=0.2, seed=4)
    moved = prec.rebase(other)
    assert moved.penalty(other).item() == 0.0
    init = {n: p.detach().clone() for n, p in other.named_parameters() if "lora_" in n}
    displace(other)
    ref = sum((p - init[n]).square().sum() for n, p in other.named_parameters() if "lora_" in n)
    torch.testing.assert_close(moved.penalty(other), ref, **EXACT)


def test_bad_arguments_are_refused():
    model = make_model()
    with pytest.raises(lc.LaloraError, match="scope"):
        lc.isotropic_precision(model, scope="lora_A")
    with pytest.raises(lc.LaloraError, match="scope applies"):
        lc.isotropic_precision(model, "merged-isotropic", scope="lora_B")
    with pytest.raises(lc.LaloraError, match="unknown isotropic structure"):
        lc.isotropic_precision(model, "kfac")
    with pytest.raises(lc.LaloraError, match="isotropic_precision"):
        lc.fit_precision(model, [], structure="isotropic", progress=False)
