"""Composition blocks against plain references."""
from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import AdapterError, ConfigError
from conftest import randomize_adapters, tiny_llama


def _model():
    m = tiny_llama()
    ak.add_adapter(m, "lang", ak.BottleneckConfig(mode="pfeiffer", reduction_factor=8))
    ak.add_adapter(m, "task", ak.BottleneckConfig(mode="pfeiffer", reduction_factor=4))
    ak.add_adapter(m, "lora", ak.LoRAConfig(r=4, targets=["q_proj", "down_proj"]))
    randomize_adapters(m, std=0.3)
    return m


def _piece(m, name, host="model.layers.0.mlp"):
    return ak.api.get_record(m, name).pieces[host]


def test_stack_feeds_output_forward():
    m = _model()
    lang, task = _piece(m, "lang"), _piece(m, "task")
    y = torch.randn(2, 5, 64)
    comp = ak.Stack("lang", "task")
    host = lang.host
    c = host.adapterkit
    torch.testing.assert_close(comp.post(host, c, None, y), task.forward_post(None, lang.forward_post(None, y)))
    # and it is what a list activation does
    x = torch.randint(0, 128, (2, 7))
    ak.set_adapter(m, ["lang", "task"])
    ref = m(x).logits
    ak.set_adapter(m, ak.Stack("lang", "task"))
    torch.testing.assert_close(m(x).logits, ref, atol=0, rtol=0)
    ak.set_adapter(m, ak.Stack("task", "lang"))
    assert (m(x).logits - ref).abs().max() > 1e-4  # order matters for series adapters


def test_average_reference():
    m = _model()
    lang, task = _piece(m, "lang"), _piece(m, "task")
    host = lang.host
    y = torch.randn(2, 5, 64)
    comp = ak.Average("lang", "task", weights=[3, 1])
    want = 0.75 * lang.forward_post(None, y) + 0.25 * task.forward_post(None, y)
    torch.testing.assert_close(comp.post(host, host.adapterkit, None, y), want)


def test_average_of_lora_equals_scaled_deltas():
    m = tiny_llama()
    ak.add_adapter(m, "a", ak.LoRAConfig(r=4))
    ak.add_adapter(m, "b", ak.LoRAConfig(r=2))
    randomize_adapters(m)
    x = torch.randint(0, 128, (2, 7))
    ak.set_adapter(m, ak.Average("a", "b", weights=[0.5, 0.5]))
    out = m(x).logits
    ak.merge_adapters(m, {"a": 0.5, "b": 0.5}, method="cat", name="avg")
    ak.set_adapter(m, "avg")
    assert (m(x).logits - out).abs().max().item() <= 1e-5


def test_nested_blocks_and_hosts_without_pieces():
    m = _model()
    x = torch.randint(0, 128, (2, 7))
    ak.set_adapter(m, ak.Stack("lora", ak.Average("lang", "task")))
    out = m(x).logits
    assert torch.isfinite(out).all()
    assert ak.api.active_adapters(m) == ("lora", "lang", "task")


def test_errors():
    m = _model()
    with pytest.raises(ak.errors.AdapterNotFoundError, match="'lang'"):
        ak.set_adapter(m, ak.Stack("lnag", "task"))
    with pytest.raises(ConfigError, match="weights"):
        ak.Average("lang", "task", weights=[1.0])
    with pytest.raises(ConfigError, match="at least one"):
        ak.Stack()
    m2 = tiny_llama()
    ak.add_adapter(m2, "a", ak.LoRAConfig())
    ak.add_adapter(m2, "b", ak.LoRAConfig())
    ak.merge(m2, "a")
    with pytest.raises(AdapterError, match="merged"):
        ak.set_adapter(m2, ak.Stack("a", "b"))


def test_deleting_a_composed_adapter_deactivates_the_composition():
    m = _model()
    ak.set_adapter(m, ak.Stack("lang", "task"))
    ak.delete_adapter(m, "task")
    assert ak.api.active_adapters(m) == ()
