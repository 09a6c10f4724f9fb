"""Pretrain the real-text scenario's base model and write it into the package (run once).

Trains :data:`lalora_curv.testbed.realtext.PRETRAIN` (a 4.2M-parameter Llama, 4096-token
byte-level BPE) on the source training texts of HellaSwag, WinoGrande and ARC-Challenge and the
GSM8K training questions (no answer), holding out ``val_fraction`` of the packed blocks for a
validation curve and keeping the best step. Then measures, before any tuning, the held-out
source NLL and the GSM8K test NLL of the answers (:func:`~lalora_curv.testbed.realtext.evaluate`),
and writes ``src/lalora_curv/testbed/realtext_model/`` atomically: ``model.safetensors`` and
``config.json`` (``from_pretrained``), the tokenizer, and ``pretraining.json`` (settings, data
hashes, validation curve, the evaluation, seconds, environment). Every real-text run and test
then loads this folder instead of pretraining.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench_core import environment
from bench_realtext import add_data_dir_argument, data_dir_of
from lalora_curv.atomic import staged_dir
from lalora_curv.testbed import realtext as rt
from lalora_curv.testbed import realtext_data as rd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir_argument(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=rt.SHIPPED)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = data_dir_of(args)
    data = rd.RealText(data_dir, eval_sample=400)
    cfg = {**rt.PRETRAIN, "seed": 0, "data": data.fingerprint()}
    t0 = time.perf_counter()
    model, tok, report = rt.pretrain(data, cfg)
    seconds = time.perf_counter() - t0
    evaluation = rt.evaluate(model, tok, data)
    info = {
        "settings": cfg,
        "report": report,
        "seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "evaluation_eval_sample_400": evaluation,
        "environment": environment(),
    }
    out: Path = args.out
    with staged_dir(out) as staging:
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / "pretraining.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(
        f"{info['parameters'] / 1e6:.2f}M parameters, {seconds / 60:.1f} min, kept step "
        f"{report['kept_step']}; held-out source NLL {evaluation['source_all']:.3f} "
        f"({', '.join(f'{k} {v:.3f}' for k, v in evaluation['source'].items())}), GSM8K NLL "
        f"{evaluation['target']:.3f}; wrote {out}"
    )


if __name__ == "__main__":
    main()
