"""The ``hooks`` backend: LoRA curvature statistics from forward hooks and one backward pass.

Forward hooks on the ``lora_A`` / ``lora_B`` sub-modules of every adapted layer record the
lora_A input ``x``, the lora_B input ``u`` and the lora_B output. One ``torch.autograd.grad`` of
the summed per-token NLL with respect to the recorded lora_B outputs then yields
``s * g = dL/d(lora_B output)`` for every module at once, without touching any parameter's
``.grad``. With ``mc_samples = k`` the forward pass is shared by the ``k`` label draws (one
backward each). The sums of :mod:`lalora_curv.statistics` are accumulated from these tensors.

Correctness notes:

* fitting runs in eval mode (LoRA and model dropout off), restored afterwards;
* forward hooks record only during the model's own forward call, so activation recomputation
  under non-reentrant gradient checkpointing (forward hooks firing again inside backward) is
  ignored rather than counted twice;
* padding positions (attention_mask 0) never contribute; the input of a lora_A shared by
  several modules (q, k, v see the same tensor) is reduced once per forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lalora_curv.adapter import LoraHandle, whole
from lalora_curv.backends.common import (
    FitRequest,
    check_finite_loss,
    fit_loop,
    fitting_state,
    loss_labels,
    model_logits,
    position_labels,
)
from lalora_curv.batches import IGNORE_INDEX, PreparedBatch
from lalora_curv.errors import BatchError, LaloraError
from lalora_curv.statistics import LoraStatistics, ModuleSums

#: sums that square a gradient summed over a group (a sequence or a whole batch)
GROUPED = frozenset({"lora_A_grad", "lora_B_grad"})


@dataclass
class _Calls:
    """Tensors recorded in one forward pass for one module (a module may run several times)."""

    inputs: list[Tensor] = field(default_factory=list)  # x, lora_A input
    lora_B_inputs: list[Tensor] = field(default_factory=list)  # u = A x
    outputs: list[Tensor] = field(default_factory=list)  # lora_B output (carries the graph)


class _Recorder:
    """Forward hooks on the LoRA sub-modules; accumulates :class:`ModuleSums`.

    Token sums record inputs flattened to the counted positions, (n, features); grouped sums
    record them as (batch, seq, features) with padding zeroed.
    """

    def __init__(
        self,
        handles: dict[str, LoraHandle],
        needs: frozenset[str],
        dtype: torch.dtype,
        group: str | None,
        rotations: dict[str, dict[str, Tensor]] | None = None,
    ):
        self.handles = handles
        self.rotations = rotations
        self.needs = needs
        self.dtype = dtype
        self.group = group  # "sequence" or "batch" for grouped sums
        self.sums = {name: ModuleSums() for name in handles}
        self.recording = False
        self.position_mask: Tensor | None = None
        self.every_position = False  # no padding in the batch
        self.calls: dict[str, _Calls] = {name: _Calls() for name in handles}
        self._shared_input_cov: list[tuple[Tensor, Tensor]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @contextlib.contextmanager
    def attached(self) -> Iterator[_Recorder]:
        try:
            for name, h in self.handles.items():
                self._handles.append(h.lora_A.register_forward_hook(self._lora_A_hook(name)))
                self._handles.append(h.lora_B.register_forward_hook(self._lora_B_hook(name)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self.reset()

    def reset(self) -> None:
        self.calls = {name: _Calls() for name in self.handles}
        self._shared_input_cov.clear()
        self.position_mask = None

    def _check(self, t: Tensor, name: str) -> Tensor:
        """``t`` as (batch, seq, features); any other shape is refused.

        A module fed flattened positions (OPT's fc1/fc2 see (batch * seq, features)) is viewed
        back.
        """
        mask = self.position_mask
        assert mask is not None
        if t.dim() == 2 and t.shape[0] == mask.numel():
            return t.view(*mask.shape, t.shape[-1])
        if t.shape[:-1] != mask.shape:
            raise BatchError(
                f"module {name!r} received an input of shape {tuple(t.shape)}, neither "
                f"(batch, seq, features) nor (batch * seq, features) for input_ids of shape "
                f"{tuple(mask.shape)}; this module is not supported"
            )
        return t

    def _masked(self, t: Tensor, name: str) -> Tensor:
        """(n, features): the counted positions of ``t``, in the statistics dtype.

        Without padding every position counts: a view, no copy.
        """
        assert self.position_mask is not None
        t = self._check(t.detach(), name)
        if self.every_position:
            return t.reshape(-1, t.shape[-1]).to(self.dtype)
        return t[self.position_mask].to(self.dtype)

    def _zeroed(self, t: Tensor, name: str) -> Tensor:
        """(batch, seq, features): ``t`` with padding positions zeroed, in the statistics dtype."""
        assert self.position_mask is not None
        mask = self.position_mask.unsqueeze(-1).to(self.dtype)
        return self._check(t.detach(), name).to(self.dtype) * mask

    def _record(self, t: Tensor, name: str) -> Tensor:
        return self._zeroed(t, name) if self.needs & GROUPED else self._masked(t, name)

    def _lora_A_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.recording:
                return
            x = args[0]
            if "input_cov" in self.needs:
                self.sums[name].add("input_cov", self._input_cov(x, name))
            if self.needs & {"lora_A_diag", "weight_diag", "lora_A_grad"}:
                self.calls[name].inputs.append(self._record(x, name))

        return hook

    def _lora_B_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.recording:
                return
            if self.needs & {"lora_B_diag", "lora_B_grad"}:
                self.calls[name].lora_B_inputs.append(self._record(args[0], name))
            self.calls[name].outputs.append(output)

        return hook

    def _input_cov(self, x: Tensor, name: str) -> Tensor:
        """``sum_t x_t x_t^T`` over counted positions, shared between modules fed the same tensor."""
        for seen, cov in self._shared_input_cov:
            if seen is x:
                return cov
        xm = self._masked(x, name)
        cov = xm.T @ xm
        self._shared_input_cov.append((x, cov))  # keeps x alive, so identity stays unambiguous
        return cov

    def accumulate_gradients(self, grads: dict[str, list[Tensor | None]], weight: float) -> None:
        """Add one label sample's gradient statistics, weighted by ``weight`` (1 / samples)."""
        for name, handle in self.handles.items():
            if self.needs & GROUPED:
                self._accumulate_grouped(name, handle, grads[name], weight)
            else:
                self._accumulate_tokens(name, handle, grads[name], weight)

    def _accumulate_tokens(self, name: str, handle: LoraHandle, grads, weight: float) -> None:
        s = handle.spec.scaling
        calls, sums = self.calls[name], self.sums[name]
        lora_B = whole(handle.lora_B.weight.detach()).to(self.dtype)
        rot = (self.rotations or {}).get(name)
        for c, grad in enumerate(grads):
            if grad is None:  # the module's output does not reach the loss
                continue
            g_B = self._masked(grad, name)  # s * g, per counted position
            if rot is not None:  # EKFAC: per-token diagonal in the K-FAC eigenbasis
                x, u = calls.inputs[c] @ rot["x"], calls.lora_B_inputs[c] @ rot["u"]
                g_A = (g_B @ lora_B) @ rot["g_A"]
                g_B = g_B @ rot["g_B"]
                sums.add("lora_B_diag", weight * (g_B.square().T @ u.square()))
                sums.add("lora_A_diag", weight * (g_A.square().T @ x.square()))
                continue
            # g = g_B / s: the 1 / s^2 scales the small product, not the (n, D_out) gradient
            if "grad_cov" in self.needs:
                sums.add("grad_cov", (weight / s**2) * (g_B.T @ g_B))
            if "weight_diag" in self.needs:
                g2 = g_B.square()
                sums.add("weight_diag", (weight / s**2) * (g2.T @ calls.inputs[c].square()))
            if "lora_B_diag" in self.needs:
                u2 = calls.lora_B_inputs[c].square()
                sums.add("lora_B_diag", weight * (g_B.square().T @ u2))
            if "lora_A_diag" in self.needs:
                g_A = g_B @ lora_B  # s * B^T g as rows
                sums.add("lora_A_diag", weight * (g_A.square().T @ calls.inputs[c].square()))

    def _accumulate_grouped(self, name: str, handle: LoraHandle, grads, weight: float) -> None:
        """Squares of gradients summed over each sequence (or over the whole batch)."""
        calls, sums = self.calls[name], self.sums[name]
        lora_B = whole(handle.lora_B.weight.detach()).to(self.dtype)
        grad_A = grad_B = None
        for c, grad in enumerate(grads):
            if grad is None:
                continue
            g_B = self._zeroed(grad, name)  # (batch, seq, D_out)
            part_B = torch.einsum("bto,btr->bor", g_B, calls.lora_B_inputs[c])
            part_A = torch.einsum("btr,bti->bri", g_B @ lora_B, calls.inputs[c])
            grad_B = part_B if grad_B is None else grad_B + part_B
            grad_A = part_A if grad_A is None else grad_A + part_A
        if grad_B is None or grad_A is None:
            return
        if self.group == "batch":
            grad_B, grad_A = grad_B.sum(0, keepdim=True), grad_A.sum(0, keepdim=True)
        sums.add("lora_B_diag", weight * grad_B.square().sum(0))
        sums.add("lora_A_diag", weight * grad_A.square().sum(0))


def _check_reached(flat, outputs, recorder: _Recorder, handles, index: int) -> None:
    """Every recorded lora_B output must reach the loss.

    One that does not (its gradient is None) would silently enter as zero curvature. That
    happens when the forward ran inside a compiled graph (``torch.compile``: the recorded
    outputs are not the ones autograd saw) or a branch detached from the loss.
    """
    pos = 0
    for name in handles:
        n = len(recorder.calls[name].outputs)
        if any(g is None for g in flat[pos : pos + n]):
            raise LaloraError(
                f"batch {index}: the output of module {name!r} did not reach the loss, so its "
                "curvature cannot be measured (a forward inside torch.compile's graph? fit "
                "the uncompiled model; a LoRA module whose output is detached or unused?)"
            )
        pos += n


def collect_statistics(
    model: nn.Module,
    handles: dict[str, LoraHandle],
    batches: Iterable[Mapping[str, Tensor]],
    request: FitRequest,
) -> LoraStatistics:
    """Run the hooks backend over ``batches`` and return the raw token sums.

    With ``rotations`` (``{module: {"x", "u", "g_A", "g_B": eigenvectors}}``) the diagonal sums
    are taken in that basis: EKFAC's eigenvalue correction.

    The loss behind every gradient is ``L = sum_{supervised t} -log p(y_t | y_<t)``, with
    ``y_t`` the true label (``empirical``, ``batch-grad-squared``) or a draw from the model's
    predictive (``mc``, ``mc_samples`` draws sharing one forward pass, seeded by ``seed``).
    """
    needs, estimator, seed, dtype = request.needs, request.estimator, request.seed, request.dtype
    granularity, rotations = request.granularity, request.rotations
    group = "batch" if estimator == "batch-grad-squared" else granularity
    recorder = _Recorder(handles, needs, dtype, group if needs & GROUPED else None, rotations)
    device = next(iter(handles.values())).lora_A.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = request.samples

    def process(batch: PreparedBatch, index: int) -> None:
        recorder.position_mask = batch.position_mask
        recorder.every_position = bool(batch.position_mask.all())
        recorder.recording = True
        try:
            logits = model_logits(model, batch)
        finally:
            recorder.recording = False
        labels = position_labels(
            loss_labels(logits, batch, index, estimator, samples, generator), batch
        )
        logits = logits.reshape(-1, logits.shape[-1])  # a view: no copy of the logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        idle = [name for name in handles if not recorder.calls[name].outputs]
        if idle:
            raise LaloraError(
                f"batch {index}: the LoRA adapter of module {idle[0]!r} did not run in the "
                f"forward pass ({len(idle)} of {len(handles)} modules idle): are adapters "
                "enabled (not inside disable_adapter())? Or does the model bypass this "
                "module's forward (a mixture-of-experts router computing with its weight "
                "directly)? Then leave it out of target_modules"
            )
        outputs = [out for name in handles for out in recorder.calls[name].outputs]
        for k in range(samples):
            loss = F.cross_entropy(logits, labels[k], ignore_index=IGNORE_INDEX, reduction="sum")
            check_finite_loss(loss, index)
            flat = torch.autograd.grad(
                loss, outputs, retain_graph=k < samples - 1, allow_unused=True
            )
            if k == 0:
                _check_reached(flat, outputs, recorder, handles, index)
            grads, pos = {}, 0
            for name in handles:
                n = len(recorder.calls[name].outputs)
                grads[name] = list(flat[pos : pos + n])
                pos += n
            recorder.accumulate_gradients(grads, 1.0 / samples)
        recorder.reset()

    with fitting_state(model, handles), recorder.attached():
        stats = fit_loop(batches, process, device, request)
    stats.modules = recorder.sums
    return stats
