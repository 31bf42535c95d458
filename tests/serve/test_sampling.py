"""Sampling filters vs their reference, seeds, min_tokens, stop strings / tokens, params validation."""
from __future__ import annotations

import pytest
import torch

from adapterkit.errors import ConfigError
from adapterkit.serve.sampling import OutputState, sample_tokens, top_k_top_p_filter, top_k_top_p_filter_ref
from adapterkit.serve.types import SamplingParams


@pytest.mark.parametrize("seed", range(5))
def test_top_k_top_p_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 40, generator=g) * 3
    logits[0, :5] = 2.0  # ties
    ks = [0, 1, 5, 40, 3, 0]
    ps = [1.0, 0.5, 0.9, 0.3, 1.0, 0.05]
    got = top_k_top_p_filter(logits, torch.tensor(ks), torch.tensor(ps))
    want = top_k_top_p_filter_ref(logits, ks, ps)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert (~torch.isinf(got)).sum(-1).min() >= 1  # the best token always survives


def test_greedy_seeded_and_banned():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    greedy = SamplingParams(temperature=0)
    assert sample_tokens(logits.clone(), [greedy, greedy], [None, None], [[], [1]]) == [1, 2]
    p = SamplingParams(temperature=1.5, seed=7)
    big = torch.randn(1, 1000)
    a = [sample_tokens(big.clone(), [p], [torch.Generator().manual_seed(7)], [[]])[0] for _ in range(2)]
    assert a[0] == a[1]
    draws = {sample_tokens(big.clone(), [p], [torch.Generator().manual_seed(s)], [[]])[0] for s in range(20)}
    assert len(draws) > 5  # temperature sampling really samples
    k1 = SamplingParams(temperature=1.0, top_k=1)
    assert sample_tokens(big.clone(), [k1], [torch.Generator().manual_seed(1)], [[]]) == [int(big.argmax())]


def test_sampling_distribution_follows_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    p = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample_tokens(logits.clone(), [p], [g], [[]])[0]] += 1
    torch.testing.assert_close(counts / 3000, logits[0].softmax(-1), atol=0.03, rtol=0)


class CharTok:
    """Token i decodes to chr(97 + i); 25 is a multi-token 'é' split in two halves."""

    def decode(self, ids, skip_special_tokens=True):
        s = "".join(chr(97 + i) if i < 25 else "\ufffd" for i in ids)
        return s.replace("\ufffd\ufffd", "é")


def test_stop_strings_hold_back_and_truncate():
    st = OutputState(SamplingParams(max_tokens=20, stop=("cde",)), CharTok(), {99}, 3, 100)
    deltas = [st.step(t) for t in [0, 1, 2, 3]]  # a b c d
    assert "".join(d[1] for d in deltas) == "ab"  # "cd" held back: could start "cde"
    ids, text, fin = st.step(4)  # e -> stop
    assert fin == "stop" and text == "" and st.text == "ab" and ids == [4]


def test_incomplete_utf8_is_held_back():
    st = OutputState(SamplingParams(max_tokens=5), CharTok(), set(), 1, 100)
    assert st.step(0)[1] == "a"
    assert st.step(25)[1] == ""  # half a character
    assert st.step(25)[1] == "é"


def test_min_tokens_eos_stop_ids_and_length():
    st = OutputState(SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=(7,)), None, {2}, 3, 100)
    assert st.banned() == [2, 7]
    assert st.step(4)[2] is None
    assert st.step(5)[2] is None and st.banned() == []
    assert st.step(7)[2] == "stop"
    st = OutputState(SamplingParams(max_tokens=3, ignore_eos=True), None, {2}, 3, 100)
    assert [st.step(2)[2] for _ in range(3)] == [None, None, "length"]
    st = OutputState(SamplingParams(max_tokens=30), None, set(), 8, 10)
    assert [st.step(1)[2] for _ in range(2)] == [None, "length"]


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                                         ("top_k", -1), ("min_tokens", 99), ("stop", ("",)), ("temperature", float("nan"))])
def test_params_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})
    assert SamplingParams(stop="x").stop == ("x",)
