"""Data pipeline: formats, loss masks (vs HF's generation-tag reference), collation, errors."""
from __future__ import annotations

import json

import pytest
import torch

from adapterkit.errors import DataError
from adapterkit.train import (
    IGNORE_INDEX,
    PadCollator,
    SFTDataset,
    build_dataset,
    chat_segments,
    load_jsonl,
    pad_token_id_for,
    tokenize_example,
)
from adapterkit.train.toy import toy_tokenizer

# ChatML with {% generation %} tags around what the assistant must produce: HF's
# return_assistant_tokens_mask on this template is the reference for our prefix method.
TAGGED_CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def supervised_text(tok, ex) -> str:
    return tok.decode(ex.input_ids[ex.labels != IGNORE_INDEX])


def test_prompt_completion_mask(tok):
    ex = tokenize_example({"prompt": "Q: 2+2?", "completion": " 4"}, tok)
    n_prompt = len(tok("Q: 2+2?")["input_ids"])
    assert ex.labels[:n_prompt].eq(IGNORE_INDEX).all()
    assert ex.labels[n_prompt:].tolist() == ex.input_ids[n_prompt:].tolist()
    assert supervised_text(tok, ex) == " 4<|im_end|>"  # completion + EOS
    assert tok.decode(ex.input_ids) == "Q: 2+2? 4<|im_end|>"
    no_eos = tokenize_example({"prompt": "Q", "completion": "A"}, tok, add_eos=False)
    assert supervised_text(tok, no_eos) == "A"


def test_prompt_special_tokens_policy():
    """A tokenizer that wraps every sequence in BOS ... EOS: one BOS, no EOS after the prompt."""
    from tokenizers import processors

    tok = toy_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|im_end|>", special_tokens=[("<|endoftext|>", 0), ("<|im_end|>", 2)])
    assert tok("ab")["input_ids"] == [0, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), 2]
    ex = tokenize_example({"prompt": "Q", "completion": "A"}, tok)
    assert tok.decode(ex.input_ids) == "<|endoftext|>QA<|im_end|>"
    assert supervised_text(tok, ex) == "A<|im_end|>"
    rendered = tokenize_example({"prompt": "<|endoftext|>Q", "completion": "A"}, tok)  # BOS already in the text
    assert rendered.input_ids.tolist() == ex.input_ids.tolist()


def test_chat_mask_multi_turn(tok, chat):
    msgs = chat[1]["messages"]
    ex = tokenize_example(chat[1], tok)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert supervised_text(tok, ex) == "hello 1<|im_end|>okok<|im_end|>"
    segs = chat_segments(msgs, tok)
    assert "".join(t for t, _ in segs) == tok.apply_chat_template(msgs, tokenize=False)
    assert [t for t, sup in segs if sup] == ["hello 1<|im_end|>", "okok<|im_end|>"]


@pytest.mark.parametrize("msgs", [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "dd ee"}],
    [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "y"},
     {"role": "assistant", "content": "z"}, {"role": "user", "content": "trailing user turn"}],
])
def test_chat_mask_matches_hf_generation_tags(msgs):
    tok = toy_tokenizer()
    tok.chat_template = TAGGED_CHATML
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ex = tokenize_example({"messages": msgs}, tok)
    assert ex.input_ids.tolist() == list(ref["input_ids"])
    ours = (ex.labels != IGNORE_INDEX).int().tolist()
    assert ours == list(ref["assistant_masks"])


def test_chat_template_not_prefix_stable_is_refused():
    tok = toy_tokenizer()
    # renders the number of messages first: a prefix renders differently from the full chat
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="cannot locate assistant turn 1"):
        tokenize_example({"messages": msgs}, tok, where="x.jsonl:4")


