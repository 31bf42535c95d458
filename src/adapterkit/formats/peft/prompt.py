"""PEFT <-> adapterkit for prompt tuning and prefix tuning (``PROMPT_TUNING``, ``PREFIX_TUNING``).

Both sides store one tensor under the key ``prompt_embeddings``: (num_virtual_tokens,
token_dim) for a decoder-only model (PEFT's ``num_transformer_submodules=1``). PEFT's
prompt-learning files have no ``base_model.model.`` prefix (the table lives on the
PeftModel, not on a base module). adapterkit's prompt tuning drives decoder-only causal
LMs, so only ``task_type: "CAUSAL_LM"`` files are read.
"""
from __future__ import annotations

from typing import Any

import torch

from ...errors import AdapterFileError, ConfigError
from ...methods.base import AdapterConfig
from .common import CODECS, IMPORTERS, BaseInfo, Codec, check_defaults

#: PEFT prompt_tuning_init -> PromptTuningConfig.init. TEXT has no token ids in the file (PEFT
#: keeps the text and a tokenizer name); the init is irrelevant once the table is loaded.
_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "random"}
_INITS_BACK = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "RANDOM"}


def model_dims(model_config: Any) -> dict[str, int | None]:
    """PEFT's prompt-learning sizes from a transformers config (None where absent;
    PEFT fills those from the model's config when it loads the adapter)."""

    def first(*names: str) -> int | None:
        for n in names:
            v = getattr(model_config, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None

    return {"num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
            "token_dim": first("hidden_size", "n_embd", "d_model"),
            "num_attention_heads": first("num_attention_heads", "n_head", "num_heads")}


def check_prompt_meta(meta: dict[str, Any], where: str) -> int:
    """Common checks of a PEFT prompt-learning config; returns num_virtual_tokens."""
    task = meta.get("task_type")
    if task != "CAUSAL_LM":
        raise AdapterFileError(f"{where}: PEFT field task_type={task!r} is not supported for "
                               f"{meta.get('peft_type')}: adapterkit drives decoder-only causal LMs (CAUSAL_LM)")
    subs = meta.get("num_transformer_submodules") or 1
    if subs != 1:
        raise AdapterFileError(f"{where}: PEFT field num_transformer_submodules={subs!r} is not supported "
                               f"(encoder-decoder prompts); only 1")
    p = meta.get("num_virtual_tokens")
    if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
        raise AdapterFileError(f"{where}: PEFT field num_virtual_tokens={p!r} must be a positive integer")
    return p


def single_table(tensors: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    t = tensors.get("prompt_embeddings")
    if t is None or len(tensors) != 1:
        raise AdapterFileError(f"{where}: a PEFT prompt-learning file must hold exactly one tensor "
                               f"'prompt_embeddings', found {sorted(tensors)[:5]}")
    if t.dim() != 2:
        raise AdapterFileError(f"{where}: tensor 'prompt_embeddings' has shape {tuple(t.shape)}; expected 2-D")
    return t


def import_prompt(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                  where: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    p = check_prompt_meta(meta, where)
    t = single_table(tensors, where)
    if t.shape[0] != p:
        raise AdapterFileError(f"{where}: tensor 'prompt_embeddings' has {t.shape[0]} rows (shape {tuple(t.shape)}) "
                               f"but num_virtual_tokens={p}")
    dim = meta.get("token_dim")
    if dim is not None and t.shape[1] != dim:
        raise AdapterFileError(f"{where}: tensor 'prompt_embeddings' has shape {tuple(t.shape)} but token_dim={dim}")
    init = _INITS.get(str(meta.get("prompt_tuning_init", "RANDOM")).upper(), "random")
    return "prompt", {"num_virtual_tokens": p, "init": init}, {"prompt_embeddings": t}


def export_prompt(config: AdapterConfig, tensors: dict[str, torch.Tensor],
                  info: BaseInfo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    check_defaults(config, {"num_virtual_tokens", "init", "init_token_ids"})
    t = tensors.get("prompt_embeddings")
    if t is None or len(tensors) != 1:
        raise ConfigError(f"a prompt-tuning adapter must hold exactly one tensor 'prompt_embeddings', got {sorted(tensors)}")
    dims = model_dims(info.model_config)
    peft_config = {
        "task_type": "CAUSAL_LM", "num_virtual_tokens": int(config.num_virtual_tokens),  # type: ignore[attr-defined]
        "token_dim": int(t.shape[1]), "num_transformer_submodules": 1,
        "num_attention_heads": dims["num_attention_heads"], "num_layers": dims["num_layers"],
        "prompt_tuning_init": _INITS_BACK.get(getattr(config, "init", "random"), "RANDOM"),
        "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        "modules_to_save": None,
    }
    return peft_config, {"prompt_embeddings": t}


CODECS["prompt"] = Codec("PROMPT_TUNING", export_prompt)
IMPORTERS["PROMPT_TUNING"] = import_prompt


# ---------------------------------------------------------------------------------------
# prefix tuning (PEFT ``peft_type: "PREFIX_TUNING"``)
# ---------------------------------------------------------------------------------------
# PEFT saves the prefix flattened: ``prompt_embeddings`` (P, num_layers * 2 * token_dim),
# token_dim = num_kv_heads * head_dim, even with prefix_projection (it saves the MLP's
# output). So a PEFT prefix file loads as prefix_projection=False, and an adapterkit prefix
# with a projection is saved through its MLP (lossless for inference, as in PEFT).
def import_prefix(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                  where: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    p = check_prompt_meta(meta, where)
    t = single_table(tensors, where)
    if t.shape[0] != p:
        raise AdapterFileError(f"{where}: tensor 'prompt_embeddings' has {t.shape[0]} rows (shape {tuple(t.shape)}) "
                               f"but num_virtual_tokens={p}")
    layers, dim = meta.get("num_layers"), meta.get("token_dim")
    if isinstance(layers, int) and isinstance(dim, int) and t.shape[1] != layers * 2 * dim:
        raise AdapterFileError(f"{where}: tensor 'prompt_embeddings' has shape {tuple(t.shape)} but num_layers * 2 * "
                               f"token_dim = {layers} * 2 * {dim} = {layers * 2 * dim}")
    return "prefix", {"num_virtual_tokens": p, "prefix_projection": False}, {"prompt_embeddings": t}


def export_prefix(config: AdapterConfig, tensors: dict[str, torch.Tensor],
                  info: BaseInfo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from types import SimpleNamespace

    from ...methods.prefix import flatten_prefix, prefix_dims

    check_defaults(config, {"num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "init"})
    flat = flatten_prefix(config, tensors).detach()  # type: ignore[arg-type]  # (P, num_layers*2*kv_dim)
    p = int(config.num_virtual_tokens)  # type: ignore[attr-defined]
    layers = heads = dim = None
    if info.model_config is not None:
        d = prefix_dims(SimpleNamespace(config=info.model_config))  # type: ignore[arg-type]
        layers, heads, dim = d.num_layers, d.num_kv_heads, d.kv_dim
        if tuple(flat.shape) != (p, layers * 2 * dim):
            raise ConfigError(f"prefix tensor has shape {tuple(flat.shape)} but the base model needs "
                              f"({p}, {layers * 2 * dim}) = (P, num_layers * 2 * num_kv_heads * head_dim)")
    peft_config = {
        "task_type": "CAUSAL_LM", "num_virtual_tokens": p, "token_dim": dim, "num_transformer_submodules": 1,
        "num_attention_heads": heads, "num_layers": layers, "prefix_projection": False,
        "encoder_hidden_size": dim, "modules_to_save": None,
    }
    return peft_config, {"prompt_embeddings": flat.contiguous()}


CODECS["prefix"] = Codec("PREFIX_TUNING", export_prefix)
IMPORTERS["PREFIX_TUNING"] = import_prefix
