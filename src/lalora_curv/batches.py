"""Validation of the batches that curvature is fitted on.

A batch is a mapping with ``input_ids`` (batch x seq, integer), optional ``attention_mask``
(1 = real token, 0 = padding) and ``labels`` (-100 = no loss), the format Hugging Face
collators produce. Labels are *unshifted*: position ``t`` predicts ``labels[t]`` from the
logits at ``t - 1``, as in ``transformers``' causal-LM loss.

**Packed and padding-free batches** carry ``position_ids`` that restart at every sequence
(and perhaps TRL's ``cu_seq_lens_q``/``cu_seq_lens_k``, which say the same): several
sequences share a row. The model is then called with the ``position_ids`` and without the 2-D
attention mask, so that transformers masks attention within each sequence (its
packed-sequence masking); padding, where a batch has some, becomes a segment of its own
(its positions restart too) and is left out of the statistics as always; and no position
predicts the first token of the next sequence. The statistics of packed sequences are those
of the same sequences padded.

**Padded batches without** ``position_ids`` get those a padded row needs,
``cumsum(attention_mask) - 1`` (as transformers' generation computes them), so a left-padded
row sees the positions of its unpadded self: models with absolute position embeddings
(GPT-2) give the same statistics for left and right padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lalora_curv.errors import BatchError

IGNORE_INDEX = -100


@dataclass
class PreparedBatch:
    """A validated batch on the model's device.

    Attributes:
        input_ids: (batch, seq) token ids.
        attention_mask: (batch, seq) 1 for real tokens, 0 for padding.
        position_mask: (batch, seq) bool, the positions whose activations and output
            gradients enter the statistics (every non-padding position).
        supervised: (batch, seq - 1) bool, the logits positions that carry a loss term:
            ``labels[:, 1:] != -100`` and neither the target nor the position predicting
            it is padding.
        targets: (batch, seq - 1) the shifted labels.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_mask: Tensor
    supervised: Tensor
    targets: Tensor
    position_ids: Tensor | None = None
    packed: bool = False
    segments: Tensor | None = None  # (batch, seq) sequence index within each row (packed)

    def model_inputs(self, accepts_position_ids: bool = True) -> dict[str, Tensor]:
        """The keyword arguments of the model's forward for this batch (module docstring)."""
        if self.packed:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if accepts_position_ids and self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs

    @property
    def num_supervised(self) -> int:
        """The number of supervised tokens (loss terms) in the batch."""
        return int(self.supervised.sum())

    @property
    def num_positions(self) -> int:
        """The number of counted (non-padding) positions in the batch."""
        return int(self.position_mask.sum())

    @property
    def num_sequences(self) -> int:
        """Sequences with a supervised token (several per row when packed)."""
        if self.segments is None:
            return int(self.supervised.any(dim=1).sum())
        seg = self.segments[:, :-1]
        keys = (
            seg[self.supervised]
            + (self.segments.max() + 1) * torch.nonzero(self.supervised, as_tuple=True)[0]
        )
        return int(torch.unique(keys).numel())


