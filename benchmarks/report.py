"""Regenerate the docs' tables from ``results/*.json`` and copy their plots to docs/assets/.

Run after the benchmarks (``make bench`` does): the tables between the ``<!-- table:NAME -->``
and ``<!-- /table:NAME -->`` markers are replaced, nothing else is touched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lalora_curv.atomic import write_bytes, write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load(name: str) -> dict:
    return json.loads((HERE / "results" / name).read_text())


def core_fit() -> str:
    """Fit time / plain forward+backward per configuration, and the K-FAC floor."""
    configs = load("core.json")["configs"]
    names = list(configs)
    keys = list(dict.fromkeys(k for c in configs.values() for k in c["fit"]))
    heads = [
        f"{c['batch_size']} x {c['seq_len']}, "
        + ("padded, masked prompt" if c["pad"] else "masked prompt")
        for c in configs.values()
    ]
    rows = [
        "| fit: structure / estimator | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(names),
    ]
    for k in keys:
        cells = []
        for n in names:
            v = configs[n]["fit"].get(k)
            cells.append(
                f"{v['ratio_to_plain']:.3f}x ({v['ratio_q1']:.3f}-{v['ratio_q3']:.3f})"
                if v
                else "-"
            )
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    rows.append(
        "| K-FAC floor: 1 + factor products alone | "
        + " | ".join(f"{configs[n]['kfac_floor']:.3f}x" for n in names)
        + " |"
    )
    return "\n".join(rows)


def core_penalty() -> str:
    r = load("core.json")
    rows = ["| penalty: structure | forward+backward / training step, median |", "|---|---|"]
    rows += [f"| {k} | {100 * v['ratio_to_step']:.2f} % |" for k, v in r["penalty"].items()]
    return "\n".join(rows)


def readme_costs() -> str:
    r = load("core.json")
    f, p = next(iter(r["configs"].values()))["fit"], r["penalty"]
    return "\n".join(
        [
            "| | K-FAC | DIAG |",
            "|---|---|---|",
            f"| fit, empirical Fisher, per batch / plain forward+backward | "
            f"{f['kfac/empirical']['ratio_to_plain']:.2f}x | {f['diag/empirical']['ratio_to_plain']:.2f}x |",
            f"| fit, MC Fisher (1 sample) / plain forward+backward | "
            f"{f['kfac/mcx1']['ratio_to_plain']:.2f}x | {f['diag/mcx1']['ratio_to_plain']:.2f}x |",
            f"| penalty forward+backward / training step | {100 * p['kfac']['ratio_to_step']:.1f} % "
            f"| {100 * p['diag']['ratio_to_step']:.2f} % |",
        ]
    )


def backends() -> str:
    r = load("backends.json")
    rows = [
        "| backend | structure | estimator | granularity | time / plain fwd+bwd, median "
        "(IQR) | peak memory / plain fwd+bwd |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["cases"]:
        rows.append(
            f"| {c['backend']} | {c['structure']} | {c['estimator']} | "
            f"{c['granularity']} | {c['time_ratio']:.2f}x ({c['time_ratio_q1']:.2f}-"
            f"{c['time_ratio_q3']:.2f}) | {c['memory_ratio']:.2f}x |"
        )
    return "\n".join(rows)


def approx() -> str:
    rows = [
        "| estimator vs exact | structure | granularity | rel. Frobenius error | diagonal "
        "rel. error | penalty rank correlation |",
        "|---|---|---|---|---|---|",
    ]
    for x in load("approx.json")["rows"]:
        fro = x.get("relative_frobenius_error")
        dense = (
            f"{fro:.3f} | {x['diagonal_relative_error']:.3f}"
            if fro is not None
            else "n/a (degree 4) | n/a"
        )
        rows.append(
            f"| {x['estimator']} vs {x['reference'].upper()} | {x['structure']} | "
            f"{x['granularity']} | {dense} | {x['penalty_rank_correlation']:.3f} |"
        )
    return "\n".join(rows)


def train_steps() -> str:
    r = load("train.json")
    rows = [
        "| penalty in `lc.train` | seconds per step, median (IQR) | vs plain LoRA |",
        "|---|---|---|",
    ]
    for name, t in r["step_times"].items():
        rows.append(
            f"| {name} | {t['median_s']:.3f} ({t['q1_s']:.3f}-{t['q3_s']:.3f}) | "
            f"{100 * t['overhead']:+.1f} % |"
        )
    return "\n".join(rows)


def train_scaling() -> str:
    r = load("train.json")
    rows = [
        "| hidden | rank | adapted modules per layer | layers | K-FAC penalty forward+backward "
        "/ training step |",
        "|---|---|---|---|---|",
    ]
    for x in r["penalty_scaling"]:  # rows written before the modules and layers axes: q, v x 2
        targets = ",".join(t.removesuffix("_proj") for t in x.get("targets", ["q", "v"]))
        rows.append(
            f"| {x['hidden']} | {x['rank']} | {targets} | {x.get('layers', 2)} | "
            f"{100 * x['ratio']:.2f} % |"
        )
    return "\n".join(rows)


def testbed() -> str:
    r = load("testbed.json")
    rows = [
        "| method | lambda | source accuracy (drop) | target exact match |",
        "|---|---|---|---|",
    ]
    for x in r["runs"]:
        rows.append(
            f"| {x['method']} | {x['lam']:.0e} | {x['source_mean']:.3f} "
            f"({-x['source_drop']:+.3f}) | {x['after']['target']:.3f} "
            f"(from {x['before']['target']:.3f}) |"
        )
    return "\n".join(rows)


def realtext() -> str:
    r = load("realtext.json")
    b = r["before"]
    rows = [
        "| method | lambda | source NLL (increase) | HellaSwag | WinoGrande | ARC-C "
        "| GSM8K NLL (decrease) |",
        "|---|---|---|---|---|---|---|",
        f"| pretrained | - | {b['source_all']:.3f} | {b['source']['hellaswag']:.3f} "
        f"| {b['source']['winogrande']:.3f} | {b['source']['arc_challenge']:.3f} "
        f"| {b['target']:.3f} |",
    ]
    for x in r["runs"]:
        a = x["after"]
        rows.append(
            f"| {x['method']} | {x['lam']:g} | {a['source_all']:.3f} "
            f"({x['source_increase']:+.3f}) | {a['source']['hellaswag']:.3f} "
            f"| {a['source']['winogrande']:.3f} | {a['source']['arc_challenge']:.3f} "
            f"| {a['target']:.3f} ({x['target_decrease']:+.3f}) |"
        )
    return "\n".join(rows)


def storage_measured() -> str:
    r = load("storage.json")["measured"]
    rows = [
        "| structure | storage | artifact MiB (without dedup) | penalty rel. error, median "
        "(max) | penalty fwd+bwd / training step |",
        "|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        st = f"lowrank k={x['rank']}" if x["storage"] == "lowrank" else x["storage"]
        rows.append(
            f"| {x['structure']} | {st} | {x['payload_bytes'] / 2**20:.1f} "
            f"({x['payload_bytes_no_dedup'] / 2**20:.1f}) | {x['penalty_rel_error_median']:.1e} "
            f"({x['penalty_rel_error_max']:.1e}) | {100 * x['penalty_time_ratio_to_step']:.2f} % |"
        )
    return "\n".join(rows)


def storage_3b() -> str:
    r = load("storage.json")["llama3b"]
    flops = {(x["structure"], x["storage"]): x["ratio_to_step"] for x in r["penalty_flops"]}
    rows = [
        "| structure | storage | artifact MB | without dedup | penalty fwd+bwd FLOPs / "
        "training step |",
        "|---|---|---|---|---|",
    ]
    for x in r["bytes"]:
        key = (x["structure"], "float32" if x["storage"] == "bfloat16" else x["storage"])
        share = f"{100 * flops[key]:.3f} %" if key in flops else "-"
        rows.append(
            f"| {x['structure']} | {x['storage'].replace('lowrank-', 'lowrank k=')} | "
            f"{x['bytes'] / 1e6:,.0f} | {x['bytes_no_dedup'] / 1e6:,.0f} | {share} |"
        )
    return "\n".join(rows)


def selfgen() -> str:
    r = load("selfgen.json")
    labels = {"none": "plain LoRA", "facts": "source facts", "self-generated": "self-generated"}
    rows = [
        "| precision fitted on | c | source tokens | source accuracy | target exact match | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for x in r["summary"]:
        rows.append(
            f"| {labels[x['source']]} | {x['c']:g} | {x['source_tokens']:.0f} | "
            f"{x['source_mean']:.3f} ± {x['source_std']:.3f} | "
            f"{x['target_mean']:.3f} ± {x['target_std']:.3f} | {x['seeds']} |"
        )
    return "\n".join(rows)


MARKERS = re.compile(r"(<!-- table:([\w-]+) -->)(.*?)(<!-- /table:\2 -->)", re.S)


def fill(path: Path) -> None:
    """Replace every marked table of ``path`` (an emptied one too) with its current rendering.

    A marker naming no table of :data:`TABLES`, or a table that renders empty, is an error:
    a page must never keep a stale or blank table silently.
    """

    def render(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"{path}: marker table:{name} names no table; known: {list(TABLES)}")
        table = TABLES[name]().strip("\n")
        if not table:
            raise SystemExit(f"{path}: table {name} rendered empty")
        return f"{m.group(1)}\n{table}\n{m.group(4)}"

    write_text(path, MARKERS.sub(render, path.read_text()))


#: plots the docs site shows: their path under results/ -> their name in docs/assets/
PLOTS = {
    **{
        name: name
        for name in (
            "testbed.png",
            "selfgen.png",
            "realtext.png",
            "sequential.png",
            "train.png",
            "lowrank.png",
        )
    },
    "evidence/evidence_fronts.png": "evidence_fronts.png",
    "evidence/evidence_equal_learning.png": "evidence_equal_learning.png",
    "evidence/pareto.png": "evidence_pareto.png",
}


def evidence() -> str:
    """The evidence page's tables, as ``bench_evidence.py report`` wrote them."""
    return (HERE / "results" / "evidence" / "evidence.md").read_text().rstrip("\n")


