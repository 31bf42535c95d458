"""AdapterHub interop: read adapters saved by the ``adapters`` package (1.x) and write ours in its format.

Mapped, exactly (checked against adapters 1.3 on BERT, RoBERTa, GPT-2 and Llama):

=======================================  ==========================================================
AdapterHub                               adapterkit
=======================================  ==========================================================
``BnConfig`` (seq_bn, double_seq_bn,     ``bottleneck`` (pfeiffer / houlsby / parallel placements,
par_bn, scaled_par_bn, ...)              ``original_ln_before``, ``residual_before_ln``)
``CompacterConfig``, ``Compacter++``     ``compacter`` (shared or per-layer rules)
``LoRAConfig`` (composition "add")       ``lora``
``IA3Config`` (composition "scale")      ``ia3`` (output scaling)
static prediction head files             ``modules_to_save`` copies of the head module
=======================================  ==========================================================

Everything else is refused with :class:`AdapterFileError` (reading) or :class:`ConfigError`
(writing) naming the AdapterHub field and value, never dropped: prefix tuning (AdapterHub keeps the
real tokens at positions 0.., adapterkit's KV-cache prefix moves them to P..), prompt tuning, Compacter options with no
adapterkit equivalent (``factorized_phm_rule``, ``shared_W_phm``, ``phm_c_init`` ...), ConfigUnion
(MAM, UniPELT), VeRA, DoRA, gates, invertible adapters, ReFT, flex heads (``head_config.json``
with a ``config``). See :mod:`.bottleneck`, :mod:`.compacter` and :mod:`.lora`
for the math.

Files: ``adapter_config.json`` (``{"config": ..., "name", "model_type", "model_class",
"hidden_size", "version"}``), ``pytorch_adapter.bin`` (AdapterHub's default; read only with
``weights_only=True``) or ``adapter.safetensors``; a head in ``head_config.json`` +
``pytorch_model_head.bin`` / ``model_head.safetensors``. The writer writes both weight
files, so ``model.load_adapter(dir)`` works with and without ``use_safetensors``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import AdapterFileError, ConfigError
from ...methods.base import AdapterConfig
from ..io import atomic_dir, read_json, read_tensors, save_tensors, write_json
from ..native import CONFIG_NAME, SavedAdapter
from . import bottleneck as _bn, compacter as _compacter, lora as _lora
from .common import AH_VERSION, AH_WEIGHTS, AH_WEIGHTS_BIN, BaseDesc, desc_from_fingerprint, desc_from_model

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS_BIN = "pytorch_model_head.bin"
HEAD_WEIGHTS = "model_head.safetensors"
#: where modules_to_save copies keep their tensors: ``<module path>.modules_to_save.<param>``
COPY = "modules_to_save"
#: AdapterHub ``architecture`` values refused by name, with the reason
UNSUPPORTED = {
    "prefix_tuning": "AdapterHub adds its prefixes inside attention with the real tokens at positions 0..; "
                     "adapterkit's (PEFT's) prefix is the KV cache, which moves them to positions P.. (other rotary "
                     "angles / position embeddings), and covers causal LMs only; not mapped",
    "prompt_tuning": "AdapterHub's prompt tuning is not mapped",
    "union": "ConfigUnion (MAM, UniPELT) combines several methods; not mapped",
    "mtl_lora": "MTL-LoRA is not mapped",
    "reft": "ReFT interventions are not mapped",
}


def is_adapterhub(meta: dict[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` dict was written by AdapterHub (``adapters`` /
    ``adapter-transformers``): a ``config`` plus the ``model_type`` / ``model_class`` it records."""
    return "format" not in meta and "peft_type" not in meta and "config" in meta and (
        "model_type" in meta or "model_class" in meta or str(meta.get("version", "")).startswith("adapter"))


