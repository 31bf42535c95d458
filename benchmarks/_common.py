"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""
from __future__ import annotations

import torch


def smol_llama(layers: int = 30, seq: int = 2048):
    """A random-weight LlamaForCausalLM with SmolLM2-135M's shapes (seeded, sdpa attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=max(seq, 2048),
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)
