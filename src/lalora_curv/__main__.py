"""Command line: ``lalora-curv quickstart`` and ``lalora-curv eval`` (``python -m lalora_curv``)."""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lalora-curv",
        description="Laplace curvature penalties for LoRA (LALoRA).",
        epilog="example: lalora-curv quickstart --out runs/quickstart",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="fit -> save -> load -> penalty on a tiny model")
    quick.add_argument("--out", default="runs/quickstart", help="output directory")
    quick.add_argument("--steps", type=int, default=20, help="target training steps")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev = sub.add_parser(
        "eval",
        help="score a model on hellaswag, winogrande, arc_challenge, gsm8k",
        epilog="example: lalora-curv eval --model ./llama --adapter "
        "./adapter --tasks arc_challenge,gsm8k --data-dir ../shared/data "
        "--limit 100 --output results.json",
    )
    ev.add_argument("--model", required=True, help="local path or hub id of a causal LM")
    ev.add_argument("--adapter", default=None, help="a peft adapter directory")
    ev.add_argument("--tasks", default="hellaswag,winogrande,arc_challenge,gsm8k")
    ev.add_argument(
        "--data-dir",
        default=None,
        help="local files in the original schemas (default: the Hugging Face hub)",
    )
    ev.add_argument("--limit", type=int, default=None, help="the first N records per task")
    ev.add_argument("--sample", type=int, default=None, help="a seeded random subset per task")
    ev.add_argument(
        "--num-fewshot",
        type=int,
        default=0,
        help="GSM8K few-shot examples (the harness's gsm8k default is 5)",
    )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--output", required=True, help="JSON file to write")
    ev.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "quickstart":
        from lalora_curv.quickstart import run

        run(args.out, steps=args.steps, progress=not args.no_progress, seed=args.seed)
    elif args.command == "eval":
        import json
        from pathlib import Path

        from lalora_curv.tasks.evaluate import evaluate, load_model

        model, tokenizer = load_model(args.model, args.adapter)
        results = evaluate(
            model,
            tokenizer,
            [t for t in args.tasks.split(",") if t],
            args.data_dir,
            limit=args.limit,
            sample=args.sample,
            seed=args.seed,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            num_fewshot=args.num_fewshot,
            progress=not args.no_progress,
        )
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        tmp.replace(out)
        print(json.dumps(results, indent=2, sort_keys=True))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
