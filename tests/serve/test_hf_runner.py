"""The generic runner (the model's own transformers modules over the paged cache): greedy output
through the Engine equals HF `generate` (+ PEFT LoRA served from disk) for each architecture,
in batches that mix prefill chunks, decodes, adapters and the base model."""
from __future__ import annotations

import copy

import pytest
import torch
from _engine_utils import hf_greedy
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterkit.serve import runner as runner_mod
from adapterkit.serve.engine import Engine
from adapterkit.serve.hf_runner import HFModelRunner
from adapterkit.serve.types import EngineConfig, SamplingParams

peft = pytest.importorskip("peft")
tf = pytest.importorskip("transformers")

D = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         vocab_size=128, max_position_embeddings=256)
SW = 4  # sliding window: the prompts below (up to 12 tokens + 6 new) run well past it


def _build(arch: str):
    """(model, two PEFT target lists, extra LoraConfig fields) for a tiny random `arch`."""
    qkvo, mlp = ["q_proj", "v_proj"], ["o_proj", "down_proj"]
    if arch == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**D))
    elif arch == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(**D, sliding_window=SW))
    elif arch == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**D))
        with torch.no_grad():  # random q/k/v biases so the bias path is exercised
            for layer in m.model.layers:
                for n in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, n).bias.normal_(0, 0.5)
    elif arch == "qwen3":  # layer 1 slides, layer 0 does not
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(**D, head_dim=16, use_sliding_window=True, sliding_window=SW,
                                               max_window_layers=1))
    elif arch == "gemma2":  # alternating local/global layers, attention and final soft-capping
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(**D, head_dim=16, sliding_window=SW, attn_logit_softcapping=0.5,
                                                 final_logit_softcapping=3.0, query_pre_attn_scalar=8))
    elif arch == "gemma3":
        m = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**D, head_dim=16, sliding_window=SW, query_pre_attn_scalar=8,
                                                     layer_types=["sliding_attention", "full_attention"]))
    elif arch == "phi3":
        m = tf.Phi3ForCausalLM(tf.Phi3Config(**D, pad_token_id=0, bos_token_id=1, eos_token_id=2))
        qkvo, mlp = ["qkv_proj"], ["o_proj", "gate_up_proj", "down_proj"]
    elif arch == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256))
        qkvo, mlp = ["c_attn"], ["c_proj", "c_fc"]  # fused q/k/v; c_proj is in attn and in mlp
    elif arch == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=128, max_position_embeddings=256, word_embed_proj_dim=64))
        qkvo, mlp = ["q_proj", "v_proj"], ["out_proj", "fc1", "fc2"]
    else:
        raise ValueError(arch)
    m.eval()
    m.generation_config.eos_token_id = None
    return m, qkvo, mlp


def _with_random_weights(m, arch: str):
    with torch.no_grad():  # random init is tiny for some archs: make every layer matter
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
        if arch.startswith("gemma"):  # Gemma scales embeddings by sqrt(hidden): else they drown the layers
            m.get_input_embeddings().weight.mul_(m.config.hidden_size ** -0.5)
    return m


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "opt"]


