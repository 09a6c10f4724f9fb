"""Low-rank storage on real spectra: the penalty error of eigen-truncated K-FAC factors fitted on
a trained model, against the rank k kept, and the storage preset for Llama-3.2-3B shapes.

The shipped real-text model (:data:`lalora_curv.testbed.realtext.SHIPPED`, 4.2M parameters,
trained on the HellaSwag, WinoGrande and ARC-Challenge texts), LoRA r = 8 on all seven linear
modules, a K-FAC precision fitted on its source texts (128 per task, MC Fisher with 2 draws, as
the evidence runs fit it). Displacements: the adapters of plain LoRA fine-tuned on GSM8K
(``--steps`` steps at lr 2e-3, ``--seeds`` seeds: the displacements a penalty meets in training)
and isotropic random ones. For each k, every factor ``F ~= U_k diag(l_k) U_k^T + diag(d)``
(:meth:`~lalora_curv.KroneckerPrecision.with_storage`); the error is ``|r_k - r| / r`` of the
penalty against the dense precision, for kfac, tri-kfac and merged-kfac (the same factors).

The Llama-3.2-3B preset: the artifact bytes of a K-FAC precision on all seven linears at r = 16
(``bench_storage``'s formula) for each k, the largest k within 300 MB, and the error at the same
fraction ``k / D`` of each factor on the trained model (the spectra of a larger model are
assumed to decay no slower in ``k / D``: stated, not measured).

Prints the table, writes ``results/lowrank.json`` and ``results/lowrank.png``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import lalora_curv as lc
from bench_core import environment, write_result
from bench_realtext import add_data_dir_argument, data_dir_of
from bench_storage import LLAMA_3B, TARGETS, artifact_bytes, llama_modules
from lalora_curv.plotting import pyplot, save_figure
from lalora_curv.tasks.formatting import make_batches
from lalora_curv.testbed import realtext as rt
from lalora_curv.testbed import realtext_data as rd

HERE = Path(__file__).resolve().parent
KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STRUCTURES = ("kfac", "tri-kfac", "merged-kfac")
BUDGET_BYTES = 300e6  # the artifact budget of the 3B preset
TOLERANCE = 0.01  # the penalty error the preset must keep


def trained_deltas(peft_model, tok, data, steps: int, seeds: list[int]) -> list[dict]:
    """Displacements of plain LoRA fine-tuned on GSM8K from the same init, one per seed."""
    init = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    deltas = []
    for seed in seeds:
        model = copy.deepcopy(peft_model)
        pairs = [data.target_train[i] for i in torch.randperm(len(data.target_train),
                 generator=torch.Generator().manual_seed(seed))[: steps * 8].tolist()]  # fmt: skip
        lc.train(model, make_batches(pairs, tok, batch_size=8, max_length=256), lr=2e-3,
                 max_steps=steps, seed=seed, progress=False)  # fmt: skip
        deltas.append(
            {
                n.replace(".default", ""): (p.detach() - init[n]).double()
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )
    return deltas


def random_deltas(prec, n: int, scale: float) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {k: scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in prec.mode.items()}
        for _ in range(n)
    ]


def errors(prec, deltas) -> dict[str, dict[str, float]]:
    """Per structure and k: median and max relative penalty error over ``deltas``."""
    out: dict[str, dict[str, float]] = {}
    for structure in STRUCTURES:
        dense = prec.with_structure(structure)
        ref = torch.stack([dense.quad(d) for d in deltas])
        for k in KS:
            approx = dense.with_storage("lowrank", k)
            got = torch.stack([approx.quad(d) for d in deltas])
            rel = ((got - ref).abs() / ref.abs()).double()
            out.setdefault(structure, {})[str(k)] = {
                "median": float(rel.median()),
                "max": float(rel.max()),
            }
    return out


def preset_3b() -> list[dict]:
    """The 3B artifact's bytes per k (K-FAC, all seven linears, r = 16, deduplicated)."""
    mods = llama_modules(LLAMA_3B)
    rows = []
    for k in (8, 16, 24, 32, 40, 48, 56, 64, 96, 128):
        b = artifact_bytes(mods, "kfac", "lowrank", k, 16, True)
        rows.append({"k": k, "bytes": sum(b.values()), "fraction_of_3072": k / 3072})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir_argument(parser)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = rd.RealText(data_dir_of(args), eval_sample=50)
    model, tok = rt.load_shipped()
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS))
    )
    prec = rt.source_precision(peft_model, tok, data, structure="kfac", mc_samples=2)
    prec = prec.to(dtype=torch.float64)
    seeds = [int(s) for s in args.seeds.split(",")]
    trained = trained_deltas(peft_model, tok, data, args.steps, seeds)
    scale = float(torch.cat([d.flatten() for d in trained[0].values()]).std())
    rand = random_deltas(prec, 8, scale)
    dims = sorted({s.in_features for s in prec.modules.values()} | {
        s.out_features for s in prec.modules.values()})  # fmt: skip
    spectra = {}
    for name in list(prec.modules)[:: max(1, len(prec.modules) // 7)][:7]:
        for kind, f in (("input", prec.input_cov[name][0]), ("grad", prec.grad_cov[name][0])):
            eig = torch.linalg.eigvalsh(f.double()).flip(0).clamp(min=0)
            spectra[f"{name.split('model.')[-1]}:{kind}"] = (eig / eig.sum()).cumsum(0).tolist()
    result = {
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "factor_sizes": dims},
        "ks": list(KS),
        "trained": errors(prec, trained),
        "random": errors(prec, rand),
        "spectra_cumulative_energy": spectra,
        "preset_3b": preset_3b(),
        "steps": args.steps,
        "seeds": seeds,
        "seconds": round(time.perf_counter() - t0, 1),
        "environment": environment(),
    }
    # the 3B preset: the largest k within the budget, the error at its fraction of each factor
    fitting = [r for r in result["preset_3b"] if r["bytes"] <= BUDGET_BYTES]
    best = max(fitting, key=lambda r: r["k"])
    largest = max(dims)
    k_here = max(1, round(best["fraction_of_3072"] * largest))
    near = min(KS, key=lambda k: (abs(k - k_here), -k))
    worst = max(max(e[str(near)]["max"] for e in result[kind].values()) for kind in ("trained",))
    result["recommended"] = {
        "k": best["k"],
        "bytes_3b": best["bytes"],
        "fraction": best["fraction_of_3072"],
        "k_at_that_fraction_here": k_here,
        "k_measured": near,
        "max_error_trained_at_k_measured": worst,
        "meets_tolerance": worst <= TOLERANCE,
    }
    print(f"trained model ({result['model']['parameters'] / 1e6:.1f}M), factors of size {dims}")
    print(f"{'k':>5}  " + "  ".join(f"{s + ' trained':>22}{'random':>10}" for s in STRUCTURES))
    for k in KS:
        cells = []
        for s in STRUCTURES:
            t, r = result["trained"][s][str(k)], result["random"][s][str(k)]
            cells.append(f"{t['median']:>11.2e} ({t['max']:.1e}){r['median']:>10.1e}")
        print(f"{k:>5}  " + "  ".join(cells))
    rec = result["recommended"]
    print(
        f"3B preset: k = {rec['k']} ({rec['bytes_3b'] / 1e6:.0f} MB, k/D = {rec['fraction']:.4f}); "
        f"here that is k ~ {rec['k_at_that_fraction_here']} of {largest}: max error on the "
        f"trained displacements at k = {rec['k_measured']}: {rec['max_error_trained_at_k_measured']:.2e}"
    )
    write_result(args.out, "lowrank.json", result)
    plot(result, args.out / "lowrank.png")


def plot(result: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    ks = result["ks"]
    for i, s in enumerate(STRUCTURES):
        for kind, style in (("trained", "-"), ("random", ":")):
            a.plot(ks, [result[kind][s][str(k)]["median"] for k in ks], style, marker="o",
                   color=f"C{i}", label=f"{s}, {kind} displacements")  # fmt: skip
    a.axhline(TOLERANCE, color="0.5", lw=0.8)
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("eigenpairs kept per factor, k")
    a.set_ylabel("median |r_k - r| / r")
    a.set_title("penalty error of low-rank factors (trained model)")
    a.legend(fontsize=7)
    for name, curve in result["spectra_cumulative_energy"].items():
        b.plot(range(1, len(curve) + 1), curve, lw=1, label=name)
    b.set_xscale("log", base=2)
    b.set_xlabel("eigenpairs k")
    b.set_ylabel("share of the trace in the top k")
    b.set_title("K-FAC factor spectra")
    b.legend(fontsize=5, ncol=2)
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
