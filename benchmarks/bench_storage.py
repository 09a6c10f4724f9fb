"""Storage benchmark: artifact bytes and penalty error of every structure's storages, and a
Llama-3.2-3B table computed from shapes.

1. Measured on the CPU Llama of ``bench_core.py`` (34M parameters; ``--quick``: its
   ``QUICK_DIMS``) with LoRA r = 16 on q, k, v, o, gate, up, down (default init, B0 = 0): for
   every K-FAC structure x storage (float32, bfloat16, low rank k = 8, 32, 128 + diagonal), and
   for diag, merged-diag and EKFAC x (float32, bfloat16), the artifact bytes with and without
   deduplication, the penalty's relative error against float32 over random displacements
   (``|r~ - r| / r``; bfloat16 rounds each stored number by at most ``u = 2^-8`` relative, which
   bounds the diagonals' error by ``u``), and the penalty forward+backward time / a training
   step.
2. Analytic, for a Llama-3.2-3B-shaped model (hidden 3072, 28 layers, 24 heads / 8 KV heads so
   k, v have 1024 outputs, MLP 8192, vocabulary 128256, LoRA r = 16 on the seven linears):
   artifact bytes per structure x storage (EKFAC left out), with and without deduplication,
   and the penalty's
   forward+backward FLOPs / the FLOPs of one LoRA training step at 8 x 512 tokens.
3. The analytic formulas checked on a scaled-down model of the same shape ratios: the byte
   formula against the tensor bytes of saved artifacts (exactly), the penalty FLOP formula
   against ``torch.utils.flop_counter`` (matmul FLOPs, exactly), and the training-step lower
   bound ``4 T N`` against the counted FLOPs of a step.

Prints the tables, writes ``results/storage.json``
(``python benchmarks/bench_storage.py``; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import lalora_curv as lc
from bench_core import CPU_LLAMA, QUICK_DIMS, environment, timed, write_result
from lalora_curv import artifact
from lalora_curv.toy import add_lora, random_batches, tiny_llama

HERE = Path(__file__).resolve().parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KFAC = ("kfac", "tri-kfac", "merged-kfac")
RANKS = (8, 32, 128)
#: (storage, rank) of every K-FAC row
STORAGES: tuple[tuple[str, int | None], ...] = (
    ("float32", None),
    ("bfloat16", None),
    *(("lowrank", k) for k in RANKS),
)
#: the other structures and their storages (dense only: no factor to truncate)
OTHERS = ("diag", "merged-diag", "ekfac")
DENSE_STORAGES: tuple[tuple[str, int | None], ...] = (("float32", None), ("bfloat16", None))
#: the modules reading the same input (their input factors are identical)
INPUT_GROUP = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "o",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "down",
}
LLAMA_3B = dict(
    hidden_size=3072,
    num_layers=28,
    num_heads=24,
    num_kv_heads=8,
    intermediate_size=8192,
    vocab_size=128256,
)
RANK, BATCH, SEQ = 16, 8, 512


# ---------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Module:
    layer: int
    kind: str  # q_proj, ...
    d_in: int
    d_out: int


def llama_modules(dims: dict, targets: Iterable[str] = TARGETS) -> list[Module]:
    """The adapted linears of a Llama with ``dims`` (bench_core / tiny_llama keys)."""
    h, m = dims["hidden_size"], dims["intermediate_size"]
    kv = h // dims["num_heads"] * dims["num_kv_heads"]
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, m),
        "up_proj": (h, m),
        "down_proj": (m, h),
    }
    return [
        Module(layer, kind, *shapes[kind])
        for layer in range(dims["num_layers"])
        for kind in TARGETS
        if kind in targets
    ]


def matmul_params(dims: dict) -> int:
    """Parameters of every matmul of the forward pass (linears and the output head)."""
    mods = llama_modules(dims)
    return sum(m.d_in * m.d_out for m in mods) + dims["hidden_size"] * dims["vocab_size"]


# ---------------------------------------------------------------------------- bytes
def factor_numbers(d: int, storage: str, rank: int | None) -> tuple[int, int]:
    """(numbers, bytes per number) of one stored factor of size ``d``."""
    if storage == "lowrank":
        k = min(rank, d)
        return d * k + k + d, 4
    return d * d, {"float32": 4, "bfloat16": 2}[storage]


def artifact_bytes(
    mods: list[Module], structure: str, storage: str, rank: int | None, r: int, dedup: bool
) -> dict[str, int]:
    """Tensor bytes of a precision artifact fitted at B0 = 0 (what ``save`` writes).

    Deduplication stores byte-identical tensors once: the input factor of the modules reading
    the same input (one per layer and group), and the zero ``B0`` (and, per storage dtype, the
    zero lora_A diagonals) of equal shape. The diagonals of diag and merged-diag count as
    ``factors``, in ``storage``'s bytes.
    """
    mode = sum(r * m.d_in * 4 for m in mods)  # A0: random, distinct
    zero_shapes = [(m.d_out, r) for m in mods]  # B0 = 0
    mode += 4 * sum(a * b for a, b in (set(zero_shapes) if dedup else zero_shapes))
    if structure in ("diag", "merged-diag"):
        b = {"float32": 4, "bfloat16": 2}[storage]
        if structure == "merged-diag":
            return {"mode": mode, "factors": sum(m.d_out * m.d_in * b for m in mods)}
        zero_a = [(r, m.d_in) for m in mods]  # the lora_A diagonal is 0 at B0 = 0
        zero_a_bytes = b * sum(x * y for x, y in (set(zero_a) if dedup else zero_a))
        if storage == "float32" and dedup:  # a float32 zero of B0's shape is stored once
            zero_a_bytes -= 4 * sum(x * y for x, y in set(zero_a) & set(zero_shapes))
        return {"mode": mode, "factors": zero_a_bytes + sum(m.d_out * r * b for m in mods)}
    inputs = {((m.layer, INPUT_GROUP[m.kind]) if dedup else m): m.d_in for m in mods}
    sizes = [*inputs.values(), *(m.d_out for m in mods)]
    factors = 0
    for d in sizes:
        n, b = factor_numbers(d, storage, rank)
        factors += n * b
    if storage == "lowrank":  # at k >= D nothing is discarded: d = 0, deduplicated by size
        full = [d for d in sizes if rank >= d]
        factors -= 4 * (sum(full) - sum(set(full) if dedup else full))
    return {"mode": mode, "factors": factors}


# ---------------------------------------------------------------------------- FLOPs
def factor_mm_flops(d: int, m: int, storage: str, rank: int | None) -> int:
    """Matmul FLOPs of ``F @ M`` for ``M`` of shape ``d x m``."""
    if storage == "lowrank":
        return 4 * d * min(rank, d) * m  # U^T M, then U (l * .)
    return 2 * d * d * m


def penalty_flops(
    mods: list[Module], structure: str, storage: str, rank: int | None, r: int
) -> int:
    """Matmul FLOPs of the penalty's forward+backward at B0 = 0 (A trained, B moved).

    kfac / tri-kfac: only the lora_B term ``<dB, G_B dB C_u>`` is live; forward
    ``G dB`` + ``(.) C_u``, backward the same again. merged-kfac: ``U^T G U`` with ``U = dB``
    and ``V C V^T`` with ``V = s A``; the backward differentiates both sides of each product.
    """
    total = 0
    for m in mods:
        g = factor_mm_flops(m.d_out, r, storage, rank)
        if structure in ("kfac", "tri-kfac"):
            total += 2 * (g + 2 * m.d_out * r * r)
        elif structure == "merged-kfac":
            c = factor_mm_flops(m.d_in, r, storage, rank)
            fwd = g + c + 2 * r * r * (m.d_out + m.d_in)
            total += fwd + g + c + 4 * r * r * (m.d_out + m.d_in)
        else:
            raise ValueError(structure)
    return total


def step_flops_lower_bound(dims: dict, tokens: int) -> int:
    """A LoRA training step on a frozen base: forward ``2 T N`` plus the backward's input
    gradients ``2 T N`` (``N`` matmul parameters). Attention and the adapters' own FLOPs are
    left out, so this is a lower bound and the penalty shares computed from it upper bounds."""
    return 4 * tokens * matmul_params(dims)


# ---------------------------------------------------------------------------- measured
def payload(path: Path) -> int:
    """Tensor bytes of a saved artifact (the safetensors file minus its header)."""
    blob = (path / artifact.TENSORS_FILE).read_bytes()
    return len(blob) - 8 - int.from_bytes(blob[:8], "little")


def total_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def saved_sizes(prec, tmp: Path) -> dict[str, int]:
    """Tensor bytes of ``prec`` saved with and without deduplication, and the files' bytes."""
    lc.save_precision(prec, tmp / "dedup")
    lc.save_precision(prec, tmp / "full", dedup=False)
    return {
        "payload_bytes": payload(tmp / "dedup"),
        "payload_bytes_no_dedup": payload(tmp / "full"),
        "artifact_bytes": total_bytes(tmp / "dedup"),
    }


