"""Adapter files: the native format and PEFT's, detected by their config."""
from __future__ import annotations

from pathlib import Path

from ..errors import AdapterFileError
from .native import CONFIG_NAME, SavedAdapter, check_fingerprint, fingerprint, is_native, read_meta, read_native, write_native

__all__ = ["SavedAdapter", "read_adapter", "write_native", "fingerprint", "check_fingerprint", "detect_format"]


def detect_format(path: str | Path) -> str:
    """"adapterkit" or "peft" (raises AdapterFileError for anything else)."""
    p, meta = read_meta(path)
    if is_native(meta):
        return "adapterkit"
    if "peft_type" in meta:
        return "peft"
    raise AdapterFileError(f"{p / CONFIG_NAME} is neither an adapterkit nor a PEFT adapter config "
                           f"(no 'format': 'adapterkit' and no 'peft_type')")


def read_adapter(path: str | Path) -> SavedAdapter:
    """Read a native or PEFT adapter directory into native method/config/tensor names."""
    p, meta = read_meta(path)
    if is_native(meta):
        return read_native(p, meta)
    if "peft_type" in meta:
        from .peft import read_peft

        return read_peft(p, meta)
    raise AdapterFileError(f"{p / CONFIG_NAME} is neither an adapterkit nor a PEFT adapter config "
                           f"(no 'format': 'adapterkit' and no 'peft_type')")
