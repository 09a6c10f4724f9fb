r"""Source batches without source data: sequences sampled from the model itself.

LALoRA needs batches that represent what the model knows. When the pre-training data is not
available, sample it from the model at the mode the precision is fitted at (the adapter's
init: at the default ``B0 = 0`` the adapter is a no-op, and the function-preserving inits
PiSSA, OLoRA and MiLoRA compute the pretrained model too, although their base weights alone
do not), draw ``y_t ~ p_theta(. | y_<t)`` at temperature ``T`` from BOS (unconditional)
or after a user prompt, and fit on the sampled tokens. At ``T = 1`` with no truncation (no
top-k/top-p) every sampled token is an exact draw from the model's predictive distribution, so
the *empirical* Fisher on these sequences is an unbiased one-sample Monte-Carlo estimate of the
true Fisher under the model's own sequence distribution,

.. math:: F = \mathbb{E}_{y \sim p_\theta}\Big[\sum_t
    \nabla \log p_\theta(y_t \mid y_{<t})\, \nabla \log p_\theta(y_t \mid y_{<t})^\top\Big],

and ``estimator="mc"`` adds label draws on top of that (``tests/fit/test_selfgen.py`` checks the
convergence against an exact enumeration on a tiny vocabulary).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lalora_curv.backends.common import derive_seed
from lalora_curv.errors import LaloraError

logger = logging.getLogger(__name__)


class SelfGeneratedBatches(list):
    """A list of batches (``input_ids``, ``attention_mask``, ``labels``) with its provenance.

    It remembers how it was sampled: :func:`~lalora_curv.fit_precision` records
    :attr:`provenance` in the precision's metadata (``metadata["self_generated"]``).
    """

    provenance: dict[str, Any]

    def first_tokens(self, tokens: int) -> SelfGeneratedBatches:
        """The shortest prefix of whole sequences holding at least ``tokens`` supervised tokens.

        All of them if there are fewer: a source of a given token count.
        """
        kept = SelfGeneratedBatches()
        total = 0
        for batch in self:
            per_row = (batch["labels"] != -100).sum(1).cumsum(0)
            rows = min(int((per_row < tokens - total).sum()) + 1, len(per_row))
            kept.append({k: v[:rows] for k, v in batch.items()})
            total += int(per_row[rows - 1])
            if total >= tokens:
                break
        kept.provenance = {
            **self.provenance,
            "num_sequences": sum(len(b["labels"]) for b in kept),
            "supervised_tokens": total,
        }
        return kept


def self_generated_batches(
    model: nn.Module,
    tokenizer: Any,
    num_sequences: int,
    max_length: int,
    prompts: Sequence[str] | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> SelfGeneratedBatches:
    """Sample ``num_sequences`` sequences from ``model`` as it is (at its adapter's init).

    Each sequence starts with BOS (the tokenizer's ``bos_token_id``, or its EOS token when it
    has no BOS, the GPT-2 convention) or, when ``prompts`` are given, with a prompt (cycled over
    the sequences, tokenized with the tokenizer's special tokens) and continues by ancestral
    sampling at ``temperature`` (no top-k, top-p or repetition penalty) until EOS or
    ``max_length`` tokens in total. Labels are the sampled tokens (EOS included); BOS, prompt
    tokens and padding are -100. Batches are right-padded, the format
    :func:`~lalora_curv.fit_precision` takes.

    Sampling is reproducible: batch ``i`` draws from a generator seeded with
    ``derive_seed(seed, "selfgen", i)``, whatever the global RNG state.

    Args:
        model: a Hugging Face causal LM, with or without a peft adapter, at the weights whose
            predictive distribution the precision should protect (the adapter's init; not
            ``disable_adapter()``, which for PiSSA/OLoRA/MiLoRA would leave a residual model).
        tokenizer: its tokenizer (for BOS/EOS/padding ids and the prompts).
        num_sequences: how many sequences to draw.
        max_length: maximum total length (BOS or prompt included).
        prompts: optional prompts to continue; their tokens are not supervised.
        temperature: softmax temperature (1.0 samples the model's own distribution).
        seed: sampling seed.
        batch_size: sequences per batch (also the generation batch).
        progress: show a progress bar.
    """
    if not isinstance(num_sequences, int) or num_sequences < 1:
        raise LaloraError(f"num_sequences must be a positive integer, got {num_sequences!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LaloraError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not temperature > 0:
        raise LaloraError(f"temperature must be > 0, got {temperature!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LaloraError("the tokenizer has no EOS token: cannot tell where a sample ends")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if prompts is not None:
        if isinstance(prompts, str) or not prompts:
            raise LaloraError("prompts must be a non-empty list of strings")
        starts = [tokenizer(p)["input_ids"] for p in prompts]
        empty = [i for i, s in enumerate(starts) if not s]
        if empty:
            raise LaloraError(
                f"prompt {empty[0]} ({prompts[empty[0]]!r}) has no token: the first sample "
                "would have no context"
            )
    else:
        starts = [[bos]]
    longest = max(len(s) for s in starts)
    if max_length <= longest:
        raise LaloraError(
            f"max_length={max_length} leaves no room to generate after a start of {longest} tokens"
        )
    device = next(model.parameters()).device  # inputs; logits may live elsewhere (sharded)
    batches = SelfGeneratedBatches()
    bar = tqdm(
        total=num_sequences, disable=not progress, desc="sampling source sequences", unit="seq"
    )
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            for index, first in enumerate(range(0, num_sequences, batch_size)):
                count = min(batch_size, num_sequences - first)
                chunk = [starts[(first + i) % len(starts)] for i in range(count)]
                batch_seed = derive_seed(seed, "selfgen", index)
                batches.append(
                    _sample_batch(
                        model, chunk, max_length, temperature, eos, pad, batch_seed, device
                    )
                )
                bar.update(count)
        finally:
            model.train(was_training)
            bar.close()
    batches.provenance = {
        "num_sequences": num_sequences,
        "max_length": max_length,
        "temperature": float(temperature),
        "seed": seed,
        "batch_size": batch_size,
        "prompts": list(prompts) if prompts is not None else None,
        "supervised_tokens": sum(int((b["labels"] != -100).sum()) for b in batches),
    }
    return batches


def _sample_batch(
    model: nn.Module,
    starts: list[list[int]],
    max_length: int,
    temperature: float,
    eos: int,
    pad: int,
    seed: int,
    device: torch.device,
) -> dict[str, Tensor]:
    """Ancestral sampling with the KV cache.

    Starts are left-padded while generating (so every row's next position is the last column)
    and the result is returned right-padded.
    """
    n, width = len(starts), max(len(s) for s in starts)
    ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, s in enumerate(starts):
        ids[i, width - len(s) :] = torch.tensor(s, device=device)
        mask[i, width - len(s) :] = 1
    lengths = torch.tensor([len(s) for s in starts], device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    alive: list[Tensor] = []
    cache_kw = _cache_keyword(model)
    past, step_ids, gen = None, ids, None
    for _ in range(max_length - int(lengths.min())):
        room = lengths + len(generated) < max_length
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **({cache_kw: past} if past is not None else {}),
        )
        past = out.get(cache_kw)
        if past is None:
            raise LaloraError(
                f"{type(model).__name__} returned no KV cache ({cache_kw!r}) with "
                "use_cache=True: cannot sample step by step"
            )
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
        if gen is None:  # on the logits' device (the last shard of a sharded model)
            gen = torch.Generator(device=probs.device).manual_seed(seed)
        if not bool(torch.isfinite(probs).all()):
            raise LaloraError(
                "the model returned non-finite logits while sampling (eager attention in "
                "float64 gives NaN on left-padded prompts: use float32 or prompts of one length)"
            )
        token = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(device)
        keep = ~finished & room
        token = torch.where(keep, token, torch.full_like(token, pad))
        generated.append(token)
        alive.append(keep)
        finished |= keep & (token == eos)
        finished |= ~room
        if bool(finished.all()):
            break
        mask = torch.cat([mask, keep.long().unsqueeze(1)], dim=1)
        step_ids = token.unsqueeze(1)
    new = torch.stack(generated, 1)
    new_mask = torch.stack(alive, 1)
    return _right_padded(starts, new, new_mask, pad)


def _right_padded(
    starts: list[list[int]], new: Tensor, new_mask: Tensor, pad: int
) -> dict[str, Tensor]:
    rows = [
        (s, new[i][new_mask[i]].tolist()) for i, s in enumerate(starts)
    ]  # (unsupervised start, supervised samples)
    width = max(len(s) + len(g) for s, g in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (s, g) in enumerate(rows):
        ids[i, : len(s) + len(g)] = torch.tensor(s + g)
        mask[i, : len(s) + len(g)] = 1
        labels[i, len(s) : len(s) + len(g)] = torch.tensor(g, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _cache_keyword(model: nn.Module) -> str:
    """``"cache"`` (transformers >= 5.2x) or ``"past_key_values"`` (earlier versions)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
