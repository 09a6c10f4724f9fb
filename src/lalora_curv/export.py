"""Export a precision to laplace-torch: a posterior over the adapter with our curvature."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lalora_curv.adapter import find_lora_modules
from lalora_curv.backends.common import SupervisedLogits, only_lora_trainable
from lalora_curv.errors import LaloraError
from lalora_curv.precision import Precision


def to_laplace(
    prec: Precision, model: nn.Module, adapter_name: str | None = None, prior_precision: float = 1.0
):
    """A laplace-torch posterior for the model's adapter with our precision as its curvature.

    The log-likelihood Hessian is the whole source data set's, ``H = N P`` (``N`` supervised
    tokens); the mean is the adapter's current weights. ``kfac`` becomes a ``KronLaplace``
    (one component only), ``diag`` a ``DiagLaplace``, ``tri-kfac`` a ``FullLaplace`` (dense:
    small models). The model is wrapped in :class:`SupervisedLogits`: call the returned object
    with dict inputs that carry ``input_ids``, ``attention_mask`` and a ``supervised`` mask.
    The merged-update structures have no representation in laplace-torch.
    """
    from laplace import DiagLaplace, FullLaplace, KronLaplace

    structure = prec.structure
    if structure not in ("kfac", "diag", "tri-kfac"):
        raise LaloraError(
            f"a {structure!r} precision has no laplace-torch counterpart; "
            "export kfac, diag or tri-kfac"
        )
    adapter = adapter_name or prec.metadata.get("adapter", {}).get("name", "default")
    params = prec.adapter_params(model, adapter)  # checks the match
    handles = find_lora_modules(model, adapter)
    n = prec.counts.get("supervised_tokens", 0)
    wrapper = SupervisedLogits(model)
    with only_lora_trainable(model, handles):
        cls = {"kfac": KronLaplace, "diag": DiagLaplace, "tri-kfac": FullLaplace}[structure]
        la = cls(wrapper, "classification", prior_precision=prior_precision)
    order = [p for p in model.parameters() if id(p) in {id(q) for q in params.values()}]
    names = {id(p): name for name, p in params.items()}
    mean = torch.cat([p.detach().flatten() for p in order])
    if structure == "kfac":
        if len(prec.weights) != 1:
            raise LaloraError(
                "a pooled K-FAC precision (several components) is a sum of "
                "Kronecker products, which laplace-torch's Kron cannot hold"
            )
        H: Any = []
        for p in order:
            spec = prec.modules[names[id(p)].rsplit(".lora_", 1)[0]]
            b = prec.blocks(spec.name)
            if names[id(p)] == spec.lora_A_name:
                H.append([n * b.lora_A_grad_cov[0], b.input_cov[0]])
            else:
                H.append([n * b.lora_B_grad_cov[0], b.lora_B_input_cov[0]])
    elif structure == "diag":
        H = n * torch.cat([prec.diag[names[id(p)]].flatten() for p in order]).to(prec.dtype)
    else:
        if [names[id(p)] for p in order] != prec.param_names:
            raise LaloraError("the model's parameter order differs from the precision's")
        H = n * prec.to_dense()
    warnings.warn(
        "the laplace-torch posterior carries our curvature but not the source loss "
        "(loss=0): its log_marginal_likelihood lacks the data-fit term; predictive and "
        "sampling tools are unaffected",
        stacklevel=3,
    )
    la.load_state_dict(
        {
            "mean": mean,
            "H": H,
            "loss": 0.0,
            "prior_mean": 0.0,
            "prior_precision": torch.as_tensor(prior_precision, dtype=mean.dtype),
            "sigma_noise": torch.as_tensor(1.0),
            "n_data": prec.counts.get("sequences", 0),
            "n_outputs": model.config.vocab_size if hasattr(model, "config") else None,
            "likelihood": "classification",
            "temperature": 1.0,
            "enable_backprop": False,
            "cls_name": cls.__name__,
        }
    )
    return la


__all__ = ["to_laplace"]
