"""Bottleneck adapters: series (Houlsby 2019, Pfeiffer 2020) and parallel (He et al., 2022).

The adapter function, for a hidden state ``h`` of width ``d`` and bottleneck ``b``::

    a(h) = dropout(W_up f(W_down h + b_down) + b_up) * s      W_down: (b, d), W_up: (d, b)

``s`` is ``scaling`` (a float, or a trainable scalar initialised to 1 with "learned").
``W_up``/``b_up`` start at zero, so a fresh adapter is the identity.

Placements (``mode``), with AdapterHub's names and defaults (``reduction_factor``, ``non_linearity``,
``scaling``, ``init``):

* ``"pfeiffer"`` = SeqBnConfig (16, relu, 1.0, bert): after the feed-forward block only;
  https://arxiv.org/abs/2005.00247
* ``"houlsby"`` = DoubleSeqBnConfig (16, swish, 1.0, bert): after the attention block AND after
  the feed-forward block; https://arxiv.org/abs/1902.00751
* ``"parallel"`` = ParBnConfig (2, relu, 4.0, mam_adapter): beside the feed-forward block,
  fed with its input; https://arxiv.org/abs/2110.04366

Exact equations per kind of host block (``x`` the block's input, ``F`` the block):

Pre-LN blocks (Llama ``self_attn``/``mlp``, GPT-2 ``attn``/``mlp``, ViT ``attention``/``mlp``),
whose output ``F(x)`` is added to the residual stream by the caller::

    series:    F(x) + a(F(x))          (forward hook on the block)
    parallel:  F(x) + a(x)             (forward hook on the block; x is the normalised input)

(``original_ln_before`` and ``residual_before_ln`` change nothing there: the LayerNorm runs
before the block, in the caller.)

Post-LN output blocks (BERT ``attention.output`` / ``output``: ``LN(dropout(dense(u)) + r)`` with
``r`` the block's second argument ``input_tensor``). Let ``h = dropout(dense(u))`` and ``z = h + r``:

* series, ``original_ln_before=False`` (Houlsby's default): ``LN(h + a(h) + r)``.
  Hook: forward hook on the block's ``dropout`` child (``h -> h + a(h)``).
* series, ``original_ln_before=True`` (Pfeiffer's default), ``residual_before_ln=True`` (default):
  the adapter reads the normalised sum but its residual is ``h`` from *before* the LayerNorm:
  ``LN(h + a(LN(z)) + r) = LN(z + a(LN(z)))``. Hook: forward pre-hook on the block's
  ``LayerNorm`` (``z -> z + a(LN(z))``).
* series, ``original_ln_before=True``, ``residual_before_ln=False``: the residual is taken
  *after* the LayerNorm: ``LN(LN(z) + a(LN(z)) + r)``. Hook: on the block itself; its pre-hook
  keeps ``r``, its forward hook maps the block's output ``y = LN(z)`` to ``LN(y + a(y) + r)``.
  (The pre-trained LayerNorm is applied twice, as in AdapterHub.)
* parallel: ``LN(h + r + a(r))`` (for BERT, ``r`` is the FFN's / attention's input). Hook: the
  block's pre-hook replaces ``input_tensor`` by ``r + a(r)``.

Any other host (e.g. a single Linear named in ``targets``) is treated like a pre-LN block; its
width comes from its Linear layers (output width of the last, input width of the first).
LLM-Adapters' placements (Hu et al., 2023) on Llama: "Series" = ``mode="pfeiffer"`` (after the
MLP, i.e. after ``down_proj``); "Parallel" = ``mode="parallel", targets=["down_proj"]`` (fed with
``down_proj``'s input), each with their ``bottleneck_size`` / ``non_linearity`` / ``scaling``.

With ``original_ln_before=False``, ``residual_before_ln`` changes nothing (no LayerNorm runs
before the adapter), exactly as in AdapterHub. Non-linear: not mergeable.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NotMergeableError, TargetNotFoundError, UnsupportedModuleError
from ..inject import base_modules, is_linear_like, resolve_targets, weight_io
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule

Mode = Literal["pfeiffer", "houlsby", "parallel"]


def _gelu_tanh(t: torch.Tensor) -> torch.Tensor:
    return F.gelu(t, approximate="tanh")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


#: name -> elementwise function (AdapterHub / transformers activation names); module-level
#: functions, not lambdas, so that a model holding adapters still pickles
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "identity": _identity,
    "linear": _identity,
}

#: AdapterHub's defaults per mode: reduction_factor, non_linearity, scaling, init
MODE_DEFAULTS: dict[str, tuple[float, str, float, str]] = {
    "pfeiffer": (16, "relu", 1.0, "bert"),
    "houlsby": (16, "swish", 1.0, "bert"),
    "parallel": (2, "relu", 4.0, "mam_adapter"),
}

#: default sites by architecture: (attention block suffixes, feed-forward block suffixes); first match wins
DEFAULT_SITES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("self_attn",), ("mlp",)),  # Llama, Mistral, Qwen2, Phi-3
    (("attn",), ("mlp",)),  # GPT-2
    (("attention",), ("mlp",)),  # ViT (transformers >= 5)
    (("attention.output",), ("output",)),  # BERT, RoBERTa, ELECTRA (BertSelfOutput / BertOutput)
)

INITS = ("bert", "mam_adapter", "houlsby")


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter hyper-parameters. ``None`` fields take the mode's AdapterHub default.

    mode: "pfeiffer" (series, after the FFN), "houlsby" (series, after attention and FFN),
        "parallel" (beside the FFN, fed its input).
    targets: host blocks (suffixes or regex); None = the mode's sites for the architecture
        (Llama self_attn/mlp, GPT-2 attn/mlp, ViT attention/mlp, BERT attention.output/output).
        Explicit targets each get the mode's adapter (houlsby and pfeiffer then differ only
        in their original_ln_before default).
    reduction_factor: bottleneck = hidden // reduction_factor (at least 1). Default 16 (parallel: 2).
    bottleneck_size: explicit bottleneck width; overrides reduction_factor.
    non_linearity: one of ACTIVATIONS. Default relu (houlsby: swish).
    scaling: multiplies the adapter's output: a float, or "learned" (a trainable scalar, init 1).
        Default 1.0 (parallel: 4.0).
    original_ln_before: post-LN blocks only: feed the adapter LN(h + r) instead of h.
        Default True for pfeiffer, False for houlsby (AdapterHub). Not for parallel.
    residual_before_ln: post-LN blocks with original_ln_before: take the adapter's residual
        before (True, default) or after (False) the pre-trained LayerNorm. See the module docstring.
    init: "bert" (W_down ~ N(0, 0.02)), "mam_adapter" (W_down kaiming-uniform), "houlsby"
        (W_down ~ truncated N(0, 0.01)); biases zero, and W_up = 0 in every case so the adapter
        starts as the identity (AdapterHub's "bert"/"houlsby" also draw W_up at random: we do not).
    dropout: on the adapter's output, before the residual.
    """

    method = "bottleneck"
    mode: Mode = "pfeiffer"
    reduction_factor: float | None = None
    bottleneck_size: int | None = None
    non_linearity: str | None = None
    scaling: float | str | None = None
    original_ln_before: bool | None = None
    residual_before_ln: bool = True
    init: str | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.mode not in MODE_DEFAULTS:
            raise ConfigError(f"{name}.mode must be one of {', '.join(MODE_DEFAULTS)}; got {self.mode!r}")
        rf, act, sc, init = MODE_DEFAULTS[self.mode]
        # frozen: fill the mode's defaults once, at construction, so the saved config is explicit
        for field_name, default in (("reduction_factor", rf), ("non_linearity", act), ("scaling", sc), ("init", init),
                                    ("original_ln_before", self.mode == "pfeiffer")):
            if getattr(self, field_name) is None:
                object.__setattr__(self, field_name, default)
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0 or not math.isfinite(rf):
            raise ConfigError(f"{name}.reduction_factor must be a number > 0, got {rf!r}")
        b = self.bottleneck_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b <= 0):
            raise ConfigError(f"{name}.bottleneck_size must be a positive integer or None, got {b!r}")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in ACTIVATIONS:
            raise ConfigError(f"{name}.non_linearity must be one of {', '.join(ACTIVATIONS)}; got {self.non_linearity!r}")
        sc = self.scaling
        if sc != "learned" and (isinstance(sc, bool) or not isinstance(sc, (int, float)) or not math.isfinite(sc)):
            raise ConfigError(f"{name}.scaling must be a finite number or 'learned', got {sc!r}")
        if self.init not in INITS:
            raise ConfigError(f"{name}.init must be one of {', '.join(INITS)}; got {self.init!r}")
        if not isinstance(self.residual_before_ln, bool):
            raise ConfigError(f"{name}.residual_before_ln must be True or False, got {self.residual_before_ln!r}")
        if not isinstance(self.original_ln_before, bool):
            raise ConfigError(f"{name}.original_ln_before must be True, False or None, got {self.original_ln_before!r}")
        if self.mode == "parallel" and self.original_ln_before:
            raise ConfigError(f"{name}.original_ln_before applies to series adapters only, not mode='parallel'")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"{name}.dropout must be in [0, 1), got {self.dropout!r}")

    def bottleneck_for(self, hidden: int) -> int:
        """The bottleneck width for a site of width ``hidden``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden // self.reduction_factor))  # type: ignore[operator]


# -- the adapter function ------------------------------------------------------------
class Bottleneck(AdapterModule):
    """``a(h) = dropout(up(f(down(h)))) * s``: the shared math of every placement.

    ``in_features`` -> ``b`` -> ``out_features``; ``forward_post`` adds ``a(y)`` to the host's output.
    """

    def __init__(self, in_features: int, out_features: int, cfg: BottleneckConfig, ref: nn.Module) -> None:
        super().__init__()
        b = cfg.bottleneck_for(in_features)
        w = _first_weight(ref)
        dev, dt = (w.device, w.dtype) if w is not None else (None, None)
        self.adapter_down = nn.Linear(in_features, b, device=dev, dtype=dt)  # W_down: (b, in)
        self.adapter_up = nn.Linear(b, out_features, device=dev, dtype=dt)  # W_up: (out, b)
        self.act_name = cfg.non_linearity.lower()  # type: ignore[union-attr]
        self.act = ACTIVATIONS[self.act_name]
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        if cfg.scaling == "learned":
            self.scaling: nn.Parameter | float = nn.Parameter(torch.ones(1, device=dev, dtype=dt))
        else:
            self.scaling = float(cfg.scaling)  # type: ignore[arg-type]
        self.reset_parameters(cfg.init)  # type: ignore[arg-type]

    def reset_parameters(self, init: str) -> None:
        with torch.no_grad():
            if init == "bert":
                nn.init.normal_(self.adapter_down.weight, std=0.02)
            elif init == "mam_adapter":
                nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            else:  # houlsby
                nn.init.trunc_normal_(self.adapter_down.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)  # identity at init
            nn.init.zeros_(self.adapter_up.bias)

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        """a(h): (..., in) -> (..., out), in the adapter's dtype."""
        h = h.to(self.adapter_down.weight.dtype)
        return self.dropout(self.adapter_up(self.act(self.adapter_down(h)))) * self.scaling

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # series: y + a(y); y: (..., d)
        return y + self.adapter(y).to(y.dtype)

    def merge(self) -> None:
        raise NotMergeableError("bottleneck adapters are non-linear (up(f(down(h)))): they cannot be merged")

    def unmerge(self) -> None:
        raise NotMergeableError("bottleneck adapters are never merged")


