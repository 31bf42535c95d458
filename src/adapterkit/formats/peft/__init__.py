"""PEFT interop: read and write Hugging Face PEFT adapter directories.

A PEFT directory holds ``adapter_config.json`` (PEFT's config dataclass as JSON, with
``peft_type``) and ``adapter_model.safetensors`` (or a legacy ``adapter_model.bin``, read
only when no safetensors file exists and only with ``weights_only=True``).

PEFT keys are the base model's module path behind ``base_model.model.`` with the adapter
name dropped (native key on the right)::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (r, in)      model.layers.0.self_attn.q_proj.lora_A
    base_model.model.model.embed_tokens.lora_embedding_A            (r, vocab)   model.embed_tokens.lora_embedding_A
    base_model.model.model.layers.0.mlp.down_proj.ia3_l             (1, in)      model.layers.0.mlp.down_proj.ia3_l
    prompt_embeddings                                               (P, dim)     prompt_embeddings

adapterkit's methods use PEFT's parameter names, shapes and math, so the codecs
(:mod:`.lora` for LoRA/rsLoRA/DoRA, :mod:`.ia3`, :mod:`.prompt` for prompt and prefix
tuning) mostly rename keys and map config fields. ``modules_to_save`` (modules trained
in full, e.g. a classification head) is shared by every codec: PEFT saves each copy under
the module's own keys (``base_model.model.score.weight``), adapterkit under
``score.modules_to_save.weight``. Anything PEFT can express that
adapterkit cannot (trainable base biases, PiSSA-style inits that
rewrite the base weights, modules with different ranks, ...) is refused with an
:class:`AdapterFileError` naming the field, never silently dropped; on export, a config
field PEFT cannot express is refused with a :class:`ConfigError`.

On import the adapter's targets are the exact module paths found in the tensor keys.
On export they are the modules' leaf names when those select exactly the adapted modules
(``["q_proj", "v_proj"]``), else the full module paths. PEFT files carry no base
fingerprint: :func:`adapterkit.load_adapter` checks every tensor shape against the model
instead and names the first mismatch.

Entry points: :func:`read_peft` / :func:`write_peft` (used by ``ak.load_adapter`` and
``ak.save_adapter(..., format="peft")``), :func:`to_peft` / :func:`from_peft` (in memory),
and :func:`adapterkit.formats.convert.convert` for whole directories.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import AdapterFileError, ConfigError
from ...methods.base import AdapterConfig
from ..io import atomic_dir, read_tensors, save_tensors, write_json
from ..native import CONFIG_NAME, SavedAdapter
from . import ia3 as _ia3, lora as _lora, prompt as _prompt  # noqa: F401  (each codec registers itself)
from .common import (
    CODECS, IMPORTERS, PEFT_VERSION, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN, PREFIX, SAVED, BaseInfo, base_info, hosts_of,
    saved_names, split_copies,
)


#: PEFT types whose model is not behind ``base_model.model.`` (module copies keyed otherwise)
_PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")


# ---------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------
def read_peft(path: Path, meta: dict[str, Any]) -> SavedAdapter:
    """Read a PEFT adapter directory into native method / config / tensor names (base=None)."""
    path = Path(path)
    tensors = read_tensors(path, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN)
    method, config, native = from_peft(meta, tensors, where=str(path / CONFIG_NAME))
    return SavedAdapter(method=method, config=config, tensors=native, base=None, path=path, format="peft")


def write_peft(path: str | Path, model: nn.Module | None, method: str, config: AdapterConfig,
               tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter ``tensors`` (native keys) as a PEFT directory, atomically.

    ``model`` (optional) gives the targeted modules' types, short target names and the
    task type; without it the saved targets are the full module paths.
    """
    info = base_info(model, hosts_of(tensors)) if model is not None else BaseInfo()
    return write_peft_info(path, info, method, config, tensors)


def write_peft_info(path: str | Path, info: BaseInfo, method: str, config: AdapterConfig,
                    tensors: dict[str, torch.Tensor]) -> Path:
    """:func:`write_peft` with the base described by ``info`` instead of a live model."""
    peft_config, peft_tensors = to_peft(method, config, tensors, info)
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_tensors(peft_tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, peft_config)
    return path


def to_peft(method: str, config: AdapterConfig, tensors: dict[str, torch.Tensor],
            info: BaseInfo | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(PEFT adapter_config.json dict, PEFT tensors) for a native adapter."""
    codec = CODECS.get(method)
    if codec is None:
        raise ConfigError(
            f"adapter method {method!r} has no PEFT equivalent; PEFT export supports: "
            f"{', '.join(sorted(CODECS))}"
        )
    info = info or BaseInfo()
    copies = {k: t for k, t in tensors.items() if SAVED in f".{k}"}
    if copies and codec.peft_type in _PROMPT_LEARNING:
        raise ConfigError(f"PEFT keeps the module copies (modules_to_save) of {codec.peft_type} adapters under "
                          f"other keys than adapterkit writes; save this {method} adapter in the native format")
    own = {k: t for k, t in tensors.items() if k not in copies}
    peft_config, peft_tensors = codec.export(config, own, info)
    task = peft_config.pop("task_type", None)
    if copies:
        hosts = sorted({f".{k}".split(SAVED)[0][1:] for k in copies})
        peft_config["modules_to_save"] = saved_names(hosts, info)
        # PEFT's file keys drop the copy's "modules_to_save.<adapter>." part
        peft_tensors.update({PREFIX + f".{k}".replace(SAVED, ".", 1)[1:]: t for k, t in copies.items()})
        if info.task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
            task = info.task_type  # PEFT then builds the matching PeftModelFor... class
    head = {"peft_type": codec.peft_type, "task_type": task,
            "base_model_name_or_path": info.name_or_path, "revision": None, "inference_mode": True,
            "auto_mapping": None, "peft_version": PEFT_VERSION}
    return {**head, **peft_config}, peft_tensors


def from_peft(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
              where: str = "PEFT adapter") -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(native method, native config dict, native tensors) for a PEFT config + tensors."""
    ptype = meta.get("peft_type")
    importer = IMPORTERS.get(str(ptype).upper()) if isinstance(ptype, str) else None
    if importer is None:
        raise AdapterFileError(
            f"{where}: peft_type {ptype!r} is not supported; adapterkit reads "
            f"{', '.join(sorted(IMPORTERS))}"
        )
    copies, tensors = split_copies(meta.get("modules_to_save"), tensors, where)
    if copies and str(ptype).upper() in _PROMPT_LEARNING:
        raise AdapterFileError(f"{where}: PEFT field modules_to_save={meta.get('modules_to_save')!r} is not "
                               f"supported for {ptype} adapters (only for LORA and IA3)")
    method, config, native = importer({**meta, "modules_to_save": None}, tensors, where)
    config["modules_to_save"] = sorted({k.split(SAVED)[0] for k in copies})
    return method, config, {**native, **copies}


def convert(in_dir: str | Path, out_dir: str | Path, to: str = "peft", model: nn.Module | None = None) -> Path:
    """:func:`adapterkit.formats.convert.convert` (native <-> PEFT directories), re-exported here."""
    from ..convert import convert as _convert  # formats.convert imports this package

    return _convert(in_dir, out_dir, to=to, model=model)


__all__ = ["read_peft", "write_peft", "write_peft_info", "to_peft", "from_peft", "convert", "BaseInfo", "base_info",
           "PEFT_WEIGHTS", "PEFT_WEIGHTS_BIN"]
