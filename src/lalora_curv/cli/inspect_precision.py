r"""``lalora-curv inspect``: what a precision artifact holds, its norms, traces and spectra.

Per structure, the *factors* reported for each module and their spectra:

* ``kfac``, ``tri-kfac``, ``merged-kfac``: the base-layer K-FAC factors ``input_cov`` =
  :math:`C_x` and ``grad_cov`` = :math:`G_h` (one pair per pooled component ``k``, with weight
  :math:`w_k`); their eigenvalues (``torch.linalg.eigvalsh``). The eigenvalues of a Kronecker
  block :math:`G \otimes C` are the products :math:`\lambda_i(G)\,\lambda_j(C)`.
* ``diag``: the entries of ``lora_A`` and ``lora_B``'s diagonals, sorted (they are its
  eigenvalues); ``merged-diag``: the entries of ``weight_diag``.
* ``ekfac``: the refitted eigenvalues :math:`\Lambda` of ``lora_A`` and ``lora_B``, sorted.

``trace`` is the trace of the precision as a matrix over the LoRA parameters, per module and
in total, e.g. for ``kfac`` :math:`\sum_k \operatorname{tr}(G_{AA,k})\operatorname{tr}(C_{x,k})
+ \operatorname{tr}(G_{B,k})\operatorname{tr}(C_{u,k})`; for the merged structures (degree 4
in ``(A, B)``, no matrix over them) it is the trace of the precision over the merged update
``dW``: :math:`\sum_k w_k \operatorname{tr}(G_k)\operatorname{tr}(C_k)` or
:math:`\sum D_W`. Norms are Frobenius norms of the stored tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lalora_curv as lc
from lalora_curv.atomic import write_json
from lalora_curv.cli._model import resolve_precision
from lalora_curv.cli._run import RunDir
from lalora_curv.plotting import SKIPPED, pyplot, save_figure

EXAMPLES = """examples:
  lalora-curv inspect --precision runs/fit-kfac/precision/hellaswag --out runs/inspect
  lalora-curv inspect --precision runs/fit-kfac --top 10   # a fit run: its precision/sum
