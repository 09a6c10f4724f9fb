"""Discovery of the LoRA modules of a peft model, and their mode (the adapter's init).

Notation (peft's shapes), for one adapted linear layer and one token::

    h = W0 x + s * B (A x),   A = lora_A.weight (r x D_in),  B = lora_B.weight (D_out x r)

with ``s = scaling[adapter]`` (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` under rsLoRA).
Parameter names follow peft's saved-adapter keys (``get_peft_model_state_dict``): the model's
parameter name with the adapter name removed, e.g. ``...q_proj.lora_A.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lalora_curv.errors import AdapterMismatchError, LaloraError


@dataclass(frozen=True)
class LoraModuleSpec:
    """Shapes and scaling of one LoRA-adapted linear module."""

    name: str
    in_features: int
    out_features: int
    rank: int
    scaling: float

    @property
    def lora_A_name(self) -> str:
        """The name of the module's lora_A weight, ``<name>.lora_A.weight``."""
        return f"{self.name}.lora_A.weight"

    @property
    def lora_B_name(self) -> str:
        """The name of the module's lora_B weight, ``<name>.lora_B.weight``."""
        return f"{self.name}.lora_B.weight"

    def to_json(self) -> dict[str, Any]:
        """The shapes and the scaling as a JSON object (the name is kept apart)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "scaling": self.scaling,
        }

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> LoraModuleSpec:
        """Inverse of :meth:`to_json`, for the module ``name``."""
        return cls(
            name, int(d["in_features"]), int(d["out_features"]), int(d["rank"]), float(d["scaling"])
        )


@dataclass(frozen=True)
class LoraHandle:
    """A live LoRA module of a model for one adapter: its spec and its modules/parameters."""

    spec: LoraModuleSpec
    layer: nn.Module
    lora_A: nn.Linear
    lora_B: nn.Linear


def _carries(module: nn.Module, adapter_name: str) -> bool:
    """Whether ``module`` is a peft LoRA layer with ``adapter_name`` (of any kind)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return False
    return any(adapter_name in getattr(module, attr, {}) for attr in ("lora_A", "lora_embedding_A"))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / accelerate / ``torch.compile`` wrappers.

    A model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) needs no unwrapping:
    its parameters are DTensor shards, gathered where a whole tensor is needed
    (:func:`whole`).

    Raises:
        LaloraError: the model is wrapped by FSDP1 (``FullyShardedDataParallel``), whose flat
            parameters hide the LoRA weights.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    while True:
        if isinstance(model, FullyShardedDataParallel) or any(
            isinstance(m, FullyShardedDataParallel) for m in model.modules()
        ):
            raise LaloraError(
                "the model is wrapped by FSDP1 (FullyShardedDataParallel), whose flat "
                "parameters hide the LoRA weights: shard it with FSDP2 instead "
                "(torch.distributed.fsdp.fully_shard; accelerate: fsdp_version 2), or use DDP"
            )
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def whole(t: Tensor) -> Tensor:
    """A parameter's whole value: an FSDP2 shard (a DTensor) all-gathered, or the tensor itself.

    The all-gather is differentiable (its gradient returns to each rank's shard).
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def eager_model(model: nn.Module) -> nn.Module:
    """The model to run a fit's forward on: ``model`` itself, or its innermost eager module.

    The innermost eager module when a ``torch.compile`` wrapper sits anywhere in its DDP /
    accelerate / compile wrappers (hooks cannot see inside a compiled graph; statistics are
    reduced across ranks by the fit itself, so DDP's forward is not needed).
    """
    chain, m = [model], model
    while True:
        inner = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        if not isinstance(inner, nn.Module):
            break
        chain.append(inner)
        m = inner
    compiled = any(hasattr(c, "_orig_mod") for c in chain)
    return chain[-1] if compiled else model


def find_lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraHandle]:
    """Return the peft LoRA ``Linear`` modules of ``model`` that carry ``adapter_name``.

    Module names are those of the model inside any DDP / compile wrapper (see
    :func:`unwrap_model`), so a precision fitted on a plain model applies to a wrapped one.

    Raises:
        AdapterMismatchError: no LoRA module carries the adapter.
        LaloraError: an unsupported LoRA variant (DoRA and other variants, LoRA bias,
            merged adapters) is found.
    """
    from peft.tuners.lora import LoraLayer

    model = unwrap_model(model)
    found: dict[str, LoraHandle] = {}
    other_adapters: set[str] = set()
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # pragma: no cover - older peft: no LoRA on parameters
        ParamWrapper = ()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not _carries(module, adapter_name):
            other_adapters.update(getattr(module, "lora_A", {}).keys())
            continue
        if isinstance(module, ParamWrapper):
            raise LaloraError(
                f"module {name!r} is a LoRA on parameters (peft's target_parameters / "
                "ParamWrapper: a mixture-of-experts router or its fused experts): its "
                "curvature would need a K-FAC per expert over the tokens routed to it, which "
                "is not supported; adapt the attention projections only "
                "(target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'])"
            )
        lora_A = module.lora_A[adapter_name] if adapter_name in module.lora_A else None
        lora_B = module.lora_B[adapter_name] if adapter_name in module.lora_B else None
        if not (isinstance(lora_A, nn.Linear) and isinstance(lora_B, nn.Linear)):
            raise LaloraError(
                f"module {name!r} ({type(module).__name__}) carries adapter {adapter_name!r} "
                "but is not a linear LoRA layer (embedding and convolution LoRA are not "
                "supported); leave it out of target_modules"
            )
        if adapter_name in getattr(module, "lora_variant", {}):
            raise LaloraError(
                f"module {name!r}: adapter {adapter_name!r} is a LoRA variant "
                f"({type(module.lora_variant[adapter_name]).__name__}, e.g. DoRA); only vanilla "
                "LoRA is supported"
            )
        if lora_B.bias is not None or lora_A.bias is not None:
            raise LaloraError(f"module {name!r}: LoRA bias (lora_bias=True) is not supported")
        if getattr(module, "merged", False):
            raise LaloraError(
                f"module {name!r}: the adapter is merged into the base weight; unmerge it first"
            )
        r, d_in = lora_A.weight.shape
        d_out = lora_B.weight.shape[0]
        spec = LoraModuleSpec(name, d_in, d_out, r, float(module.scaling[adapter_name]))
        found[name] = LoraHandle(spec, module, lora_A, lora_B)
    if not found:
        hint = f" (adapters present: {sorted(other_adapters)})" if other_adapters else ""
        raise AdapterMismatchError(
            f"no peft LoRA Linear module with adapter {adapter_name!r} in the model{hint}"
        )
    return found


def active_adapters(model: nn.Module) -> list[str] | None:
    """The names of the peft adapters the model runs (None when it does not say)."""
    inner = unwrap_model(model)
    active = getattr(inner, "active_adapters", None)
    if callable(active):
        active = active()
    if isinstance(active, str):
        return [active]
    return list(active) if isinstance(active, list | tuple) else None


def check_active(model: nn.Module, adapter_name: str, error: type[LaloraError] = LaloraError):
    """Refuse to fit or train ``adapter_name`` while the model runs another adapter.

    The forward would use that adapter's weights and the optimizer would move them.
    """
    active = active_adapters(model)
    if active is not None and adapter_name not in active:
        raise error(
            f"adapter {adapter_name!r} is not the model's active adapter ({active}): the "
            f"forward would run {active[0]!r}; call model.set_adapter({adapter_name!r}) first"
        )


def unpenalised_trainables(model: nn.Module, handles: dict[str, LoraHandle]) -> list[str]:
    """Names of the parameters that require a gradient but are not the adapter's LoRA weights.

    Not its lora_A / lora_B weights: ``modules_to_save`` copies, LoRA biases, trainable token
    rows, another adapter's weights; a LoRA precision does not cover them.
    """
    covered = {id(p) for h in handles.values() for p in (h.lora_A.weight, h.lora_B.weight)}
    return [
        n
        for n, p in unwrap_model(model).named_parameters()
        if p.requires_grad and id(p) not in covered
    ]


def adapter_mode(handles: dict[str, LoraHandle], dtype: torch.dtype) -> dict[str, Tensor]:
    """The adapter's current weights, detached, on the CPU in ``dtype``: the mode ``mu``."""
    mode: dict[str, Tensor] = {}
    for h in handles.values():
        mode[h.spec.lora_A_name] = whole(h.lora_A.weight.detach()).to("cpu", dtype).clone()
        mode[h.spec.lora_B_name] = whole(h.lora_B.weight.detach()).to("cpu", dtype).clone()
    return mode


def adapter_config(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """JSON-able summary of the peft LoRA config of ``adapter_name`` (empty if unavailable)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        return {"name": adapter_name}
    c = configs[adapter_name]
    targets = getattr(c, "target_modules", None)
    if isinstance(targets, set | list | tuple):
        targets = sorted(targets)
    init = getattr(c, "init_lora_weights", True)
    return {
        "name": adapter_name,
        "r": getattr(c, "r", None),
        "lora_alpha": getattr(c, "lora_alpha", None),
        "use_rslora": getattr(c, "use_rslora", False),
        "lora_dropout": getattr(c, "lora_dropout", None),
        "target_modules": targets,
        "init_lora_weights": init if isinstance(init, bool | str) else str(init),
        "peft_version": getattr(c, "peft_version", None),
    }


def base_model_info(model: nn.Module) -> dict[str, Any]:
    """Name/revision/type of the underlying Hugging Face model when they are known."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    info = {
        "name_or_path": getattr(config, "name_or_path", None) or None,
        "revision": getattr(config, "_commit_hash", None),
        "model_type": getattr(config, "model_type", None),
        "quantization": _quantization(config),
    }
    return {k: v for k, v in info.items() if v is not None}


def _quantization(config) -> str | None:
    """``"bitsandbytes-4bit"`` / ``"bitsandbytes-8bit"`` for a quantized base, else None."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    get = q.get if isinstance(q, dict) else lambda k, d=None: getattr(q, k, d)
    method = str(get("quant_method", "quantized")).split(".")[-1].lower().replace("_", "")
    bits = "4bit" if get("load_in_4bit", False) else "8bit" if get("load_in_8bit", False) else ""
    return f"{method}-{bits}" if bits else method


def match_modules(
    expected: dict[str, LoraModuleSpec], handles: dict[str, LoraHandle], *, what: str
) -> None:
    """Check that the model's LoRA modules are exactly ``expected``; raise on the first mismatch.

    Args:
        expected: module specs of the precision.
        handles: the model's LoRA modules for the adapter.
        what: a short description of the precision, used in error messages.
    """
    for name in sorted(set(expected) | set(handles)):
        if name not in handles:
            raise AdapterMismatchError(
                f"{what}: module {name!r} has no LoRA adapter in the model "
                f"(the model adapts {len(handles)} modules, the precision {len(expected)})"
            )
        if name not in expected:
            raise AdapterMismatchError(
                f"{what}: the model adapts module {name!r}, which the precision does not cover"
            )
        want, got = expected[name], handles[name].spec
        if (want.in_features, want.out_features) != (got.in_features, got.out_features):
            raise AdapterMismatchError(
                f"{what}: module {name!r} is {got.out_features}x{got.in_features} in the model "
                f"but {want.out_features}x{want.in_features} in the precision"
            )
        if want.rank != got.rank or want.scaling != got.scaling:
            raise AdapterMismatchError(
                f"{what}: module {name!r} has rank {got.rank}, scaling {got.scaling:g} in the model "
                f"but rank {want.rank}, scaling {want.scaling:g} in the precision; a K-FAC "
                "precision can be re-based onto this adapter with prec.rebase(model)"
            )