def supervised_mask(labels: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(batch, seq - 1) bool: the logits positions with a loss term.

    ``labels[:, 1:] != -100``, and neither the target nor the position predicting it is padding
    (left padding would otherwise let a pad position predict the first real token).
    """
    sup = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        real = attention_mask.bool()
        sup = sup & real[:, 1:] & real[:, :-1]
    return sup


def prepare_batch(
    batch: Mapping[str, Tensor],
    device: torch.device,
    index: int,
    vocab_size: int | None = None,
) -> PreparedBatch:
    """Validate ``batch`` (the ``index``-th) and move it to ``device``.

    With ``vocab_size``, every input id must lie in ``[0, vocab_size)`` and every label there
    or be -100.

    Raises:
        BatchError: naming the batch and the problem.
    """
    where = f"batch {index}"
    if not isinstance(batch, Mapping):
        raise BatchError(
            f"{where}: expected a dict with input_ids and labels, got {type(batch).__name__}"
        )
    for key in ("input_ids", "labels"):
        if key not in batch:
            hint = (
                " (for plain language-model data pass labels=input_ids)" if key == "labels" else ""
            )
            raise BatchError(f"{where}: missing {key!r}{hint}")
    ids = torch.as_tensor(batch["input_ids"])
    labels = torch.as_tensor(batch["labels"])
    if ids.ndim != 2:
        raise BatchError(f"{where}: input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or labels.dtype.is_floating_point:
        raise BatchError(f"{where}: input_ids and labels must be integer tensors")
    if labels.shape != ids.shape:
        raise BatchError(
            f"{where}: labels shape {tuple(labels.shape)} != input_ids shape {tuple(ids.shape)}"
        )
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    mask = torch.as_tensor(mask)
    if mask.shape != ids.shape:
        raise BatchError(
            f"{where}: attention_mask shape {tuple(mask.shape)} != input_ids shape "
            f"{tuple(ids.shape)}"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise BatchError(f"{where}: attention_mask must hold only 0 and 1")
    outside = ids < 0
    if vocab_size is not None:
        outside |= ids >= vocab_size
    if ids.numel() and bool(outside.any()):
        raise BatchError(
            f"{where}: input_ids holds token id {int(ids[outside][0])}, outside the model's "
            f"vocabulary [0, {vocab_size})"
        )
    wrong = (labels < 0) & (labels != IGNORE_INDEX)
    if vocab_size is not None:
        wrong |= labels >= vocab_size
    if labels.numel() and bool(wrong.any()):
        raise BatchError(
            f"{where}: labels hold {int(labels[wrong][0])}, outside [0, {vocab_size}) and "
            "not -100 (no loss)"
        )
    positions = _position_ids(batch, ids, mask, where)
    ids, labels, mask = ids.to(device), labels.to(device, torch.long), mask.to(device)
    position_mask = mask.bool()
    targets = labels[:, 1:]
    supervised = supervised_mask(labels, mask)
    if positions is None:  # padded rows: the positions each row's unpadded self would see
        derived = (mask.cumsum(-1) - 1).clamp(min=0)
        return PreparedBatch(ids, mask, position_mask, supervised, targets, derived)
    positions = positions.to(device)
    # padding becomes a segment of its own: its positions restart (0, 1, ...) at each run
    pad = ~position_mask
    if bool(pad.any()):
        index = torch.arange(pad.shape[1], device=device).expand_as(pad)
        after_pad = torch.cat([torch.zeros_like(pad[:, :1]), pad[:, :-1]], dim=1)
        run_start = torch.where(pad & ~after_pad, index, torch.zeros_like(index))
        positions = torch.where(pad, index - torch.cummax(run_start, dim=-1).values, positions)
    step = torch.diff(positions, dim=-1, prepend=positions[:, :1] - 1)
    segments = (step != 1).long().cumsum(-1)
    # no position predicts the first token of the next sequence
    supervised = supervised & (segments[:, 1:] == segments[:, :-1])
    return PreparedBatch(
        ids, mask, position_mask, supervised, targets, positions, packed=True, segments=segments
    )


def _position_ids(batch: Mapping[str, Tensor], ids: Tensor, mask: Tensor, where: str):
    """The batch's ``position_ids`` (checked against ``cu_seq_lens_*``), or None."""
    cu = [k for k in ("cu_seq_lens_q", "cu_seq_lens_k") if k in batch]
    if "position_ids" not in batch:
        if cu:
            raise BatchError(
                f"{where}: {cu[0]} without position_ids; give both (TRL's collator does)"
            )
        return None
    positions = torch.as_tensor(batch["position_ids"])
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.shape != ids.shape or positions.dtype.is_floating_point:
        raise BatchError(
            f"{where}: position_ids must be integers of the shape of input_ids "
            f"{tuple(ids.shape)}, got {tuple(positions.shape)} {positions.dtype}"
        )
    if bool((positions < 0).any()):
        raise BatchError(f"{where}: position_ids must be >= 0")
    for key in cu:  # padding-free rows: the boundaries must be the position restarts
        bounds = torch.as_tensor(batch[key]).flatten().tolist()
        starts = (positions.flatten() == 0).nonzero().flatten().tolist()
        if ids.shape[0] != 1 or bounds[:-1] != starts or bounds[-1] != ids.shape[1]:
            raise BatchError(
                f"{where}: {key} {bounds} disagrees with the sequence starts of position_ids "
                f"{starts} (one packed row of {ids.shape[1]} tokens)"
            )
    return positions.long()
