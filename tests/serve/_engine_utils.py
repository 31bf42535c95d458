"""Helpers for the engine tests: random LoRA adapters and the HF reference generation."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

MODS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def make_lora(model, r: int, targets, seed: int, alpha: float | None = None, std: float = 0.3) -> SimpleNamespace:
    """An in-memory adapter (method/config/tensors, native key names) with random A and B."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        for m in targets:
            lin = getattr(getattr(layer, MODS[m]), m)
            tensors[f"model.layers.{i}.{MODS[m]}.{m}.lora_A"] = torch.randn(r, lin.in_features, generator=g) * std
            tensors[f"model.layers.{i}.{MODS[m]}.{m}.lora_B"] = torch.randn(lin.out_features, r, generator=g) * std
    cfg = {"r": r, "alpha": float(alpha if alpha is not None else 2 * r), "targets": list(targets)}
    return SimpleNamespace(method="lora", config=cfg, tensors=tensors)


def merged_copy(model, adapter: SimpleNamespace | None):
    """A deep copy of the HF model with W += scale * B @ A folded in (the reference math)."""
    m = copy.deepcopy(model)
    if adapter is None:
        return m
    scale = adapter.config["alpha"] / adapter.config["r"]
    mods = dict(m.named_modules())
    with torch.no_grad():
        for k, A in adapter.tensors.items():
            if k.endswith("lora_A"):
                path = k[: -len(".lora_A")]
                B = adapter.tensors[path + ".lora_B"]
                mods[path].weight += scale * (B @ A)
    return m


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """HF transformers `generate`, greedy, no EOS stop."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()
