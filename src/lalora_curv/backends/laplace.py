"""The ``laplace`` backend (laplace-torch) and the export of a precision to laplace-torch.

laplace-torch (Daxberger et al., NeurIPS 2021) is the reference library for Laplace
approximations. Fitting: its ``KronLaplace`` on the LoRA parameters (only those require a
gradient during the fit), with curvlinops as its curvature backend (``CurvlinopsEF`` for the
empirical Fisher, ``CurvlinopsGGN(stochastic=True)`` for the MC Fisher), on dict batches whose
model wrapper returns the supervised logits. Each unpadded piece of a batch (see
:func:`lalora_curv.backends.curvlinops.unpadded_pieces`) is fitted as a data set of one item,
and its Kronecker factors, read from the public ``H_facs``, are converted into our raw sums.

Known limitations of laplace-torch in this setting, handled here and worth knowing when using
it directly on language models:

* it rescales the input factor of every mini-batch by ``len(y) / len(dataset)``, mixing token
  counts (``y``) with sequence counts (the data set), so for token-level language modelling
  its ``H`` is off by the number of supervised tokens per sequence;
* its ``Kron + Kron`` adds factors (a product of sums, not a sum of products);
* its model output must be 2-D, so prompt tokens and padding count unless the model masks them
  (our wrapper does), and its GGN default is the type-2 Fisher (one backward per vocabulary
  entry, biased for causal LMs), which is why ``mc`` maps to ``CurvlinopsGGN(stochastic=True)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lalora_curv.adapter import LoraHandle
from lalora_curv.backends._common import (
    FitRequest,
    check_labels,
    derive_seed,
    fit_loop,
    fitting_state,
    hooks_restored,
    input_sums,
    only_lora_trainable,
)
from lalora_curv.backends.curvlinops import SupervisedLogits, unpadded_pieces
from lalora_curv.batches import PreparedBatch
from lalora_curv.errors import LaloraError
from lalora_curv.statistics import LoraStatistics, ModuleSums

_WARNED = [False]


def _warn_limitations() -> None:
    if not _WARNED[0]:
        _WARNED[0] = True
        warnings.warn(
            "backend 'laplace': laplace-torch's KronLaplace, used directly on a language model, "
            "rescales each batch's input factor by len(y)/len(dataset) (tokens over sequences), "
            "adds Kron factors across batches (a product of sums) and counts every output "
            "position it is given; lalora-curv feeds it supervised logits only, one unpadded "
            "piece at a time, and undoes the rescaling",
            stacklevel=3,
        )


def _lora_module_order(wrapper: nn.Module, handles: dict[str, LoraHandle]) -> list[tuple[str, str]]:
    """(module name, "A"/"B") in laplace-torch's factor order (the model's module order)."""
    which = {}
    for name, h in handles.items():
        which[id(h.lora_A)] = (name, "A")
        which[id(h.lora_B)] = (name, "B")
    return [which[id(m)] for _, m in wrapper.named_modules() if id(m) in which]


def collect_statistics(
    model: nn.Module,
    handles: dict[str, LoraHandle],
    batches: Iterable[Mapping[str, Tensor]],
    request: FitRequest,
) -> LoraStatistics:
    """Base K-FAC sums computed by laplace-torch's ``KronLaplace``."""
    estimator, mc_samples, seed, dtype = (
        request.estimator,
        request.mc_samples,
        request.seed,
        request.dtype,
    )
    from laplace import KronLaplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    wrapper = SupervisedLogits(model)
    order = _lora_module_order(wrapper, handles)
    sums = {name: ModuleSums() for name in handles}
    device = next(iter(handles.values())).lora_A.weight.device
    pieces_seen = [0]

    def process(batch: PreparedBatch, index: int) -> None:
        for X, y, positions in unpadded_pieces(batch, "laplace"):
            check_labels(y, model, index)
            if y.numel() == 0:  # laplace-torch scales this piece's input factor by len(y) = 0
                for name, x_sum in input_sums(model, handles, X, dtype).items():
                    sums[name].add("input_cov", x_sum)
                continue
            size = X["input_ids"].shape[0]
            kwargs: dict[str, Any] = {
                "seed": derive_seed(seed, "piece", pieces_seen[0]) % 2**31,
                "num_per_example_loss_terms": max(1, y.numel() // size),
            }
            if estimator == "mc":
                backend, backend_kwargs = CurvlinopsGGN, {"stochastic": True}
                kwargs["mc_samples"] = mc_samples
            else:
                backend, backend_kwargs = CurvlinopsEF, {}
            pieces_seen[0] += 1
            la = KronLaplace(
                wrapper,
                "classification",
                backend=backend,
                backend_kwargs=backend_kwargs,
                asdl_fisher_kwargs=kwargs,
            )
            la.fit(torch.utils.data.DataLoader([{**X, "labels": y}], batch_size=None))
            kfacs = la.H_facs.kfacs
            if len(kfacs) != len(order):
                raise LaloraError(
                    f"laplace-torch returned {len(kfacs)} factor pairs for {len(order)} LoRA layers"
                )
            for (name, which), (grad_f, input_f) in zip(order, kfacs, strict=True):
                s = handles[name].spec.scaling
                if which == "A":  # input factor: mean over positions, times len(y) / 1
                    sums[name].add("input_cov", input_f.to(dtype) / y.numel() * positions)
                else:  # gradient factor of lora_B: sum over tokens of (s g)(s g)^T
                    sums[name].add("grad_cov", grad_f.to(dtype) / s**2)

    _warn_limitations()
    with fitting_state(model, handles), only_lora_trainable(model, handles), hooks_restored(model):
        stats = fit_loop(batches, process, device, request)
    stats.modules = sums
    return stats


def exact_curvature(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    kind: str = "ggn",
    adapter_name: str = "default",
) -> Tensor:
    """The exact, dense curvature of the LoRA parameters per supervised token (small models).

    laplace-torch's ``FullLaplace`` with curvlinops operators: ``kind="ggn"`` is the exact
    generalised Gauss-Newton matrix of the summed NLL (the expectation of the MC Fisher),
    ``kind="ef"`` the empirical Fisher of the per-token losses, ``sum_tau grad l_tau grad
    l_tau^T``. Divided by the number of supervised tokens; order: ``param_names``.
    Needs eager attention.
    """
    from laplace import FullLaplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    from lalora_curv.adapter import find_lora_modules
    from lalora_curv.batches import prepare_batch

    if kind not in ("ggn", "ef"):
        raise LaloraError(f"unknown curvature kind {kind!r}; valid: ['ef', 'ggn']")
    handles = find_lora_modules(model, adapter_name)
    device = next(iter(handles.values())).lora_A.weight.device
    data = []
    for i, raw in enumerate(batches):
        b = prepare_batch(raw, device, i)
        if b.num_supervised:
            data.append(
                {
                    "input_ids": b.input_ids,
                    "attention_mask": b.attention_mask,
                    "supervised": b.supervised,
                    "labels": b.targets[b.supervised],
                }
            )
    n = sum(int(d["labels"].numel()) for d in data)
    if n == 0:
        raise LaloraError("no supervised token in the batches")
    backend = {"ggn": CurvlinopsGGN, "ef": CurvlinopsEF}[kind]
    with fitting_state(model, handles), only_lora_trainable(model, handles):
        la = FullLaplace(SupervisedLogits(model), "classification", backend=backend)
        la.fit(torch.utils.data.DataLoader(data, batch_size=None))
        order = [p for p in model.parameters() if p.requires_grad]
    expected = [p for h in handles.values() for p in (h.lora_A.weight, h.lora_B.weight)]
    if [id(p) for p in order] != [id(p) for p in expected]:
        raise LaloraError("the model's parameter order differs from the LoRA module order")
    return la.H.detach() / n


def to_laplace(
    prec, model: nn.Module, adapter_name: str | None = None, prior_precision: float = 1.0
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

    from lalora_curv.adapter import find_lora_modules

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
