"""Real-text fronts: plain LoRA against LALoRA (K-FAC, MC Fisher) at equal compute, in NLL.

The question of docs/results.md on the real-text scenario (:mod:`lalora_curv.testbed.realtext`:
a tiny Llama pretrained on the real HellaSwag, WinoGrande and ARC-Challenge texts, LoRA r = 8
on every linear module fine-tuned on GSM8K): learning is the decrease of the per-token NLL of
the GSM8K test answers, forgetting the increase of the pooled per-token NLL of held-out source
text. Grid: learning rate (``--lrs``) x method (plain LoRA; LALoRA with a K-FAC precision from
the MC Fisher, ``--mc-samples`` label draws, fitted on the source texts, at each raw lambda of
``--lams``) x seed (``--seeds``: LoRA init, training pairs and their order, the fitting texts),
``--steps`` steps with every ``--eval-every`` steps, step 0 (the pretrained model) and the last
step measured. Every checkpoint of every run is a point of its method's front: the Pareto front
of the seed-averaged checkpoints over all its learning rates, lambdas and steps (early stopping
is part of each method's front).

Runs go to ``--workers`` spawned processes with one torch thread each and are appended, as each
finishes, to ``results/realtext_front.json`` (written atomically; finished runs are skipped when
the script runs again with the same model and data). Plots ``results/realtext_front.png`` (every
run in the JSON) and prints each method's front (mean +- std over seeds). ``--quick``: the tiny
model of ``bench_realtext.py --quick``, 20 steps measured every 10, the first lr, lambda and seed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench_core import environment, write_result
from bench_realtext import add_data_dir_argument, data_dir_of
from lalora_curv.testbed import realtext as rt
from lalora_curv.testbed.sweep import one_thread  # the sweep's worker setup
from lalora_curv.testbed.sweep_report import aggregate, method_fronts, plot_pareto

HERE = Path(__file__).resolve().parent
QUICK_SETTINGS = {"hidden": 32, "mlp": 64, "layers": 2, "steps": 20, "vocab": 1024}
PLAIN, LALORA = "lora", "lalora-kfac-mc"
RUSAGE = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
#: what makes a run the same run again (with the file's model, data and eval sample)
KEY = ("method", "lr", "lam", "seed", "steps", "eval_every", "mc_samples")


def grid(
    lrs: list[float],
    lams: list[float],
    seeds: list[int],
    steps: int,
    eval_every: int,
    mc_samples: int,
) -> list[dict[str, Any]]:
    """The runs: per lr and seed, plain LoRA (lam 0) and LALoRA at every lambda."""
    methods = [(PLAIN, 0.0), *[(LALORA, lam) for lam in lams]]
    return [
        {
            "method": m,
            "lr": lr,
            "lam": lam,
            "seed": s,
            "steps": steps,
            "eval_every": eval_every,
            "mc_samples": mc_samples if m == LALORA else 0,
        }
        for lr in lrs
        for m, lam in methods
        for s in seeds
    ]


def run_key(run: dict[str, Any]) -> str:
    return json.dumps({k: run[k] for k in KEY}, sort_keys=True)


# --- worker processes ---------------------------------------------------------------------------

_DATA: dict[str, rt.RealText] = {}


def _data_key(data_dir: str | None, eval_sample: int) -> str:
    return json.dumps([data_dir, eval_sample])


def one_run(
    cell: dict[str, Any],
    data_dir: str | None,
    eval_sample: int,
    settings: dict | None,
    before: dict[str, Any],
) -> dict[str, Any]:
    """Fine-tune a fresh copy of the cached pretrained model as ``cell`` says; the result with
    the ``trajectory`` from step 0 (``before``) to the last step."""
    torch.set_num_threads(1)
    key = _data_key(data_dir, eval_sample)
    if key not in _DATA:  # the texts once per worker
        _DATA[key] = rt.RealText(data_dir, eval_sample=eval_sample)
    data = _DATA[key]
    model, tok = rt.pretrained(data, settings, progress=False)
    t0 = time.perf_counter()
    lalora = cell["method"] == LALORA
    result = rt.finetune(
        model,
        tok,
        data,
        precision_structure="kfac" if lalora else None,
        lam=cell["lam"],
        estimator="mc",
        mc_samples=max(1, cell["mc_samples"]),
        steps=cell["steps"],
        lr=cell["lr"],
        before=before,
        eval_every=cell["eval_every"],
        seed=cell["seed"],
    )
    result.pop("before")  # the file's, passed in
    result["trajectory"] = [{"step": 0, **before}, *result["trajectory"]]
    return {**cell, "seconds": time.perf_counter() - t0, **result}


# --- fronts ---------------------------------------------------------------------------------------


def records(runs: list[dict[str, Any]], before: dict[str, Any]) -> list[dict[str, Any]]:
    """Every checkpoint of every run as a :func:`~lalora_curv.testbed.sweep_report.aggregate`
    record, both axes higher-is-better: ``target`` = GSM8K NLL decrease (learning),
    ``source_mean`` = minus the pooled source NLL increase (minus forgetting), ``source`` =
    minus each task's increase."""
    out = []
    for r in runs:
        cell = {k: r[k] for k in KEY}
        config = json.dumps({k: v for k, v in cell.items() if k != "seed"}, sort_keys=True)
        for c in r["trajectory"]:
            out.append(
                {
                    "config": config,
                    "cell": cell,
                    "seed": r["seed"],
                    "step": c["step"],
                    "lam": r["lam"],
                    "target": before["target"] - c["target"],
                    "source_mean": before["source_all"] - c["source_all"],
                    "source": {t: before["source"][t] - c["source"][t] for t in rt.SOURCES},
                }
            )
    return out


