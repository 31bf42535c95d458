"""AdapterHub bottleneck adapters (``BnConfig``: seq_bn, double_seq_bn, par_bn, ...) <-> adapterkit's
``bottleneck`` method.

AdapterHub's sites and math (``adapters/methods/modeling.py``), for a layer whose sub-block
output is ``F`` and residual input ``r`` (with ``a(h) = up(f(down(h))) * scaling``):

* post-LN blocks (BERT, RoBERTa: ``<layer>.attention.output`` = ``mh_adapter`` and ``<layer>.output`` =
  ``output_adapter``), ``F = dropout(dense(u))``: exactly adapterkit's post-LN placements
  (``original_ln_before`` / ``residual_before_ln`` / parallel), so the files map one to one;
* pre-LN layers (Llama, GPT-2; ``<layer>.attention_adapters`` / ``<layer>.output_adapters``), where
  AdapterHub has no LayerNorm to apply and ``r`` is the residual stream:

  - ``original_ln_before=False``: ``r + F + a(F)`` = adapterkit's series adapter on the attention /
    MLP block;
  - ``original_ln_before=True`` (seq_bn), output adapter, ``residual_before_ln=True``:
    ``z + a(z)`` with ``z = r + F`` the layer's output = adapterkit's series adapter on the layer
    itself (target ``model.layers.N``);
  - refused: the same on the attention adapter (``z`` is no module's output there),
    ``residual_before_ln=False`` there (AdapterHub adds ``r`` twice), and ``is_parallel`` (AdapterHub
    feeds the parallel adapter the un-normalised stream ``r``; adapterkit feeds the block's input).

Weights: AdapterHub ``adapter_down.0.weight`` / ``.bias`` (the Linear inside its Sequential),
``adapter_up.weight`` / ``.bias``, ``scaling`` (with ``scaling="learned"``) = adapterkit's
``adapter_down.weight`` / ``.bias``, ``adapter_up.*``, ``scaling`` on the piece.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ...errors import AdapterFileError, ConfigError
from ...methods.bottleneck import ACTIVATIONS, BottleneckConfig
from .common import PRE_LN_BLOCKS, BaseDesc, check_family, check_fields, is_number, leave_out, refuse, split_layer

#: AdapterHub's non_linearity names (transformers' ACT2FN, lower-cased) -> adapterkit's; others are refused
ACT_IN = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "silu": "silu",
          "swish": "swish", "tanh": "tanh", "sigmoid": "sigmoid", "leakyrelu": "leakyrelu", "linear": "identity"}
ACT_OUT = {"identity": "linear", "linear": "linear"}


def _must(pred: Any, why: str) -> tuple[Any, str]:
    """A field rule: the value must satisfy ``pred``, else it is refused with ``why``."""
    return pred, why


RULES: dict[str, Any] = {
    "architecture": _must(lambda v: v is None, "not a bottleneck adapter"),
    "mh_adapter": None, "output_adapter": None, "leave_out": None,  # the tensor keys say where the adapter is
    "reduction_factor": None,  # the widths come from the tensors
    "init_weights_seed": None,
    "init_weights": _must(lambda v: v in ("bert", "mam_adapter", "houlsby"), "unknown init"),
    "non_linearity": _must(lambda v: isinstance(v, str) and v.lower() in ACT_IN,
                           f"adapterkit's bottleneck offers {', '.join(sorted(ACT_IN))}"),
    "original_ln_before": _must(lambda v: isinstance(v, bool), "must be true or false"),
    "original_ln_after": _must(lambda v: v is True, "False drops the pre-trained residual and LayerNorm after the "
                                                     "adapter; adapterkit always keeps them"),
    "residual_before_ln": _must(lambda v: isinstance(v, bool), "'post_add' takes the adapter's residual after the "
                                                               "sub-block's residual sum; no adapterkit placement does"),
    "adapter_residual_before_ln": None,  # only matters with ln_after, which is refused
    "ln_before": _must(lambda v: v is False, "a new LayerNorm inside the adapter has no adapterkit equivalent"),
    "ln_after": _must(lambda v: v is False, "a new LayerNorm inside the adapter has no adapterkit equivalent"),
    "is_parallel": _must(lambda v: isinstance(v, bool), "must be true or false"),
    "scaling": _must(lambda v: is_number(v) or v == "learned", "'channel' (a learned vector) has no adapterkit "
                                                                "equivalent; a number or 'learned' maps"),
    "use_gating": _must(lambda v: v is False, "UniPELT-style gates have no adapterkit equivalent"),
    "inv_adapter": _must(lambda v: v is None, "invertible adapters (MAD-X) are not mapped"),
    "inv_adapter_reduction_factor": None,
    "cross_adapter": _must(lambda v: v is False, "cross-attention adapters (encoder-decoder) are not mapped"),
    "dropout": _must(lambda v: is_number(v) and 0 <= v < 1, "must be in [0, 1)"),
    "stochastic_depth": _must(lambda v: v in (0, 0.0, None), "dropping whole adapter outputs in training has no "
                                                             "adapterkit equivalent"),
    "phm_layer": _must(lambda v: v is False, "a Compacter (read by the compacter codec)"),
    # PHM settings: inert without phm_layer (Compacters have their own rules, compacter.RULES)
    **{k: None for k in ("phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule",
                         "phm_c_init", "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank",
                         "phm_bias")},
}

#: BnConfig's fields and defaults in adapters 1.3 (written in full on export)
DEFAULTS: dict[str, Any] = {
    "mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
    "original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0, "use_gating": False,
    "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
    "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0,
}

KEY_RE = re.compile(r"^(?P<site>.+)\.adapters\.(?P<name>[^.]+)\.(?P<param>adapter_down\.0\.\w+|adapter_up\.\w+|scaling)$")
PARAM_IN = {"adapter_down.0.weight": "adapter_down.weight", "adapter_down.0.bias": "adapter_down.bias",
            "adapter_up.weight": "adapter_up.weight", "adapter_up.bias": "adapter_up.bias", "scaling": "scaling"}
PARAM_OUT = {v: k for k, v in PARAM_IN.items()}
#: site names (relative to the layer) per family: mh_adapter, output_adapter
SITES = {"post_ln": ("attention.output", "output"), "pre_ln": ("attention_adapters", "output_adapters")}


def read(meta: dict[str, Any], cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
         where: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """An AdapterHub bottleneck adapter as (``"bottleneck"``, config dict, native tensors)."""
    check_fields(cfg, RULES, where)
    parallel = bool(cfg.get("is_parallel", False))
    want = sorted(PARAM_IN) if cfg.get("scaling") == "learned" else sorted(set(PARAM_IN) - {"scaling"})
    hosts: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for site, host, piece, params in place_sites(meta, cfg, tensors, where):
        if sorted(params) != want:
            raise AdapterFileError(f"{where}: adapter site {site!r} holds {sorted(params)}, expected {want}")
        hosts.append(host)
        out.update({f"{piece}.{PARAM_IN[p]}": t for p, t in params.items()})
    width = one_width([t.shape[0] for k, t in out.items() if k.endswith("adapter_down.weight")], cfg, where)
    scaling = cfg.get("scaling", 1.0)
    config = {
        "mode": "parallel" if parallel else ("houlsby" if cfg.get("mh_adapter") else "pfeiffer"),
        "targets": hosts, "bottleneck_size": width, "non_linearity": ACT_IN[str(cfg["non_linearity"]).lower()],
        "scaling": scaling if scaling == "learned" else float(scaling),
        "original_ln_before": False if parallel else bool(cfg.get("original_ln_before", False)),
        "residual_before_ln": True if parallel else bool(cfg.get("residual_before_ln", True)),
        "init": cfg.get("init_weights", "bert"), "dropout": float(cfg.get("dropout", 0.0)),
    }
    return "bottleneck", config, out


def one_width(per_site: list[int], cfg: dict[str, Any], where: str) -> int:
    """The bottleneck width all sites share (AdapterHub may vary it per layer; adapterkit may not)."""
    widths = sorted(set(per_site))
    if len(widths) != 1:
        raise refuse(where, "reduction_factor", cfg.get("reduction_factor"),
                     f"the bottleneck widths differ between layers ({widths}); an adapterkit adapter has one width")
    return widths[0]


def place_sites(meta: dict[str, Any], cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                where: str) -> list[tuple[str, str, str, dict[str, torch.Tensor]]]:
    """``(site, target, piece path, {param: tensor})`` per AdapterHub adapter site, layer by layer.

    ``site`` is AdapterHub's module path, ``target`` the block adapterkit's config names, ``piece`` the
    module path adapterkit's tensors live under (which depends on the placement, see the module docstring).
    """
    mt = meta.get("model_type")
    family = check_family(mt, where)
    name, parallel = meta.get("name"), bool(cfg.get("is_parallel", False))
    olb, rbl = bool(cfg.get("original_ln_before", False)), cfg.get("residual_before_ln", True)
    mh_site, out_site = SITES[family]
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY_RE.match(key)
        if not m or m["name"] != name:
            raise AdapterFileError(f"{where}: tensor {key!r} is not part of a bottleneck adapter named {name!r}")
        sites.setdefault(m["site"], {})[m["param"]] = t
    if not sites:
        raise AdapterFileError(f"{where}: the weights file holds no tensors of adapter {name!r}")
    placed = []
    for site, params in sites.items():
        try:
            layer, idx, rest = split_layer(site)
        except ValueError:
            raise AdapterFileError(f"{where}: {site!r} is not inside a transformer layer") from None
        if rest not in (mh_site, out_site):
            raise AdapterFileError(f"{where}: tensors under {site!r}: not an AdapterHub {mt} adapter site "
                                   f"({mh_site!r} or {out_site!r} of a layer)")
        mh = rest == mh_site
        if family == "post_ln":
            host = site
            piece = host if parallel or (olb and not rbl) else f"{host}.LayerNorm" if olb else f"{host}.dropout"
        else:
            host, piece = _pre_ln_host(layer, mh, parallel, olb, rbl, mt, cfg, where)
        placed.append(((idx, not mh), (site, host, piece, params)))
    return [p for _, p in sorted(placed, key=lambda x: x[0])]


def _pre_ln_host(layer: str, mh: bool, parallel: bool, olb: bool, rbl: Any, mt: str, cfg: dict[str, Any],
                 where: str) -> tuple[str, str]:
    """(target, piece path) of an AdapterHub adapter site in a pre-LN layer; refusals per the module docstring."""
    attn, mlp = PRE_LN_BLOCKS[mt]
    if parallel:
        raise refuse(where, "is_parallel", True, f"on {mt} (pre-LN) AdapterHub feeds the parallel adapter the "
                     f"un-normalised residual stream, which no adapterkit placement reproduces")
    if not olb:
        host = f"{layer}.{attn if mh else mlp}"
        return host, host
    if mh:
        raise refuse(where, "original_ln_before", True, f"on {mt} (pre-LN) the attention adapter would read the "
                     f"residual sum inside the layer, which no adapterkit placement reproduces "
                     f"(mh_adapter={cfg.get('mh_adapter')})")
    if not rbl:
        raise refuse(where, "residual_before_ln", rbl, f"with original_ln_before on {mt} (pre-LN) AdapterHub adds "
                     f"the residual stream twice; adapterkit does not reproduce that")
    return layer, layer


def export(config: BottleneckConfig, tensors: dict[str, torch.Tensor], desc: BaseDesc,
           name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(AdapterHub ``config`` dict, AdapterHub tensors) for a native bottleneck adapter.

    Raises:
        ConfigError: a piece or a config value AdapterHub cannot express (named).
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        piece, _, p = k.rpartition(".")
        if p == "weight" or p == "bias":
            piece, _, sub = piece.rpartition(".")
            p = f"{sub}.{p}"
        if p not in PARAM_OUT:
            raise ConfigError(f"bottleneck export: tensor {k!r} has no AdapterHub counterpart")
        groups.setdefault(piece, {})[p] = t
    sites, ah = export_sites(list(groups), config, desc, "bottleneck")
    out: dict[str, torch.Tensor] = {}
    widths = []
    for piece, params in groups.items():
        b, d_in = params["adapter_down.weight"].shape
        if d_in != desc.hidden_size or params["adapter_up.weight"].shape[0] != desc.hidden_size:
            raise ConfigError(f"bottleneck export: piece at {piece!r} maps width {d_in} -> "
                              f"{params['adapter_up.weight'].shape[0]}; AdapterHub adapters map hidden_size "
                              f"{desc.hidden_size} -> {desc.hidden_size}")
        widths.append(b)
        out.update({f"{sites[piece]}.adapters.{name}.{PARAM_OUT[p]}": t for p, t in params.items()})
    rf = config.reduction_factor if config.bottleneck_size is None else None
    ah.update(reduction_factor=reduction_factor(rf, desc.hidden_size, widths[0] if widths else 1),
              init_weights=config.init, is_parallel=config.mode == "parallel",
              scaling=config.scaling if config.scaling == "learned" else float(config.scaling))  # type: ignore[arg-type]
    return ah, out


def export_sites(pieces: list[str], config: Any, desc: BaseDesc, what: str) -> tuple[dict[str, str], dict[str, Any]]:
    """AdapterHub's site (module path) for each of a bottleneck-like adapter's pieces, and the
    config fields the placement decides (sites, leave_out, original_ln_before, residual_before_ln,
    non_linearity, dropout), checked to be expressible.

    Raises:
        ConfigError: a piece AdapterHub has no site for, or a layout it cannot express.
    """
    family = check_family(desc.model_type, f"{what} export", export=True)
    mh_site, out_site = SITES[family]
    olbs: set[bool] = set()
    used: dict[int, set[str]] = {}
    sites: dict[str, str] = {}
    for piece in pieces:
        block = re.sub(r"\.(dropout|LayerNorm)$", "", piece) if family == "post_ln" else piece
        try:
            layer, idx, rest = split_layer(block)
        except ValueError:
            raise ConfigError(f"{what} export: piece at {piece!r} is not inside a transformer layer") from None
        if family == "post_ln":
            if rest not in (mh_site, out_site):
                raise ConfigError(f"{what} export: piece at {piece!r}; AdapterHub places {desc.model_type} "
                                  f"adapters only at a layer's {mh_site!r} and {out_site!r}")
            kind = "mh" if rest == mh_site else "out"
            sites[piece] = block
        else:
            kind, olb = _pre_ln_kind(rest, piece, config, desc.model_type)
            olbs.add(olb)
            sites[piece] = f"{layer}.{mh_site if kind == 'mh' else out_site}"
        if kind in used.setdefault(idx, set()):
            raise ConfigError(f"{what} export: two pieces at the {kind} site of layer {idx}")
        used[idx].add(kind)
    if len(olbs) > 1:
        raise ConfigError(f"{what} export: on a pre-LN model the adapter sits both on a block and on a whole "
                          f"layer; AdapterHub's original_ln_before is one value per adapter")
    want = set().union(*used.values()) if used else set()
    for idx, kinds in used.items():
        if kinds != want:
            raise ConfigError(f"{what} export: layer {idx} has adapters at {sorted(kinds)} but others at "
                              f"{sorted(want)}; AdapterHub puts the same sites in every layer")
    act = str(config.non_linearity).lower()
    if act not in ACTIVATIONS:
        raise ConfigError(f"{what} export: non_linearity {config.non_linearity!r} is unknown")
    ah = {**DEFAULTS, "mh_adapter": "mh" in want, "output_adapter": "out" in want,
          "leave_out": leave_out(desc, set(used), f"a {what} adapter"), "non_linearity": ACT_OUT.get(act, act),
          "dropout": float(config.dropout)}
    if family == "post_ln":
        parallel = getattr(config, "mode", None) == "parallel"
        ah["original_ln_before"] = bool(config.original_ln_before) and not parallel
        ah["residual_before_ln"] = bool(config.residual_before_ln)
    else:
        ah["original_ln_before"], ah["residual_before_ln"] = (olbs.pop() if olbs else False), True
    return sites, ah


def _pre_ln_kind(rest: str, piece: str, config: BottleneckConfig, mt: str) -> tuple[str, bool]:
    """(site kind, AdapterHub original_ln_before) of a piece in a pre-LN layer."""
    attn, mlp = PRE_LN_BLOCKS[mt]
    if getattr(config, "mode", None) == "parallel":
        raise ConfigError(f"bottleneck export: mode='parallel' on {mt} (pre-LN): adapterkit feeds the adapter the "
                          f"block's normalised input, AdapterHub the residual stream; not expressible")
    if rest == attn:
        return "mh", False
    if rest == mlp:
        return "out", False
    if rest == "":
        return "out", True
    raise ConfigError(f"bottleneck export: piece at {piece!r}; AdapterHub places {mt} adapters after a layer's "
                      f"{attn!r} or {mlp!r} block or after the layer")


def reduction_factor(preferred: float | None, hidden: int, width: int) -> float:
    """A reduction_factor that AdapterHub turns into ``width`` (``int(hidden // rf)``): ``preferred`` if it does."""
    cands: list[float] = [float(preferred)] if preferred is not None else []
    cands += [hidden / width, (hidden + 0.5) / width if width else 1.0]
    for rf in cands:
        if max(1, int(hidden // rf)) == width:
            return rf
    raise ConfigError(f"AdapterHub export: no AdapterHub reduction_factor gives a bottleneck of {width} for "
                      f"hidden size {hidden}")
