"""Measure learning and forgetting on the embedded benchmark.

``source_accuracy``: multiple-choice accuracy on each source sub-domain (every entity's fact).
``target_accuracy``: exact match of the greedy first token after ``"answer :"``.
``WorldScenario``: the world as a scenario of :func:`lalora_curv.testbed.finetune.finetune`;
``finetune``: LoRA on the target problems (optionally with a precision's penalty), with both
measured before and after.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

import lalora_curv as lc
from lalora_curv.strength import Strength
from lalora_curv.tasks.formatting import make_batches
from lalora_curv.tasks.scoring import score_multiple_choice
from lalora_curv.testbed.finetune import Penalty
from lalora_curv.testbed.finetune import finetune as run_finetune
from lalora_curv.testbed.world import SOURCES, World

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def source_accuracy(model: nn.Module, tok, world: World) -> dict[str, float]:
    """The 4-way multiple-choice accuracy (``acc``) on each source sub-domain's facts."""
    return {
        s: score_multiple_choice(model, tok, world.source_items(s), batch_size=64)["acc"]
        for s in SOURCES
    }


@torch.no_grad()
def target_accuracy(model: nn.Module, tok, problems: list[tuple[str, str]]) -> float:
    """Exact match on ``(question, answer)`` problems: the greedy next token is the answer."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(problems), 64):
        chunk = problems[start : start + 64]
        enc = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in chunk]
        width = max(len(x) for x in enc)
        ids = torch.full((len(enc), width), tok.pad_token_id)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, x in enumerate(enc):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1
        guess = logits[torch.arange(len(enc)), last].argmax(-1)
        gold = torch.tensor([tok.convert_tokens_to_ids(a.strip()) for _, a in chunk])
        correct += int((guess == gold).sum())
    model.train(was_training)
    return correct / len(problems)


def source_batches(world: World, tok, source: str, batch_size: int = 16) -> list[dict]:
    """Supervised batches of a source sub-domain's facts (context -100, answer supervised)."""
    examples = [(c, " " + a) for c, a in (world.fact(source, e) for e in world.entities)]
    return make_batches(examples, tok, batch_size=batch_size, max_length=64)


def source_precision(
    model: nn.Module,
    tok,
    world: World,
    *,
    source: str = "facts",
    structure: str = "kfac",
    estimator: str = "mc",
    mc_samples: int = 8,
    tokens: int | None = None,
    seed: int = 0,
) -> lc.Precision:
    """The precision the penalty uses, fitted at the adapter's init on one of two sources.

    ``source="facts"``: each source sub-domain's facts (answers supervised), one precision per
    sub-domain, pooled (:func:`lalora_curv.fit_pooled_precision`).
    ``source="self-generated"``: unconditional samples of the base model
    (:func:`lalora_curv.self_generated_batches`, up to 32 tokens) until at least ``tokens``
    supervised tokens (default: as many as the facts hold), no source data used.
    """
    mc = mc_samples if estimator == "mc" else 1
    fit = dict(structure=structure, estimator=estimator, mc_samples=mc, progress=False, seed=seed)
    if source == "facts":
        per_source = {s: source_batches(world, tok, s) for s in SOURCES}
        return lc.fit_pooled_precision(model, per_source, **fit)
    if source != "self-generated":
        raise ValueError(f"source must be 'facts' or 'self-generated', got {source!r}")
    if tokens is None:
        tokens = sum(
            int((b["labels"] != -100).sum()) for s in SOURCES for b in source_batches(world, tok, s)
        )
    num = 8
    while True:  # the fewest sequences (doubling) that reach the token count
        batches = lc.self_generated_batches(model, tok, num, 32, seed=seed, progress=False)
        if batches.provenance["supervised_tokens"] >= tokens:
            break
        num *= 2
    return lc.fit_precision(model, batches.first_tokens(tokens), **fit)


class WorldScenario:
    """The embedded world as a :class:`~lalora_curv.testbed.finetune.Scenario`.

    Measured by each source sub-domain's fact accuracy and the target's exact match on
    ``test_problems`` test problems; trained on ``train_problems`` target problems in batches
    of 16 (shuffled by the run's seed with ``shuffle``); the curvature fitted on the facts or
    on self-generated text (:func:`source_precision`).
    """

    def __init__(
        self, world: World, tok, train_problems: int, test_problems: int, shuffle: bool
    ) -> None:
        self.world, self.tok, self.train_problems = world, tok, train_problems
        self.test = world.problems("test", test_problems)
        self.shuffle = shuffle

    def measure(self, model: nn.Module) -> dict[str, Any]:
        """``{"source": {sub-domain: acc}, "target": exact match}``."""
        return {
            "source": source_accuracy(model, self.tok, self.world),
            "target": target_accuracy(model, self.tok, self.test),
        }

    def train_batches(self, steps: int, seed: int) -> list[dict]:
        """The target problems in batches of 16 (their order seeded with ``shuffle``)."""
        problems = self.world.problems("train", self.train_problems)
        if self.shuffle:
            random.Random(seed).shuffle(problems)  # the seed varies the data order too
        return make_batches(problems, self.tok, batch_size=16, max_length=64)

    def source_precision(self, model: nn.Module, penalty: Penalty, seed: int) -> lc.Precision:
        """:func:`source_precision` on ``penalty.source`` (``"facts"``, ``"self-generated"``)."""
        return source_precision(
            model,
            self.tok,
            self.world,
            source=penalty.source,
            structure=penalty.structure,
            estimator=penalty.estimator,
            mc_samples=penalty.mc_samples,
            seed=seed,
        )


def finetune(
    model: nn.Module,
    tok,
    world: World,
    *,
    precision: str | None = None,
    strength: float | Strength = 0.0,
    source: str = "facts",
    estimator: str = "mc",
    mc_samples: int = 8,
    steps: int = 300,
    lr: float = 2e-3,
    rank: int = 8,
    targets: tuple[str, ...] = ALL_LINEAR,
    train_problems: int = 2000,
    test_problems: int = 300,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """LoRA on the world's target, optionally with a Laplace penalty ``lam * penalty``.

    :func:`lalora_curv.testbed.finetune.finetune` on :class:`WorldScenario`, summarised:
    ``precision`` is a structure name (fitted here at the adapter's init with
    :func:`source_precision` on ``source``) or ``None`` for plain LoRA; ``strength`` a number
    (``lambda``) or a :class:`~lalora_curv.strength.Strength`.
    """
    run = run_finetune(
        model,
        WorldScenario(world, tok, train_problems, test_problems, shuffle=False),
        penalty=None
        if precision is None
        else Penalty(
            precision, strength, source=source, estimator=estimator, mc_samples=mc_samples
        ),
        lr=lr,
        steps=steps,
        rank=rank,
        targets=targets,
        seed=seed,
        progress=progress,
    )
    before, after = run.before, run.after
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    return {
        "before": before,
        "after": after,
        "source_drop": mean(before["source"]) - mean(after["source"]),
        "target_gain": after["target"] - before["target"],
        "lam_applied": run.lam,
        "mean_curvature": run.mean_curvature,
        "source_tokens": run.source_tokens,
    }
