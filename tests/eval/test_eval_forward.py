"""evaluate_forward (the library's forward, for adapters the engine cannot serve) gives the
engine's scores and greedy answers for a LoRA adapter, and batching does not change the
answers of a prefix adapter (left padding + virtual tokens) or a bottleneck adapter."""
from __future__ import annotations

import copy

import pytest
import torch

import adapterkit as ak
import adapterkit.eval as ev
from adapterkit.errors import ConfigError
from adapterkit.eval.runner import _context

from _eval_utils import char_tokenizer, save_lora, tiny_llama
from test_eval_engine import MC, PPL

GEN = dict(n=5, max_tokens=8, stop=())


def test_forward_equals_engine_for_lora(tmp_path):
    model, tok = tiny_llama(), char_tokenizer()
    path = save_lora(model, tmp_path / "a", r=4, seed=1)
    gen = ev.load_task("dates", **GEN)
    engine = ev.evaluate(model, tok, [MC, PPL, gen], {"a": path}, include_base=False, progress=False)
    m = copy.deepcopy(model)
    ak.load_adapter(m, path, name="a")
    fwd = ev.evaluate_forward(m, tok, [MC, PPL, gen], name="a", params=7, batch_size=3)
    for e in range(len(MC.examples)):
        assert fwd.logliks["a"]["mc"][e] == pytest.approx(engine.logliks["a"]["mc"][e], abs=1e-4)
    for got, want in zip(fwd.logliks["a"]["ppl"], engine.logliks["a"]["ppl"]):
        assert got[0] == pytest.approx(want[0], abs=1e-4) and got[1] == want[1]
    # greedy answers: each one equals HF generate on that prompt alone (no padding)
    for e, rec in enumerate(gen.examples):
        ids = _context(tok, gen, rec)
        with torch.no_grad():
            out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert fwd.predictions["a"]["dates"][e] == tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert fwd.scores["a"]["mc"] == engine.scores["a"]["mc"] and fwd.params == {"a": 7}


@pytest.mark.parametrize("method,cfg", [("prefix", {"num_virtual_tokens": 3}), ("bottleneck", {"mode": "pfeiffer"})])
def test_batching_does_not_change_answers(method, cfg):
    from conftest import randomize_adapters

    model, tok = tiny_llama(), char_tokenizer()
    ak.add_adapter(model, "x", ak.make_config(method, **cfg))
    randomize_adapters(model, std=0.3)
    tasks = [MC, ev.load_task("dates", **GEN)]
    one = ev.evaluate_forward(model, tok, tasks, name="x", batch_size=1)
    many = ev.evaluate_forward(model, tok, tasks, name="x", batch_size=5)
    assert many.predictions == one.predictions
    for a, b in zip(many.logliks["x"]["mc"], one.logliks["x"]["mc"]):
        assert a == pytest.approx(b, abs=1e-4)


def test_bad_batch_size():
    model, tok = tiny_llama(), char_tokenizer()
    with pytest.raises(ConfigError, match="batch_size"):
        ev.evaluate_forward(model, tok, [MC], batch_size=0)
