"""The ``hooks`` backend: LoRA curvature statistics from forward hooks and one backward pass.

Forward hooks on the LoRA ``lora_A`` / ``lora_B`` sub-modules of every adapted layer record the
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
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lalora_curv.adapter import LoraHandle
from lalora_curv.batches import PreparedBatch, prepare_batch
from lalora_curv.errors import BatchError, CurvatureError, LaloraError
from lalora_curv.statistics import LoraStatistics, ModuleSums

logger = logging.getLogger("lalora_curv")

ESTIMATORS = ("empirical", "mc", "batch-grad-squared")


@dataclass
class _Calls:
    """Tensors recorded in one forward pass for one module (a module may run several times)."""

    inputs: list[Tensor] = field(default_factory=list)  # x, lora_A input
    lora_B_inputs: list[Tensor] = field(default_factory=list)  # u = A x
    outputs: list[Tensor] = field(default_factory=list)  # lora_B output (carries the graph)


class _Recorder:
    """Forward hooks on the LoRA sub-modules; accumulates :class:`ModuleSums`."""

    def __init__(self, handles: dict[str, LoraHandle], needs: frozenset[str], dtype: torch.dtype):
        self.handles = handles
        self.needs = needs
        self.dtype = dtype
        self.sums = {name: ModuleSums() for name in handles}
        self.recording = False
        self.position_mask: Tensor | None = None
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

    def _masked(self, t: Tensor, name: str) -> Tensor:
        mask = self.position_mask
        assert mask is not None
        if t.shape[:-1] != mask.shape:
            raise BatchError(
                f"module {name!r} received an input of shape {tuple(t.shape)}; lalora-curv "
                f"expects (batch, seq, features) matching input_ids {tuple(mask.shape)}"
            )
        return t.detach()[mask].to(self.dtype)

    def _lora_A_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.recording:
                return
            x = args[0]
            if "input_cov" in self.needs:
                self.sums[name].add("input_cov", self._input_cov(x, name))
            if self.needs & {"lora_A_diag", "weight_diag", "lora_A_grad"}:
                self.calls[name].inputs.append(self._masked(x, name))

        return hook

    def _lora_B_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.recording:
                return
            if self.needs & {"lora_B_diag", "lora_B_grad"}:
                self.calls[name].lora_B_inputs.append(self._masked(args[0], name))
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
            s = handle.spec.scaling
            calls = self.calls[name]
            sums = self.sums[name]
            lora_B = handle.lora_B.weight.detach().to(self.dtype)
            batch_grad_A = batch_grad_B = None
            for c, grad in enumerate(grads[name]):
                if grad is None:  # the module's output does not reach the loss
                    continue
                g_B = self._masked(grad, name)  # s * g, per counted position
                if self.needs & {"lora_A_diag", "lora_A_grad"}:
                    g_A = g_B @ lora_B  # s * B^T g as rows
                if "grad_cov" in self.needs:
                    g = g_B / s
                    sums.add("grad_cov", weight * (g.T @ g))
                if "weight_diag" in self.needs:
                    g2 = (g_B / s).square()
                    sums.add("weight_diag", weight * (g2.T @ calls.inputs[c].square()))
                if "lora_B_diag" in self.needs:
                    sums.add(
                        "lora_B_diag", weight * (g_B.square().T @ calls.lora_B_inputs[c].square())
                    )
                if "lora_A_diag" in self.needs:
                    sums.add("lora_A_diag", weight * (g_A.square().T @ calls.inputs[c].square()))
                if "lora_B_grad" in self.needs:
                    part = g_B.T @ calls.lora_B_inputs[c]
                    batch_grad_B = part if batch_grad_B is None else batch_grad_B + part
                if "lora_A_grad" in self.needs:
                    part = g_A.T @ calls.inputs[c]
                    batch_grad_A = part if batch_grad_A is None else batch_grad_A + part
            if batch_grad_B is not None:
                sums.add("lora_B_diag", weight * batch_grad_B.square())
            if batch_grad_A is not None:
                sums.add("lora_A_diag", weight * batch_grad_A.square())


def needed_sums(structure: str, estimator: str) -> frozenset[str]:
    """The token sums (and recorded tensors) a structure needs."""
    if estimator == "batch-grad-squared":
        return frozenset({"lora_A_grad", "lora_B_grad"})
    return {
        "diag": frozenset({"lora_A_diag", "lora_B_diag"}),
        "merged-diag": frozenset({"weight_diag"}),
    }.get(structure, frozenset({"input_cov", "grad_cov"}))


@contextlib.contextmanager
def fitting_state(model: nn.Module, handles: dict[str, LoraHandle]) -> Iterator[None]:
    """Eval mode and differentiable LoRA weights for the fit; everything restored afterwards."""
    training = {m: m.training for m in model.modules()}
    lora_params = [p for h in handles.values() for p in (h.lora_A.weight, h.lora_B.weight)]
    requires_grad = [p.requires_grad for p in lora_params]
    try:
        model.eval()
        for p in lora_params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for m, mode in training.items():
            m.training = mode
        for p, flag in zip(lora_params, requires_grad, strict=True):
            p.requires_grad_(flag)


def _logits(model: nn.Module, batch: PreparedBatch) -> Tensor:
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


def collect_statistics(
    model: nn.Module,
    handles: dict[str, LoraHandle],
    batches: Iterable[Mapping[str, Tensor]],
    *,
    needs: frozenset[str],
    estimator: str,
    mc_samples: int,
    seed: int,
    max_batches: int | None,
    progress: bool,
    dtype: torch.dtype,
) -> LoraStatistics:
    """Run the hooks backend over ``batches`` and return the raw token sums.

    The loss behind every gradient is ``L = sum_{supervised t} -log p(y_t | y_<t)``, with
    ``y_t`` the true label (``empirical``, ``batch-grad-squared``) or a draw from the model's
    predictive (``mc``, ``mc_samples`` draws sharing one forward pass, seeded by ``seed``).
    """
    stats = LoraStatistics()
    recorder = _Recorder(handles, needs, dtype)
    device = next(iter(handles.values())).lora_A.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = mc_samples if estimator == "mc" else 1
    total = max_batches if max_batches is not None else _len_or_none(batches)
    bar = tqdm(
        total=total,
        disable=not progress,
        unit="batch",
        desc=f"fitting LoRA curvature ({estimator})",
    )
    with fitting_state(model, handles), recorder.attached():
        for index, raw in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            batch = prepare_batch(raw, device, index)
            stats.batches += 1
            if batch.num_supervised == 0:
                stats.skipped_batches += 1
                logger.warning(
                    "batch %d has no supervised token (all labels -100 or padding); skipped", index
                )
                bar.update(1)
                continue
            recorder.position_mask = batch.position_mask
            recorder.recording = True
            try:
                logits = _logits(model, batch)
            finally:
                recorder.recording = False
            logits = logits[:, :-1][batch.supervised]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            vocab = logits.shape[-1]
            if estimator == "mc":
                labels = sample_labels(logits.detach(), samples, generator)
            else:
                labels = batch.targets[batch.supervised].unsqueeze(0)
                if bool((labels < 0).any()) or bool((labels >= vocab).any()):
                    raise BatchError(f"batch {index}: labels outside [0, {vocab}) other than -100")
            idle = [name for name in handles if not recorder.calls[name].outputs]
            if idle:
                raise LaloraError(
                    f"batch {index}: the LoRA adapter of module {idle[0]!r} did not run in the "
                    f"forward pass ({len(idle)} of {len(handles)} modules idle): is the adapter "
                    "active (model.set_adapter) and are adapters enabled?"
                )
            outputs = [out for name in handles for out in recorder.calls[name].outputs]
            for k in range(samples):
                loss = F.cross_entropy(logits, labels[k], reduction="sum")
                if not bool(torch.isfinite(loss)):
                    raise CurvatureError(f"batch {index}: the source loss is {loss.item()}")
                flat = torch.autograd.grad(
                    loss, outputs, retain_graph=k < samples - 1, allow_unused=True
                )
                grads, pos = {}, 0
                for name in handles:
                    n = len(recorder.calls[name].outputs)
                    grads[name] = list(flat[pos : pos + n])
                    pos += n
                recorder.accumulate_gradients(grads, 1.0 / samples)
            stats.positions += batch.num_positions
            stats.supervised_tokens += batch.num_supervised
            stats.sequences += batch.num_sequences
            recorder.reset()
            bar.update(1)
            bar.set_postfix(tokens=stats.supervised_tokens)
        stats.modules = recorder.sums
    bar.close()
    return stats


@torch.no_grad()
def sample_labels(logits: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """``samples`` draws from ``softmax(logits)`` per row, as a (samples, rows) tensor.

    Inverse-CDF sampling: ``y = min{i : F_i > U F_V}``, ``U ~ Uniform[0, 1)``, with ``F`` the
    cumulative probabilities. Exact, and ~35x faster on the CPU than ``torch.multinomial`` for
    one draw per row (whose single-sample path is slow: 85 ms vs 2.3 ms for 700 x 8192).
    """
    cdf = torch.softmax(logits, dim=-1).cumsum_(dim=-1)
    u = torch.rand(
        logits.shape[0], samples, generator=generator, device=logits.device, dtype=cdf.dtype
    )
    draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return draws.clamp_(max=logits.shape[-1] - 1).T.contiguous()


def _len_or_none(batches: Iterable) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
