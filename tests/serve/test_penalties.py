"""Presence / frequency / repetition penalties (vLLM semantics): the vectorised kernel against a
per-token float64 reference, and the engine's greedy output against a plain greedy loop over
the HF model's own logits with the reference penalties applied at each step."""
from __future__ import annotations

import pytest
import torch

from adapterkit.errors import ConfigError
from adapterkit.serve.engine import Engine
from adapterkit.serve.sampling import apply_penalties, apply_penalties_ref, sample_tokens
from adapterkit.serve.types import EngineConfig, GenerationRequest, SamplingParams


@pytest.mark.parametrize("seed", range(4))
def test_apply_penalties_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    V = 30
    logits = torch.randn(5, V, generator=g) * 3
    logits[1, 3] = float("-inf")  # a banned token stays banned
    params = [SamplingParams(presence_penalty=0.5), SamplingParams(frequency_penalty=1.5, repetition_penalty=1.3),
              SamplingParams(), SamplingParams(repetition_penalty=0.7, presence_penalty=-1.0, frequency_penalty=-0.5),
              SamplingParams(presence_penalty=2.0, frequency_penalty=2.0, repetition_penalty=2.0)]
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (4, 0, 7, 3, 10)]
    outputs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (6, 5, 2, 0, 9)]
    want = apply_penalties_ref(logits, params, prompts, outputs)
    got = apply_penalties(logits.clone(), params, prompts, outputs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[2], logits[2])  # no penalty: untouched
    assert not torch.equal(got[0], logits[0]) and not torch.equal(got[3], logits[3])


def test_semantics_by_hand():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    # token 0 and 1 in the prompt, token 2 generated twice
    rep = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=2.0)], [[0, 1]], [[2, 2]])
    assert rep.tolist() == [[1.0, -4.0, 0.5, 1.0]]  # positive divided, negative multiplied
    freq = apply_penalties(logits.clone(), [SamplingParams(frequency_penalty=0.25)], [[0, 1]], [[2, 2]])
    assert freq.tolist() == [[2.0, -2.0, 0.5, 1.0]]  # output only, times the count
    pres = apply_penalties(logits.clone(), [SamplingParams(presence_penalty=0.25)], [[0, 1]], [[2, 2]])
    assert pres.tolist() == [[2.0, -2.0, 0.75, 1.0]]  # output only, once
    # greedy picks change: token 0 wins, until repetition halves it below token 3
    assert sample_tokens(logits.clone(), [SamplingParams(temperature=0, repetition_penalty=4.0)], [None], [[]],
                         [([0], [])]) == [2]


def test_penalties_without_history_are_refused():
    with pytest.raises(ValueError, match="histories"):
        sample_tokens(torch.zeros(1, 4), [SamplingParams(presence_penalty=1.0)], [None], [[]])


@pytest.mark.parametrize(("field", "value"), [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                               ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
                                               ("presence_penalty", True)])
def test_out_of_range_penalties_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=256)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    return m


def _reference_greedy(model, prompt: list[int], p: SamplingParams, steps: int) -> list[int]:
    """Greedy over the full forward's last logits, penalties from the reference each step."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + out])).logits[:, -1].float()
            out.append(int(apply_penalties_ref(logits, [p], [prompt], [out]).argmax(-1)))
    return out


def test_engine_greedy_with_penalties_equals_reference_loop():
    model = _tiny()
    eng = Engine(model, config=EngineConfig(max_num_seqs=4, max_loras=1, max_lora_rank=8, max_model_len=128,
                                            pool_bytes=8 << 20), start=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 9, 3)]
    params = [SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.8),
              SamplingParams(temperature=0, max_tokens=12, frequency_penalty=1.0, presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=12)]
    got: dict[int, list[int]] = {i: [] for i in range(3)}
    for i, (pr, p) in enumerate(zip(prompts, params)):  # batched together in each step
        eng.submit(GenerationRequest(prompt_token_ids=pr, params=p), lambda c, i=i: got[i].extend(c.token_ids))
    while eng.scheduler.running or eng.scheduler.waiting:
        eng.step()
    for i in range(3):
        assert got[i] == _reference_greedy(model, prompts[i], params[i], 12), i
    # the penalties really changed the output: the unpenalised greedy differs
    plain = _reference_greedy(model, prompts[0], SamplingParams(temperature=0), 12)
    assert plain != got[0]
