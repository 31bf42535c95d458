"""The engine's own forward matches HF for each supported architecture (Qwen2 has q/k/v biases)."""
from __future__ import annotations

import pytest
import torch
from _engine_utils import hf_greedy, make_lora, merged_copy

from adapterkit.errors import UnsupportedModuleError
from adapterkit.serve.engine import Engine
from adapterkit.serve.types import EngineConfig, SamplingParams

KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=128, max_position_embeddings=256)


def _model(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    m = model_cls(cfg_cls(**KW)).eval()
    if arch == "qwen2":  # random biases so the bias path is exercised
        with torch.no_grad():
            for layer in m.model.layers:
                for n in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, n).bias.normal_(0, 0.5)
    m.generation_config.eos_token_id = None
    return m


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_arch_matches_hf(arch):
    m = _model(arch)
    ad = make_lora(m, 4, ("q_proj", "k_proj", "up_proj"), seed=3)
    eng = Engine(m, config=EngineConfig(block_size=4, num_pages=32), start=False)
    eng.register_adapter("a", ad)
    prompts = [[1, 5, 9, 2, 7], [3, 3, 3]]
    outs = eng.generate_sync(prompts, ["a", None], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert outs[0].token_ids == hf_greedy(merged_copy(m, ad), prompts[0], 5)
    assert outs[1].token_ids == hf_greedy(m, prompts[1], 5)


def test_unsupported_arch_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModuleError, match="GPT2LMHeadModel"):
        Engine(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)), start=False)
