"""The one curvlinops interface the curvlinops backend reads, pinned: if a release changes it,
this test names what changed (pyproject pins curvlinops-for-pytorch < 3.1 for this reason)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

curvlinops = pytest.importorskip("curvlinops")


def test_kfac_state_dict_holds_the_factors_the_backend_reads():
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac import FisherType, KFACType

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 5, bias=False)).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 5, (6,))
    params = list(model.parameters())
    op = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        params,
        [(X, y)],
        fisher_type=FisherType.EMPIRICAL,
        kfac_approx=KFACType.EXPAND,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    state = op.state_dict()
    for key in ("input_covariances", "gradient_covariances"):
        assert key in state, (
            f"curvlinops {curvlinops.__version__}: KFACLinearOperator.state_dict() has no "
            f"{key!r} any more (keys: {sorted(state)}); lalora_curv.backends.curvlinops reads it"
        )
    # keyed by module name, as the backend looks them up
    assert sorted(state["input_covariances"]) == ["0", "1"]
    # the backend's conversion: the input covariance is a mean over the data's positions
    assert torch.allclose(state["input_covariances"]["0"], X.T @ X / X.shape[0])
    assert state["gradient_covariances"]["1"].shape == (5, 5)
