"""Measure learning and forgetting on the embedded benchmark.

``source_accuracy``: multiple-choice accuracy on each source sub-domain (every entity's fact).
``target_accuracy``: exact match of the greedy first token after ``"answer :"``.
``finetune``: LoRA on the target problems (optionally with a precision's penalty) via
:func:`lalora_curv.train`, with both measured before and after.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lalora_curv as lc
from lalora_curv.strength import Strength, as_strength, mean_curvature
from lalora_curv.tasks.formatting import make_batches
from lalora_curv.tasks.scoring import score_multiple_choice
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
    sub-domain, pooled. ``source="self-generated"``: unconditional samples of the base model
    (:func:`lalora_curv.self_generated_batches`, up to 32 tokens) until at least ``tokens``
    supervised tokens (default: as many as the facts hold), no source data used.
    """
    mc = mc_samples if estimator == "mc" else 1
    fit = dict(structure=structure, estimator=estimator, mc_samples=mc, progress=False, seed=seed)
    if source == "facts":
        precisions = [
            lc.fit_precision(model, source_batches(world, tok, s), sources=[s], **fit)
            for s in SOURCES
        ]
        return sum(precisions[1:], precisions[0])
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


def finetune(
    model: nn.Module,
    tok,
    world: World,
    *,
    precision: str | lc.Precision | None = None,
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
    """LoRA on the target, optionally with a Laplace penalty ``lam * penalty``.

    ``precision`` is a structure name (fitted here at the adapter's init with
    :func:`source_precision` on ``source``) or ``None`` for plain LoRA. With
    ``strength`` a number (``lambda``) or a :class:`~lalora_curv.strength.Strength`.
    """
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets))
    )
    test = world.problems("test", test_problems)
    before = {
        "source": source_accuracy(peft_model, tok, world),
        "target": target_accuracy(peft_model, tok, test),
    }
    prec = None
    if precision is not None:
        prec = source_precision(
            peft_model,
            tok,
            world,
            source=source,
            structure=precision,
            estimator=estimator,
            mc_samples=mc_samples,
            seed=seed,
        )
    strength = as_strength(strength)
    weight = strength.initial_lam(prec)
    train = make_batches(world.problems("train", train_problems), tok, batch_size=16, max_length=64)
    lc.train(
        peft_model, train, prec, strength, lr=lr, max_steps=steps, seed=seed, progress=progress
    )
    after = {
        "source": source_accuracy(peft_model, tok, world),
        "target": target_accuracy(peft_model, tok, test),
    }
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    return {
        "before": before,
        "after": after,
        "source_drop": mean(before["source"]) - mean(after["source"]),
        "target_gain": after["target"] - before["target"],
        "lam_applied": weight,
        "mean_curvature": mean_curvature(prec) if prec is not None else None,
        "source_tokens": prec.counts["supervised_tokens"] if prec is not None else 0,
    }