def from_adapterhub(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    where: str = "AdapterHub adapter") -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(native method, native config dict, native tensors) for an AdapterHub config + tensors (no head)."""
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{where}: AdapterHub field 'config' must be the full config object, got {cfg!r}")
    if not isinstance(meta.get("name"), str):
        raise AdapterFileError(f"{where}: AdapterHub field 'name' (the adapter's name in the tensor keys) is missing")
    arch = cfg.get("architecture")
    if arch in UNSUPPORTED:
        raise AdapterFileError(f"{where}: AdapterHub config field 'architecture' = {arch!r} is not supported: "
                               f"{UNSUPPORTED[arch]}")
    if arch is None:
        if cfg.get("phm_layer"):
            return _compacter.read(meta, cfg, tensors, where)
        return _bn.read(meta, cfg, tensors, where)
    if arch == "lora":
        return _lora.read(meta, cfg, tensors, where)
    raise AdapterFileError(f"{where}: AdapterHub config field 'architecture' = {arch!r} is unknown to adapterkit")


def read_adapterhub(path: str | Path, meta: dict[str, Any]) -> SavedAdapter:
    """Read an AdapterHub adapter directory (and its static head, if saved) into native names.

    Returns:
        A :class:`SavedAdapter` whose base records AdapterHub's ``model_type`` and ``hidden_size``
        (checked against the model on load).

    Raises:
        AdapterFileError: a missing/corrupt file, or an AdapterHub feature adapterkit cannot reproduce.
    """
    path = Path(path)
    where = str(path / CONFIG_NAME)
    tensors = read_tensors(path, AH_WEIGHTS, AH_WEIGHTS_BIN)
    method, config, native = from_adapterhub(meta, tensors, where)
    heads = _read_head(path)
    from ...registry import get_method

    if "modules_to_save" not in get_method(method).config_cls.field_names():
        if heads:
            raise AdapterFileError(f"{path}: this adapter carries a prediction head ({HEAD_CONFIG}); this adapterkit "
                                   f"version has no modules_to_save to hold it")
    elif heads:
        # a static head is every module outside the base model: one copy per top-level module
        config["modules_to_save"] = sorted({k.split(".", 1)[0] for k in heads})
        native.update({f"{k.split('.', 1)[0]}.{COPY}.{k.split('.', 1)[1]}": v for k, v in heads.items()})
    else:
        config["modules_to_save"] = []  # a head-less file: do not pick a default head
    base = {"architecture": meta.get("model_class"), "model_type": meta.get("model_type"), "modules": {}}
    if isinstance(meta.get("hidden_size"), int):
        base["hidden_size"] = meta["hidden_size"]
    return SavedAdapter(method=method, config=config, tensors=native, base=base, path=path, format="adapterhub")


def _read_head(path: Path) -> dict[str, torch.Tensor]:
    """A static head's tensors by full parameter name (``classifier.weight``); {} without head files."""
    if not (path / HEAD_CONFIG).is_file():
        return {}
    hc = read_json(path / HEAD_CONFIG)
    if hc.get("config") is not None:
        raise AdapterFileError(f"{path / HEAD_CONFIG}: AdapterHub head field 'config' = "
                               f"{hc['config'].get('head_type') if isinstance(hc['config'], dict) else hc['config']!r} "
                               f"(a flex head of adapters' *AdapterModel classes) is not supported; static heads "
                               f"of transformers classes map onto modules_to_save")
    heads = read_tensors(path, HEAD_WEIGHTS, HEAD_WEIGHTS_BIN)
    bad = [k for k in heads if "." not in k]
    if bad:
        raise AdapterFileError(f"{path}: head tensor {bad[0]!r} is not a module parameter")
    return heads


def to_adapterhub(method: str, config: AdapterConfig, tensors: dict[str, torch.Tensor], desc: BaseDesc,
                  name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(AdapterHub adapter_config.json dict, adapter tensors, head tensors) for a native adapter.

    Raises:
        ConfigError: the method, a module or a config value AdapterHub cannot express (named).
    """
    if not name or "." in name:
        raise ConfigError(f"AdapterHub export: adapter name {name!r} must be non-empty and without '.'")
    body = {k: v for k, v in tensors.items() if f".{COPY}." not in f".{k}"}
    head = {k.replace(f".{COPY}.", "."): v for k, v in tensors.items() if f".{COPY}." in f".{k}"}
    if method == "bottleneck":
        cfg, out = _bn.export(config, body, desc, name)  # type: ignore[arg-type]
    elif method == "compacter":
        cfg, out = _compacter.export(config, body, desc, name)  # type: ignore[arg-type]
    elif method in ("lora", "ia3"):
        cfg, out = _lora.export(method, config, body, desc, name)
    else:
        raise ConfigError(f"adapter method {method!r} has no AdapterHub equivalent adapterkit can write; "
                          f"AdapterHub export supports bottleneck, compacter, lora, ia3")
    meta = {"config": cfg, "name": name, "model_type": desc.model_type, "model_class": desc.model_class,
            "hidden_size": desc.hidden_size, "model_name": desc.model_name, "version": AH_VERSION}
    return meta, out, head


def write_adapterhub_desc(path: str | Path, desc: BaseDesc, method: str, config: AdapterConfig,
                          tensors: dict[str, torch.Tensor], name: str, num_labels: int | None = None) -> Path:
    """:func:`write_adapterhub` with the base given by ``desc`` instead of a live model."""
    meta, out, head = to_adapterhub(method, config, tensors, desc, name)
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_tensors(out, tmp / AH_WEIGHTS, metadata={"format": "pt"})
        torch.save({k: v.detach().contiguous().cpu() for k, v in out.items()}, tmp / AH_WEIGHTS_BIN)
        write_json(tmp / CONFIG_NAME, meta)
        if head:
            save_tensors(head, tmp / HEAD_WEIGHTS, metadata={"format": "pt"})
            torch.save({k: v.detach().contiguous().cpu() for k, v in head.items()}, tmp / HEAD_WEIGHTS_BIN)
            hc = {k: meta[k] for k in ("model_type", "model_class", "hidden_size", "model_name", "version")}
            write_json(tmp / HEAD_CONFIG, {**hc, "config": None, "name": None,
                                           **({"num_labels": num_labels} if num_labels is not None else {})})
    return path


def write_adapterhub(path: str | Path, model: nn.Module, method: str, config: AdapterConfig,
                     tensors: dict[str, torch.Tensor], name: str) -> Path:
    """Write adapter ``tensors`` (native keys) as an AdapterHub directory, atomically.

    Args:
        path: the directory to (re)write.
        model: the transformers model the adapter belongs to (its model_type, class, sizes).
        method, config, tensors: the adapter (``adapter_state_dict`` keys).
        name: the adapter's name inside the AdapterHub keys (``...adapters.<name>...``).

    Returns:
        ``path``.

    Raises:
        ConfigError: anything AdapterHub cannot express, named; nothing is written then.
    """
    desc = desc_from_model(model)
    return write_adapterhub_desc(path, desc, method, config, tensors, name,
                                 num_labels=getattr(getattr(model, "config", None), "num_labels", None))


__all__ = ["is_adapterhub", "read_adapterhub", "write_adapterhub", "write_adapterhub_desc", "to_adapterhub",
           "from_adapterhub", "BaseDesc", "desc_from_model", "desc_from_fingerprint"]