"""

#: spectra longer than this are stored at this many evenly spaced ranks
MAX_STORED = 4096


def _spectrum(values: Tensor, symmetric: bool) -> Tensor:
    """Eigenvalues (``symmetric``: of a matrix; else the entries), descending, float64."""
    v = torch.linalg.eigvalsh(values.double()) if symmetric else values.double().flatten()
    return v.sort(descending=True).values


def _factor(t: Tensor, symmetric: bool, spectra: bool, weight: float | None = None):
    entry: dict[str, Any] = {
        "shape": list(t.shape),
        "norm": float(t.double().norm()),
        "trace": float(t.double().diagonal().sum() if symmetric else t.double().sum()),
    }
    if weight is not None:
        entry["weight"] = weight
    if spectra:
        s = _spectrum(t, symmetric)
        entry["max"], entry["min"] = float(s[0]), float(s[-1])
        if len(s) > MAX_STORED:
            ranks = torch.linspace(0, len(s) - 1, MAX_STORED).round().long()
            entry["ranks"], s = ranks.tolist(), s[ranks]
        entry["eigenvalues"] = s.tolist()
    return entry


def _module_report(prec: lc.Precision, name: str, spectra: bool) -> dict[str, Any]:
    spec = prec.modules[name]
    factors: dict[str, Any] = {}
    if isinstance(prec, lc.KroneckerPrecision):
        C, G, w = prec.input_cov[name], prec.grad_cov[name], prec.weights
        for k in range(C.shape[0]):
            tag = "" if len(w) == 1 else f"[{k}]"
            weight = w[k] if len(w) > 1 else None
            factors[f"input_cov{tag}"] = _factor(C[k], True, spectra, weight)
            factors[f"grad_cov{tag}"] = _factor(G[k], True, spectra, weight)
    elif isinstance(prec, lc.DiagPrecision):
        factors["lora_A"] = _factor(prec.diag[spec.lora_A_name], False, spectra)
        factors["lora_B"] = _factor(prec.diag[spec.lora_B_name], False, spectra)
    elif isinstance(prec, lc.MergedDiagPrecision):
        factors["weight_diag"] = _factor(prec.weight_diag[name], False, spectra)
    elif isinstance(prec, lc.EKFACPrecision):
        factors["lora_A"] = _factor(prec.eigenvalues[spec.lora_A_name], False, spectra)
        factors["lora_B"] = _factor(prec.eigenvalues[spec.lora_B_name], False, spectra)
    else:  # a structure added later: say so rather than guess
        raise lc.LaloraError(f"inspect does not know structure {prec.structure!r}")
    return {
        "shape": {"in_features": spec.in_features, "out_features": spec.out_features},
        "rank": spec.rank,
        "scaling": spec.scaling,
        "trace": prec.module_trace(name),
        "factors": factors,
    }


def precision_report(prec: lc.Precision, spectra: bool = True) -> dict[str, Any]:
    """Metadata, and per module: factor norms, traces and (``spectra``) eigenvalues."""
    modules = {name: _module_report(prec, name, spectra) for name in prec.modules}
    return {
        "structure": prec.structure,
        "metadata": prec.metadata,
        "num_params": prec.num_params,
        "trace": prec.trace(),
        "modules": modules,
    }


def plot_spectra(report: dict[str, Any], path: Path) -> Path | None:
    """One panel per factor kind: eigenvalues against rank, one line per module (log scale)."""
    plt = pyplot()
    if plt is None:  # plotting is optional (extra "bench")
        return None
    panels: dict[str, list[tuple[str, list[int], list[float]]]] = {}
    for module, m in report["modules"].items():
        for factor, f in m["factors"].items():
            if "eigenvalues" not in f:
                continue
            kind = factor.split("[")[0]
            ranks = f.get("ranks", list(range(len(f["eigenvalues"]))))
            label = module.removeprefix("base_model.model.").removeprefix("model.")
            label += factor[len(kind) :]
            panels.setdefault(kind, []).append((label, ranks, f["eigenvalues"]))
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.0 * len(panels), 3.8), dpi=110, squeeze=False
    )
    for ax, (kind, lines) in zip(axes[0], panels.items(), strict=True):
        drawn = 0
        for label, ranks, values in lines:
            positive = [(i + 1, v) for i, v in zip(ranks, values, strict=True) if v > 0]
            if positive:
                ax.loglog(*zip(*positive, strict=True), label=label, linewidth=1)
                drawn += 1
        ax.set_title(kind)
        ax.set_xlabel("rank")
        ax.set_ylabel("eigenvalue (> 0)")
        ax.grid(True, which="both", alpha=0.3)
        if not drawn:  # e.g. lora_A's blocks at the default init B0 = 0: exactly zero
            ax.text(0.5, 0.5, "no positive eigenvalue", ha="center", transform=ax.transAxes)
        elif drawn <= 12:
            ax.legend(fontsize=6)
    fig.suptitle(f"{report['structure']} precision: spectra per module")
    fig.tight_layout()
    return save_figure(fig, path)


def _fmt(x: float) -> str:
    return f"{x:.3e}"


def print_report(report: dict[str, Any], top: int) -> None:
    """Print the report: the metadata, then each factor's norms, traces and top eigenvalues."""
    meta = report["metadata"]
    adapter = meta.get("adapter", {})
    print(f"structure      {report['structure']}")
    for key in ("estimator", "backend", "granularity", "mc_samples", "seed", "stats_dtype"):
        print(f"{key:<14} {meta.get(key)}")
    print(f"counts         {meta.get('counts')}")
    print(f"sources        {meta.get('sources')}")
    print(f"base model     {meta.get('base_model')}")
    print(
        f"adapter        r={adapter.get('r')} lora_alpha={adapter.get('lora_alpha')} "
        f"targets={adapter.get('target_modules')} B0=0: {meta.get('lora_B_init_zero')}"
    )
    weights = meta.get("component_weights")
    print(
        f"scale          {meta.get('scale')}"
        + (f"  component weights {weights}" if weights else "")
    )
    print(f"created        {meta.get('created')}  (lalora-curv {meta.get('library_version')})")
    print(f"parameters     {report['num_params']}  trace {_fmt(report['trace'])}\n")
    header = f"{'module':<48} {'factor':<14} {'norm':>10} {'trace':>10} {'max':>10} {'min':>10}"
    print(header + f"  top {top}")
    for module, m in report["modules"].items():
        for factor, f in m["factors"].items():
            eig = f.get("eigenvalues", [])
            head = " ".join(_fmt(v) for v in eig[:top])
            print(
                f"{module[-48:]:<48} {factor:<14} {_fmt(f['norm']):>10} {_fmt(f['trace']):>10} "
                f"{_fmt(f.get('max', float('nan'))):>10} {_fmt(f.get('min', float('nan'))):>10}"
                f"  {head}"
            )


def inspect(precision: str, out: str = "runs/inspect", top: int = 5) -> dict[str, Any]:
    """Print a precision artifact's metadata, per-module norms, traces and spectra; plot them.

    Args:
        precision: a precision artifact directory, or a fit run (its precision/sum).
        out: run directory (report.json with every eigenvalue, spectra.png).
        top: eigenvalues printed per factor (the largest).

    Returns:
        The report written to ``report.json``.
    """
    run = RunDir("inspect", out, locals())
    path = resolve_precision(precision)
    prec = lc.load_precision(path)
    report = precision_report(prec)
    report["artifact"] = str(path)
    write_json(run / "report.json", report)
    print(f"artifact       {path}")
    print_report(report, top)
    plot = plot_spectra(report, run / "spectra.png")
    if plot is None and pyplot() is None:
        print(SKIPPED)
    print(
        f"\nrun directory: {run.path} (config.yaml, report.json{', spectra.png' if plot else ''})"
    )
    return report
