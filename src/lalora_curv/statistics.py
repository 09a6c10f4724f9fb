r"""Raw curvature statistics of LoRA modules, as sums over tokens, before normalisation.

For one module with lora_A input ``x_t`` (D_in), lora_B input ``u_t = A x_t`` (r) and base-layer
output gradient ``g_t = dL/dh_t`` (D_out), where ``L`` is the *sum* of per-token negative
log-likelihoods over supervised tokens (true labels: empirical Fisher; labels drawn from the
model: Monte-Carlo Fisher), the sums are, over counted (non-padding) positions ``t``:

.. math::

    S_x = \sum_t x_t x_t^\top,\qquad S_g = \sum_t g_t g_t^\top
    \qquad \text{(K-FAC, "expand")}

    S_A = \sum_t (s B^\top g_t)^{\odot 2} (x_t^{\odot 2})^\top,\qquad
    S_B = \sum_t (s g_t)^{\odot 2} (u_t^{\odot 2})^\top \qquad \text{(per-token diagonal)}

    S_W = \sum_t g_t^{\odot 2} (x_t^{\odot 2})^\top \qquad \text{(merged-update diagonal)}

and for the paper's cheap diagonal, ``sum_batches (dL_batch/dA)^2`` and ``(dL_batch/dB)^2``.
Monte-Carlo sums are averaged over the label samples. The one normalisation shared by every
structure (see :mod:`lalora_curv.precision`): input factors are divided by the number of counted
positions, everything built from gradients by the number of supervised tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lalora_curv.errors import CurvatureError


@dataclass
class ModuleSums:
    """Token sums of one module (``None`` where the structure does not need them)."""

    input_cov: Tensor | None = None  # S_x, D_in x D_in
    grad_cov: Tensor | None = None  # S_g, D_out x D_out
    lora_A_diag: Tensor | None = None  # S_A, r x D_in
    lora_B_diag: Tensor | None = None  # S_B, D_out x r
    weight_diag: Tensor | None = None  # S_W, D_out x D_in

    def add(self, name: str, value: Tensor) -> None:
        """Add ``value`` to the sum ``name`` (in place; a copy starts a sum)."""
        current = getattr(self, name)
        setattr(self, name, value.clone() if current is None else current.add_(value))


@dataclass
class LoraStatistics:
    """Sums of every module plus the counts that normalise them."""

    modules: dict[str, ModuleSums] = field(default_factory=dict)
    positions: int = 0  # counted (non-padding) positions: normaliser of input factors
    supervised_tokens: int = 0  # loss terms: normaliser of gradient statistics
    sequences: int = 0  # sequences with at least one supervised token
    batches: int = 0
    skipped_batches: int = 0  # batches without any supervised token

    def counts(self) -> dict[str, int]:
        """The counts as the metadata's ``counts`` records them."""
        return {
            "positions": self.positions,
            "supervised_tokens": self.supervised_tokens,
            "sequences": self.sequences,
            "batches": self.batches,
            "skipped_batches": self.skipped_batches,
        }

    def all_reduce(
        self,
        shapes: dict[str, dict[str, tuple[int, ...]]],
        keys: set[str],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Sum every statistic and count over the ranks of ``torch.distributed`` (in place).

        Each rank fits its own shard; the sums of sums are the sums over all the data, so the
        precision built from them equals a single-process fit. ``shapes`` gives each module's
        tensor shapes, for a statistic one rank never saw (a module its data never reached);
        every rank reduces the same ``keys``, in the same order, so none waits forever.
        """
        import torch.distributed as dist

        for name in shapes:
            sums = self.modules.setdefault(name, ModuleSums())
            for key in sorted(keys):
                value = getattr(sums, key)
                if value is None:
                    value = torch.zeros(shapes[name][key], dtype=dtype, device=device)
                dist.all_reduce(value)
                setattr(sums, key, value)
        counts = [
            self.positions,
            self.supervised_tokens,
            self.sequences,
            self.batches,
            self.skipped_batches,
        ]
        total = torch.tensor(counts, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        (
            self.positions,
            self.supervised_tokens,
            self.sequences,
            self.batches,
            self.skipped_batches,
        ) = (int(c) for c in total.tolist())

    def check_finite(self) -> None:
        """Raise :class:`CurvatureError` naming the first non-finite statistic."""
        for name, sums in self.modules.items():
            for key in ("input_cov", "grad_cov", "lora_A_diag", "lora_B_diag", "weight_diag"):
                value = getattr(sums, key)
                if value is not None and not bool(torch.isfinite(value).all()):
                    raise CurvatureError(
                        f"module {name!r}: statistic {key} has NaN/inf entries (a non-finite "
                        "loss or activation in the source batches?)"
                    )
