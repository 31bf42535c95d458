"""Shared fixtures: tiny random-weight models built from configs (no downloads)."""
from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, **kw)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128)).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, vocab_size=128)).eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8,
                                               num_labels=5)).eval()


def randomize_adapters(model: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every adapter parameter random values (LoRA B starts at zero: identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapterkit." in f".{n}":
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if any(k in n for k in ("magnitude", "ia3", "ssf_scale")) else 0.0))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(0, 128, (4, 9))
