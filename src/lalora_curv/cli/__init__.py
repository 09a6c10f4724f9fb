"""The ``lalora-curv`` command line, built with jsonargparse from the commands' signatures.

Each command is a plain typed function (one module each): its parameters are the options,
its docstring the help, and ``--config FILE.yaml`` / ``--print_config`` come for free.
Option names are the parameters' (``--data_dir``); ``--data-dir`` is accepted as well, and a
boolean option ``--progress`` reads ``--progress``, ``--progress false`` and ``--no_progress``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from inspect import signature
from typing import Any, get_type_hints

import docstring_parser
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter

from lalora_curv.cli.demo import EXAMPLES as DEMO_EXAMPLES
from lalora_curv.cli.demo import demo
from lalora_curv.cli.evaluate import EXAMPLES as EVAL_EXAMPLES
from lalora_curv.cli.evaluate import evaluate
from lalora_curv.cli.fit import EXAMPLES as FIT_EXAMPLES
from lalora_curv.cli.fit import fit
from lalora_curv.cli.inspect_precision import EXAMPLES as INSPECT_EXAMPLES
from lalora_curv.cli.inspect_precision import inspect
from lalora_curv.cli.paper import EXAMPLES as PAPER_EXAMPLES
from lalora_curv.cli.paper import paper
from lalora_curv.cli.quickstart import EXAMPLES as QUICKSTART_EXAMPLES
from lalora_curv.cli.quickstart import quickstart
from lalora_curv.cli.sweep import EXAMPLES as SWEEP_EXAMPLES
from lalora_curv.cli.sweep import sweep
from lalora_curv.cli.train import EXAMPLES as TRAIN_EXAMPLES
from lalora_curv.cli.train import train

#: sub-command -> (function, one-line help, examples)
COMMANDS: dict[str, tuple[Callable[..., Any], str, str]] = {
    "fit": (fit, "stage 1: a precision per source sub-dataset, and their sum", FIT_EXAMPLES),
    "train": (train, "stage 2: fine-tune the adapter with lam * penalty", TRAIN_EXAMPLES),
    "eval": (evaluate, "score on hellaswag, winogrande, arc_challenge, gsm8k", EVAL_EXAMPLES),
    "sweep": (
        sweep,
        "a grid of methods x settings x seeds: fronts, curves, tables",
        SWEEP_EXAMPLES,
    ),
    "paper": (
        paper,
        "the paper's recipe on a real LLM: fit, train, select on validation, score",
        PAPER_EXAMPLES,
    ),
    "demo": (
        demo,
        "plain LoRA, an L2 control and LALoRA on real text in minutes (start here)",
        DEMO_EXAMPLES,
    ),
    "inspect": (inspect, "a precision's metadata, norms, traces, spectra", INSPECT_EXAMPLES),
    "quickstart": (
        quickstart,
        "fit -> save -> load -> penalty on a tiny model",
        QUICKSTART_EXAMPLES,
    ),
}

EPILOG = """examples:
  lalora-curv demo --out runs/demo --data_dir ../shared/data   # start here
  lalora-curv sweep --grid sweeps/front.yaml --out runs/front
  lalora-curv fit --model ./llama --data_dir ../shared/data \\
      --sources winogrande,arc_challenge --out runs/fit
  lalora-curv inspect --precision runs/fit --out runs/inspect
  lalora-curv train --model ./llama --adapter runs/fit --precision runs/fit --lam 1000 \\
      --data_dir ../shared/data --out runs/train
  lalora-curv eval --model ./llama --adapter runs/train --data_dir ../shared/data \\
      --output runs/train/eval.json
  lalora-curv fit --config fit.yaml          # every option from a YAML file
  lalora-curv fit --model ./llama --print_config > fit.yaml

Each command writes a run directory (--out) with config.yaml, its metrics, artifacts and plots.
"""


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the examples' line breaks kept."""


def command_parser(name: str) -> ArgumentParser:
    """The parser of one sub-command, from its function's signature and docstring."""
    fn, _, examples = COMMANDS[name]
    parser = ArgumentParser(
        prog=f"lalora-curv {name}",
        description=(fn.__doc__ or "").strip().split("\n")[0],
        epilog=examples,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of options")
    flags = [n for n, t in get_type_hints(fn).items() if t is bool and n != "return"]
    parser.add_function_arguments(fn, skip=set(flags), as_group=False)
    docs = {p.arg_name: p.description for p in docstring_parser.parse(fn.__doc__ or "").params}
    defaults = {n: p.default for n, p in signature(fn).parameters.items()}
    for flag in flags:  # --flag, --flag true|false, --no_flag
        parser.add_argument(
            f"--{flag}",
            action=ActionYesNo,
            nargs="?",
            default=defaults[flag],
            help=f"{docs.get(flag, '')} (--no_{flag}: off)",
        )
    return parser


def build_parser() -> ArgumentParser:
    """The ``lalora-curv`` parser, one sub-command per entry of :data:`COMMANDS`."""
    parser = ArgumentParser(
        prog="lalora-curv",
        description="Laplace curvature penalties for LoRA (LALoRA).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subcommands(dest="command")
    for name, (_, summary, _) in COMMANDS.items():
        sub.add_subcommand(name, command_parser(name), help=summary)
    return parser


_OPTION = re.compile(r"--[A-Za-z][\w-]*")


def normalise_argv(argv: list[str]) -> list[str]:
    """``--data-dir x`` -> ``--data_dir x`` (option names only; values are left alone)."""
    out = []
    for token in argv:
        name, eq, value = token.partition("=")
        if _OPTION.fullmatch(name):
            token = "--" + name[2:].replace("-", "_") + eq + value
        out.append(token)
    return out


def run_command(argv: list[str]) -> Any:
    """Parse ``argv`` (without the program name) and run the sub-command."""
    parser = build_parser()
    cfg = parser.parse_args(normalise_argv(argv))
    name = cfg.command
    kwargs = {k: v for k, v in vars(cfg[name]).items() if k not in ("config", "__path__")}
    return COMMANDS[name][0](**kwargs)


__all__ = ["COMMANDS", "build_parser", "command_parser", "normalise_argv", "run_command"]