def test_chat_errors(tok):
    with pytest.raises(DataError, match="no message with role 'assistant'"):
        tokenize_example({"messages": [{"role": "user", "content": "hi"}]}, tok)
    with pytest.raises(DataError, match=r"messages\[1\] is missing the key 'content'"):
        tokenize_example({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, tok)
    with pytest.raises(DataError, match="must be a string"):
        tokenize_example({"messages": [{"role": "assistant", "content": 3}]}, tok)
    no_tmpl = toy_tokenizer()
    no_tmpl.chat_template = None
    with pytest.raises(DataError, match="chat_template"):
        tokenize_example({"messages": [{"role": "assistant", "content": "x"}]}, no_tmpl)


def test_truncation_and_no_supervised_tokens(tok):
    ex = tokenize_example({"prompt": "abcdef", "completion": "ghij"}, tok, max_length=8)
    assert ex.input_ids.numel() == 8 and supervised_text(tok, ex) == "gh"
    with pytest.raises(DataError, match=r"f\.jsonl:7: no supervised .*max_length=5"):
        tokenize_example({"prompt": "abcdef", "completion": "ghij"}, tok, max_length=5, where="f.jsonl:7")
    with pytest.raises(DataError, match="no supervised"):
        tokenize_example({"input_ids": [1, 2, 3], "labels": [1, -100, -100]}, None)


def test_jsonl_errors(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n{not json}\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        build_dataset(p, tok)
    p.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing the key 'completion'"):
        build_dataset(p, tok)
    p.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: unrecognized example with keys \['text'\]"):
        build_dataset(p, tok)
    p.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object"):
        build_dataset(p, tok)
    p.write_text("\n  \n")
    with pytest.raises(DataError, match="no examples"):
        build_dataset(p, tok)
    with pytest.raises(DataError, match="no such data file"):
        build_dataset(tmp_path / "missing.jsonl", tok)
    p.write_text(json.dumps({"prompt": "a", "completion": 5}) + "\n")
    with pytest.raises(DataError, match="'completion' must be a string"):
        build_dataset(p, tok)
    with pytest.raises(DataError, match="need a tokenizer"):
        build_dataset([{"prompt": "a", "completion": "b"}])


def test_sources_agree(tmp_path, tok, qa, chat):
    recs = qa[:3] + chat[:2]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert load_jsonl(p) == recs

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(recs)

        def __getitem__(self, i):
            return recs[i]

    a, b, c = build_dataset(p, tok), build_dataset(recs, tok), build_dataset(DS(), tok)
    assert build_dataset(a) is a
    for x, y, z in zip(a.examples, b.examples, c.examples):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, z.labels)
    assert a.examples[0].source == f"{p}:1" and b.examples[1].source == "example 1"
    pre = build_dataset([{"input_ids": torch.tensor([5, 6, 7])}])  # no labels: train on all
    assert pre[0]["labels"].tolist() == [5, 6, 7] and isinstance(pre, SFTDataset)
    with pytest.raises(DataError, match="'labels' has 2 entries but 'input_ids' has 3"):
        build_dataset([{"input_ids": [1, 2, 3], "labels": [1, 2]}])


def test_collator_right_pads(tok):
    ds = build_dataset([{"prompt": "a", "completion": "bcd"}, {"prompt": "ab", "completion": "c"}], tok)
    batch = PadCollator(7)([ds[0], ds[1]])
    n0, n1 = ds[0]["input_ids"].numel(), ds[1]["input_ids"].numel()
    T = max(n0, n1)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, T)
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (T - n1)
    assert batch["input_ids"][1, n1:].eq(7).all() and batch["labels"][1, n1:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0].tolist() == ds[0]["input_ids"].tolist()
    assert batch["labels"][0].tolist() == ds[0]["labels"].tolist()


def test_pad_token_fallback(tok):
    class NoPad:
        pad_token_id = None
        eos_token_id = 9

    assert pad_token_id_for(tok) == tok.pad_token_id
    assert pad_token_id_for(NoPad()) == 9
    assert pad_token_id_for(None) == 0
