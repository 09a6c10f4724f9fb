"""The smallest end-to-end run: fit -> save -> load -> penalty, on a tiny model, offline.

For every structure it fits a precision on synthetic source batches, saves it, loads it back
(checking that the loaded penalty is identical), then trains the adapter on a different
synthetic "target" distribution for a few plain-LoRA steps and records each penalty along the
way: how far, by each curvature's measure, the adapter drifted from its source mode.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import lalora_curv as lc
from lalora_curv.plotting import pyplot, save_figure
from lalora_curv.toy import add_lora, random_batches, tiny_llama


def run(
    out_dir: str | Path = "runs/quickstart", steps: int = 20, progress: bool = True, seed: int = 0
) -> dict[str, Any]:
    """Run the quick start and write ``summary.json`` (and ``penalties.png``) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = 128
    model = add_lora(
        tiny_llama(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            seed=seed,
        ),
        r=8,
        alpha=16,
        target_modules=("q_proj", "v_proj"),
        seed=seed,
    )
    # source: tokens from the lower half of the vocabulary; target: the upper half
    source = random_batches(8, 4, 32, vocab // 2, seed=seed)
    target = random_batches(4, 4, 32, vocab // 2, seed=seed + 1, token_offset=vocab // 2)

    precisions: dict[str, lc.Precision] = {}
    fitted: dict[str, lc.Precision] = {}
    summary: dict[str, Any] = {"structures": {}}
    for structure in lc.STRUCTURES:
        t0 = time.perf_counter()
        prec = lc.fit_precision(
            model,
            source,
            structure=structure,
            estimator="mc",
            mc_samples=2,
            progress=progress,
            sources=["toy-source"],
        )
        fit_s = time.perf_counter() - t0
        path = lc.save_precision(prec, out / structure)
        loaded = lc.load_precision(path)
        precisions[structure] = loaded
        fitted[structure] = prec
        summary["structures"][structure] = {
            "artifact": str(path),
            "fit_seconds": round(fit_s, 3),
            "artifact_bytes": sum(f.stat().st_size for f in path.iterdir()),
        }
        print(
            f"fitted {structure:<12} in {fit_s:5.2f}s -> {path} "
            f"({summary['structures'][structure]['artifact_bytes'] / 1024:.0f} KiB)"
        )

    # Train the adapter on the target with plain LoRA (lam = 0) and watch each penalty grow.
    history: dict[str, list[float]] = {s: [] for s in precisions}

    def penalties(model: torch.nn.Module, step: int) -> dict[str, float]:
        values = {s: float(prec.penalty(model)) for s, prec in precisions.items()}
        for s, v in values.items():
            history[s].append(v)
        return values

    (out / "train_log.jsonl").unlink(missing_ok=True)  # the log appends: start it afresh
    records = lc.train(
        model,
        target,
        None,
        0.0,
        lr=5e-3,
        max_steps=steps,
        eval_fn=penalties,
        eval_every=1,
        log_file=out / "train_log.jsonl",
        progress=progress,
        seed=seed,
    )
    history["target_nll"] = [r["nll"] for r in records if "nll" in r]
    summary["history"] = history
    with torch.no_grad():
        identical = all(
            torch.equal(fitted[s].penalty(model), precisions[s].penalty(model)) for s in precisions
        )
    if not identical:
        raise RuntimeError("a loaded precision's penalty differs from the fitted one's")
    summary["loaded_equals_fitted"] = identical
    summary["note"] = (
        "penalties are (theta - mu)^T P (theta - mu) with P the mean per-token "
        "Fisher of the source data; merged-kfac equals kfac to first order"
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _plot(history, out / "penalties.png")

    print(f"\n{'structure':<13}{'penalty after ' + str(steps) + ' target steps':>32}")
    for s in precisions:
        print(f"{s:<13}{history[s][-1]:>32.4e}")
    print(
        f"\ntarget NLL {history['target_nll'][0]:.3f} -> {history['target_nll'][-1]:.3f}; "
        "penalties of the loaded artifacts are identical to the fitted ones"
    )
    print(f"summary: {out / 'summary.json'}, training log: {out / 'train_log.jsonl'}")
    if (out / "penalties.png").exists():
        print(f"plot:    {out / 'penalties.png'}")
    return summary


def _plot(history: dict[str, list[float]], path: Path) -> None:
    plt = pyplot()
    if plt is None:  # plotting is optional (extra "bench")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, values in history.items():
        if name != "target_nll":
            # at the default init B0 = 0, tri-kfac coincides with kfac: dash it to show both
            ax.semilogy(
                range(1, len(values) + 1),
                values,
                label=name,
                marker=".",
                linestyle="--" if name == "tri-kfac" else "-",
            )
    ax.set_xlabel("plain-LoRA training step on the target data")
    ax.set_ylabel(r"penalty $(\theta-\mu)^\top P(\theta-\mu)$")
    ax.set_title("Drift from the source mode, as each precision measures it")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
