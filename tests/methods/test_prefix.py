"""Prefix tuning: against a hand-built key/value cache and against PEFT's PrefixEncoder."""
from __future__ import annotations

import pytest
import torch
from _method_checks import assert_decode_step_matches_full_forward, generate_left_padded_batch_and_rows_alone
from conftest import check_peft_generate, tiny_gpt2, tiny_llama
from transformers import DynamicCache

import adapterkit as ak
from adapterkit.errors import AdapterError, ConfigError, NotMergeableError
from adapterkit.formats import read_adapter
from adapterkit.methods import PrefixTuningConfig
from adapterkit.methods.prefix import flatten_prefix, prefix_dims

P = 3
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# (num_layers, num_kv_heads, head_dim) of the tiny models: Llama has GQA (4 heads, 2 kv heads)
DIMS = {"llama": (2, 2, 16), "gpt2": (2, 4, 16)}


def prefixed(kind: str, proj: bool = False, name: str = "a", seed: int = 7, **kw):
    model = MODELS[kind]()
    torch.manual_seed(seed)
    ak.add_adapter(model, name, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=proj, **kw))
    return model


def flat_of(model, name: str = "a") -> torch.Tensor:
    """The flat prefix (P, layers*2*kv_dim), computed here from the parameters (MLP written out)."""
    piece = model.adapterkit[name]
    if not piece.prefix_projection:
        return piece.prompt_embeddings
    t = piece.transform
    return t[2](torch.tanh(t[0](piece.embedding.weight)))


def ref_cache(kind: str, flat: torch.Tensor, batch: int) -> DynamicCache:
    """Layer l: keys = flat[:, 2l*kv:(2l+1)*kv], values = the next kv columns, as (B, H, P, D)."""
    layers, heads, dim = DIMS[kind]
    kv = heads * dim
    out = []
    for layer in range(layers):
        k = flat[:, 2 * layer * kv:(2 * layer + 1) * kv].reshape(P, heads, dim).transpose(0, 1)
        v = flat[:, (2 * layer + 1) * kv:(2 * layer + 2) * kv].reshape(P, heads, dim).transpose(0, 1)
        out.append((k.unsqueeze(0).repeat(batch, 1, 1, 1), v.unsqueeze(0).repeat(batch, 1, 1, 1)))
    return DynamicCache(out)


