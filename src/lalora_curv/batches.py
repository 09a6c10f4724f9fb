"""Validation of the batches that curvature is fitted on.

A batch is a mapping with ``input_ids`` (batch x seq, integer), optional ``attention_mask``
(1 = real token, 0 = padding) and ``labels`` (-100 = no loss), the format Hugging Face
collators produce. Labels are *unshifted*: position ``t`` predicts ``labels[t]`` from the
logits at ``t - 1``, as in ``transformers``' causal-LM loss.
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

    @property
    def num_supervised(self) -> int:
        return int(self.supervised.sum())

    @property
    def num_positions(self) -> int:
        return int(self.position_mask.sum())

    @property
    def num_sequences(self) -> int:
        return int(self.supervised.any(dim=1).sum())


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
    """Validate ``batch`` (the ``index``-th) and move it to ``device``; with ``vocab_size``,
    every input id must lie in ``[0, vocab_size)`` and every label there or be -100.

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
    ids, labels, mask = ids.to(device), labels.to(device, torch.long), mask.to(device)
    position_mask = mask.bool()
    targets = labels[:, 1:]
    supervised = supervised_mask(labels, mask)
    return PreparedBatch(ids, mask, position_mask, supervised, targets)