def front_table(fronts: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each method's front points in NLL terms (mean and std over seeds), by learning."""
    return [
        {
            "method": method,
            "lr": json.loads(p["config"])["lr"],
            "lam": json.loads(p["config"])["lam"],
            "step": p["step"],
            "seeds": p["n"],
            "learning": p["target"],
            "learning_std": p["target_std"],
            "forgetting": 0.0 - p["source_mean"],  # not -0.0
            "forgetting_std": p["source_mean_std"],
        }
        for method, front in sorted(fronts.items())
        for p in front
    ]


def format_front(rows: list[dict[str, Any]]) -> str:
    lines = [
        "each method's front (seed means +- std; nats per token): GSM8K NLL decrease "
        "(learning, higher is better), source NLL increase (forgetting, lower is better)",
        f"{'method':<16}{'lr':>8}{'lambda':>8}{'step':>6}{'seeds':>7}  {'learning':>17}  "
        f"{'forgetting':>17}",
    ]
    for r in rows:
        lines.append(
            f"{r['method']:<16}{r['lr']:>8g}{r['lam']:>8g}{r['step']:>6}{r['seeds']:>7}  "
            f"{r['learning']:>7.3f} +- {r['learning_std']:.3f}  "
            f"{r['forgetting']:>7.3f} +- {r['forgetting_std']:.3f}"
        )
    return "\n".join(lines)


def plot(configs: list[dict[str, Any]], path: Path, model: str) -> Path | None:
    return plot_pareto(
        configs,
        path,
        xlabel="GSM8K test NLL decrease per token (learning, higher is better)",
        ylabel="held-out source NLL increase per token\n(forgetting, lower is better)",
        title=f"Real text, {model}: fronts over lr x lambda x step (seed means)",
        y_sign=-1.0,
        legend_loc="upper left",
    )


# --- the script -----------------------------------------------------------------------------------


def _floats(text: str, name: str, parser: argparse.ArgumentParser) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{name}: {text!r} is not a comma-separated list of numbers")
    if not values or any(v <= 0 for v in values):
        parser.error(f"{name}: every value must be > 0, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir_argument(parser)
    parser.add_argument("--lrs", default="1e-3,2e-3,4e-3")
    parser.add_argument("--lams", default="1000,10000", help="raw LALoRA lambdas (> 0)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--mc-samples", type=int, default=1, help="MC Fisher label draws (1: as bench_realtext)"
    )
    parser.add_argument("--eval-sample", type=int, default=400, help="held-out texts per task")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, 20 steps (measured every 10), the first lr, lambda and seed",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    lrs, lams = _floats(args.lrs, "--lrs", parser), _floats(args.lams, "--lams", parser)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    for name in ("steps", "eval_every", "mc_samples", "eval_sample", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not seeds:
        parser.error("--seeds: no seed given")
    steps, eval_every, settings = args.steps, args.eval_every, None
    if args.quick:
        lrs, lams, seeds, steps, eval_every = lrs[:1], lams[:1], seeds[:1], 20, 10
        settings = QUICK_SETTINGS
    name = "realtext_front_quick" if args.quick else "realtext_front"
    path = args.out / (name + ".json")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the parent's pretraining and evaluation, and --workers 1
    data_dir = data_dir_of(args)
    data = rt.RealText(data_dir, eval_sample=args.eval_sample)
    _DATA[_data_key(data_dir, args.eval_sample)] = data  # for --workers 1
    model, tok = rt.pretrained(data, settings)  # once, cached, before the workers load it
    header = {
        "pretrain": {**rt.PRETRAIN, **(settings or {})},
        "data": data.fingerprint(),
        "eval_sample": args.eval_sample,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is not None:
        changed = [k for k in ("pretrain", "data", "eval_sample") if saved[k] != header[k]]
        if changed:
            raise SystemExit(
                f"{path} holds runs of another {', '.join(changed)}: move it away or pass "
                "another --out"
            )
        before = saved["before"]
    else:
        before = rt.evaluate(model, tok, data)
    runs = saved["runs"] if saved else []
    done = {run_key(r) for r in runs}
    cells = grid(lrs, lams, seeds, steps, eval_every, args.mc_samples)
    todo = [c for c in cells if run_key(c) not in done]
    todo.sort(key=lambda c: c["method"] != LALORA)  # the longer runs first
    print(
        f"pretrained model ({header['parameters'] / 1e6:.2f}M parameters): source NLL "
        f"{before['source_all']:.3f}, GSM8K NLL {before['target']:.3f}; {len(cells)} runs in "
        f"the grid, {len(cells) - len(todo)} already in {path}, {len(todo)} to run"
    )

    def save() -> None:
        write_result(
            args.out,
            name + ".json",
            {**header, "before": before, "runs": runs, "environment": environment()},
        )

    failed: list[tuple[dict[str, Any], BaseException]] = []
    bar = tqdm(total=len(todo), desc="real-text runs", unit="run")

    def finished(cell: dict[str, Any], future_result) -> None:
        try:
            run = future_result()
        except Exception as err:  # reported after the other runs
            failed.append((cell, err))
        else:
            runs.append(run)
            save()
            a = run["after"]
            bar.write(
                f"{run['method']:<15} lr {run['lr']:g} lam {run['lam']:g} seed {run['seed']}: "
                f"source NLL {a['source_all']:.3f} ({run['source_increase']:+.3f}), GSM8K NLL "
                f"{a['target']:.3f} ({-run['target_decrease']:+.3f}), {run['seconds']:.0f} s"
            )
        bar.update()

    jobs = [(c, data_dir, args.eval_sample, settings, before) for c in todo]
    t0 = time.perf_counter()
    if args.workers == 1 or len(todo) <= 1:
        for job in jobs:
            finished(job[0], lambda job=job: one_run(*job))
    else:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(args.workers, mp_context=context, initializer=one_thread)
        try:
            futures = {pool.submit(one_run, *job): job[0] for job in jobs}
            for future in as_completed(futures):
                finished(futures[future], future.result)
        finally:  # ^C: the queued runs do not start; finished ones are already written
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    if todo:  # ru_maxrss: KiB on Linux; the children's is the largest worker's
        own, worker = (resource.getrusage(w).ru_maxrss / 1024 for w in RUSAGE)
        print(
            f"{len(todo) - len(failed)} runs in {wall:.0f} s with {args.workers} workers; peak "
            f"resident memory {own:.0f} MiB (this process), {worker:.0f} MiB (largest worker)"
        )

    configs = aggregate(records(runs, before))
    rows = front_table(method_fronts(configs))
    print(format_front(rows))
    model_name = "tiny model (--quick)" if args.quick else f"{header['parameters'] / 1e6:.1f}M"
    png = plot(configs, args.out / (name + ".png"), model_name)
    write_result(
        args.out,
        name + ".json",
        {**header, "before": before, "runs": runs, "fronts": rows, "environment": environment()},
    )
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    if failed:
        lines = "\n".join(
            f"  {c['method']} lr {c['lr']:g} lam {c['lam']:g} seed {c['seed']}: "
            f"{type(e).__name__}: {e}"
            for c, e in failed
        )
        raise SystemExit(
            f"{len(failed)} of {len(todo)} runs failed (the others are in {path}; running the "
            f"script again retries only the failed ones):\n{lines}"
        )


if __name__ == "__main__":
    main()
