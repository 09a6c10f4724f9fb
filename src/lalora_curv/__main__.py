"""Command line: ``lalora-curv quickstart`` (``python -m lalora_curv``)."""

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "quickstart":
        from lalora_curv.quickstart import run

        run(args.out, steps=args.steps, progress=not args.no_progress, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
