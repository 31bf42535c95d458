"""adapterkit's native format: ``adapter_config.json`` + ``adapter.safetensors``.

``adapter_config.json``::

    {"format": "adapterkit", "adapterkit_version": "0.1.0", "method": "lora",
     "config": {...the method's config...},
     "base": {"architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 576, ...,
              "modules": {"model.layers.0.self_attn.q_proj": {"type": "Linear", "weight": [576, 576]}, ...}}}

Tensor keys are ``<host module path>.<param>`` (``model.layers.0.self_attn.q_proj.lora_A``),
or just ``<param>`` for pieces on the root module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import AdapterFileError, IncompatibleBaseError
from .io import atomic_dir, read_json, read_tensors, save_tensors, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
WEIGHTS_BIN = "adapter.bin"
FORMAT = "adapterkit"

_CONFIG_DIMS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "n_embd", "n_layer", "n_head", "d_model", "image_size",
                "patch_size", "num_channels")


@dataclass
class SavedAdapter:
    method: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    base: dict[str, Any] | None
    path: Path | None = None
    format: str = FORMAT


def fingerprint(model: nn.Module, host_names: list[str]) -> dict[str, Any]:
    """What an adapter needs of its base: architecture, sizes, the targeted weights' shapes."""
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) if cfg is not None else None
    fp: dict[str, Any] = {"architecture": (archs[0] if archs else type(model).__name__)}
    if cfg is not None:
        for k in _CONFIG_DIMS:
            v = getattr(cfg, k, None)
            if isinstance(v, (int, str)):
                fp[k] = v
    mods = dict(model.named_modules())
    modules: dict[str, Any] = {}
    for n in host_names:
        m = mods[n]
        entry: dict[str, Any] = {"type": type(m).__name__}
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            entry["weight"] = list(w.shape)
        modules[n] = entry
    fp["modules"] = modules
    return fp


def check_fingerprint(model: nn.Module, base: dict[str, Any] | None, where: str) -> None:
    """Refuse a base that differs from the one the adapter was made for.

    Names the first mismatching module weight and both shapes."""
    if not base:
        return
    mods = dict(model.named_modules())
    for n, entry in (base.get("modules") or {}).items():
        m = mods.get(n)
        if m is None:
            raise IncompatibleBaseError(
                f"adapter {where} was made for a base with module {n!r}, which this model "
                f"({type(model).__name__}) does not have"
            )
        want = entry.get("weight")
        w = getattr(m, "weight", None)
        if want is not None and isinstance(w, torch.Tensor) and list(w.shape) != list(want):
            raise IncompatibleBaseError(
                f"adapter {where} does not fit this base model: {n}.weight has shape {tuple(w.shape)} here "
                f"but {tuple(want)} in the adapter's base ({base.get('architecture')})"
            )
    cfg = getattr(model, "config", None)
    for k in _CONFIG_DIMS:
        if k in base and cfg is not None and isinstance(getattr(cfg, k, None), (int, str)):
            if getattr(cfg, k) != base[k] and k != "model_type":
                raise IncompatibleBaseError(
                    f"adapter {where} was made for a base with {k}={base[k]}, this model has {k}={getattr(cfg, k)}"
                )


def write_native(path: str | Path, method: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                 base: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_tensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "method": method})
        write_json(tmp / CONFIG_NAME, {"format": FORMAT, "adapterkit_version": __version__, "method": method,
                                       "config": config, "base": base})
    return path


def read_native(path: Path, meta: dict[str, Any]) -> SavedAdapter:
    method = meta.get("method")
    if not isinstance(method, str):
        raise AdapterFileError(f"{path / CONFIG_NAME} has no 'method' field")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path / CONFIG_NAME} has no 'config' object")
    tensors = read_tensors(path, WEIGHTS_NAME, WEIGHTS_BIN)
    return SavedAdapter(method=method, config=config, tensors=tensors, base=meta.get("base"), path=path)


def is_native(meta: dict[str, Any]) -> bool:
    return meta.get("format") == FORMAT


def read_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise AdapterFileError(f"no adapter at {p}: the directory does not exist")
    if not p.is_dir():
        raise AdapterFileError(f"{p} is not a directory (an adapter is a directory with {CONFIG_NAME})")
    return p, read_json(p / CONFIG_NAME)
