"""AdapterHub Compacter / Compacter++ (``BnConfig`` with ``phm_layer=True``) <-> adapterkit's ``compacter``.

Placement: exactly as for bottleneck adapters (:mod:`.bottleneck`). The PHM layers compute the same
function in transposed layouts. AdapterHub: ``y = x H + b`` with ``H = sum_i kron(A_i, L_i R_i)``
(``phm_rule`` A: (n, n, n), ``W_left`` L: (n, in/n, r), ``W_right`` R: (n, r, out/n)); adapterkit:
``y = x W^T + b`` with ``W = sum_i kron(A'_i, L'_i R'_i)`` (L': (n, out/n, r), R': (n, r, in/n)).
Since ``kron(A, B)^T = kron(A^T, B^T)``, they are equal for ``A' = A^T``, ``L' = R^T``, ``R' = L^T``
(each transposed over its last two axes), which is the whole mapping.

AdapterHub keeps the shared rule (``shared_phm_rule=True``) at ``<base model>.shared_parameters.<name>.phm_rule``,
adapterkit on the root piece (``phm_rule``). Refused by name: factorised rules, unfactorised or
shared weights (``factorized_phm_W=False``, ``shared_W_phm``), frozen rules (``learn_phm=False``), the
inits adapterkit does not offer (``phm_c_init``, ``hypercomplex_nonlinearity``), learned scaling and
parallel placement.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ...errors import AdapterFileError, ConfigError
from ...methods.compacter import CompacterConfig
from . import bottleneck as _bn
from .common import BaseDesc, check_fields, is_number, split_layer

_POS = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "must be a positive integer")
RULES: dict[str, Any] = {
    **_bn.RULES,
    "phm_layer": (lambda v: v is True, "not a Compacter"),
    "phm_dim": _POS, "phm_rank": _POS,
    "phm_bias": (lambda v: isinstance(v, bool), "must be true or false"),
    "shared_phm_rule": (lambda v: isinstance(v, bool), "must be true or false"),
    "factorized_phm_rule": (lambda v: v is False, "factorised rule matrices have no adapterkit equivalent"),
    "factorized_phm_W": (lambda v: v is True, "adapterkit's PHM weights are always factorised (W_left @ W_right)"),
    "shared_W_phm": (lambda v: v is False, "PHM weights shared across layers have no adapterkit equivalent"),
    "learn_phm": (lambda v: v is True, "frozen rule matrices have no adapterkit equivalent (adapterkit trains them)"),
    "phm_c_init": (lambda v: v == "normal", "adapterkit initialises the rule matrices from N(0, 0.01) only"),
    "hypercomplex_nonlinearity": (lambda v: v == "glorot-uniform",
                                  "adapterkit initialises the PHM factors glorot-uniform only"),
    "phm_init_range": None,  # used by the 'normal' factor init only, refused above
    "scaling": (is_number, "adapterkit's Compacter scaling is a number"),
    "is_parallel": (lambda v: v is False, "a parallel Compacter has no adapterkit equivalent"),
}
SHARED_RE = re.compile(r"^(?:(?P<prefix>.+)\.)?shared_parameters\.(?P<name>[^.]+)\.phm_rule$")
#: the path from the base model to its layers, per model_type (to place the shared rule on export)
LAYERS_IN_BASE = {"bert": "encoder.layer", "roberta": "encoder.layer", "llama": "layers", "gpt2": "h"}
_T = (1, 2)  # every PHM tensor is transposed over its last two axes between the two layouts
#: AdapterHub PHM parameter -> adapterkit's, within one projection
PHM_IN = {"W_left": "W_right", "W_right": "W_left", "phm_rule": "phm_rule", "b": "b"}
PROJ_IN = {"adapter_down.0": "adapter_down", "adapter_up": "adapter_up"}


def _flip(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(*_T).contiguous() if t.dim() == 3 else t


def read(meta: dict[str, Any], cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
         where: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """An AdapterHub Compacter as (``"compacter"``, config dict, native tensors)."""
    check_fields(cfg, RULES, where)
    n, shared = int(cfg.get("phm_dim", 4)), bool(cfg.get("shared_phm_rule", True))
    rules = {k: t for k, t in tensors.items() if SHARED_RE.match(k)}
    body = {k: t for k, t in tensors.items() if k not in rules}
    if shared != bool(rules) or len(rules) > 1:
        raise AdapterFileError(f"{where}: shared_phm_rule={shared} but the file holds {len(rules)} shared rule "
                               f"tensor(s) ({sorted(rules) or 'none'})")
    per_layer = ["W_left", "W_right"] + (["b"] if cfg.get("phm_bias", True) else []) + ([] if shared else ["phm_rule"])
    want = sorted(f"{proj}.{p}" for proj in PROJ_IN for p in per_layer)
    out = {"phm_rule": _flip(next(iter(rules.values())))} if shared else {}
    hosts, widths, hidden = [], [], 0
    for site, host, piece, params in _bn.place_sites(meta, cfg, body, where):
        if sorted(params) != want:
            raise AdapterFileError(f"{where}: Compacter site {site!r} holds {sorted(params)}, expected {want}")
        hosts.append(host)
        widths.append(n * params["adapter_down.0.W_right"].shape[2])
        hidden = n * params["adapter_down.0.W_left"].shape[1]
        for k, t in params.items():
            proj, _, p = k.rpartition(".")
            out[f"{piece}.{PROJ_IN[proj]}.{PHM_IN[p]}"] = _flip(t)
    width = _bn.one_width(widths, cfg, where)
    rf = next((c for c in (hidden / width, (hidden + 0.5) / width) if _ours(hidden, c, n) == width), None)
    if rf is None:
        raise AdapterFileError(f"{where}: a Compacter bottleneck of {width} (hidden {hidden}, phm_dim {n}) is not "
                               f"one adapterkit makes")
    config = {"mode": "compacter" if cfg.get("mh_adapter") else "compacter++", "targets": hosts, "phm_dim": n,
              "phm_rank": int(cfg.get("phm_rank", 1)), "shared_phm_rule": shared, "reduction_factor": rf,
              "non_linearity": _bn.ACT_IN[str(cfg["non_linearity"]).lower()], "phm_bias": bool(cfg.get("phm_bias", True)),
              "scaling": float(cfg.get("scaling", 1.0)), "original_ln_before": bool(cfg.get("original_ln_before")),
              "residual_before_ln": bool(cfg.get("residual_before_ln", True)), "dropout": float(cfg.get("dropout", 0))}
    return "compacter", config, out


def _ours(hidden: int, rf: float, n: int) -> int:
    """adapterkit's Compacter width (CompacterConfig.bottleneck_for)."""
    return max(n, int(hidden // rf) // n * n)


def export(config: CompacterConfig, tensors: dict[str, torch.Tensor], desc: BaseDesc,
           name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(AdapterHub ``config`` dict, AdapterHub tensors) for a native Compacter.

    Raises:
        ConfigError: a piece or a layout AdapterHub cannot express (named).
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    shared = tensors.get("phm_rule")
    proj_out = {v: k for k, v in PROJ_IN.items()}
    phm_out = {v: k for k, v in PHM_IN.items()}
    for k, t in tensors.items():
        if k == "phm_rule":
            continue
        head, _, p = k.rpartition(".")
        piece, _, proj = head.rpartition(".")
        if proj not in proj_out or p not in phm_out:
            raise ConfigError(f"compacter export: tensor {k!r} has no AdapterHub counterpart")
        groups.setdefault(piece, {})[f"{proj_out[proj]}.{phm_out[p]}"] = _flip(t)
    sites, ah = _bn.export_sites(list(groups), config, desc, "compacter")
    for piece, params in groups.items():
        out.update({f"{sites[piece]}.adapters.{name}.{p}": t for p, t in params.items()})
    if shared is not None:
        out[f"{_base_prefix(next(iter(groups)), desc)}shared_parameters.{name}.phm_rule"] = _flip(shared)
    width = config.bottleneck_for(desc.hidden_size)
    ah.update(phm_layer=True, phm_dim=config.phm_dim, phm_rank=config.phm_rank, shared_phm_rule=config.shared_phm_rule,
              phm_bias=config.phm_bias, scaling=float(config.scaling),
              reduction_factor=_bn.reduction_factor(config.reduction_factor, desc.hidden_size, width))
    return ah, out


def _base_prefix(piece: str, desc: BaseDesc) -> str:
    """The base model's module path plus '.' (``bert.``; '' for a model without a head)."""
    layer, idx, _ = split_layer(piece if desc.family == "pre_ln" else re.sub(r"\.(dropout|LayerNorm)$", "", piece))
    tail = f"{LAYERS_IN_BASE[desc.model_type]}.{idx}"
    if not layer.endswith(tail):
        raise ConfigError(f"compacter export: layer {layer!r} is not at {tail!r} inside a {desc.model_type} model")
    return layer[: -len(tail)]
