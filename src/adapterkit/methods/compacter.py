"""Compacter and Compacter++ (Mahabadi et al., 2021, https://arxiv.org/abs/2106.04647).

A bottleneck adapter (see :mod:`adapterkit.methods.bottleneck`) whose down and up projections
are parameterised hypercomplex multiplication (PHM) layers::

    a(h) = dropout(PHM_up f(PHM_down h + b_down) + b_up) * s
    PHM(x) = W x + b,   W = sum_{i=1..n} A_i ⊗ B_i          W: (out, in)
    A_i: (n, n)  the "slow" rule matrices, one set SHARED by every PHM layer of the adapter
                 (``shared_phm_rule=True``: down and up projections of every site)
    B_i = s_i t_i^T: (out/n, in/n), rank ``phm_rank`` "fast" per-layer factors,
                 s_i: (out/n, r) = ``W_left[i]``, t_i^T: (r, in/n) = ``W_right[i]``

Placements (the paper, and AdapterHub's CompacterConfig / CompacterPlusPlusConfig):
``mode="compacter"``: after the attention AND the feed-forward block (Houlsby placement);
``mode="compacter++"``: after the feed-forward block only (Pfeiffer placement). The same
site rules as the bottleneck adapters apply (pre-LN blocks: ``F(x) + a(F(x))``; BERT-style
post-LN blocks: ``original_ln_before`` / ``residual_before_ln``).

Trainable parameters, for sites of width d, bottleneck k, n = phm_dim, r = phm_rank::

    per site:  2 r (d + k)  [fast factors]  + (k + d) [biases, phm_bias]
    shared:    n^3 once (shared_phm_rule), else 2 n^3 per site

The bottleneck is ``d // reduction_factor`` rounded down to a multiple of n (at least n),
since PHM needs n to divide both widths (the site width d must be a multiple of n).
Init (AdapterHub's): A ~ N(0, 0.01); W_left, W_right glorot-uniform per i; biases 0 — except
that the up projection's ``W_right`` starts at ZERO so a fresh adapter is the identity (as
for our bottleneck adapters). Non-linear: not mergeable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..inject import resolve_targets
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .bottleneck import (
    ACTIVATIONS,
    Bottleneck,
    BottleneckConfig,
    LNPreBottleneck,
    PostLNBlockBottleneck,
    _accept,
    _io,
    default_sites,
    is_post_ln_block,
)

MODES = ("compacter", "compacter++")


@dataclass(frozen=True)
class CompacterConfig(AdapterConfig):
    """Compacter hyper-parameters (AdapterHub's names and defaults).

    mode: "compacter" (after attention and FFN) or "compacter++" (after the FFN only).
    targets: host blocks (suffixes or regex); None = the mode's sites for the architecture
        (Llama self_attn/mlp, GPT-2 attn/mlp, ViT attention/mlp, BERT attention.output/output).
    phm_dim: n, the number of Kronecker terms (must divide the site width).
    phm_rank: r, the rank of the fast factors B_i (the paper: 1).
    shared_phm_rule: one set of rule matrices A_i for the whole adapter (the paper) or one per PHM layer.
    reduction_factor: bottleneck = hidden // reduction_factor, rounded down to a multiple of phm_dim.
    non_linearity: one of bottleneck.ACTIVATIONS (default gelu).
    phm_bias: a bias on each PHM layer.
    scaling: multiplies the adapter's output.
    original_ln_before: post-LN (BERT) blocks: feed the adapter LN(h + r). None = the mode's
        default (compacter: False, compacter++: True), as in AdapterHub.
    residual_before_ln: post-LN blocks with original_ln_before: residual before (True) or after the LN.
    dropout: on the adapter's output.
    """

    method = "compacter"
    mode: Literal["compacter", "compacter++"] = "compacter"
    phm_dim: int = 4
    phm_rank: int = 1
    shared_phm_rule: bool = True
    reduction_factor: float = 32
    non_linearity: str = "gelu"
    phm_bias: bool = True
    scaling: float = 1.0
    original_ln_before: bool | None = None
    residual_before_ln: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.mode not in MODES:
            raise ConfigError(f"{name}.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.original_ln_before is None:  # frozen: fill the mode's default once, so the saved config is explicit
            object.__setattr__(self, "original_ln_before", self.mode == "compacter++")
        for f in ("phm_dim", "phm_rank"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name}.{f} must be a positive integer, got {v!r}")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0 or not math.isfinite(rf):
            raise ConfigError(f"{name}.reduction_factor must be a number > 0, got {rf!r}")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in ACTIVATIONS:
            raise ConfigError(f"{name}.non_linearity must be one of {', '.join(ACTIVATIONS)}; got {self.non_linearity!r}")
        for f in ("shared_phm_rule", "phm_bias", "residual_before_ln", "original_ln_before"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"{name}.{f} must be True or False, got {getattr(self, f)!r}")
        sc = self.scaling
        if isinstance(sc, bool) or not isinstance(sc, (int, float)) or not math.isfinite(sc):
            raise ConfigError(f"{name}.scaling must be a finite number, got {sc!r}")
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"{name}.dropout must be in [0, 1), got {self.dropout!r}")

    def bottleneck_for(self, hidden: int) -> int:
        """``hidden // reduction_factor`` rounded down to a multiple of phm_dim (at least phm_dim)."""
        n = self.phm_dim
        return max(n, int(hidden // self.reduction_factor) // n * n)

    def as_bottleneck(self, hidden: int) -> BottleneckConfig:
        """The placement / activation / scaling part, as a bottleneck adapter config."""
        return BottleneckConfig(mode="houlsby" if self.mode == "compacter" else "pfeiffer",
                                bottleneck_size=self.bottleneck_for(hidden), non_linearity=self.non_linearity,
                                scaling=self.scaling, original_ln_before=self.original_ln_before,
                                residual_before_ln=self.residual_before_ln, dropout=self.dropout)


def kron_sum(rule: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(rule[i], fast[i])``: rule (n, n, n), fast (n, p, q) -> (n p, n q).

    kron(A, B)[a p + c, b q + d] = A[a, b] B[c, d], so the sum is one einsum and a reshape.
    """
    n, p, q = fast.shape
    return torch.einsum("iab,icd->acbd", rule, fast).reshape(n * p, n * q)


class PHMRule(AdapterModule):
    """Holds the adapter's shared rule matrices ``phm_rule`` (n, n, n); sits on the root
    module and transforms nothing (so it is saved and counted exactly once)."""

    has_pre = False
    has_post = False

    def __init__(self, n: int, ref: torch.Tensor) -> None:
        super().__init__()
        self.phm_rule = nn.Parameter(torch.empty(n, n, n, device=ref.device, dtype=ref.dtype))
        with torch.no_grad():
            nn.init.normal_(self.phm_rule, std=0.01)


class PHMLinear(nn.Module):
    """``x @ W.T + b`` with ``W = sum_i A_i ⊗ (W_left[i] @ W_right[i])``: (out, in).

    W_left: (n, out/n, r), W_right: (n, r, in/n), b: (out,). ``A`` is the own ``phm_rule``
    (n, n, n), or the shared one of ``shared`` (referenced, not owned: not a submodule).
    """

    def __init__(self, in_features: int, out_features: int, cfg: CompacterConfig, ref: torch.Tensor,
                 shared: PHMRule | None, zero_init: bool) -> None:
        super().__init__()
        n, r = cfg.phm_dim, cfg.phm_rank
        dev, dt = ref.device, ref.dtype
        self.W_left = nn.Parameter(torch.empty(n, out_features // n, r, device=dev, dtype=dt))
        self.W_right = nn.Parameter(torch.empty(n, r, in_features // n, device=dev, dtype=dt))
        self.b = nn.Parameter(torch.zeros(out_features, device=dev, dtype=dt)) if cfg.phm_bias else None
        object.__setattr__(self, "_shared", shared)  # a plain reference: the root piece owns it
        if shared is None:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n, device=dev, dtype=dt))
            with torch.no_grad():
                nn.init.normal_(self.phm_rule, std=0.01)
        with torch.no_grad():
            for i in range(n):  # glorot-uniform per factor, as AdapterHub
                nn.init.xavier_uniform_(self.W_left[i])
                nn.init.xavier_uniform_(self.W_right[i])
            if zero_init:
                self.W_right.zero_()  # W = 0: the adapter starts as the identity

    @property
    def rule(self) -> torch.Tensor:
        return self._shared.phm_rule if self._shared is not None else self.phm_rule

    @property
    def weight(self) -> torch.Tensor:
        """The composed W: (out, in)."""
        return kron_sum(self.rule, self.W_left @ self.W_right)  # fast: (n, out/n, in/n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        return F.linear(x.to(self.W_left.dtype), self.weight, self.b)


class _Compacter(Bottleneck):
    """A bottleneck piece whose projections are PHM layers (mixed into each placement class)."""

    def __init__(self, in_features: int, out_features: int, cfg: CompacterConfig, ref: nn.Module,
                 shared: PHMRule | None) -> None:
        bcfg = cfg.as_bottleneck(in_features)
        super().__init__(in_features, out_features, bcfg, ref)
        k = bcfg.bottleneck_size
        assert k is not None
        w = self.adapter_down.weight
        # replace the dense projections built by Bottleneck
        self.adapter_down = PHMLinear(in_features, k, cfg, w, shared, zero_init=False)  # type: ignore[assignment]
        self.adapter_up = PHMLinear(k, out_features, cfg, w, shared, zero_init=True)  # type: ignore[assignment]

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        """a(h): (..., d) -> (..., d)."""
        return self.dropout(self.adapter_up(self.act(self.adapter_down(h)))) * self.scaling


class CompacterSeries(_Compacter):
    """``y + a(y)`` after a pre-LN block (or after a post-LN block's dropout)."""


class CompacterLNPre(_Compacter, LNPreBottleneck):
    """On a post-LN block's LayerNorm (pre-hook): ``z -> z + a(LN(z))``."""


class CompacterPostLNBlock(_Compacter, PostLNBlockBottleneck):
    """On a post-LN block: ``LN(z) -> LN(LN(z) + a(LN(z)) + r)``."""


def _check_width(site: str, d: int, cfg: CompacterConfig) -> None:
    if d % cfg.phm_dim:
        raise ConfigError(f"compacter: phm_dim={cfg.phm_dim} must divide the width {d} of site {site!r} "
                          f"(PHM splits each weight into phm_dim x phm_dim blocks)")


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, CompacterConfig)
    what = f"compacter adapter {name!r}"
    bmode = "houlsby" if cfg.mode == "compacter" else "pfeiffer"
    hosts = default_sites(model, bmode) if cfg.targets is None else resolve_targets(
        model, cfg.targets, accept=_accept, what=what)
    mods = dict(model.named_modules())
    ref = next(p for p in mods[hosts[0]].parameters())
    shared = PHMRule(cfg.phm_dim, ref) if cfg.shared_phm_rule else None
    pieces: dict[str, AdapterModule] = {"": shared} if shared is not None else {}
    for h in hosts:
        blk = mods[h]
        d, _ = _io(blk)
        _check_width(h, d, cfg)
        if is_post_ln_block(blk) and not cfg.original_ln_before:
            pieces[f"{h}.dropout"] = CompacterSeries(d, d, cfg, blk, shared)
        elif is_post_ln_block(blk) and cfg.residual_before_ln:
            pieces[f"{h}.LayerNorm"] = CompacterLNPre(d, d, cfg, blk, shared)
        elif is_post_ln_block(blk):
            pieces[h] = CompacterPostLNBlock(d, d, cfg, blk, shared)
        else:
            pieces[h] = CompacterSeries(d, d, cfg, blk, shared)
    return pieces


register(MethodSpec(name="compacter", config_cls=CompacterConfig, attach=attach, mergeable=False,
                    paper="Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (Mahabadi et al., 2021)"))
