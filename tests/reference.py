"""Brute-force float64 references, independent of the library's hooks and contractions.

Per-token ("expand") gradients come from autograd on a model whose LoRA weights are replaced by
one copy per (sequence, position): ``dL/dB_{b,t} = (s g_{b,t}) u_{b,t}^T`` exactly. Zero probes
added to the lora_A and lora_B outputs give ``s B^T g`` and ``s g`` directly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lalora_curv.adapter import find_lora_modules


@dataclass
class TokenData:
    """Per-token tensors of one module over one batch, counted positions only."""

    x: Tensor  # (n, D_in) lora_A input
    u: Tensor  # (n, r) lora_B input
    g_B: Tensor  # (n, D_out) dL/d(lora_B output) = s g
    g_A: Tensor  # (n, r) dL/d(lora_A output) = s B^T g
    grad_A: Tensor  # (n, r, D_in) per-token gradient of lora_A
    grad_B: Tensor  # (n, D_out, r) per-token gradient of lora_B
    row: Tensor  # (n,) the sequence each token belongs to


@contextlib.contextmanager
def per_position_lora(model, adapter="default"):
    """Replace every lora_A/lora_B forward by a per-position-weight version with probes."""
    handles = find_lora_modules(model, adapter)
    store: dict[str, dict[str, Tensor]] = {}
    originals = {}

    def make(name, h, which):
        lin = h.lora_A if which == "A" else h.lora_B

        def forward(inp):
            b, t, _ = inp.shape
            w = lin.weight.detach().expand(b, t, *lin.weight.shape).clone().requires_grad_(True)
            out = torch.einsum("btoi,bti->bto", w, inp)
            probe = torch.zeros_like(out, requires_grad=True)
            d = store.setdefault(name, {})
            d[f"in_{which}"] = inp.detach()
            d[f"w_{which}"] = w
            d[f"probe_{which}"] = probe
            return out + probe

        return lin, forward

    try:
        for name, h in handles.items():
            for which in ("A", "B"):
                lin, fwd = make(name, h, which)
                originals[lin] = lin.forward
                lin.forward = fwd
        yield store
    finally:
        for lin in originals:
            del lin.forward


def supervised_mask(batch: dict) -> Tensor:
    """(batch, seq - 1): label set, target and predicting position both real tokens."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    return (batch["labels"][:, 1:] != -100) & mask[:, 1:] & mask[:, :-1]


def summed_nll(logits: Tensor, batch: dict) -> Tensor:
    sup = supervised_mask(batch)
    return F.cross_entropy(logits[:, :-1][sup], batch["labels"][:, 1:][sup], reduction="sum")


def token_data(model, batch: dict, adapter="default") -> dict[str, TokenData]:
    """Per-token tensors of every module for the summed NLL with the true labels."""
    with per_position_lora(model, adapter) as store:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).logits
        loss = summed_nll(logits, batch)
        names = list(store)
        keys = ["probe_A", "probe_B", "w_A", "w_B"]
        grads = torch.autograd.grad(loss, [store[n][k] for n in names for k in keys])
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    out = {}
    for i, n in enumerate(names):
        gA, gB, wA, wB = grads[4 * i : 4 * i + 4]
        out[n] = TokenData(
            x=store[n]["in_A"][mask],
            u=store[n]["in_B"][mask],
            g_B=gB[mask],
            g_A=gA[mask],
            grad_A=wA[mask],
            grad_B=wB[mask],
            row=mask.nonzero()[:, 0],
        )
    return out


def counts(batches) -> tuple[int, int]:
    """(counted positions, supervised tokens) over batches."""
    pos = sup = 0
    for b in batches:
        mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
        pos += int(mask.sum())
        sup += int(supervised_mask(b).sum())
    return pos, sup


