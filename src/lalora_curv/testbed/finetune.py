"""One fine-tuning run of an experiment, whatever the scenario.

Every experiment of the testbed (the embedded world, the real-text scenario, their sweeps)
trains through :func:`finetune`: a LoRA adapter drawn after ``torch.manual_seed(seed)``, the
untouched model measured, a penalty built (a curvature fitted on the scenario's source data at
the adapter's init, or a data-free L2 control), then :func:`lalora_curv.train` on the
scenario's target batches, measured every ``eval_every`` steps. A scenario says only what is
its own: how a model is measured, which batches train it, and how its source precision is
fitted.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from peft import LoraConfig
from torch import nn

import lalora_curv as lc
from lalora_curv.baselines import lora_adapter, migu
from lalora_curv.precision import REGISTRY
from lalora_curv.strength import Strength, as_strength, mean_curvature


class Scenario(Protocol):
    """What a fine-tuning experiment needs of its scenario."""

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """The model's metrics (forgetting and learning), without gradients."""

    def train_batches(self, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
        """The target's supervised batches for ``steps`` steps, ordered by ``seed``."""

    def source_precision(self, model: nn.Module, penalty: Penalty, seed: int) -> lc.Precision:
        """The curvature of ``penalty.structure`` fitted on the scenario's source data."""


@dataclass(frozen=True)
class Penalty:
    """The penalty of a run.

    Attributes:
        structure: a registry structure: a curvature (fitted on the scenario's ``source``) or
            an L2 control (``isotropic``, ``merged-isotropic``: built from the adapter).
        strength: ``lambda`` (a :class:`~lalora_curv.strength.Strength` or a number).
        scope: the isotropic control's ``"all"`` or ``"lora_B"``.
        source: the scenario's name of the data the curvature is fitted on.
        estimator: the Fisher estimator.
        mc_samples: label draws per token for ``estimator="mc"``.
    """

    structure: str
    strength: Strength | float = 0.0
    scope: str = "all"
    source: str = "texts"
    estimator: str = "mc"
    mc_samples: int = 1


@dataclass
class Run:
    """What a run measured.

    Attributes:
        before: the untouched model's metrics.
        trajectory: ``{"step": s, **metrics}`` every ``eval_every`` steps and at the end.
        after: the metrics at the end (the trajectory's last entry, without its step).
        log: :func:`lalora_curv.train`'s records.
        precision: the penalty's precision (None: plain LoRA or MIGU).
        lam: ``lambda`` at the first step.
    """

    before: dict[str, Any]
    trajectory: list[dict[str, Any]]
    after: dict[str, Any]
    log: list[dict[str, Any]]
    precision: lc.Precision | None
    lam: float
    lam_at: dict[int, float] = field(default_factory=dict)
    penalty_at: dict[int, float] = field(default_factory=dict)

    @property
    def mean_curvature(self) -> float | None:
        """``m(P)`` of the precision (what a relative strength divides by)."""
        return mean_curvature(self.precision) if self.precision is not None else None

    @property
    def source_tokens(self) -> int:
        """Supervised source tokens the precision was fitted on (0 for none or a control)."""
        if self.precision is None:
            return 0
        return int(self.precision.counts.get("supervised_tokens", 0))


def finetune(
    model: nn.Module,
    scenario: Scenario,
    *,
    penalty: Penalty | None = None,
    lr: float,
    steps: int,
    rank: int,
    targets: tuple[str, ...],
    init: str = "default",
    migu_threshold: float | None = None,
    eval_every: int | None = None,
    before: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Run:
    """LoRA (``r = alpha = rank`` on ``targets``) on the scenario's target.

    Args:
        model: the base model (wrapped in place by peft).
        scenario: the scenario (:class:`Scenario`).
        penalty: the penalty towards the init (None: plain LoRA).
        lr: AdamW learning rate.
        steps: optimizer steps.
        rank: LoRA rank (and alpha).
        targets: the adapted linear modules.
        init: the adapter's init (:data:`lalora_curv.baselines.INITS`).
        migu_threshold: train with MIGU's gradient mask at this quantile.
        eval_every: measure every this many steps (and at the end); None: only at the end.
        before: the untouched model's metrics, if already measured (they are every run's).
        seed: the adapter init, the data order, the MC labels, dropout.
        progress: a progress bar.
    """
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets))
    peft_model = lora_adapter(model, config, init)
    if before is None:
        peft_model.eval()
        with torch.no_grad():
            before = scenario.measure(peft_model)
    precision, strength = None, as_strength(0.0)
    if penalty is not None:
        if REGISTRY[penalty.structure].fitted:
            precision = scenario.source_precision(peft_model, penalty, seed)
        else:
            precision = lc.isotropic_precision(peft_model, penalty.structure, scope=penalty.scope)
        strength = as_strength(penalty.strength)
    lam = strength.initial_lam(precision)
    train = scenario.train_batches(steps, seed)
    trajectory: list[dict[str, Any]] = []

    def checkpoint(m: nn.Module, step: int) -> dict[str, float]:
        trajectory.append({"step": step, **scenario.measure(m)})
        return {}

    guard = migu(peft_model, migu_threshold) if migu_threshold is not None else nullcontext()
    with guard:
        log = lc.train(
            peft_model,
            train,
            precision,
            strength,
            lr=lr,
            max_steps=steps,
            seed=seed,
            eval_fn=checkpoint,
            eval_every=eval_every,
            progress=progress,
        )
    steps_logged = [r for r in log if "penalty" in r]
    return Run(
        before=before,
        trajectory=trajectory,
        after={k: v for k, v in trajectory[-1].items() if k != "step"},
        log=log,
        precision=precision,
        lam=lam,
        lam_at={r["step"]: r["lam"] for r in steps_logged},
        penalty_at={r["step"]: r["penalty"] for r in steps_logged},
    )


__all__ = ["Penalty", "Run", "Scenario", "finetune"]
