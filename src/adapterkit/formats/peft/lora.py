"""PEFT <-> adapterkit for LoRA, rsLoRA and DoRA (PEFT ``peft_type: "LORA"``).

adapterkit's LoRA pieces use PEFT's parameter names, shapes and math (including the bias,
scaled by ``s`` in both), so translating is renaming. Per host module (native key after
``<host>.`` on the left, PEFT key after ``base_model.model.<host>.`` on the right)::

    lora_A                 (r, in) | (r, in, kh, kw)     lora_A.weight
    lora_B                 (out, r) | (out, r, 1, 1)     lora_B.weight
    lora_bias              (out,)                        lora_B.bias
    lora_embedding_A       (r, num_embeddings)           lora_embedding_A
    lora_embedding_B       (dim, r)                      lora_embedding_B
    lora_magnitude_vector  (out,) | (1, out, 1, 1)       lora_magnitude_vector   (DoRA)

PEFT's ``rank_pattern`` / ``alpha_pattern`` (per-module ranks and alphas) are read with
PEFT's own matching rule and checked against the tensor shapes; adapterkit's LoRA config
has one r and alpha per adapter, so an adapter whose modules really differ is refused.
"""
from __future__ import annotations

from typing import Any

import torch

from ...errors import AdapterFileError, ConfigError
from ...methods.base import AdapterConfig
from .common import (
    CODECS, IMPORTERS, PREFIX, BaseInfo, Codec, check_defaults, hosts_of, pattern_key, peft_targets, refuse_fields,
    strip_prefix,
)

#: PEFT key suffix -> native parameter name
_FROM_PEFT = {
    "lora_A.weight": "lora_A",
    "lora_B.weight": "lora_B",
    "lora_B.bias": "lora_bias",
    "lora_embedding_A": "lora_embedding_A",
    "lora_embedding_B": "lora_embedding_B",
    "lora_magnitude_vector": "lora_magnitude_vector",
}
_TO_PEFT = {v: k for k, v in _FROM_PEFT.items()}
#: native (A, B) parameter names per host kind
_FACTORS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))
_MAG = "lora_magnitude_vector"
#: whole base-layer weights PEFT saves beside a targeted embedding (save_embedding_layers="auto");
#: they are the base model's own weights, which the user already has
_IGNORED = ("base_layer.weight", "base_layer.bias")

#: PEFT LoraConfig fields adapterkit cannot honour, with the reason
_REFUSED = {
    "trainable_token_indices": "trainable token rows of the embedding are not an adapterkit method",
    "layer_replication": "it duplicates base layers",
    "target_parameters": "LoRA on bare nn.Parameters (MoE experts) is not supported",
    "use_qalora": "QALoRA pools the input groupwise",
    "alora_invocation_tokens": "activated LoRA changes which tokens the adapter sees",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "megatron_config": "Megatron parallel layers are not supported",
    "arrow_config": "Arrow routing is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "kasa_config": "KaSA is not supported",
    "velora_config": "VeLoRA is not supported",
}
#: init_lora_weights values whose adapters only make sense on a base model whose weights
#: the init rewrote (W_res = W - s B A); loading them onto the original base would be wrong
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
#: PEFT init_lora_weights -> LoRAConfig.init (the init is irrelevant once the weights are loaded;
#: EVA and orthogonal only pick the starting factors, so they load as plain LoRA)
_INITS = {True: "kaiming", False: "random", "gaussian": "gaussian", "eva": "kaiming", "orthogonal": "kaiming"}
_INITS_BACK = {"kaiming": True, "random": False, "gaussian": "gaussian"}


