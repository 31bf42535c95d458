"""Tiny offline stand-ins (a byte-level tokenizer with a chat template, a random Llama).

They let tests, examples and ``adapterkit train --model tiny`` run in seconds with no model
download: the tokenizer maps every UTF-8 byte to one token (vocab 259) and uses the same
ChatML template style as SmolLM2, so chat masking is exercised on a realistic template.
"""
from __future__ import annotations

from typing import Any

import torch

# ChatML, the format of SmolLM2/Qwen; every turn ends with <|im_end|> + newline.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def toy_tokenizer() -> Any:
    """A byte-level tokenizer (no merges: one token per byte) with a ChatML chat template.

    ids 0..2 are ``<|endoftext|>`` (bos/pad), ``<|im_start|>``, ``<|im_end|>`` (eos);
    ids 3..258 are the 256 bytes. Built in memory from ``tokenizers``: nothing is downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def toy_llama(seed: int = 0, vocab_size: int = TOY_VOCAB_SIZE, hidden_size: int = 64,
              num_hidden_layers: int = 2) -> torch.nn.Module:
    """A random-weight ``LlamaForCausalLM`` small enough to train on CPU in milliseconds/step.

    Args:
        seed: torch seed for the weights (same seed -> identical model).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)  # don't disturb the caller's RNG stream
    return model.eval()
