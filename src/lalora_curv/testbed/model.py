"""The embedded benchmark's tokenizer and tiny Llama, pretrained once and cached.

A word-level tokenizer over the world's vocabulary and a 2M-parameter Llama (hidden 192,
4 layers, 4 heads, MLP 512, untied embeddings) pretrained on the world's fact sentences and
counting strings; the result is saved (atomically) under the user's cache directory, keyed by
every setting, so later runs load it in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lalora_curv.atomic import staged_dir
from lalora_curv.testbed.world import World

PRETRAIN = {
    "hidden": 192,
    "layers": 4,
    "heads": 4,
    "mlp": 512,
    "steps": 2000,
    "batch": 64,
    "lr": 2e-3,
    "texts": 60000,
}


def make_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the world's vocabulary, with ``<pad>``, ``<eos>`` and ``<unk>``."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *world.vocabulary])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def cache_dir(kind: str = "testbed") -> Path:
    """The cache folder of ``kind``, ``<root>/<kind>``.

    ``<root>`` is ``$LALORA_CURV_CACHE``, else ``$XDG_CACHE_HOME/lalora-curv``
    (``~/.cache/lalora-curv`` when that is unset).
    """
    root = os.environ.get("LALORA_CURV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lalora-curv"
    )
    return Path(root) / kind


def pretrained(seed: int = 0, settings: dict | None = None, progress: bool = True):
    """``(model, tokenizer, world)``: pretrained on the world of ``seed``, cached on disk."""
    cfg = {**PRETRAIN, **(settings or {}), "seed": seed}
    world = World(seed)
    model, tok = cached("testbed", cfg, lambda: _pretrain(world, cfg, progress))
    return model, tok, world


def cached(kind: str, cfg: dict, build: Callable[[], tuple]) -> tuple:
    """``(model, tokenizer)`` from ``cache_dir(kind)/<hash of cfg>``.

    ``build()`` them first (saved atomically: written to a staging folder, then renamed) if
    they are not there.
    """
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(kind) / key
    if not (path / "config.json").is_file():
        model, tok = build()
        with staged_dir(path, replace=False) as staging:
            model.save_pretrained(staging)
            tok.save_pretrained(staging)
            (staging / f"{kind}.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    model = LlamaForCausalLM.from_pretrained(path)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    return model.eval(), tok


class Pretraining:
    """What both embedded scenarios pretrain with.

    A Llama from ``cfg`` (hidden, mlp, layers, heads; untied embeddings; EOS doubling as BOS)
    drawn after ``torch.manual_seed(cfg["seed"])``, AdamW (weight decay
    ``cfg["weight_decay"]``, default 0.01) with a one-cycle schedule over ``cfg["steps"]`` at
    ``cfg["lr"]``, and steps with gradient clipping at norm 1. The tokenizer ``tok`` sets the
    vocabulary and the special tokens, ``max_positions`` the context length and ``attention``
    the attention implementation.
    """

    def __init__(self, tok, cfg: dict, max_positions: int, attention: str) -> None:
        if cfg["steps"] < 3:  # the one-cycle schedule needs a warm-up and an annealing step
            raise ValueError(f"pretraining needs at least 3 steps, got {cfg['steps']}")
        torch.manual_seed(cfg["seed"])
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=cfg["hidden"],
            intermediate_size=cfg["mlp"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            num_key_value_heads=cfg["heads"],
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            attn_implementation=attention,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.eos_token_id,
        )
        self.model = LlamaForCausalLM(config).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.01)
        )
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            cfg["lr"],
            total_steps=cfg["steps"],
            pct_start=max(0.05, 2 / cfg["steps"]),  # OneCycleLR divides by pct * steps - 1
        )

    def step(self, **batch: torch.Tensor) -> torch.Tensor:
        """One optimizer step on ``batch`` (``input_ids``, ``labels``, ...); returns the loss."""
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def _pretrain(world: World, cfg: dict, progress: bool):
    tok = make_tokenizer(world)
    run = Pretraining(tok, cfg, max_positions=64, attention="eager")
    rng = random.Random(cfg["seed"])
    texts = world.pretraining_texts(rng, cfg["texts"])
    encoded = [tok(t + " <eos>", add_special_tokens=False)["input_ids"] for t in texts]
    for _ in tqdm(
        range(cfg["steps"]),
        disable=not progress,
        desc="pretraining the testbed model (once)",
        unit="step",
    ):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(cfg["batch"])]
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        run.step(input_ids=ids, attention_mask=mask, labels=labels)
    return run.model.eval(), tok
