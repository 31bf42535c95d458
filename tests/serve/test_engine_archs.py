"""The engine (fused fast path for Llama/Mistral/Qwen2) matches HF per architecture (Qwen2 has q/k/v biases);
which runner `make_runner` picks; what cannot be served is refused by name."""
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


def test_encoder_decoder_is_refused_naming_the_architecture():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64))
    with pytest.raises(UnsupportedModuleError, match="T5ForConditionalGeneration"):
        Engine(t5, start=False)


def test_make_runner_takes_the_fused_path_only_where_it_is_exact():
    from transformers import GPT2Config, GPT2LMHeadModel

    import adapterkit as ak
    from adapterkit.methods.lora import LoRAConfig
    from adapterkit.serve.hf_runner import HFModelRunner
    from adapterkit.serve.runner import ModelRunner, make_runner

    assert type(make_runner(_model("llama"))) is ModelRunner
    assert type(make_runner(_model("qwen2"))) is ModelRunner
    mistral = _model("mistral")
    mistral.config.sliding_window = 64
    assert type(make_runner(mistral, max_model_len=64)) is ModelRunner  # the window is never reached
    assert type(make_runner(mistral, max_model_len=65)) is HFModelRunner
    assert type(make_runner(mistral)) is HFModelRunner  # unknown length: the window may be reached
    attached = _model("llama")
    ak.add_adapter(attached, "x", LoRAConfig(r=2, targets=("q_proj",)))
    assert type(make_runner(attached)) is HFModelRunner  # the fused copies would ignore it
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert type(make_runner(gpt2)) is HFModelRunner


def test_fused_runner_shares_the_base_weights_instead_of_copying_them():
    """Same dtype and device: q/k/v and gate/up become views of the runner's stacked weights (one
    copy of the base), and the model computes exactly what it did."""
    from adapterkit.serve.runner import ModelRunner

    m = _model("qwen2")
    x = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        before = m(x).logits
    r = ModelRunner(m)
    for layer, lw in zip(m.model.layers, r.layers):
        at, mlp = layer.self_attn, layer.mlp
        for w in (at.q_proj.weight, at.k_proj.weight, at.v_proj.weight):
            assert w.untyped_storage().data_ptr() == lw.w_qkv.untyped_storage().data_ptr()
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            assert w.untyped_storage().data_ptr() == lw.w_gu.untyped_storage().data_ptr()
        torch.testing.assert_close(lw.w_qkv[at.q_proj.out_features:][:at.k_proj.out_features], at.k_proj.weight,
                                   rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(m(x).logits, before)
    # another dtype: the runner's copy is its own, the model's weights are untouched
    m2 = _model("llama")
    w0 = m2.model.layers[0].self_attn.q_proj.weight
    ptr = w0.data_ptr()
    r2 = ModelRunner(m2, dtype=torch.bfloat16)
    assert w0.data_ptr() == ptr and w0.dtype == torch.float32
    assert r2.layers[0].w_qkv.dtype == torch.bfloat16
