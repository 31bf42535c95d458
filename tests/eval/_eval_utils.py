"""Helpers of the eval tests: the serve tests' tiny Llama, char tokenizer and LoRA writer."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))

from test_server_utils import char_tokenizer, save_lora, tiny_llama  # noqa: E402

__all__ = ["char_tokenizer", "save_lora", "tiny_llama"]
