"""Tiny Llama + peft LoRA models and synthetic batches, built offline from configs.

Used by the quick-start run, the tests and the benchmarks; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    vocab_size: int = 64,
    hidden_size: int = 32,
    intermediate_size: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> LlamaForCausalLM:
    """A randomly initialised Llama (eager attention by default, no dropout) on the CPU.

    (Eager attention takes its softmax in float32 whatever the model's dtype; ``"sdpa"`` keeps
    a float64 model in float64 throughout.)
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        attn_implementation=attn_implementation,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def add_lora(
    model: nn.Module,
    r: int = 4,
    alpha: float = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    dropout: float = 0.0,
    init_B_std: float = 0.0,
    seed: int = 0,
    adapter_name: str = "default",
) -> nn.Module:
    """Wrap ``model`` with a peft LoRA adapter; ``init_B_std > 0`` draws a non-zero ``B0``."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if init_B_std > 0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if f"lora_B.{adapter_name}." in name:
                    p.normal_(0.0, init_B_std)
    return peft_model


def random_batches(
    num_batches: int,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    seed: int = 0,
    pad_fraction: float = 0.25,
    prompt_fraction: float = 0.25,
    token_offset: int = 0,
) -> list[dict[str, Tensor]]:
    """Right-padded random batches of tokens in ``[token_offset, token_offset + vocab_size)``.

    The first ``prompt_fraction`` of each row has label -100.
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g) + token_offset
        lengths = seq_len - (torch.rand(batch_size, generator=g) * pad_fraction * seq_len).long()
        pos = torch.arange(seq_len)
        mask = (pos[None, :] < lengths[:, None]).long()
        labels = ids.clone()
        labels[mask == 0] = -100
        labels[:, : max(1, int(prompt_fraction * seq_len))] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
