"""The Laplace penalty inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer``.

``PenaltyMixin`` adds ``lam * prec.penalty(model)`` to every optimizer step of any ``Trainer``
subclass; ``LaloraTrainer`` is ``transformers.Trainer`` with it::

    trainer = LaloraTrainer(model=model, args=args, train_dataset=ds, precision=prec, lam=1e3)
    trainer = LaloraTrainer(..., precision=prec, lam=lc.Strength.relative(0.1))  # or a budget

    from trl import SFTTrainer                       # the same for TRL
    class LaloraSFTTrainer(PenaltyMixin, SFTTrainer): ...

The penalty does not depend on the batch and the parameters do not move within an
accumulation window, so each of its ``K`` micro-batches carries ``lam * penalty / K`` in its
loss (one backward, as DDP requires): the step's gradient gains exactly ``lam * grad(penalty)``,
whatever normalisation the Trainer applies to the NLL (per micro-batch or by
``num_items_in_batch``). The Trainer's ``loss`` includes the penalty term; ``penalty`` and
``lam`` are logged beside it. Works with gradient accumulation, gradient checkpointing and bf16
(the penalty is computed in the precision's dtype, float32 by default). Under DDP every rank computes the same
penalty on the same (replicated) adapter; its gradient is averaged like any other. The penalty
is evaluated in every micro-batch (``K`` times per step, unlike the thin loop's once): about 1 %
of a step each at r = 16 on q, v, so worth knowing at large ``K``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lalora_curv import checks
from lalora_curv.errors import LaloraError
from lalora_curv.precision import Precision
from lalora_curv.strength import Strength, as_strength


class PenaltyMixin:
    """Adds ``lam * precision.penalty(model)`` to a Hugging Face ``Trainer``'s objective.

    Construct it as the ``Trainer`` it is mixed into, with three keyword arguments more (the
    rest go to the ``Trainer``).

    Args:
        precision: the source precision; ``None`` trains plain LoRA.
        lam: the penalty's strength: a number (``lambda >= 0``) or a
            :class:`~lalora_curv.strength.Strength`.
        adapter_name: the peft adapter to penalise.
    """

    def __init__(
        self,
        *args: Any,
        precision: Precision | None = None,
        lam: float | Strength = 0.0,
        adapter_name: str = "default",
        **kwargs: Any,
    ) -> None:
        strength = as_strength(lam)
        checks.string("adapter_name", adapter_name)
        if precision is not None and not isinstance(precision, Precision):
            raise LaloraError(
                f"precision must be a lalora_curv Precision or None, got {type(precision).__name__}"
            )
        strength.check(precision)
        super().__init__(*args, **kwargs)
        self.precision = precision
        self.strength = strength
        self.lam = strength.initial_lam(precision)
        self.adapter_name = adapter_name
        self._penalty_log: list[float] = []
        self._budget_step: tuple[int, float] | None = None  # (step, its penalty)
        from lalora_curv.train_checks import check_covered

        check_covered(self.model, precision, adapter_name, LaloraError)  # refused now

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """The ``Trainer``'s loss plus ``lam * penalty`` in training (scaled for accumulation)."""
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.precision is None or not model.training:
            return out
        loss, rest = (out[0], tuple(out[1:])) if return_outputs else (out, ())
        penalty = self.precision.penalty(model, self.adapter_name)
        if not bool(torch.isfinite(penalty)):
            raise LaloraError(f"step {self.state.global_step}: the penalty is {penalty.item()}")
        self._penalty_log.append(float(penalty.detach()))
        self._follow_budget(float(penalty.detach()))
        if self.lam > 0:
            # training_step divides the loss by the accumulation steps unless it was already
            # normalised over the window (num_items_in_batch): the penalty enters once a window
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (
                    getattr(self, "model_accepts_loss_kwargs", False)
                    and num_items_in_batch is not None
                ) or (getattr(self, "compute_loss_func", None) is not None)
            steps = getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
            loss = loss + self.lam * penalty / (steps if scaled else 1)
        return (loss, *rest) if return_outputs else loss

    def _follow_budget(self, penalty: float) -> None:
        """Under a source-NLL budget, update ``lam`` once per optimizer step.

        From the penalty of the step before (the thin loop's rule; the parameters do not move
        within a step).
        """
        if self.strength.kind != "budget":
            return
        step = self.state.global_step
        if self._budget_step is not None and step > self._budget_step[0]:
            self.lam = self.strength.next_lam(self.lam, self._budget_step[1], self.precision)
        if self._budget_step is None or step > self._budget_step[0]:
            self._budget_step = (step, penalty)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The ``Trainer``'s log, with the mean ``penalty`` and ``lam`` in training records."""
        if self._penalty_log and "loss" in logs:  # training records only, not evaluation ones
            logs["penalty"] = sum(self._penalty_log) / len(self._penalty_log)
            logs["lam"] = self.lam
            self._penalty_log.clear()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


def _trainer_class():
    from transformers import Trainer

    class LaloraTrainer(PenaltyMixin, Trainer):
        """``transformers.Trainer`` with the Laplace penalty (see :class:`PenaltyMixin`)."""

    return LaloraTrainer


def __getattr__(name: str):
    if name == "LaloraTrainer":  # import transformers' Trainer only when asked for
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
