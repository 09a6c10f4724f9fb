r"""How strongly the penalty pulls.

One :class:`Strength` for ``lc.train``, the Hugging Face mixin, the command line and the
experiments.

Three ways to set ``lambda`` in ``loss = nll + lambda * (theta - mu)^T P (theta - mu)``:

* :meth:`Strength.fixed`: ``lambda`` itself.
* :meth:`Strength.relative`: ``lambda = c / m(P)`` with ``m(P) = tr(P) / num_params`` the
  precision's mean eigenvalue, so that ``c`` is dimensionless: one range of ``c`` serves every
  structure, estimator and source, whose raw scales differ by orders of magnitude (for the
  isotropic controls ``m(P)`` is the share of penalised entries, so ``lambda P`` has the same
  trace for every structure at one ``c``).
* :meth:`Strength.budget`: a source-NLL budget ``epsilon`` (nats per source token). The
  precision is the mean Fisher per source token, so to second order the adapter raises the mean
  source NLL by ``q = (theta - mu)^T P (theta - mu) / (2 s)`` (``s`` the precision's
  ``metadata["scale"]``); ``lambda`` follows the multiplicative dual ascent of
  ``min NLL_target s.t. q <= epsilon``,

  .. math:: \lambda_{t+1} = \lambda_t \exp\big(\eta\,\mathrm{clip}(q_t/\epsilon - 1, -1, 1)\big),

  from a start ``lambda_0`` (given, or ``c / m(P)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lalora_curv import checks
from lalora_curv.errors import LaloraError
from lalora_curv.precision import Precision

KINDS = ("fixed", "relative", "budget")


@dataclass(frozen=True)
class Strength:
    """``lambda``: fixed, relative to ``m(P)``, or adapted to a source-NLL budget.

    Attributes:
        kind: ``"fixed"``, ``"relative"`` or ``"budget"``.
        value: ``lambda``, ``c`` or ``epsilon``.
        start_lam: the budget's start ``lambda`` (or None: from ``start_c``).
        start_c: the budget's start as a relative strength (used when ``start_lam`` is None).
        rate: the budget's ``eta``: ``lambda`` changes by at most ``exp(eta)`` per step.
    """

    kind: str
    value: float
    start_lam: float | None = None
    start_c: float | None = None
    rate: float = 0.02

    def __post_init__(self) -> None:
        checks.choice("strength kind", self.kind, KINDS)
        name = {"fixed": "lam", "relative": "c", "budget": "source_nll_budget"}[self.kind]
        checks.number(name, self.value, 0.0, strict=self.kind == "budget")
        checks.number("start_lam", self.start_lam, 0.0, strict=True, optional=True)
        checks.number("start_c", self.start_c, 0.0, strict=True, optional=True)
        checks.number("budget_rate", self.rate, 0.0, strict=True)
        if self.kind == "budget" and self.start_lam is None and self.start_c is None:
            raise LaloraError("a source-NLL budget needs a start lam > 0 (start_lam or start_c)")

    @classmethod
    def fixed(cls, lam: float) -> Strength:
        """``lambda = lam``."""
        return cls("fixed", lam)

    @classmethod
    def relative(cls, c: float) -> Strength:
        """``lambda = c / m(P)``, ``m(P)`` the precision's mean eigenvalue."""
        return cls("relative", c)

    @classmethod
    def budget(
        cls,
        epsilon: float,
        start_lam: float | None = None,
        start_c: float | None = None,
        rate: float = 0.02,
    ) -> Strength:
        """A source-NLL budget of ``epsilon`` nats per token, from ``start_lam`` or ``start_c``."""
        return cls("budget", epsilon, start_lam, start_c, rate)

    @property
    def active(self) -> bool:
        """Whether the penalty enters the loss at all (``lambda > 0`` at the start)."""
        return not (self.kind in ("fixed", "relative") and self.value == 0.0)

    def check(self, precision: Precision | None, error: type[LaloraError] = LaloraError) -> None:
        """Refuse a strength the precision cannot carry.

        A penalty without a precision, a budget on a precision whose penalty is not in nats per
        source token.
        """
        if precision is None:
            if self.active:
                raise error("lam > 0 needs a precision")
            return
        if self.kind != "budget":
            return
        meta = precision.metadata
        if meta.get("granularity") == "sequence" or meta.get("estimator") == "batch-grad-squared":
            raise error(
                "source_nll_budget reads penalty / 2 as nats per source token, which needs a "
                "per-token Fisher; this precision is "
                f"{meta.get('estimator')!r} at {meta.get('granularity')!r} granularity"
            )
        if meta.get("scale") is None or not float(meta["scale"]) > 0:
            raise error(
                "source_nll_budget needs the precision's positive scale (a sum of "
                f"differently scaled precisions has none); got {meta.get('scale')!r}"
            )

    def initial_lam(self, precision: Precision | None) -> float:
        """``lambda`` at the first step."""
        if self.kind == "fixed":
            return self.value
        if precision is None:
            return 0.0
        if self.kind == "relative":
            return self.value / mean_curvature(precision)
        if self.start_lam is not None:
            return self.start_lam
        return float(self.start_c) / mean_curvature(precision)  # type: ignore[arg-type]

    def next_lam(self, lam: float, penalty: float, precision: Precision | None) -> float:
        """``lambda`` for the next step, after a step whose penalty was ``penalty``."""
        if self.kind != "budget" or precision is None:
            return lam
        projected = 0.5 * penalty / float(precision.metadata["scale"])
        excess = min(1.0, max(-1.0, projected / self.value - 1.0))
        return lam * math.exp(self.rate * excess)

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON object."""
        return {
            "kind": self.kind,
            "value": self.value,
            "start_lam": self.start_lam,
            "start_c": self.start_c,
            "rate": self.rate,
        }


def mean_curvature(precision: Precision) -> float:
    """``m(P) = tr(P) / num_params``, the precision's mean eigenvalue.

    Over the merged update for the merged structures, per LoRA parameter.
    """
    m = precision.trace() / precision.num_params
    if not m > 0:
        raise LaloraError(f"a relative strength needs a precision with a positive trace, got {m}")
    return m


def as_strength(lam: float | Strength) -> Strength:
    """A plain number is a fixed ``lambda``."""
    if isinstance(lam, Strength):
        return lam
    return Strength.fixed(checks.number("lam", lam, 0.0))  # type: ignore[arg-type]


__all__ = ["Strength", "as_strength", "mean_curvature"]
