"""Sequential tasks on the embedded benchmark: source facts -> task 1 -> task 2.

One LoRA adapter is trained on task 1 (the word problems, :meth:`World.problems`), then,
continuing from there, on task 2 (how many stones each entity holds, :meth:`World.holdings`,
whose template shares words with task 1). Measured after every ``eval_every`` steps of both
stages: source accuracy (the pretrained facts), task-1 exact match on its test problems and
task-2 exact match. Methods:

* ``"lora"``: plain LoRA in both stages;
* ``"lalora"``: the source precision ``P_S`` fitted at the adapter's init, mode ``theta_0``,
  in both stages (the paper's method applied as is: stage 2 pulls back towards ``theta_0``
  and protects nothing of task 1);
* ``"online"``: ``P_S`` in stage 1; then a precision ``F_1`` fitted on task-1 data at
  ``theta_1`` and :func:`lalora_curv.online_laplace` ``P_1 = gamma P_S|theta_1 + F_1``
  (pooled by tokens) around ``theta_1`` in stage 2.

Each stage's strength is relative: ``lam = c / mean_curvature(P)`` of the precision in use.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lalora_curv as lc
from lalora_curv.strength import mean_curvature
from lalora_curv.tasks.formatting import make_batches
from lalora_curv.testbed.experiment import (
    ALL_LINEAR,
    source_accuracy,
    source_precision,
    target_accuracy,
)
from lalora_curv.testbed.world import World

METHODS = ("lora", "lalora", "online")


def run_sequential(
    model: nn.Module,
    tok,
    world: World,
    *,
    method: str = "online",
    c: float = 0.01,
    decay: float = 1.0,
    structure: str = "kfac",
    mc_samples: int = 8,
    steps: int | tuple[int, int] = (1000, 300),
    lr: float = 2e-3,
    rank: int = 8,
    targets: tuple[str, ...] = ALL_LINEAR,
    train_problems: int = 2000,
    test_problems: int = 300,
    task_problems: int = 144,
    eval_every: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``method`` on task 1 then task 2 and return its curve.

    Args:
        model: the pretrained benchmark's model (:func:`lalora_curv.testbed.pretrained`).
        tok: its tokenizer.
        world: its world.
        method: ``"lora"``, ``"lalora"`` or ``"online"`` (module docstring).
        c: relative penalty strength of both stages.
        decay: ``gamma`` of the online update.
        structure: the precisions' structure (MC Fisher with ``mc_samples`` draws).
        mc_samples: label draws of the MC Fisher.
        steps: optimizer steps of task 1 and of task 2 (one int: both); task 2's facts are
            learnt within ~200 steps at lr 2e-3, task 1 needs ~1000.
        lr: AdamW learning rate of both stages.
        rank: LoRA rank (``lora_alpha = rank``).
        targets: the linear layers to adapt.
        train_problems: task-1 training problems (task 2 trains on as many, its facts
            repeated).
        test_problems: task-1 test problems.
        task_problems: task-1 training problems the online update's ``F_1`` is fitted on
            (default: as many as the source precision's facts, 3 x 48).
        eval_every: steps between evaluations, in both stages.
        seed: LoRA init, data order and MC draws.
        progress: training progress bars.

    Returns:
        ``{"method", "seed", "lam": [stage 1, stage 2], "curve": [{"stage", "step",
        "source", "source_mean", "task1", "task2"}, ...]}``, step counted over both stages.
    """
    stage_steps = (steps, steps) if isinstance(steps, int) else tuple(steps)
    if len(stage_steps) != 2 or min(stage_steps) < 1:
        raise lc.LaloraError(f"steps: one or two positive step counts, got {steps!r}")
    if method not in METHODS:
        raise lc.LaloraError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets))
    )
    test1, task2 = world.problems("test", test_problems), world.holdings()

    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        acc = source_accuracy(m, tok, world)
        return {
            **{f"source/{k}": v for k, v in acc.items()},
            "task1": target_accuracy(m, tok, test1),
            "task2": target_accuracy(m, tok, task2),
        }

    problems = world.problems("train", train_problems)
    random.Random(seed).shuffle(problems)
    stage_data = {
        1: make_batches(problems, tok, batch_size=16, max_length=64),
        2: make_batches(_repeat(task2, len(problems), seed), tok, batch_size=16, max_length=64),
    }
    peft_model.eval()
    with torch.no_grad():
        curve = [_point(0, 0, evaluate(peft_model, 0))]
    source = None
    if method != "lora":
        source = source_precision(
            peft_model, tok, world, structure=structure, mc_samples=mc_samples, seed=seed
        )
    lams = []
    for stage in (1, 2):
        prec = source
        if stage == 2 and method == "online":
            fitted = lc.fit_precision(
                peft_model,
                make_batches(problems[:task_problems], tok, batch_size=16, max_length=64),
                structure=structure,
                estimator="mc",
                mc_samples=mc_samples,
                seed=seed,
                sources=["task1"],
                progress=False,
            )
            prec = lc.online_laplace(source, fitted, decay=decay)
        lam = c / mean_curvature(prec) if prec is not None else 0.0
        lams.append(lam)
        log = lc.train(
            peft_model,
            stage_data[stage],
            prec,
            lam,
            lr=lr,
            max_steps=stage_steps[stage - 1],
            seed=seed + 1000 * stage,
            eval_fn=evaluate,
            eval_every=eval_every,
            progress=progress,
        )
        offset = 0 if stage == 1 else stage_steps[0]
        curve += [
            _point(
                stage, offset + int(r["step"]), {k[5:]: v for k, v in r.items() if k[:5] == "eval/"}
            )
            for r in log
            if any(k.startswith("eval/") for k in r)
        ]
    return {"method": method, "seed": seed, "c": c, "decay": decay, "lam": lams, "curve": curve}


def _repeat(items: list, n: int, seed: int) -> list:
    """``n`` items: shuffled passes over ``items`` (each pass its own order)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        chunk = list(items)
        rng.shuffle(chunk)
        out += chunk
    return out[:n]


def _point(stage: int, step: int, metrics: dict[str, float]) -> dict[str, Any]:
    source = {k[7:]: v for k, v in metrics.items() if k.startswith("source/")}
    return {
        "stage": stage,
        "step": step,
        "source": source,
        "source_mean": sum(source.values()) / len(source),
        "task1": metrics["task1"],
        "task2": metrics["task2"],
    }
