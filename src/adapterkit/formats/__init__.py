"""Adapter files: the native format, PEFT's and AdapterHub's, detected by their config."""
from __future__ import annotations

from pathlib import Path

from ..errors import AdapterFileError
from .native import CONFIG_NAME, SavedAdapter, check_fingerprint, fingerprint, is_native, read_meta, read_native, write_native

__all__ = ["SavedAdapter", "read_adapter", "write_native", "fingerprint", "check_fingerprint", "detect_format"]


def detect_format(path: str | Path) -> str:
    """"adapterkit", "peft" or "adapterhub" (raises AdapterFileError for anything else)."""
    from .adapterhub import is_adapterhub

    p, meta = read_meta(path)
    if is_native(meta):
        return "adapterkit"
    if "peft_type" in meta:
        return "peft"
    if is_adapterhub(meta):
        return "adapterhub"
    raise AdapterFileError(f"{p / CONFIG_NAME} is neither an adapterkit nor a PEFT adapter config, nor an AdapterHub "
                           f"one (no 'format': 'adapterkit', no 'peft_type', no AdapterHub 'config' + 'model_type')")


def read_adapter(path: str | Path) -> SavedAdapter:
    """Read a native, PEFT or AdapterHub adapter directory into native method/config/tensor names."""
    p, meta = read_meta(path)
    if is_native(meta):
        return read_native(p, meta)
    if "peft_type" in meta:
        from .peft import read_peft

        return read_peft(p, meta)
    from .adapterhub import is_adapterhub, read_adapterhub

    if is_adapterhub(meta):
        return read_adapterhub(p, meta)
    raise AdapterFileError(f"{p / CONFIG_NAME} is neither an adapterkit nor a PEFT adapter config, nor an AdapterHub "
                           f"one (no 'format': 'adapterkit', no 'peft_type', no AdapterHub 'config' + 'model_type')")