def ref_logits(kind: str, base, flat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    b, n = ids.shape
    pos = torch.arange(P, P + n).unsqueeze(0)
    return base(ids, past_key_values=ref_cache(kind, flat, b), attention_mask=torch.ones(b, P + n, dtype=torch.long),
                position_ids=pos).logits


def ref_greedy(kind: str, base, flat: torch.Tensor, ids: torch.Tensor, steps: int) -> torch.Tensor:
    seq = ids
    for _ in range(steps):
        nxt = ref_logits(kind, base, flat, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def peft_twin(kind: str, model, proj: bool):
    import peft

    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=proj)
    pm = peft.get_peft_model(MODELS[kind](), cfg)
    piece = model.adapterkit["a"]
    # with projection our parameter names are PEFT's PrefixEncoder's; without, PEFT calls it embedding.weight
    state = piece.state_dict() if proj else {"embedding.weight": piece.prompt_embeddings}
    pm.prompt_encoder["default"].load_state_dict(state)
    return pm.eval()


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(0, 128, (3, 8))


@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_matches_reference_and_peft(kind, proj, ids):
    model, base = prefixed(kind, proj), MODELS[kind]()
    pm = peft_twin(kind, model, proj)
    labels = ids.clone()
    labels[:, :2] = -100
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels)
        want = ref_logits(kind, base, flat_of(model), ids)
        theirs = pm(input_ids=ids, attention_mask=mask, labels=labels)
        plain = base(ids).logits
    assert ours.logits.shape == (3, 8, 128)
    torch.testing.assert_close(ours.logits, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)
    assert (ours.logits - plain).abs().max() > 1e-3
    ak.set_adapter(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("proj", [False, True])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_cache_matches_reference_and_peft(kind, proj, ids):
    model, base = prefixed(kind, proj), MODELS[kind]()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        got = model.generate(ids, **kw)
        want = ref_greedy(kind, base, flat_of(model), ids, 6)
        theirs = peft_twin(kind, model, proj).generate(input_ids=ids, **kw)
        plain = base.generate(ids, **kw)
    assert got.tolist() == want.tolist()
    check_peft_generate(got, theirs)
    assert got.tolist() != plain.tolist()
    ak.set_adapter(model, None)
    with torch.no_grad():
        assert model.generate(ids, **kw).tolist() == plain.tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_left_padded_batch_equals_rows_alone(kind):
    generate_left_padded_batch_and_rows_alone(prefixed(kind))


def test_decode_step_with_returned_cache(ids):
    assert_decode_step_matches_full_forward(prefixed("llama"), ids, cache_len=P + 8)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trainable_counts(kind):
    layers, heads, dim = DIMS[kind]
    assert prefix_dims(MODELS[kind]()) == (layers, heads, dim)
    kv, out = heads * dim, layers * 2 * heads * dim
    assert ak.trainable_parameters(prefixed(kind), "a") == P * out
    enc = 24
    mlp = P * kv + (kv * enc + enc) + (enc * out + out)
    assert ak.trainable_parameters(prefixed(kind, True, encoder_hidden_size=enc), "a") == mlp
    assert ak.trainable_parameters(prefixed(kind, True), "a") == P * kv + (kv * kv + kv) + (kv * out + out)


@pytest.mark.parametrize("proj", [False, True])
def test_gradients_only_on_prefix(proj, ids):
    model = prefixed("llama", proj)
    model(ids, labels=ids).loss.backward()
    own = {f"adapterkit.a.{k}" for k, _ in model.adapterkit["a"].named_parameters()}
    for n, p in model.named_parameters():
        if n in own:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n


@pytest.mark.parametrize("proj", [False, True])
def test_save_load_round_trip_and_peft_tensor(tmp_path, proj, ids):
    model = prefixed("gpt2", proj)
    ak.save_adapter(model, "a", tmp_path / "a")
    saved = read_adapter(tmp_path / "a")
    keys = {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"}
    assert set(saved.tensors) == (keys if proj else {"prompt_embeddings"})
    # what PEFT would save: the encoder's output
    cfg = ak.get_adapter_config(model, "a")
    want = peft_twin("gpt2", model, proj).get_prompt_embedding_to_save("default")
    torch.testing.assert_close(flatten_prefix(cfg, saved.tensors), want, rtol=0, atol=1e-6)
    fresh = tiny_gpt2()
    ak.load_adapter(fresh, tmp_path / "a", name="b")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_refusals(ids):
    model = prefixed("llama")
    with pytest.raises(NotMergeableError):
        ak.merge(model, "a")
    with ak.adapter_batch(model, ["a", None, "a"]), pytest.raises(AdapterError, match="mixed batch"):
        model(ids)
    ak.add_adapter(model, "b", PrefixTuningConfig(num_virtual_tokens=2))
    ak.set_adapter(model, ["a", "b"])
    with pytest.raises(AdapterError, match="only one"):
        model(ids)
    ak.set_adapter(model, "a")
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(AdapterError, match="gradient checkpointing"):
        model(ids, labels=ids)


def test_bad_configs():
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=-1)
    with pytest.raises(ConfigError, match="encoder_hidden_size"):
        PrefixTuningConfig(encoder_hidden_size=8)
    with pytest.raises(ConfigError, match="targets"):
        PrefixTuningConfig(targets="model.*")
    with pytest.raises(ConfigError, match="init"):
        PrefixTuningConfig(init="ones")
    assert ak.make_config("prefix", prefix_projection=True).prefix_projection