# ---------------------------------------------------------------------------------------
# PEFT -> adapterkit
# ---------------------------------------------------------------------------------------
def import_lora(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                where: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    refuse_fields(meta, where, _REFUSED)
    bias_mode = meta.get("bias", "none")
    if bias_mode not in (None, "none"):
        raise AdapterFileError(f"{where}: PEFT field bias={bias_mode!r} is not supported: it trains the base "
                               f"model's biases, which adapterkit adapters never hold (only bias='none')")
    init = meta.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterFileError(
            f"{where}: PEFT field init_lora_weights={init!r}: this adapter was trained on a base whose weights "
            f"the {init} init rewrote; convert it in PEFT first (save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...)) to get a plain LoRA"
        )
    if not isinstance(init, (bool, str)) or init not in _INITS:
        raise AdapterFileError(f"{where}: PEFT field init_lora_weights={init!r} is not supported")
    dora = bool(meta.get("use_dora", False))
    rslora = bool(meta.get("use_rslora", False))
    r0, alpha0 = meta.get("r", 8), meta.get("lora_alpha", 8)
    rank_pattern = meta.get("rank_pattern") or {}
    alpha_pattern = meta.get("alpha_pattern") or {}
    for fname, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in pat.values()):
            raise AdapterFileError(f"{where}: PEFT field {fname}={pat!r} must map module patterns to numbers")

    by_host: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], str] = {}
    for key, t in strip_prefix(tensors, where).items():
        if key.endswith(_IGNORED):
            continue
        for suffix, param in _FROM_PEFT.items():
            if key.endswith("." + suffix):
                host = key[: -len(suffix) - 1]
                if param == _MAG and not dora:
                    raise AdapterFileError(f"{where}: tensor {key!r} is a DoRA magnitude but the config has "
                                           f"use_dora=false")
                by_host.setdefault(host, {})[param] = t
                keys[host, param] = key
                break
        else:
            raise AdapterFileError(f"{where}: tensor {key!r} is not a LoRA tensor adapterkit knows "
                                   f"(expected keys ending in {', '.join(_FROM_PEFT)})")
    if not by_host:
        raise AdapterFileError(f"{where}: the PEFT LoRA adapter holds no LoRA tensors")

    out: dict[str, torch.Tensor] = {}
    per_host: dict[str, tuple[int, float]] = {}
    for host, params in sorted(by_host.items()):
        a_name, b_name = _FACTORS[1] if "lora_embedding_A" in params or "lora_embedding_B" in params else _FACTORS[0]
        for need in (a_name, b_name) + ((_MAG,) if dora else ()):
            if need not in params:
                have = ", ".join(repr(keys[host, p]) for p in params)
                raise AdapterFileError(f"{where}: module {host!r} has no {_TO_PEFT[need]} tensor (has: {have})")
        if len(params) > 2 + dora + ("lora_bias" in params):
            raise AdapterFileError(f"{where}: module {host!r} mixes embedding and linear LoRA tensors")
        a = params[a_name]
        r = int(a.shape[0])
        rk = pattern_key(rank_pattern, host, "rank_pattern", where)
        want_r = int(rank_pattern[rk]) if rk is not None else int(r0)
        if r != want_r:
            src = f"rank_pattern[{rk!r}]={want_r}" if rk is not None else f"r={want_r}"
            raise AdapterFileError(f"{where}: tensor {keys[host, a_name]!r} has rank {r} (shape {tuple(a.shape)}) "
                                   f"but the config says {src}")
        ak_ = pattern_key(alpha_pattern, host, "alpha_pattern", where)
        alpha = float(alpha_pattern[ak_]) if ak_ is not None else float(alpha0)
        per_host[host] = (r, alpha)
        for param, t in params.items():
            out[f"{host}.{param}"] = t

    shapes = set(per_host.values())
    if len(shapes) > 1:
        detail = ", ".join(f"{h}: r={r}, alpha={a:g}" for h, (r, a) in list(per_host.items())[:4])
        field = "rank_pattern" if len({r for r, _ in shapes}) > 1 else "alpha_pattern"
        raise AdapterFileError(
            f"{where}: PEFT field {field}={meta.get(field)!r} gives modules different ranks/alphas ({detail}, ...); "
            f"adapterkit's LoRA config has one r and alpha per adapter, so this adapter cannot be loaded faithfully"
        )
    (r, alpha), = shapes
    any_bias = any("lora_bias" in p for p in by_host.values())
    config = {"r": r, "alpha": alpha, "dropout": float(meta.get("lora_dropout", 0.0) or 0.0),
              "use_rslora": rslora, "bias": any_bias, "init": _INITS[init], "targets": sorted(by_host)}
    if any_bias and not all("lora_bias" in p for p in by_host.values()):
        raise AdapterFileError(f"{where}: only some modules have a lora_B.bias tensor")
    return ("dora" if dora else "lora"), config, out


# ---------------------------------------------------------------------------------------
# adapterkit -> PEFT
# ---------------------------------------------------------------------------------------
def export_lora(config: AdapterConfig, tensors: dict[str, torch.Tensor],
                info: BaseInfo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    dora = config.method == "dora"
    check_defaults(config, {"r", "alpha", "dropout", "use_rslora", "bias", "init"})
    init = getattr(config, "init", "kaiming")
    if init not in _INITS_BACK:  # api.save_adapter runs the method's export first (PiSSA -> plain LoRA)
        raise ConfigError(f"LoRA init={init!r} has no PEFT equivalent here; save through ak.save_adapter, "
                          f"which first rewrites it as a plain LoRA")
    hosts = hosts_of(tensors)
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        host, _, param = key.rpartition(".")
        name = _TO_PEFT.get(param)
        if not host or name is None or (param == _MAG and not dora):
            raise ConfigError(f"tensor {key!r} has no PEFT LoRA equivalent")
        out[f"{PREFIX}{host}.{name}"] = t
    init_back = _INITS_BACK[init]
    if config.bias and init_back == "gaussian":  # type: ignore[attr-defined]
        init_back = True  # PEFT refuses lora_bias with a gaussian init; the init is moot once loaded
    peft_config = {
        "task_type": info.task_type if info.task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM") else None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": float(config.dropout),  # type: ignore[attr-defined]
        "use_rslora": bool(config.use_rslora), "use_dora": dora,  # type: ignore[attr-defined]
        "lora_bias": bool(config.bias), "bias": "none",  # type: ignore[attr-defined]
        "fan_in_fan_out": any(info.host_types.get(h) == "Conv1D" for h in hosts),
        "target_modules": peft_targets(hosts, info), "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": init_back, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "exclude_modules": None,
    }
    return peft_config, out


CODECS["lora"] = Codec("LORA", export_lora)
CODECS["dora"] = Codec("LORA", export_lora)
IMPORTERS["LORA"] = import_lora
