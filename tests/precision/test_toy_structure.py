"""A new structure is one class: defining it registers it, and fitting (every backend need
resolved from its ``needs``), the penalty, sums, saving and loading work without touching any
other file."""

from __future__ import annotations

import pytest
import torch

import lalora_curv as lc
from helpers import make_batches, make_model
from lalora_curv.precision import REGISTRY, Precision
from lalora_curv.precision._util import mean_of, take


@pytest.fixture
def toy_structure():
    """``P = w_m I`` on each module's lora_B, ``w_m`` the mean per-token Fisher diagonal of
    that lora_B: the one class a toy structure needs, unregistered afterwards."""

    class ScalarBPrecision(Precision):
        structure = "toy-scalar-b"
        estimators = ("empirical", "mc")

        @classmethod
        def needs(cls, estimator, granularity):
            return frozenset({"lora_B_diag"})

        @classmethod
        def from_statistics(cls, stats, specs, mode, metadata):
            n, dtype = stats.supervised_tokens, next(iter(mode.values())).dtype
            w = {
                name: mean_of(
                    stats.modules[name].lora_B_diag, (spec.out_features, spec.rank), n, dtype
                ).mean()
                for name, spec in specs.items()
            }
            return cls(specs, mode, w, metadata)

        def __init__(self, modules, mode, weight, metadata):
            super().__init__(modules, mode, metadata)
            self.weight = dict(weight)
            self._record_storage()

        def _module_quad(self, spec, dA, dB):
            return self.weight[spec.name].to(dB.dtype) * dB.square().sum()

        def module_trace(self, name):
            spec = self.modules[name]
            return float(self.weight[name]) * spec.out_features * spec.rank

        def structure_tensors(self):
            return {f"toy.{n}": w.reshape(1) for n, w in self.weight.items()}

        @classmethod
        def from_tensors(cls, modules, mode, tensors, metadata):
            w = {n: take(tensors, f"toy.{n}", (1,))[0] for n in modules}
            return cls(modules, mode, w, metadata)

        def _weighted_sum(self, others, weights):
            parts = [self, *others]
            w = {
                n: sum(c * p.weight[n] for p, c in zip(parts, weights, strict=True))
                for n in self.weight
            }
            return ScalarBPrecision(self.modules, self.mode, w, self._metadata)

    yield ScalarBPrecision
    REGISTRY.pop("toy-scalar-b")


def test_a_toy_structure_is_one_class(toy_structure, tmp_path):
    model, batches = make_model(), make_batches()
    assert REGISTRY["toy-scalar-b"] is toy_structure
    toy = lc.fit_precision(
        model, batches, structure="toy-scalar-b", progress=False, stats_dtype=torch.float64
    )
    # the reference: the same per-token Fisher diagonal, fitted as the diag structure
    diag = lc.fit_precision(
        model, batches, structure="diag", progress=False, stats_dtype=torch.float64
    )
    for name, spec in toy.modules.items():
        assert float(toy.weight[name]) == pytest.approx(
            float(diag.diag[spec.lora_B_name].mean()), rel=1e-12
        )
    # the penalty at a displacement, against the formula
    torch.manual_seed(0)
    delta = {n: 0.1 * torch.randn_like(t) for n, t in toy.mode.items()}
    expected = sum(
        float(toy.weight[name]) * float(delta[spec.lora_B_name].square().sum())
        for name, spec in toy.modules.items()
    )
    assert float(toy.quad(delta)) == pytest.approx(expected, rel=1e-12)
    # sums pool by tokens; the artifact round-trips exactly
    pooled = toy + toy
    assert float(pooled.quad(delta)) == pytest.approx(expected, rel=1e-12)
    path = lc.save_precision(toy, tmp_path / "toy")
    loaded = lc.load_precision(path)
    assert type(loaded) is toy_structure and loaded.digest() == toy.digest()
    assert loaded.metadata["structure"] == "toy-scalar-b"
