"""AdapterHub LoRA (``LoRAConfig``, ``composition_mode="add"``) and (IA)^3 (``IA3Config``,
``composition_mode="scale"``) <-> adapterkit's ``lora`` and ``ia3`` methods.

AdapterHub's math (``adapters/methods/lora.py``), per wrapped Linear ``y = W x + b``:

* LoRA: ``y + (alpha / r) * B A x``, ``<module>.loras.<name>.lora_A`` (r, in), ``lora_B`` (out, r):
  adapterkit's LoRA with the same A, B, r and alpha;
* (IA)^3: ``y * (alpha * l)`` (the bias is scaled too), ``lora_B`` = l (out, 1): adapterkit's (IA)^3
  with output scaling, ``ia3_l = alpha * l``.

GPT-2's fused ``attn.c_attn`` is one "merged" layer with one block per enabled attention matrix
(``attn_matrices``, in q, k, v order): LoRA ``lora_A`` (n r, in), ``lora_B`` (n d, r) with group
``g`` giving ``B_g A_g`` for its slot of the output (a grouped convolution), (IA)^3 ``lora_B`` (n d, 1)
with the disabled slots scaled by ``alpha`` alone. On import this becomes one rank-``n r`` LoRA
(``A = lora_A``, ``B`` block-diagonal in the slots, alpha scaled by n so alpha/r is unchanged); the
other modules' factors are zero-padded to that rank (same product). On export a rank-r LoRA on
``c_attn`` is written with ``attn_matrices = [q, k, v]`` and ``lora_A`` repeated per slot, exactly.

Sites AdapterHub can hold per layer (see ``common.LORA_SITES``): the attention q/k/v projections,
"intermediate" and "output"; every non-``leave_out`` layer gets the same ones.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from ...errors import AdapterFileError, ConfigError
from ...methods.base import AdapterConfig
from .common import LORA_SITES, BaseDesc, check_family, check_fields, is_number, leave_out, refuse, split_layer

QKV = ("q", "k", "v")

RULES: dict[str, Any] = {
    "architecture": (lambda v: v == "lora", "not a LoRA adapter"),
    "selfattn_lora": None, "intermediate_lora": None, "output_lora": None, "leave_out": None,  # the keys say where
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "must be a positive integer"),
    "alpha": (lambda v: is_number(v) and v != 0, "must be a non-zero number"),
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, "must be in [0, 1)"),
    "attn_matrices": (lambda v: isinstance(v, list) and set(v) <= set(QKV), "must be a list of 'q', 'k', 'v'"),
    "composition_mode": (lambda v: v in ("add", "scale"), "adapterkit maps 'add' (LoRA) and 'scale' ((IA)^3)"),
    "init_weights": (lambda v: v in ("lora", "bert", "ia3"), "VeRA's frozen random factors are not mapped"),
    "init_weights_seed": None, "dtype": None,  # a trained adapter's weights come from the file; dtype: cast on load
    "use_gating": (lambda v: v is False, "UniPELT-style gates have no adapterkit equivalent"),
    "use_dora": (lambda v: v is False, "AdapterHub's DoRA is not mapped (adapterkit's dora method is PEFT's)"),
    "vera_d": (lambda v: v is None, "VeRA is not mapped"), "vera_b": (lambda v: v is None, "VeRA is not mapped"),
}

#: LoRAConfig's fields and defaults in adapters 1.3 (written in full on export)
DEFAULTS: dict[str, Any] = {
    "architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False, "leave_out": [],
    "r": 8, "alpha": 8, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add",
    "init_weights": "lora", "init_weights_seed": None, "use_gating": False, "use_dora": False, "vera_d": None,
    "vera_b": None, "dtype": None,
}

KEY_RE = re.compile(r"^(?P<host>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>lora_A|lora_B)$")


def _merged(mt: str, host: str) -> bool:
    try:
        _, _, rest = split_layer(host)
    except ValueError:
        return False
    return LORA_SITES.get(mt, {}).get(rest, (None, None))[1] == "qkv"


def read(meta: dict[str, Any], cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
         where: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """An AdapterHub LoRA / (IA)^3 adapter as (``"lora"`` or ``"ia3"``, config dict, native tensors)."""
    mt = meta.get("model_type")
    check_family(mt, where)
    check_fields(cfg, RULES, where)
    name, scale = meta.get("name"), cfg.get("composition_mode", "add") == "scale"
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("alpha", 8))
    slots = [i for i, q in enumerate(QKV) if q in cfg.get("attn_matrices", ["q", "v"])]
    if scale and r != 1:
        raise refuse(where, "r", r, "composition_mode='scale' ((IA)^3) needs r = 1")
    if scale and cfg.get("dropout", 0):
        raise refuse(where, "dropout", cfg.get("dropout"), "(IA)^3 has no dropout")
    hosts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY_RE.match(key)
        if not m or m["name"] != name:
            raise AdapterFileError(f"{where}: tensor {key!r} is not part of a LoRA adapter named {name!r}")
        hosts.setdefault(m["host"], {})[m["param"]] = t
    if not hosts:
        raise AdapterFileError(f"{where}: the weights file holds no tensors of adapter {name!r}")
    want = ["lora_B"] if scale else ["lora_A", "lora_B"]
    for h, ps in hosts.items():
        if sorted(ps) != want:
            raise AdapterFileError(f"{where}: module {h!r} holds {sorted(ps)}, expected {want}")
    if scale:
        vectors = {f"{h}.ia3_l": _ia3_vector(mt, h, ps["lora_B"], slots, alpha, where) for h, ps in hosts.items()}
        return "ia3", {"targets": sorted(hosts)}, vectors
    n_max = max((len(slots) if _merged(mt, h) else 1) for h in hosts)
    rank = n_max * r
    out: dict[str, torch.Tensor] = {}
    for h, ps in sorted(hosts.items()):
        a, b = ps["lora_A"], ps["lora_B"]
        n = len(slots) if _merged(mt, h) else 1
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != n * r or b.shape[1] != r or b.shape[0] % n:
            fit = f"r={r}" + (f" with attn_matrices {cfg.get('attn_matrices')}" if n > 1 else "")
            raise AdapterFileError(f"{where}: module {h!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                                   f"do not fit {fit}")
        if _merged(mt, h):
            d = b.shape[0] // n
            big_b = b.new_zeros(3 * d, rank)
            for g, slot in enumerate(slots):
                big_b[slot * d:(slot + 1) * d, g * r:(g + 1) * r] = b[g * d:(g + 1) * d]
            b = big_b
        out[f"{h}.lora_A"] = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        out[f"{h}.lora_B"] = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    config = {"r": rank, "alpha": alpha * rank / r, "dropout": float(cfg.get("dropout", 0.0)),
              "targets": sorted(hosts), "init": "kaiming"}
    return "lora", config, out


def _ia3_vector(mt: str, host: str, lb: torch.Tensor, slots: list[int], alpha: float, where: str) -> torch.Tensor:
    """adapterkit's ``ia3_l`` (out, 1) for AdapterHub's ``lora_B``: ``alpha * l``, merged slots padded with 1."""
    if lb.dim() != 2 or lb.shape[1] != 1:
        raise AdapterFileError(f"{where}: module {host!r}: (IA)^3 lora_B has shape {tuple(lb.shape)}, "
                               f"expected (out, 1)")
    if _merged(mt, host):
        d = lb.shape[0] // len(slots)
        full = lb.new_ones(3 * d, 1)
        for g, slot in enumerate(slots):
            full[slot * d:(slot + 1) * d] = lb[g * d:(g + 1) * d]
        lb = full
    return lb * alpha


def export(method: str, config: AdapterConfig, tensors: dict[str, torch.Tensor], desc: BaseDesc,
           name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(AdapterHub ``config`` dict, AdapterHub tensors) for a native ``lora`` or ``ia3`` adapter.

    Raises:
        ConfigError: a module, tensor or config value AdapterHub cannot express (named).
    """
    mt = desc.model_type
    check_family(mt, f"{method} export", export=True)
    sites = LORA_SITES[mt]
    ia3 = method == "ia3"
    params = ("ia3_l",) if ia3 else ("lora_A", "lora_B")
    hosts: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        h, _, p = k.rpartition(".")
        if p not in params:
            raise ConfigError(f"{method} export: tensor {k!r} has no AdapterHub counterpart")
        hosts.setdefault(h, {})[p] = t
    ah: dict[str, Any] = {**DEFAULTS, "selfattn_lora": False}
    if ia3:
        ah.update(r=1, alpha=1, composition_mode="scale", init_weights="ia3")
    else:
        r = getattr(config, "r")
        if getattr(config, "bias", False):
            raise ConfigError("lora export: LoRAConfig.bias=True; AdapterHub's LoRA has no bias")
        # AdapterHub scales by alpha / r; rsLoRA's alpha / sqrt(r) is the same with alpha' = alpha sqrt(r)
        alpha = config.alpha  # type: ignore[attr-defined]
        if getattr(config, "use_rslora", False):
            alpha *= math.sqrt(r)
        ah.update(r=r, alpha=alpha, dropout=float(config.dropout))  # type: ignore[attr-defined]
    used: dict[int, set[str]] = {}
    mats: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for h, ps in hosts.items():
        try:
            _, idx, rest = split_layer(h)
        except ValueError:
            rest, idx = "", -1
        if rest not in sites:
            raise ConfigError(f"{method} export: module {h!r}; AdapterHub's LoRA/(IA)^3 wraps only "
                              f"{', '.join(sites)} of a {mt} layer")
        loc, mat = sites[rest]
        used.setdefault(idx, set()).add(rest)
        if mat is not None:
            mats.update(QKV if mat == "qkv" else (mat,))
        pre = f"{h}.loras.{name}"
        if ia3:
            l = ps["ia3_l"]
            if l.dim() != 2 or l.shape[1] != 1:
                raise ConfigError(f"ia3 export: module {h!r} scales its input (feedforward_targets); AdapterHub's "
                                  f"(IA)^3 only scales outputs")
            out[f"{pre}.lora_B"] = l
            continue
        a, b = ps["lora_A"], ps["lora_B"]
        if a.dim() != 2:
            raise ConfigError(f"lora export: module {h!r} is not a Linear layer (lora_A {tuple(a.shape)})")
        out[f"{pre}.lora_A"] = torch.cat([a] * 3) if mat == "qkv" else a  # merged: one block per slot, B unchanged
        out[f"{pre}.lora_B"] = b
    want = set().union(*used.values())
    for idx, rel in used.items():
        if rel != want:
            missing = sorted(want - rel)
            raise ConfigError(f"{method} export: layer {idx} lacks {missing[0]!r} that other layers adapt; AdapterHub "
                              f"wraps the same modules in every layer")
    locs = {sites[r][0] for r in want}
    ah.update(selfattn_lora="selfattn" in locs, intermediate_lora="intermediate" in locs,
              output_lora="output" in locs, attn_matrices=[m for m in QKV if m in mats] or DEFAULTS["attn_matrices"],
              leave_out=leave_out(desc, set(used), f"a {method} adapter"))
    return ah, out
