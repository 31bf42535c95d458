"""SSF: Scaling & Shifting Your Features (Lian et al., 2022, https://arxiv.org/abs/2210.08823).

After an operation with per-channel output ``y`` (C channels), SSF learns a scale ``gamma``
and a shift ``beta`` (both (C,))::

    y' = gamma * y + beta

``ssf_scale`` starts at 1 and ``ssf_shift`` at 0 (``init="identity"``, the fresh adapter is the
identity), or, as in the paper's code, ``ssf_scale ~ N(1, 0.02)``, ``ssf_shift ~ N(0, 0.02)``
(``init="normal"``). Hosts and where the channel axis is:

* ``nn.Linear`` / transformers ``Conv1D``: the last axis (the output features);
* ``nn.Conv2d``: the channel axis of (B, C, H, W) (or (C, H, W));
* ``nn.LayerNorm``: its normalised (trailing) axes, shape ``normalized_shape``;
* RMSNorm-like norms (``nn.RMSNorm``, Llama's ``LlamaRMSNorm``, any ``*Norm`` class with a weight
  the shape of its feature axis), ``BatchNorm`` / ``GroupNorm``: their channels.

Merge (zero inference overhead, the paper's re-parameterisation): SSF is an affine map after
an affine map, so it folds into the host itself::

    Linear / Conv:  W' = diag(gamma) W   (each output row / filter scaled),  b' = gamma * b + beta
    norms:          w' = gamma * w,                                          b' = gamma * b + beta

A Linear/Conv2d without a bias (Llama's projections) gets one at merge time (zeros + beta),
removed again by unmerge: the merged model then has extra ``bias`` tensors (with transformers,
set ``attention_bias`` / ``mlp_bias`` before saving a merged Llama with ``save_pretrained``). On
a norm WITHOUT a bias (RMSNorm) SSF learns the scale only: a shift there could not be merged, and
loses no expressiveness where the norm's consumers carry SSF shifts themselves (their shifts
absorb ``W beta``). Norm merges are verified on a probe input (norms such as Gemma's compute
``(1 + w) * x``, where scaling ``w`` is not scaling the output): a mismatch raises
NotMergeableError and leaves the weights untouched. Unmerge divides back by ``gamma`` (exact up
to rounding; merging refuses a ``gamma`` with zeros). Several SSF adapters merged on one host
must be unmerged in reverse order (their affine maps do not commute).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError, NotMergeableError
from ..inject import base_modules, is_linear_like, linear_layers_except_head, resolve_targets, weight_io
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora import tied_weights

INITS = ("identity", "normal")


@dataclass(frozen=True)
class SSFConfig(AdapterConfig):
    """SSF hyper-parameters.

    targets: modules whose output is scaled and shifted (suffixes or a regex). None: as in the
        paper, after every operation: every Linear/Conv1D except the output head, every Conv2d,
        every norm with a weight (LayerNorm, RMSNorm, BatchNorm, GroupNorm).
    init: "identity" (scale 1, shift 0: the fresh adapter changes nothing) or "normal" (the
        paper's code: scale ~ N(1, init_std), shift ~ N(0, init_std)).
    init_std: the standard deviation of the "normal" init (the paper: 0.02).
    """

    method = "ssf"
    init: Literal["identity", "normal"] = "identity"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in INITS:
            raise ConfigError(f"SSFConfig.init must be one of {', '.join(INITS)}; got {self.init!r}")
        s = self.init_std
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0 or s == float("inf"):
            raise ConfigError(f"SSFConfig.init_std must be a finite number >= 0, got {s!r}")


# -- host kinds ------------------------------------------------------------------------------
_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def _norm_weight(m: nn.Module) -> torch.Tensor | None:
    w = m.__dict__.get("_parameters", {}).get("weight")
    return w if isinstance(w, torch.Tensor) else None


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer with a learned elementwise weight SSF can fold into."""
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm, *_CHANNEL_NORMS)):
        return _norm_weight(m) is not None
    # transformers' LlamaRMSNorm, T5LayerNorm, ...: no common base class; the probe at merge
    # time checks that scaling the weight scales the output
    w = _norm_weight(m)
    return type(m).__name__.endswith("Norm") and w is not None and w.dim() == 1 and not list(m.children())


def is_ssf_host(m: nn.Module) -> bool:
    return is_linear_like(m) or isinstance(m, nn.Conv2d) or is_norm(m)


def default_targets(model: nn.Module) -> list[str]:
    """After every op, as in the paper: linear layers (not the head), Conv2d and norms."""
    lin = set(linear_layers_except_head(model))
    return [n for n, m in base_modules(model) if n and (n in lin or isinstance(m, nn.Conv2d) or is_norm(m))]


