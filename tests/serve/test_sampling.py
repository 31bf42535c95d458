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


# ---------------------------------------------------------------- incremental detokenization
_TEXTS = ["héllo wörld, naïve café ☕", "日本語のテキストです。", "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧 family",
          "Ελληνικά και русский текст", "plain ascii text with spaces  and\ttabs\n", "مرحبا بالعالم"]


def _bpe(kind: str):
    """A small BPE tokenizer trained here: byte-level (GPT-2 / SmolLM2 style: multi-byte
    characters split over tokens) or Metaspace (SentencePiece style: a leading-space rule)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None if kind == "byte" else "<unk>"))
    if kind == "byte":
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = sorted({c for t in _TEXTS for c in t})
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, special_tokens=["<unk>", "<eos>"])
    tk.train_from_iterator(_TEXTS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def _stream(tok, ids: list[int]) -> tuple[list[str], OutputState]:
    st = OutputState(SamplingParams(max_tokens=len(ids), ignore_eos=True), tok, set(), 1, 10_000)
    return [st.step(t)[1] for t in ids], st


@pytest.mark.parametrize("kind", ["byte", "metaspace"])
def test_incremental_text_equals_the_full_decode(kind):
    tok = _bpe(kind)
    g = torch.Generator().manual_seed(0)
    V = len(tok)
    cases = [tok.encode(t, add_special_tokens=False) for t in _TEXTS]
    cases += [torch.randint(0, V, (60,), generator=g).tolist() for _ in range(60)]  # invalid UTF-8, specials
    for ids in cases:
        deltas, st = _stream(tok, ids)
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == full, ids
        assert not st._detok.full  # the windows were used, not the whole-output fallback
        for n in range(1, len(ids)):  # every streamed prefix is a prefix of the whole decode
            assert full.startswith("".join(deltas[:n]))
    # a character split over byte tokens is held back until complete, then sent whole
    if kind == "byte":
        ids = tok.convert_tokens_to_ids(list(pre_tokenizers_bytes("😀")))
        assert None not in ids and _stream(tok, ids)[0] == ["", "", "", "😀"]


def pre_tokenizers_bytes(text: str) -> list[str]:
    """The byte-level symbols of `text`'s UTF-8 bytes (GPT-2's map: printable bytes stand for
    themselves, the others for chr(256 + n) in byte order)."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    mapping, n = {}, 0
    for b in range(256):
        if chr(b) in alphabet:
            mapping[b] = chr(b)
        else:
            mapping[b], n = chr(256 + n), n + 1
    return [mapping[b] for b in text.encode()]


class _Counting:
    """Wraps a tokenizer and counts the token ids it is asked to decode."""

    def __init__(self, tok) -> None:
        self.tok, self.decoded = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_small_window():
    tok = _bpe("byte")
    ids = tok.encode(" ".join(_TEXTS) * 4, add_special_tokens=False)
    counting = _Counting(tok)
    deltas, _ = _stream(counting, ids)
    assert "".join(deltas) == tok.decode(ids)
    # whole-output decoding would cost n(n+1)/2 ids; windows cost a few per token (+ n at the end)
    assert counting.decoded < 10 * len(ids), (counting.decoded, len(ids))
    assert len(ids) > 100


def test_space_cleaning_tokenizer_falls_back_to_whole_decodes():
    tok = _bpe("byte")
    tok.clean_up_tokenization_spaces = True  # " ." -> "." across token boundaries
    ids = tok.encode("a . b , c ' d n't e ?", add_special_tokens=False)
    deltas, st = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) and st._detok.full


def test_default_model_tokenizer_streams_its_full_decode():
    from pathlib import Path

    from transformers import AutoTokenizer

    dirs = sorted((Path.home() / ".cache" / "adapterkit" / "models").glob("SmolLM2-*"))
    if not dirs:
        pytest.skip("the default model is not cached here")
    tok = AutoTokenizer.from_pretrained(dirs[0])
    g = torch.Generator().manual_seed(1)
    cases = [tok.encode(t) for t in _TEXTS] + [torch.randint(0, len(tok), (80,), generator=g).tolist()
                                               for _ in range(5)]
    for ids in cases:
        assert "".join(_stream(tok, ids)[0]) == tok.decode(ids, skip_special_tokens=True)
