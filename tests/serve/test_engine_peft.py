"""Engine vs PEFT: adapters saved by PEFT, served from disk, match PEFT's own generate; seeded
sampling does not depend on what else is in the batch."""
from __future__ import annotations

import pytest
import torch
from _engine_utils import hf_greedy
from conftest import tiny_llama

from adapterkit.serve.engine import Engine
from adapterkit.serve.types import EngineConfig, SamplingParams

peft = pytest.importorskip("peft")


def test_peft_saved_adapters_match_peft_generate(tmp_path):
    base = tiny_llama(seed=4)
    base.generation_config.eos_token_id = None
    specs = {"p1": (4, ["q_proj", "v_proj"]), "p2": (8, ["o_proj", "gate_proj", "down_proj"])}
    for name, (r, targets) in specs.items():
        pm = peft.get_peft_model(tiny_llama(seed=4), peft.LoraConfig(r=r, lora_alpha=3 * r, target_modules=targets,
                                                                     init_lora_weights=False))
        pm.save_pretrained(tmp_path / name)
    eng = Engine(base, config=EngineConfig(max_loras=2, block_size=4, num_pages=64))
    try:
        for name in specs:
            eng.register_adapter(name, str(tmp_path / name))
        prompts = [[1, 2, 3, 4], [9, 8, 7], [5] * 11]
        names = ["p1", "p2", None]
        outs = eng.generate_sync(prompts, names, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    finally:
        eng.shutdown()
    for p, n, o in zip(prompts, names, outs):
        ref = tiny_llama(seed=4)
        ref.generation_config.eos_token_id = None
        if n is not None:
            ref = peft.PeftModel.from_pretrained(ref, tmp_path / n).eval()
        assert o.token_ids == hf_greedy(ref, p, 5), n


def test_seeded_sampling_independent_of_batch():
    m = tiny_llama(seed=1)
    eng = Engine(m, config=EngineConfig(block_size=4, num_pages=64), start=False)
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1234, max_tokens=8, ignore_eos=True)
    alone = eng.generate_sync([[3, 4, 5]], None, sp)[0].token_ids
    other = SamplingParams(temperature=1.0, seed=99, max_tokens=8, ignore_eos=True)
    mixed = eng.generate_sync([[7, 7], [3, 4, 5], [1, 2, 3, 4, 5, 6]], None, [other, sp, other])
    assert mixed[1].token_ids == alone
    unseeded = eng.generate_sync([[3, 4, 5]] * 4, None, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in unseeded}) > 1  # different requests draw differently
    assert torch.is_grad_enabled()  # the engine does not leak inference mode