def brute_force(model, batches, adapter="default") -> dict[str, dict[str, Tensor]]:
    """Every statistic by its definition, normalised as the library documents."""
    positions, n_sup = counts(batches)
    handles = find_lora_modules(model, adapter)
    acc: dict[str, dict[str, Tensor]] = {}
    for batch in batches:
        for name, d in token_data(model, batch, adapter).items():
            s = handles[name].spec.scaling
            g = d.g_B / s
            parts = {
                "C_x": d.x.T @ d.x / positions,
                "C_u": d.u.T @ d.u / positions,
                "C_xu": d.x.T @ d.u / positions,
                "G_h": g.T @ g / n_sup,
                "G_B": d.g_B.T @ d.g_B / n_sup,
                "G_AA": d.g_A.T @ d.g_A / n_sup,
                "G_AB": d.g_A.T @ d.g_B / n_sup,
                "diag_A": d.grad_A.square().sum(0) / n_sup,
                "diag_B": d.grad_B.square().sum(0) / n_sup,
                "weight_diag": torch.einsum("no,ni->oi", g.square(), d.x.square()) / n_sup,
                "grad_A_sum": d.grad_A.sum(0),
                "grad_B_sum": d.grad_B.sum(0),
                "seq_diag_A": per_sequence(d.grad_A, d.row).square().sum(0) / n_sup,
                "seq_diag_B": per_sequence(d.grad_B, d.row).square().sum(0) / n_sup,
            }
            m = acc.setdefault(name, {})
            for k, v in parts.items():
                m[k] = v if k not in m else m[k] + v
    return acc


def per_sequence(per_token: Tensor, row: Tensor) -> Tensor:
    """Sum per-token gradients (n, ...) into per-sequence gradients (sequences, ...)."""
    out = torch.zeros(int(row.max()) + 1, *per_token.shape[1:], dtype=per_token.dtype)
    return out.index_add_(0, row, per_token)


def batch_grad_squared(model, batches, adapter="default") -> dict[str, Tensor]:
    """``sum_batches (dL_batch/dtheta)^2 / N`` from plain autograd parameter gradients."""
    handles = find_lora_modules(model, adapter)
    _, n_sup = counts(batches)
    params = {}
    for h in handles.values():
        params[h.spec.lora_A_name] = h.lora_A.weight
        params[h.spec.lora_B_name] = h.lora_B.weight
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in batches:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).logits
        grads = torch.autograd.grad(summed_nll(logits, batch), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            out[n] += g.square() / n_sup
    return out


def merge_jacobian(A0: Tensor, B0: Tensor, s: float) -> Tensor:
    """Jacobian of ``vec_r(s B A)`` w.r.t. ``[vec_r(A), vec_r(B)]`` at ``(A0, B0)`` (autograd)."""
    r, d_in = A0.shape

    def merged(theta: Tensor) -> Tensor:
        A = theta[: r * d_in].view(r, d_in)
        B = theta[r * d_in :].view(B0.shape[0], r)
        return (s * B @ A).flatten()

    theta0 = torch.cat([A0.flatten(), B0.flatten()])
    return torch.autograd.functional.jacobian(merged, theta0)


def exact_fisher(model, batch):
    """Exact expected G_h and per-token lora_B diagonal, normalised like the library.

    The expectation over labels drawn from the model, on a tiny vocabulary:
    ``E[g_t g_t^T] = sum_tau J_{tau,t}^T H_tau J_{tau,t}`` with ``J_{tau,t} = d logits_tau / d
    (lora_B output)_t`` and ``H_tau = diag(p_tau) - p_tau p_tau^T`` (tests/fit/test_mc.py).
    """
    handles = find_lora_modules(model)
    mask = batch["attention_mask"].bool()
    sup = supervised_mask(batch)
    n_sup = int(sup.sum())
    with per_position_lora(model) as store:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1][sup]  # (n, V)
        names = list(store)
        probes = [store[n]["probe_B"] for n in names]
        rows = []
        for i in range(logits.shape[0]):
            for v in range(logits.shape[1]):
                rows.append(torch.autograd.grad(logits[i, v], probes, retain_graph=True))
    p = torch.softmax(logits.detach(), -1)
    out = {}
    for j, name in enumerate(names):
        s = handles[name].spec.scaling
        J = torch.stack([r[j] for r in rows]).view(
            logits.shape[0], logits.shape[1], *probes[j].shape
        )[:, :, mask]  # (n, V, T, D)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        per_t = torch.einsum("nvto,nvw,nwtq->toq", J, H, J)  # E[gB_t gB_t^T] per position
        u2 = store[name]["in_B"][mask].square()
        out[name] = {
            "G_h": per_t.sum(0) / s**2 / n_sup,
            "diag_B": torch.einsum("too,tr->or", per_t, u2) / n_sup,
        }
    return out