class SSFPiece(AdapterModule):
    """``y' = ssf_scale * y + ssf_shift`` over the host's output channels.

    ``ssf_scale``: (C,) (LayerNorm: ``normalized_shape``); ``ssf_shift``: same shape, or absent
    on a norm without a bias.
    """

    def __init__(self, host: nn.Module, cfg: SSFConfig, tied_with: str | None = None) -> None:
        super().__init__()
        self.bind(host)
        self.tied_with = tied_with
        w = host.weight
        if is_linear_like(host):
            self.kind, shape, shift = "linear", (weight_io(host)[0],), True
        elif isinstance(host, nn.Conv2d):
            self.kind, shape, shift = "conv", (w.shape[0],), True
        elif isinstance(host, _CHANNEL_NORMS):
            self.kind, shape, shift = "channel_norm", (w.shape[0],), getattr(host, "bias", None) is not None
        else:  # LayerNorm / RMSNorm-like: the weight's shape is the normalised trailing shape
            self.kind, shape, shift = "norm", tuple(w.shape), getattr(host, "bias", None) is not None
        dev, dt = w.device, w.dtype
        self.ssf_scale = nn.Parameter(torch.ones(shape, device=dev, dtype=dt))
        self.ssf_shift = nn.Parameter(torch.zeros(shape, device=dev, dtype=dt)) if shift else None
        if cfg.init == "normal":
            with torch.no_grad():
                nn.init.normal_(self.ssf_scale, mean=1.0, std=cfg.init_std)
                if self.ssf_shift is not None:
                    nn.init.normal_(self.ssf_shift, mean=0.0, std=cfg.init_std)
        self._made_bias = False  # merge created the host's bias (removed again by unmerge)

    # -- math ----------------------------------------------------------------------------
    def _view(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A (C,) vector shaped to broadcast against the host output ``y``."""
        if self.kind == "conv":
            return v.reshape(-1, 1, 1)  # (B, C, H, W) or (C, H, W)
        if self.kind == "channel_norm":
            return v.reshape(-1, *([1] * (y.dim() - 2)))  # (B, C, *spatial)
        return v  # trailing axes

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = y * self._view(self.ssf_scale, y)
        if self.ssf_shift is not None:
            out = out + self._view(self.ssf_shift, y)
        return out.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``W' - W = (gamma - 1) * W`` row-wise, in the host weight's layout (the bias changes
        too: see :meth:`merge`)."""
        w = self.host.weight
        return w * (self._weight_scale(w) - 1)

    def _weight_scale(self, w: torch.Tensor) -> torch.Tensor:
        """ssf_scale shaped to scale the host weight's output channels."""
        s = self.ssf_scale.to(w.dtype)
        if self.kind == "linear" and not isinstance(self.host, nn.Linear):
            return s.reshape(1, -1)  # Conv1D stores W as (in, out)
        if self.kind in ("linear", "conv"):
            return s.reshape(-1, *([1] * (w.dim() - 1)))  # (out, 1) / (out, 1, 1, 1)
        return s  # norms: the weight has the scale's shape

    # -- merge ---------------------------------------------------------------------------
    def merge(self) -> None:
        host = self.host
        if self.tied_with is not None:
            raise NotMergeableError(
                f"cannot merge SSF into a {type(host).__name__} whose weight is shared with {self.tied_with!r} "
                f"(tied weights): merging would change {self.tied_with!r} too")
        if not bool((self.ssf_scale != 0).all()):
            raise NotMergeableError(f"cannot merge SSF into {type(host).__name__}: ssf_scale has zeros "
                                    f"(unmerge could not undo it)")
        # torch's own norms are known to be w * normalize(x) + b; others are checked on a probe
        builtin = isinstance(host, (nn.LayerNorm, nn.RMSNorm, *_CHANNEL_NORMS))
        probe = self._probe() if self.kind == "norm" and not builtin else None
        with torch.no_grad():
            w = host.weight
            w.mul_(self._weight_scale(w))
            if self.ssf_shift is not None:
                if getattr(host, "bias", None) is None:
                    host.bias = nn.Parameter(torch.zeros(self.ssf_shift.shape, device=w.device, dtype=w.dtype),
                                             requires_grad=False)
                    self._made_bias = True
                b = host.bias
                b.mul_(self.ssf_scale.to(b.dtype)).add_(self.ssf_shift.to(b.dtype))
        self.merged = True
        if probe is not None:
            x, want = probe
            with torch.no_grad():
                got = host.forward(x)  # .forward: no hooks, the merged host alone
            if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3):
                self.unmerge()
                raise NotMergeableError(
                    f"cannot merge SSF into {type(host).__name__}: scaling its weight does not scale its output "
                    f"(it is not y = w * normalize(x) + b)")

    def _probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random input to a norm host and the output the merged host must give."""
        host, w = self.host, self.host.weight
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn((4, *w.shape), generator=g).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            return x, self.forward_post(x, host.forward(x))

    def unmerge(self) -> None:
        host = self.host
        with torch.no_grad():
            w = host.weight
            w.div_(self._weight_scale(w))
            if self.ssf_shift is not None:
                if self._made_bias:
                    host.bias = None
                    self._made_bias = False
                else:
                    b = host.bias
                    b.sub_(self.ssf_shift.to(b.dtype)).div_(self.ssf_scale.to(b.dtype))
        self.merged = False


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, SSFConfig)
    what = f"ssf adapter {name!r}"
    mods = dict(model.named_modules())

    def accept(n: str, m: nn.Module) -> bool:
        return is_ssf_host(m)

    # a norm without a learned weight (LayerNorm(elementwise_affine=False)) is refused here by
    # name: SSF there could not be merged
    hosts = resolve_targets(model, cfg.targets, accept=accept, fallback=default_targets, what=what)
    tied = tied_weights(model, {h: mods[h] for h in hosts})
    return {h: SSFPiece(mods[h], cfg, tied.get(h)) for h in hosts}


register(MethodSpec(name="ssf", config_cls=SSFConfig, attach=attach, mergeable=True,
                    paper="Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning "
                          "(Lian et al., 2022)"))