class ParallelBottleneck(Bottleneck):
    """Pre-LN block: ``y + a(x)`` with ``x`` the block's input."""

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.adapter(x).to(y.dtype)


class LNPreBottleneck(Bottleneck):
    """On a post-LN block's LayerNorm (pre-hook): ``z -> z + a(LN(z))``."""

    has_pre = True
    has_post = False

    def forward_pre(self, x: torch.Tensor) -> torch.Tensor:
        ln = self.host
        normed = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)  # type: ignore[arg-type]
        return x + self.adapter(normed).to(x.dtype)


def _residual_arg(
    host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[tuple[Any, ...], dict[str, Any]]]]:
    """The post-LN block's ``input_tensor`` (its second argument) and a function putting it back."""
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        return args[1], lambda r: ((args[0], r, *args[2:]), kwargs)
    r = kwargs.get("input_tensor")
    if isinstance(r, torch.Tensor):
        return r, lambda r2: (args, {**kwargs, "input_tensor": r2})
    raise TypeError(f"{type(host).__name__} was called without its residual input_tensor argument")


class PostLNBlockBottleneck(Bottleneck):
    """On a post-LN block (residual after the LayerNorm): ``y = LN(z) -> LN(y + a(y) + r)``."""

    has_pre = True
    has_post = True

    def __init__(self, in_features: int, out_features: int, cfg: BottleneckConfig, ref: nn.Module) -> None:
        super().__init__(in_features, out_features, cfg, ref)
        self._r: torch.Tensor | None = None  # the current call's input_tensor, kept from pre to post hook

    def hook_pre(
        self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], rows: torch.Tensor | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self._r = _residual_arg(host, args, kwargs)[0]  # (B, T, d), every row: hook_post picks its rows
        return args, kwargs

    def hook_post(self, host: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        r, self._r = self._r, None  # drop the reference: no activation outlives the call
        if r is None:
            raise RuntimeError("PostLNBlockBottleneck: the pre-hook did not run for this call")
        ln = host.LayerNorm

        def f(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            s = y + self.adapter(y).to(y.dtype) + r
            return F.layer_norm(s, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

        if rows is None:
            return f(y, r)
        if not rows.numel():
            return y
        sub = f(y.index_select(0, rows), r.index_select(0, rows))
        return y.index_copy(0, rows, sub.to(y.dtype))


class PostLNParallelBottleneck(Bottleneck):
    """On a post-LN block (pre-hook): ``input_tensor r -> r + a(r)``, so the block gives ``LN(h + r + a(r))``."""

    has_pre = True
    has_post = False

    def hook_pre(
        self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], rows: torch.Tensor | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        r, put = _residual_arg(host, args, kwargs)  # r: (B, T, d)
        if rows is None:
            return put(r + self.adapter(r).to(r.dtype))
        if not rows.numel():
            return args, kwargs
        sub = r.index_select(0, rows)
        return put(r.index_copy(0, rows, sub + self.adapter(sub).to(r.dtype)))


# -- sites ---------------------------------------------------------------------------
def is_post_ln_block(m: nn.Module) -> bool:
    """A BERT-style output block: ``LN(dropout(dense(u)) + input_tensor)``."""
    return (isinstance(getattr(m, "LayerNorm", None), nn.LayerNorm) and is_linear_like(getattr(m, "dense", None))
            and isinstance(getattr(m, "dropout", None), nn.Module))


def _linears(m: nn.Module) -> list[nn.Module]:
    if is_linear_like(m):
        return [m]
    return [c for _, c in base_modules(m) if is_linear_like(c)]


def _first_weight(m: nn.Module) -> torch.Tensor | None:
    for p in m.parameters():
        return p
    return None


def _io(m: nn.Module) -> tuple[int, int]:
    """(output width, input width) of a block: its last Linear's outputs, its first Linear's inputs."""
    lin = _linears(m)
    return weight_io(lin[-1])[0], weight_io(lin[0])[1]


def default_sites(model: nn.Module, mode: str) -> list[str]:
    """The mode's host blocks for a known architecture (attention sites for houlsby only)."""
    names = [n for n, _ in base_modules(model) if n]

    def match(suffixes: tuple[str, ...]) -> list[str]:
        return [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]

    for attn, ffn in DEFAULT_SITES:
        a = match(attn)
        f = [n for n in match(ffn) if n not in a]
        if a and f:
            return sorted(a + f, key=names.index) if mode == "houlsby" else f
    raise TargetNotFoundError(
        f"no default bottleneck sites for {type(model).__name__}; pass targets=[...] naming the attention and/or "
        f"feed-forward blocks (known: Llama self_attn/mlp, GPT-2 attn/mlp, ViT attention/mlp, BERT attention.output/output)"
    )


def _accept(n: str, m: nn.Module) -> bool:
    return bool(_linears(m))


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, BottleneckConfig)
    what = f"{cfg.method} adapter {name!r}"
    if cfg.targets is None:
        hosts = default_sites(model, cfg.mode)
    else:
        hosts = resolve_targets(model, cfg.targets, accept=_accept, what=what)
    mods = dict(model.named_modules())
    pieces: dict[str, AdapterModule] = {}
    for h in hosts:
        blk = mods[h]
        out_f, in_f = _io(blk)
        if is_post_ln_block(blk):
            # every post-LN piece maps width-d states to width d (d = the block's output width)
            if cfg.mode == "parallel":
                pieces[h] = PostLNParallelBottleneck(out_f, out_f, cfg, blk)
            elif not cfg.original_ln_before:
                pieces[f"{h}.dropout"] = Bottleneck(out_f, out_f, cfg, blk)
            elif cfg.residual_before_ln:
                pieces[f"{h}.LayerNorm"] = LNPreBottleneck(out_f, out_f, cfg, blk)
            else:
                pieces[h] = PostLNBlockBottleneck(out_f, out_f, cfg, blk)
        elif cfg.mode == "parallel":
            pieces[h] = ParallelBottleneck(in_f, out_f, cfg, blk)
        else:
            pieces[h] = Bottleneck(out_f, out_f, cfg, blk)
    if not pieces:
        raise UnsupportedModuleError(f"{what}: no module to attach to")
    return pieces


register(MethodSpec(name="bottleneck", config_cls=BottleneckConfig, attach=attach, mergeable=False,
                    paper="Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019); AdapterFusion "
                          "(Pfeiffer et al., 2020); Towards a Unified View of PETL (He et al., 2022)"))
