"""Prompt tuning: against a plain inputs_embeds reference and against PEFT."""
from __future__ import annotations

import pytest
import torch
from _method_checks import assert_decode_step_matches_full_forward, generate_left_padded_batch_and_rows_alone
from conftest import check_peft_generate, tiny_gpt2, tiny_llama

import adapterkit as ak
from adapterkit.errors import AdapterError, ConfigError, NotMergeableError, UnsupportedModuleError
from adapterkit.formats import read_adapter
from adapterkit.methods import PromptTuningConfig

P = 3
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def prompted(kind: str, p: int = P, name: str = "a", seed: int = 7, **kw):
    model = MODELS[kind]()
    torch.manual_seed(seed)
    ak.add_adapter(model, name, PromptTuningConfig(num_virtual_tokens=p, **kw))
    return model


def prompt_of(model, name: str = "a") -> torch.Tensor:
    return model.adapterkit[name].prompt_embeddings


def ref_logits(base, prompt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Plain reference: [prompt ; embed(ids)] as inputs_embeds, logits of the real tokens."""
    emb = base.get_input_embeddings()(ids)
    x = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), emb], dim=1)
    return base(inputs_embeds=x).logits[:, prompt.shape[0]:]


def ref_greedy(base, prompt: torch.Tensor, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole [prompt ; tokens] sequence every step."""
    seq = ids
    for _ in range(steps):
        nxt = ref_logits(base, prompt, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def peft_twin(kind: str, prompt: torch.Tensor):
    import peft

    pm = peft.get_peft_model(MODELS[kind](), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return pm.eval()


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(0, 128, (3, 8))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_matches_reference_and_changes_output(kind, ids):
    model, base = prompted(kind), MODELS[kind]()
    with torch.no_grad():
        out = model(ids).logits
        want = ref_logits(base, prompt_of(model), ids)
        plain = base(ids).logits
    assert out.shape == (3, 8, 128)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    assert (out - plain).abs().max() > 1e-3  # the prompt does something
    ak.set_adapter(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_equals_peft_logits_and_loss(kind, ids):
    model = prompted(kind)
    pm = peft_twin(kind, prompt_of(model))
    labels = ids.clone()
    labels[:, :2] = -100
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels)
        theirs = pm(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits[:, P:], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)


def test_loss_predicts_first_token_from_prompt(ids):
    # the first real token is a target (PEFT's convention): its label changes the loss
    model = prompted("llama")
    base = tiny_llama()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
        full = ref_logits(base, prompt_of(model), ids)  # (B, L, V), real tokens only
        emb = base.get_input_embeddings()(ids)
        x = torch.cat([prompt_of(model).unsqueeze(0).expand(3, -1, -1), emb], dim=1)
        last_virtual = base(inputs_embeds=x).logits[:, P - 1]  # predicts ids[:, 0]
        logits = torch.cat([last_virtual.unsqueeze(1), full[:, :-1]], dim=1)  # predicts ids[:, 0..L-1]
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids.reshape(-1))
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_cache_matches_reference_and_peft(kind, ids):
    model, base = prompted(kind, init="vocab"), MODELS[kind]()
    with torch.no_grad():
        prompt_of(model).mul_(20)  # a strong prompt, so the generated text differs from the base model's
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        want = ref_greedy(base, prompt_of(model), ids, 6)
        theirs = peft_twin(kind, prompt_of(model)).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        plain = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert got.tolist() == want.tolist()
    check_peft_generate(got, theirs)
    assert got.tolist() != plain.tolist()
    ak.set_adapter(model, None)  # without the adapter: the base model's generation
    with torch.no_grad():
        assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False).tolist() == plain.tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_left_padded_batch_equals_rows_alone(kind):
    # position_ids from the padding mask move by P: a padded row decodes exactly as it does alone
    model = prompted(kind, init="vocab")
    both, alone = generate_left_padded_batch_and_rows_alone(model)
    assert both.sequences[0].tolist() == alone[0].sequences[0].tolist()


def test_decode_step_with_returned_cache(ids):
    # the cache holds the P virtual tokens before the 8 real ones
    assert_decode_step_matches_full_forward(prompted("llama"), ids, cache_len=P + 8)


def test_trainable_count_and_gradients_only_on_prompt(ids):
    model = prompted("gpt2")
    assert ak.trainable_parameters(model, "a") == P * 64
    assert ak.trainable_parameters(model) == P * 64
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n == "adapterkit.a.prompt_embeddings":
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None and not p.requires_grad, n


def test_save_load_round_trip(tmp_path, ids):
    model = prompted("llama", init="text", init_token_ids=[5, 6])
    assert torch.equal(prompt_of(model), model.get_input_embeddings().weight[[5, 6, 5]])
    ak.save_adapter(model, "a", tmp_path / "a")
    saved = read_adapter(tmp_path / "a")
    assert saved.method == "prompt" and set(saved.tensors) == {"prompt_embeddings"}
    fresh = tiny_llama()
    ak.load_adapter(fresh, tmp_path / "a", name="b")
    assert ak.get_adapter_config(fresh, "b") == ak.get_adapter_config(model, "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_delete_restores_base_and_removes_hooks(ids):
    model, base = prompted("llama"), tiny_llama()
    ak.delete_adapter(model, "a")
    assert not model._forward_hooks and not model._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)


def test_mixed_batches_and_stacking_are_refused(ids):
    model = prompted("llama")
    with ak.adapter_batch(model, ["a", "a", "a"]), torch.no_grad():  # every row: an ordinary call
        torch.testing.assert_close(model(ids).logits, ref_logits(tiny_llama(), prompt_of(model), ids),
                                   rtol=0, atol=1e-5)
    with ak.adapter_batch(model, ["a", None, "a"]), pytest.raises(AdapterError, match="mixed batch"):
        model(ids)
    ak.add_adapter(model, "b", PromptTuningConfig(num_virtual_tokens=2))
    ak.set_adapter(model, ["a", "b"])
    with pytest.raises(AdapterError, match="only one"):
        model(ids)
    with pytest.raises(NotMergeableError):
        ak.merge(model, "a")


def test_bad_configs_and_inputs(ids):
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="init_token_ids"):
        PromptTuningConfig(init="text")
    with pytest.raises(ConfigError, match="targets"):
        PromptTuningConfig(targets=["q_proj"])
    with pytest.raises(ConfigError, match="vocabulary size"):
        prompted("llama", init="text", init_token_ids=[500])
    with pytest.raises(UnsupportedModuleError):
        ak.add_adapter(torch.nn.Linear(4, 4), "a", PromptTuningConfig())
    model = prompted("llama")
    with pytest.raises(AdapterError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(3, 5, dtype=torch.long))
    assert ak.make_config("prompt", num_virtual_tokens=4) == PromptTuningConfig(num_virtual_tokens=4)


def test_tuple_outputs_are_cut_too(ids):
    model = prompted("llama")
    with torch.no_grad():
        want = model(ids, labels=ids)
        plain = model(ids, return_dict=False)
        with_loss = model(ids, labels=ids, return_dict=False)
    torch.testing.assert_close(plain[0], want.logits, rtol=0, atol=0)
    torch.testing.assert_close(with_loss[1], want.logits, rtol=0, atol=0)
    torch.testing.assert_close(with_loss[0], want.loss, rtol=0, atol=0)