def build(dims: dict, rank: int, seed: int = 0):
    model = add_lora(tiny_llama(**dims, seed=seed), r=rank, alpha=rank, target_modules=TARGETS)
    return model.eval()


def random_deltas(prec, n: int, scale: float, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {k: scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in prec.mode.items()}
        for _ in range(n)
    ]


def rel_errors(prec, ref, ds) -> torch.Tensor:
    """``|r~ - r| / r`` of ``prec`` against ``ref`` over the displacements ``ds``."""
    want = torch.stack([ref.quad(d) for d in ds])
    return (torch.stack([prec.quad(d) for d in ds]) - want).abs() / want.abs()


def with_storage(full_rank, dense, storage: str, rank: int | None):
    """``storage`` of the fitted precision; low ranks truncate one full eigendecomposition
    (equal to compressing the float32 factors directly, without repeating ``eigh``)."""
    if storage == "lowrank":
        return full_rank.with_storage("lowrank", rank=rank)
    return dense.with_storage(storage)


def measured(dims: dict, batch: int, seq: int, n_batches: int, repeats: int) -> dict:
    model = build(dims, RANK)
    batches = random_batches(n_batches, batch, seq, dims["vocab_size"], seed=0)
    prec = lc.fit_precision(model, batches, structure="kfac", progress=False)
    others = {s: lc.fit_precision(model, batches, structure=s, progress=False) for s in OTHERS}
    full = prec.with_storage("lowrank", rank=max(dims["hidden_size"], dims["intermediate_size"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def training_step() -> None:
        model(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = timed(training_step, repeats)
    with torch.no_grad():  # away from the mode: A and B both moved
        for p in trainable:
            p.add_(1e-2 * torch.randn_like(p))
    ds = random_deltas(prec, 20, 1e-2)
    rows = []

    def row(structure: str, storage: str, rank: int | None, sizes: dict, p, ref) -> dict:
        err = rel_errors(p, ref, ds)

        def penalty() -> None:
            p.penalty(model).backward()
            optimizer.zero_grad(set_to_none=True)

        t = timed(penalty, max(4 * repeats, 5), warmup=2)
        out = {
            "structure": structure,
            "storage": storage,
            "rank": rank,
            **sizes,
            "penalty_rel_error_median": float(err.median()),
            "penalty_rel_error_max": float(err.max()),
            "penalty_time_ratio_to_step": t["median_s"] / step["median_s"],
        }
        print(
            f"{structure:<12} {label(storage, rank):<12} "
            f"{sizes['payload_bytes'] / 2**20:8.2f} MiB "
            f"({sizes['payload_bytes_no_dedup'] / 2**20:8.2f} without dedup)  "
            f"penalty error median {out['penalty_rel_error_median']:.1e} "
            f"max {out['penalty_rel_error_max']:.1e}  "
            f"time {100 * out['penalty_time_ratio_to_step']:.2f} % of a step"
        )
        return out

    with tempfile.TemporaryDirectory() as tmp:
        for storage, rank in STORAGES:
            stored = with_storage(full, prec, storage, rank)
            sizes = saved_sizes(stored, Path(tmp))
            for structure in KFAC:
                ref, p = prec.with_structure(structure), stored.with_structure(structure)
                rows.append(row(structure, storage, rank, sizes, p, ref))
        for structure in OTHERS:  # fitted on the same batches, each against its float32
            ref = others[structure]
            for storage, rank in DENSE_STORAGES:
                p = ref.with_storage(storage)
                rows.append(row(structure, storage, rank, saved_sizes(p, Path(tmp)), p, ref))
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": {
            **dims,
            "parameters": n_params,
            "lora_rank": RANK,
            "targets": list(TARGETS),
            "fit_batches": n_batches,
            "batch_size": batch,
            "seq_len": seq,
        },
        "training_step_s": step,
        "displacements": len(ds),
        "rows": rows,
    }


def label(storage: str, rank: int | None) -> str:
    return f"lowrank-{rank}" if storage == "lowrank" else storage


# ---------------------------------------------------------------------------- checks
def check_formulas(dims: dict) -> dict:
    """The byte and FLOP formulas against a scaled-down model's saved artifacts and counted
    FLOPs (both must match exactly)."""
    model = build(dims, RANK)
    # more supervised tokens than the largest factor's size: full-rank factors (with fewer,
    # the discarded eigenvalues of a low-rank factor are 0 and the zero diagonals of several
    # factors would be deduplicated, which the formula does not count)
    batches = random_batches(2, 4, 96, dims["vocab_size"], seed=0)
    mods = llama_modules(dims)
    prec = lc.fit_precision(model, batches, structure="kfac", progress=False)
    others = {
        s: lc.fit_precision(model, batches, structure=s, progress=False)
        for s in ("diag", "merged-diag")
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(s, st, k) for s in KFAC for st, k in STORAGES]
        cases += [(s, st, None) for s in others for st, _ in DENSE_STORAGES]
        for structure, storage, rank in cases:
            if structure in others:
                p = others[structure].with_storage(storage)
            else:
                p = prec.with_structure(structure).with_storage(storage, rank)
            for dedup in (True, False):
                lc.save_precision(p, Path(tmp) / "a", dedup=dedup)
                want = artifact_bytes(mods, structure, storage, rank, RANK, dedup)
                got = payload(Path(tmp) / "a")
                rows.append(
                    {
                        "structure": structure,
                        "storage": label(storage, rank),
                        "dedup": dedup,
                        "formula_bytes": sum(want.values()),
                        "measured_bytes": got,
                    }
                )
    flops = []
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1e-2 * torch.randn_like(p))
    for structure in KFAC:
        for storage, rank in STORAGES:
            p = prec.with_structure(structure).with_storage(storage, rank)
            p.penalty(model)  # derive the cached blocks outside the count
            with FlopCounterMode(display=False) as counter:
                p.penalty(model).backward()
            model.zero_grad(set_to_none=True)
            flops.append(
                {
                    "structure": structure,
                    "storage": label(storage, rank),
                    "formula_flops": penalty_flops(mods, structure, storage, rank, RANK),
                    "counted_flops": counter.get_total_flops(),
                }
            )
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    with FlopCounterMode(display=False) as counter:
        model(**batches[0]).loss.backward()
    model.zero_grad(set_to_none=True)
    step = {
        "tokens": tokens,
        "lower_bound_flops": step_flops_lower_bound(dims, batches[0]["input_ids"].numel()),
        "counted_flops": counter.get_total_flops(),
    }
    bad = [r for r in rows if r["formula_bytes"] != r["measured_bytes"]]
    bad += [r for r in flops if r["formula_flops"] != r["counted_flops"]]
    if bad:
        raise SystemExit(f"the analytic formulas disagree with the measurement: {bad}")
    if step["lower_bound_flops"] > step["counted_flops"]:
        raise SystemExit(f"the training-step FLOPs are not a lower bound: {step}")
    print(
        f"formulas checked on the scaled-down model: {len(rows)} artifacts (bytes exact), "
        f"{len(flops)} penalties (matmul FLOPs exact); a training step counts "
        f"{step['counted_flops'] / step['lower_bound_flops']:.2f}x the 4 T N lower bound"
    )
    return {"model": dims, "bytes": rows, "penalty_flops": flops, "training_step": step}


def llama3b_tables() -> dict:
    mods = llama_modules(LLAMA_3B)
    tokens = BATCH * SEQ
    step = step_flops_lower_bound(LLAMA_3B, tokens)
    bytes_rows = []
    for structure in (*KFAC, "diag", "merged-diag"):
        options = STORAGES if structure in KFAC else DENSE_STORAGES
        for storage, rank in options:
            with_d = artifact_bytes(mods, structure, storage, rank, RANK, True)
            without = artifact_bytes(mods, structure, storage, rank, RANK, False)
            bytes_rows.append(
                {
                    "structure": structure,
                    "storage": label(storage, rank),
                    "bytes": sum(with_d.values()),
                    "bytes_no_dedup": sum(without.values()),
                    "mode_bytes": with_d["mode"],
                    "factor_bytes": with_d["factors"],
                }
            )
    flop_rows = [
        {
            "structure": s,
            "storage": label(st, k),
            "penalty_flops": penalty_flops(mods, s, st, k, RANK),
            "ratio_to_step": penalty_flops(mods, s, st, k, RANK) / step,
        }
        for s in KFAC
        for st, k in STORAGES
        if st != "bfloat16"  # same FLOPs as float32 (upcast, then the same products)
    ]
    print(f"\nLlama-3.2-3B shapes, LoRA r={RANK} on {','.join(TARGETS)}, B0 = 0:")
    for row in bytes_rows:
        print(
            f"  {row['structure']:<12} {row['storage']:<12} {row['bytes'] / 1e6:10.1f} MB "
            f"({row['bytes_no_dedup'] / 1e6:10.1f} MB without dedup)"
        )
    print(f"  penalty fwd+bwd FLOPs / a training step at {BATCH} x {SEQ} tokens:")
    for row in flop_rows:
        print(f"  {row['structure']:<12} {row['storage']:<12} {100 * row['ratio_to_step']:7.3f} %")
    return {
        "shapes": {**LLAMA_3B, "lora_rank": RANK, "targets": list(TARGETS)},
        "matmul_parameters": matmul_params(LLAMA_3B),
        "tokens_per_step": tokens,
        "training_step_flops_lower_bound": step,
        "bytes": bytes_rows,
        "penalty_flops": flop_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        dims, batch, seq, n_batches, repeats = QUICK_DIMS, 2, 64, 1, 2
    else:
        dims = CPU_LLAMA
        batch, seq, n_batches, repeats = 4, 256, 2, args.repeats
    small = dict(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=256,
        num_layers=2,
        num_heads=6,
        num_kv_heads=2,
    )
    results = {"check": check_formulas(small)}
    results["measured"] = measured(dims, batch, seq, n_batches, repeats)
    results["llama3b"] = llama3b_tables()
    kfac32 = next(
        r
        for r in results["llama3b"]["penalty_flops"]
        if r["structure"] == "kfac" and r["storage"] == "float32"
    )
    sizes = {
        r["storage"]: r["bytes"] for r in results["llama3b"]["bytes"] if r["structure"] == "kfac"
    }
    results["goals"] = {
        "penalty_kfac_float32_le_1pct_at_3b": kfac32["ratio_to_step"] <= 0.01,
        "storages_under_500MB_at_3b": sorted(k for k, v in sizes.items() if v <= 500e6),
    }
    name = "storage_quick.json" if args.quick else "storage.json"
    write_result(args.out, name, results)
    write_result(args.out, "environment.json", environment())
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