@pytest.fixture(autouse=True)
def generic_only(monkeypatch):
    """Every engine here runs the generic runner, also for the archs with a fused fast path."""
    monkeypatch.setattr(runner_mod, "FUSED_FAST_PATH", False)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_hf_generate_and_peft(arch, tmp_path):
    torch.manual_seed(0)
    base, t1, t2 = _build(arch)
    _with_random_weights(base, arch)
    pristine = copy.deepcopy(base)
    fan = arch == "gpt2"  # GPT-2's Conv1D stores weights transposed
    for name, (r, targets) in {"p1": (4, t1), "p2": (8, t2)}.items():
        pm = peft.get_peft_model(copy.deepcopy(pristine), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, fan_in_fan_out=fan))
        pm.save_pretrained(tmp_path / name)
    # a small token budget so steps mix decodes with prefill chunks (chunked prefill)
    eng = Engine(base, config=EngineConfig(max_loras=2, block_size=4, num_pages=64, max_num_batched_tokens=8),
                 start=False)
    assert isinstance(eng.runner, HFModelRunner)
    for name in ("p1", "p2"):
        eng.register_adapter(name, str(tmp_path / name))
    # varied tokens, well past the sliding window (identical keys would hide window and soft-cap bugs)
    prompts = [[1, 5, 9, 2, 7, 12, 30, 4], [3, 17, 45, 3, 99, 8, 21, 60, 2, 5, 77], [8, 6, 4],
               [2, 9, 4, 4, 1, 7, 3, 8, 6, 4, 11, 13]]
    names = ["p1", None, "p2", "p1"]
    outs = eng.generate_sync(prompts, names, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for p, n, o in zip(prompts, names, outs):
        ref = copy.deepcopy(pristine)
        if n is not None:
            ref = peft.PeftModel.from_pretrained(ref, tmp_path / n).eval()
        assert o.token_ids == hf_greedy(ref, p, 6), (arch, n, p)


def attached_lora_model(init: str):
    """A tiny Llama with an active adapterkit LoRA "mine" (q, v, down) of init `init` attached in
    Python, its weights moved away from their initialisation (as if trained)."""
    import adapterkit as ak
    from adapterkit.methods.lora import LoRAConfig

    torch.manual_seed(1)
    m, _, _ = _build("llama")
    _with_random_weights(m, "llama")
    ak.add_adapter(m, "mine", LoRAConfig(r=4, alpha=8, init=init, targets=("q_proj", "v_proj", "down_proj")))
    ak.set_adapter(m, "mine")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".mine." in n:
                p.add_(torch.randn_like(p) * 0.2)
    return m


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_adapter_attached_in_python_serves_as_it_computes(init, monkeypatch):
    """An adapterkit LoRA attached before Engine(...) runs inside the model's forward: PiSSA/OLoRA's
    rewritten (residual) base and the adapter on top together give HF generate's tokens."""
    import adapterkit as ak

    m = attached_lora_model(init)
    prompts = [[1, 5, 9, 2, 7, 12, 30, 4], [3, 17, 45, 3, 99, 8, 21]]
    want = [hf_greedy(m, p, 6) for p in prompts]
    with ak.disable_adapters(m):
        without = [hf_greedy(m, p, 6) for p in prompts]
    assert want != without  # the adapter changes the output: the test can tell them apart
    # even with the fast path allowed, an attached adapter takes the generic runner
    monkeypatch.setattr(runner_mod, "FUSED_FAST_PATH", True)
    eng = Engine(m, config=EngineConfig(block_size=4, num_pages=32, max_num_batched_tokens=8), start=False)
    assert isinstance(eng.runner, HFModelRunner)
    outs = eng.generate_sync(prompts, None, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


# ----------------------------------------------------------------------------- the fused fast path
def _steps(bs: int, slots_of: list[int]):
    """Two steps over three sequences (prompts 5, 9, 3; pages of seq i: 4i..4i+3): step 1 prefills
    all of seq 0 and 2 and a chunk of seq 1; step 2 decodes seqs 0 and 2 and finishes seq 1's prompt."""
    from adapterkit.serve.runner import StepInput

    def rows(i, a, b):
        return [(4 * i + p // bs) * bs + p % bs for p in range(a, b)]

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 128, (n + 1,), generator=g).tolist() for n in (5, 9, 3)]
    steps = []
    for parts in ([(0, 0, 5), (2, 0, 3), (1, 0, 6)], [(0, 5, 6), (2, 3, 4), (1, 6, 9)]):  # (seq, start, end)
        tok, pos, rw, ql, cl, sl, sample = [], [], [], [], [], [], []
        for i, a, b in parts:
            tok += ids[i][a:b]
            pos += range(a, b)
            rw += rows(i, a, b)
            ql.append(b - a)
            cl.append(b)
            sl += [slots_of[i]] * (b - a)
            sample.append(len(tok) - 1)
        pages = torch.tensor([[4 * i + j for j in range(4)] for i, _, _ in parts])
        steps.append(StepInput(torch.tensor(tok), torch.tensor(pos), torch.tensor(rw), torch.tensor(ql), pages,
                               torch.tensor(cl), torch.tensor(sl), torch.tensor(sample)))
    return steps


@pytest.mark.parametrize("prepack", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_runner_equals_generic_runner(arch, prepack):
    from _engine_utils import make_lora

    from adapterkit.serve.adapters import AdapterStore, LoraSlots
    from adapterkit.serve.pool import UnifiedPool
    from adapterkit.serve.runner import ModelRunner

    torch.manual_seed(2)
    m, _, _ = _build(arch)
    _with_random_weights(m, arch)
    fused, generic = ModelRunner(m, prepack=prepack), HFModelRunner(m)  # prepack: oneDNN's weight layout
    assert fused.module_shapes() == generic.module_shapes()
    store = AdapterStore(fused.module_shapes(), 2, 8)
    slots = LoraSlots(2, fused.module_shapes(), torch.float32, "cpu")
    for s, (r, targets) in enumerate([(4, ("q_proj", "k_proj", "up_proj")), (8, ("v_proj", "o_proj", "down_proj"))]):
        ad = store.register(f"a{s}", make_lora(m, r, targets, seed=s))
        slots.set(s, ad, store.weights(f"a{s}"))
    pools = [UnifiedPool(2, 2, 16, 4, 12) for _ in range(2)]
    for step in _steps(4, [0, -1, 1]):
        a, b = fused.forward(step, pools[0], slots), generic.forward(step, pools[1], slots)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pools[0].kv, pools[1].kv, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- paged attention
@st.composite
def _attn_case(draw):
    B = draw(st.integers(1, 4))
    q_lens = sorted((draw(st.integers(1, 5)) for _ in range(B)), key=lambda q: q != 1)  # decodes first
    ctx = [q + draw(st.integers(0, 7)) for q in q_lens]
    bs = draw(st.sampled_from([1, 2, 4]))
    kvh = draw(st.sampled_from([1, 2, 4]))
    window = draw(st.one_of(st.none(), st.integers(1, 6)))
    softcap = draw(st.one_of(st.none(), st.floats(0.5, 5.0)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))  # bf16 computes in fp32 on CPU
    return q_lens, ctx, bs, kvh, window, softcap, dtype, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(_attn_case())
def test_paged_attention_matches_reference(case):
    from adapterkit.serve.attention import build_meta, paged_attention, paged_attention_ref

    q_lens, ctx, bs, kvh, window, softcap, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    H, hd = 4, 8
    P = max(-(-c // bs) for c in ctx)
    perm = torch.randperm(len(ctx) * P + 2, generator=g).tolist()  # scattered pages, two never used
    tables = [perm[i * P:(i + 1) * P] for i in range(len(ctx))]
    rows = [tables[i][p // bs] * bs + p % bs for i, (q, c) in enumerate(zip(q_lens, ctx)) for p in range(c - q, c)]
    T = sum(q_lens)
    q, k, v = (torch.randn(T, n, hd, generator=g).to(dtype) for n in (H, kvh, kvh))
    cache = torch.randn(2, (len(ctx) * P + 2) * bs, kvh, hd, generator=g).to(dtype)  # old context: random
    c1, c2 = cache.clone(), cache.clone()
    meta = build_meta(torch.tensor(q_lens), torch.tensor(ctx), torch.tensor(tables), torch.tensor(rows), bs)
    got = paged_attention(q, k, v, c1[0], c1[1], meta, scaling=0.3, sliding_window=window, softcap=softcap)
    want = paged_attention_ref(q, k, v, c2[0], c2[1], q_lens, ctx, tables, rows, bs, scaling=0.3,
                               sliding_window=window, softcap=softcap)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the fp32 result
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert torch.equal(c1, c2)


def test_fused_runner_in_bf16_matches_generic_runner_in_bf16():
    """An fp32 model served in bf16: the fused runner's own converted weights are prepacked for
    oneDNN (ops.linear); logits still match the generic runner's (the model's modules in bf16)."""
    from adapterkit.serve.pool import UnifiedPool
    from adapterkit.serve.runner import ModelRunner

    torch.manual_seed(4)
    m, _, _ = _build("llama")
    _with_random_weights(m, "llama")
    fused = ModelRunner(m, dtype=torch.bfloat16)
    assert fused.layers[0].w_qkv.is_mkldnn and fused.lm_head.is_mkldnn
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the model is untouched
    generic = HFModelRunner(copy.deepcopy(m), dtype=torch.bfloat16)
    pools = [UnifiedPool(2, 2, 16, 4, 12, torch.bfloat16) for _ in range(2)]
    for step in _steps(4, [-1, -1, -1]):
        a, b = fused.forward(step, pools[0]), generic.forward(step, pools[1])
        torch.testing.assert_close(a, b, atol=0.15, rtol=0.05)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
