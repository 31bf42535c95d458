"""modules_to_save: heads trained in full beside an adapter, saved, reloaded, exchanged with PEFT."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.errors import ConfigError, TargetNotFoundError
from adapterkit.inject import CONTAINER


def llama_cls(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, num_labels=3,
                      pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def bert_cls(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=128, num_labels=3)).eval()


IDS = torch.randint(1, 128, (4, 7), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 0])


def train(model, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(IDS).logits, LABELS).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("make,head,targets", [(llama_cls, "score", ["q_proj", "v_proj"]),
                                               (bert_cls, "classifier", ["query", "value"])])
def test_head_trains_saves_and_reloads_here_and_in_peft(tmp_path, make, head, targets) -> None:
    model = make()
    head_before = getattr(model, head).weight.detach().clone()
    rec = ak.add_adapter(model, "cls", ak.LoRAConfig(r=4, targets=targets))
    assert list(rec.heads) == [head]  # PEFT's default for sequence classification
    train(model)
    out = model(IDS).logits
    # the copy trained, the original head did not
    assert not torch.equal(rec.heads[head].module.weight, head_before)
    torch.testing.assert_close(getattr(model, head).weight, head_before, rtol=0, atol=0)

    ak.save_adapter(model, "cls", tmp_path / "native")
    ak.save_adapter(model, "cls", tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == [head] and cfg["task_type"] == "SEQ_CLS"
    assert f"base_model.model.{head}.weight" in load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for sub in ("native", "peft"):
        fresh = make()
        ak.load_adapter(fresh, tmp_path / sub, name="cls")
        torch.testing.assert_close(fresh(IDS).logits, out)
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(pm(input_ids=IDS).logits, out)


def test_peft_trained_head_loads_with_the_same_logits(tmp_path) -> None:
    pm = peft.get_peft_model(llama_cls(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pm.eval()
    ref = pm(input_ids=IDS).logits
    pm.save_pretrained(str(tmp_path / "p"))  # modules_to_save ["classifier", "score"]: Llama has only score
    model = llama_cls()
    rec = ak.load_adapter(model, tmp_path / "p", name="p")
    assert list(rec.heads) == ["score"] and ak.get_adapter_config(model, "p").modules_to_save == ("score",)
    torch.testing.assert_close(model(IDS).logits, ref)


def test_two_heads_coexist_and_mixed_batches_pick_each_rows_head() -> None:
    model = llama_cls()
    base = model(IDS).logits
    ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["q_proj"]))
    ak.add_adapter(model, "b", ak.LoRAConfig(r=2, targets=["v_proj"]))
    outs = {}
    for n in ("a", "b"):
        ak.set_adapter(model, n)
        train(model)
        outs[n] = model(IDS).logits
    with ak.adapter_batch(model, ["a", "b", None, "a"]):
        mixed = model(IDS).logits
    torch.testing.assert_close(mixed[[0, 3]], outs["a"][[0, 3]])
    torch.testing.assert_close(mixed[1], outs["b"][1])
    torch.testing.assert_close(mixed[2], base[2])  # no adapter: the original head


def test_mixed_batch_gradients_reach_only_the_rows_head() -> None:
    model = llama_cls()
    rec_a = ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["q_proj"]))
    rec_b = ak.add_adapter(model, "b", ak.LoRAConfig(r=2, targets=["q_proj"]))
    with ak.adapter_batch(model, ["a", "a", None, None]):
        model(IDS).logits.sum().backward()
    assert rec_a.heads["score"].module.weight.grad is not None
    assert rec_b.heads["score"].module.weight.grad is None


def test_explicit_none_and_bad_modules_to_save() -> None:
    model = llama_cls()
    assert not ak.add_adapter(model, "none", ak.LoRAConfig(r=2, modules_to_save=())).heads
    rec = ak.add_adapter(model, "emb", ak.LoRAConfig(r=2, targets=["q_proj"], modules_to_save=["embed_tokens"]))
    assert list(rec.heads) == ["model.embed_tokens"]
    with pytest.raises(TargetNotFoundError, match="modules_to_save entry 'scor' .*'score'"):
        ak.add_adapter(model, "x", ak.LoRAConfig(r=2, modules_to_save=["scor"]))
    with pytest.raises(ConfigError, match="'model.layers.0' is in modules_to_save and the adapter also targets"):
        ak.add_adapter(model, "y", ak.LoRAConfig(r=2, targets=["q_proj"], modules_to_save=["layers.0"]))
    with pytest.raises(ConfigError, match="modules_to_save must be a list"):
        ak.LoRAConfig(modules_to_save="score")
    assert ak.list_adapters(model) == ["none", "emb"]  # failed adds left nothing behind


def test_causal_lm_saves_no_head_by_default(llama) -> None:
    assert not ak.add_adapter(llama, "a", ak.LoRAConfig(r=2)).heads


def test_merge_unmerge_and_merge_and_unload_carry_the_head() -> None:
    model = llama_cls()
    base = model(IDS).logits
    ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["q_proj"]))
    train(model)
    out = model(IDS).logits
    ak.merge(model, "a")
    torch.testing.assert_close(model(IDS).logits, out)
    ak.unmerge(model, "a")
    ak.set_adapter(model, None)
    torch.testing.assert_close(model(IDS).logits, base)
    ak.set_adapter(model, "a")
    ak.merge_and_unload(model, "a")
    assert not any(CONTAINER in n for n, _ in model.named_modules())
    torch.testing.assert_close(model(IDS).logits, out)


def test_delete_restores_the_plain_model() -> None:
    model = llama_cls()
    keys = set(model.state_dict())
    ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["q_proj"]))
    ak.delete_adapter(model, "a")
    assert set(model.state_dict()) == keys


def test_the_files_copies_decide_not_the_loading_models_class(tmp_path, llama) -> None:
    # a causal-LM adapter (no head) onto a classifier of the same base: no copy expected
    ak.add_adapter(llama, "a", ak.LoRAConfig(r=2, targets=["q_proj"]))
    ak.save_adapter(llama, "a", tmp_path / "lm")
    assert not ak.load_adapter(llama_cls(), tmp_path / "lm").heads
    # a classifier adapter keeps its head copy even with the default (None) config
    model = llama_cls()
    ak.add_adapter(model, "c", ak.LoRAConfig(r=2, targets=["q_proj"]))
    ak.save_adapter(model, "c", tmp_path / "c")
    fresh = llama_cls()
    assert list(ak.load_adapter(fresh, tmp_path / "c").heads) == ["score"]
    assert ak.get_adapter_config(fresh, "c") == ak.get_adapter_config(model, "c")


def test_native_file_without_the_field_still_loads(tmp_path) -> None:
    model = llama_cls()
    ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["q_proj"], modules_to_save=()))
    ak.save_adapter(model, "a", tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["config"]["modules_to_save"]  # as written before the field existed
    cfg_path.write_text(json.dumps(cfg))
    assert not ak.load_adapter(llama_cls(), tmp_path / "a").heads


def test_ia3_head_round_trips_through_peft(tmp_path) -> None:
    model = llama_cls()
    ak.add_adapter(model, "ia3", ak.IA3Config(targets=["k_proj", "down_proj"], feedforward_targets=["down_proj"]))
    train(model, steps=2)
    out = model(IDS).logits
    ak.save_adapter(model, "ia3", tmp_path / "p", format="peft")
    pm = peft.PeftModel.from_pretrained(llama_cls(), str(tmp_path / "p")).eval()
    torch.testing.assert_close(pm(input_ids=IDS).logits, out)
    fresh = llama_cls()
    assert list(ak.load_adapter(fresh, tmp_path / "p").heads) == ["score"]
    torch.testing.assert_close(fresh(IDS).logits, out)


def test_prompt_tuning_head_saves_natively_and_is_refused_for_peft(tmp_path) -> None:
    model = llama_cls()
    ak.add_adapter(model, "pt", ak.PromptTuningConfig(num_virtual_tokens=2))
    train(model, steps=2)
    out = model(IDS).logits
    ak.save_adapter(model, "pt", tmp_path / "n")
    fresh = llama_cls()
    ak.load_adapter(fresh, tmp_path / "n")
    torch.testing.assert_close(fresh(IDS).logits, out)
    with pytest.raises(ConfigError, match="module copies .*PROMPT_TUNING.*native format"):
        ak.save_adapter(model, "pt", tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


def test_combine_adapters_refuses_to_drop_trained_heads() -> None:
    model = llama_cls()
    ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["q_proj"]))
    ak.add_adapter(model, "b", ak.LoRAConfig(r=2, targets=["q_proj"], modules_to_save=()))
    with pytest.raises(ConfigError, match="adapter 'a' trains modules in full \\(score: modules_to_save\\)"):
        ak.combine_adapters(model, {"a": 0.5, "b": 0.5})
    assert ak.list_adapters(model) == ["a", "b"]


def test_peft_prompt_learning_with_module_copies_is_refused() -> None:
    from adapterkit.errors import AdapterFileError
    from adapterkit.formats.peft import from_peft

    meta = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2,
            "modules_to_save": ["lm_head"]}
    tensors = {"prompt_embeddings": torch.zeros(2, 64), "base_model.lm_head.weight": torch.zeros(128, 64)}
    with pytest.raises(AdapterFileError, match="modules_to_save=\\['lm_head'\\] is not supported for PROMPT_TUNING"):
        from_peft(meta, tensors)


def test_deepcopy_keeps_an_independent_head() -> None:
    import copy

    model = llama_cls()
    rec = ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["q_proj"]))
    train(model, steps=1)
    out = model(IDS).logits
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(IDS).logits, out, rtol=0, atol=0)
    with torch.no_grad():
        rec.heads["score"].module.weight.zero_()
    torch.testing.assert_close(twin(IDS).logits, out, rtol=0, atol=0)


def test_convert_carries_the_head_both_ways(tmp_path) -> None:
    from adapterkit.formats.convert import convert

    model = llama_cls()
    ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["q_proj"]))
    train(model, steps=1)
    out = model(IDS).logits
    ak.save_adapter(model, "a", tmp_path / "n")
    convert(tmp_path / "n", tmp_path / "p", to="peft")  # no model: the fingerprint describes the base
    pm = peft.PeftModel.from_pretrained(llama_cls(), str(tmp_path / "p")).eval()
    torch.testing.assert_close(pm(input_ids=IDS).logits, out)
    convert(tmp_path / "p", tmp_path / "back", to="native", model=llama_cls())
    fresh = llama_cls()
    ak.load_adapter(fresh, tmp_path / "back")
    torch.testing.assert_close(fresh(IDS).logits, out)


@pytest.mark.parametrize("cls,head", [("BertForTokenClassification", "classifier"),
                                      ("BertForQuestionAnswering", "qa_outputs"),
                                      ("BertModel", None)])
def test_task_defaults_follow_peft(cls, head) -> None:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, cls)(transformers.BertConfig(hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=1, num_attention_heads=2,
                                                               vocab_size=64))
    rec = ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["query"]))
    assert list(rec.heads) == ([head] if head else [])


def test_merging_a_copy_of_a_tied_head_is_refused(ids) -> None:
    from adapterkit.errors import AdapterError
    from conftest import tiny_llama

    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ak.add_adapter(model, "a", ak.LoRAConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]))
    emb = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(AdapterError, match="lm_head.weight is the same tensor as model.embed_tokens.weight"):
        ak.merge_into_base(model, "a")
    assert not ak.api._is_merged(ak.api.get_record(model, "a"))
    torch.testing.assert_close(model.model.embed_tokens.weight, emb, rtol=0, atol=0)