def lowrank() -> str:
    r = load("lowrank.json")
    rows = [
        "| k per factor | kfac: trained, median (max) | kfac: random | merged-kfac: trained | "
        "merged-kfac: random |",
        "|---|---|---|---|---|",
    ]
    for k in r["ks"]:
        t, rnd = r["trained"]["kfac"][str(k)], r["random"]["kfac"][str(k)]
        mt, mr = r["trained"]["merged-kfac"][str(k)], r["random"]["merged-kfac"][str(k)]
        rows.append(
            f"| {k} | {100 * t['median']:.2f} % ({100 * t['max']:.2f} %) | "
            f"{100 * rnd['median']:.2f} % | {100 * mt['median']:.2f} % | "
            f"{100 * mr['median']:.2f} % |"
        )
    rec = r["recommended"]
    rows.append(
        f"| 3B preset: k = {rec['k']} ({rec['bytes_3b'] / 1e6:.0f} MB at 3B), here k = "
        f"{rec['k_measured']} of {max(r['model']['factor_sizes'])} | "
        f"{100 * rec['max_error_trained_at_k_measured']:.1f} % (max) | | | |"
    )
    return "\n".join(rows)


TABLES = {
    "selfgen": selfgen,
    "core-fit": core_fit,
    "core-penalty": core_penalty,
    "readme-costs": readme_costs,
    "backends": backends,
    "approx": approx,
    "train-steps": train_steps,
    "train-scaling": train_scaling,
    "testbed": testbed,
    "storage-measured": storage_measured,
    "storage-3b": storage_3b,
    "realtext": realtext,
    "lowrank": lowrank,
    "evidence": evidence,
}


def copy_plots() -> None:
    assets = ROOT / "docs" / "assets"
    assets.mkdir(exist_ok=True)
    for name, target in PLOTS.items():
        source = HERE / "results" / name
        if source.is_file():
            write_bytes(assets / target, source.read_bytes())
            print(f"copied {source} -> {assets / target}")
        else:  # a partial `make bench`: the page keeps its figure, and says which is stale
            print(f"kept {assets / target}: {source} not found (run its benchmark to refresh it)")


if __name__ == "__main__":
    copy_plots()
    for doc in (
        ROOT / "README.md",
        ROOT / "docs" / "benchmarks.md",
        ROOT / "docs" / "evaluation.md",
        ROOT / "docs" / "selfgen.md",
        ROOT / "docs" / "results.md",
    ):
        fill(doc)
        print(f"updated {doc}")
