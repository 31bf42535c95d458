"""Prefix and prompt tuning on both names of the KV-cache argument.

transformers 5.24 renamed the causal-LM forward argument ``past_key_values`` to ``cache``.
The installed transformers has one of the two; these wrappers give the other one too, so both
call conventions run in every test session, whichever transformers is installed.
"""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn
from transformers import DynamicCache

import adapterkit as ak
from adapterkit.errors import AdapterError, UnsupportedModuleError
from adapterkit.methods import PrefixTuningConfig, PromptTuningConfig
from adapterkit.methods.prompt import cache_arg

P = 3


class _Wrapper(nn.Module):
    """A causal LM around a tiny Llama whose forward names its cache like an old or new transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_llama()
        self.config = self.inner.config

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def call_inner(self, kv, **kw):
        return self.inner(**kw, **{cache_arg(self.inner): kv})


class LegacyLM(_Wrapper):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None):
        return self.call_inner(past_key_values, input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache)


class RenamedLM(_Wrapper):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None):
        return self.call_inner(cache, input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache)


WRAPPERS = {"past_key_values": LegacyLM, "cache": RenamedLM}


def with_adapter(arg: str, cfg) -> nn.Module:
    model = WRAPPERS[arg]().eval()
    torch.manual_seed(5)
    ak.add_adapter(model, "a", cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapterkit." in f".{n}":
                p.normal_()
    return model


@pytest.mark.parametrize("arg", list(WRAPPERS))
def test_cache_arg_reads_the_forward_signature(arg):
    assert cache_arg(WRAPPERS[arg]()) == arg
    assert cache_arg(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("arg", list(WRAPPERS))
def test_decode_step_with_the_returned_cache_under_either_name(arg, method):
    cfg = PrefixTuningConfig(num_virtual_tokens=P) if method == "prefix" else PromptTuningConfig(num_virtual_tokens=P)
    model = with_adapter(arg, cfg)
    torch.manual_seed(0)
    ids, nxt = torch.randint(0, 128, (2, 6)), torch.randint(0, 128, (2, 1))
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        assert first.past_key_values.get_seq_length() == P + 6  # the virtual tokens went into the cache
        step = model(input_ids=nxt, attention_mask=torch.ones(2, 7, dtype=torch.long),
                     **{arg: first.past_key_values})
        full = model(input_ids=torch.cat([ids, nxt], dim=1)).logits
        plain = model.inner(torch.cat([ids, nxt], dim=1)).logits
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=0, atol=1e-5)
    assert (full[:, -1] - plain[:, -1]).abs().max() > 1e-3  # the adapter is really in the path


def test_prefix_on_the_legacy_name_equals_the_renamed_one():
    a, b = with_adapter("past_key_values", PrefixTuningConfig(num_virtual_tokens=P)), \
        with_adapter("cache", PrefixTuningConfig(num_virtual_tokens=P))
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=0)


def test_both_names_at_once_are_refused():
    model = with_adapter("cache", PrefixTuningConfig(num_virtual_tokens=P))
    with pytest.raises(AdapterError, match="both cache and past_key_values"):
        model(input_ids=torch.randint(0, 128, (1, 4)), cache=DynamicCache(), past_key_values=DynamicCache())


def test_a_model_without_a_cache_argument_is_refused_by_prefix_tuning():
    class NoCache(_Wrapper):
        def forward(self, input_ids=None, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    with pytest.raises(UnsupportedModuleError, match="KV cache .*cache or past_key_values"):
        ak.add_adapter(NoCache(), "a", PrefixTuningConfig(num_virtual_tokens=P))
