"""Approximation quality of every structure and estimator against the exact curvature.

On a tiny Llama (hidden 16, 2 layers, vocabulary 48; LoRA r = 3 on q, v, down_proj with a
non-zero B0 so that every block is live), the exact GGN and empirical Fisher of the LoRA
parameters come from laplace-torch's ``FullLaplace`` (curvlinops operators), per supervised
token. For each structure and estimator we report the relative Frobenius error of the dense
precision and the Spearman rank correlation of ``delta^T P delta`` with the exact form over
random displacements of size 1e-2 per coordinate. Printed, and written to
``results/approx.json``. Not asserted: only an
identity makes an approximation exact (see tests/backends/test_backends.py for those).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lalora_curv as lc
from bench_core import environment, write_result
from lalora_curv.exact import exact_curvature
from lalora_curv.toy import add_lora, random_batches, tiny_llama

HERE = Path(__file__).resolve().parent


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def split(prec: lc.Precision, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat displacement (param_names order) as ``{param name: tensor}``."""
    out, offset = {}, 0
    for name in prec.param_names:
        n = prec.mode[name].numel()
        out[name] = flat[offset : offset + n].view_as(prec.mode[name])
        offset += n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mc-samples", type=int, default=500)
    parser.add_argument("--displacements", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="few MC samples and displacements")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.mc_samples, args.displacements = 20, 20
    model = add_lora(
        tiny_llama(
            vocab_size=48,
            hidden_size=16,
            intermediate_size=24,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            dtype=torch.float64,
        ),
        r=3,
        alpha=6,
        target_modules=("q_proj", "v_proj", "down_proj"),
        init_B_std=0.3,
    ).double()
    batches = random_batches(4, 4, 12, 48, seed=0)
    exact = {kind: exact_curvature(model, batches, kind) for kind in ("ggn", "ef")}
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(
        args.displacements, exact["ggn"].shape[0], generator=g, dtype=torch.float64
    )
    # small displacements: the exact curvature is local (the merged penalties are quartic and
    # match their linearisation only near the mode); quadratic rank correlations are unaffected
    deltas = 1e-2 * deltas
    rows = []
    for estimator, reference in (("mc", "ggn"), ("empirical", "ef")):
        ref = exact[reference]
        ref_quad = torch.einsum("ni,ij,nj->n", deltas, ref, deltas)
        for structure, granularity in (
            ("diag", "token"),
            ("diag", "sequence"),
            ("kfac", "token"),
            ("tri-kfac", "token"),
            ("ekfac", "token"),
            ("merged-kfac", "token"),
            ("merged-diag", "token"),
        ):
            prec = lc.fit_precision(
                model,
                batches,
                structure=structure,
                estimator=estimator,
                mc_samples=args.mc_samples if estimator == "mc" else 1,
                granularity=granularity,
                progress=False,
                stats_dtype=torch.float64,
            )
            row = {
                "structure": structure,
                "granularity": granularity,
                "estimator": estimator,
                "reference": reference,
            }
            if prec.quadratic:
                P = prec.to_dense()
                quad = torch.einsum("ni,ij,nj->n", deltas, P, deltas)
                row["relative_frobenius_error"] = float((P - ref).norm() / ref.norm())
                row["diagonal_relative_error"] = float(
                    (P.diagonal() - ref.diagonal()).norm() / ref.diagonal().norm()
                )
            else:  # degree 4 in (A, B): no matrix; compare the penalties only
                quad = torch.stack([prec.quad(split(prec, d)) for d in deltas])
            row["penalty_rank_correlation"] = spearman(quad, ref_quad)
            rows.append(row)
            fro = row.get("relative_frobenius_error")
            dense = (
                f"rel. Frobenius error {fro:.3f}, diagonal {row['diagonal_relative_error']:.3f}, "
                if fro is not None
                else "(degree 4: no matrix), "
            )
            print(
                f"{estimator:<10}{structure:<12}{granularity:<9} vs exact {reference}: {dense}"
                f"penalty rank corr. {row['penalty_rank_correlation']:.3f}"
            )
    out = {
        "rows": rows,
        "mc_samples": args.mc_samples,
        "displacements": args.displacements,
        "environment": environment(),
    }
    write_result(args.out, "approx.json", out)
    print(f"wrote {args.out / 'approx.json'}")


if __name__ == "__main__":
    main()
