"""MoLA: MoE-LoRA with Layer-wise Expert Allocation ("Higher Layers Need More LoRA Experts",
Gao et al., 2024, https://arxiv.org/abs/2402.08562).

Each target layer l holds E_l LoRA experts and a top-k router on the input token::

    p = softmax(G x)                      G: ``router`` (E_l, in), no bias
    K = top-k(p),  g_e = p_e / sum_{K} p  (renormalised over the chosen experts, as in Mixtral)
    y = W x + b + s * sum_{e in K} g_e B_e A_e x,    A_e (r, in), B_e (out, r), s = alpha / r

``lora_A`` (E_l, r, in), ``lora_B`` (E_l, out, r) (A kaiming, B zero: identity start). The number of
experts E_l differs per layer (``experts_per_layer``): a list of per-layer-group counts, spread
evenly over the model's layers (a list as long as the layer count gives one count per layer), or
a named schedule of 4 groups, all with the same total as the paper's comparisons:

* "uniform": ``num_experts`` everywhere (MoLA-□);
* "triangle": 8, 6, 4, 2 (MoLA-△, more experts in lower layers);
* "inverted-triangle": 2, 4, 6, 8 (MoLA-▽, more in higher layers: the paper's best);
* "hourglass": 8, 2, 2, 8 (MoLA-⋈).

The layer index of a target is the first integer in its module path (``model.layers.3.mlp.up_proj``
-> 3); the layer count is 1 + the largest such index in the model. Optional Switch-style load
balancing (``aux_loss_weight`` > 0, Mixtral's form): ``E * sum_e f_e P_e`` (f_e: fraction of the
tokens that route to expert e among their top-k, P_e: its mean router probability) from the last
training forward, returned by ``regularization()`` (call it after the forward). Input-dependent,
so not mergeable. Each expert runs only on the tokens routed to it (sparse dispatch, as in the
authors' code).
Trainable parameters per target: E_l (r (in + out) + in).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import base_modules
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora_xs import LinearPiece, attach_linear, check_float, check_positive_int, find_linear_hosts

SCHEDULES: dict[str, tuple[int, ...]] = {
    "triangle": (8, 6, 4, 2),
    "inverted-triangle": (2, 4, 6, 8),
    "hourglass": (8, 2, 2, 8),
}
_INT = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class MoLAConfig(AdapterConfig):
    """MoLA hyper-parameters.

    r: rank of every expert. alpha: scaling numerator, s = alpha / r.
    experts_per_layer: "uniform", "triangle", "inverted-triangle", "hourglass", a comma list
    ("2,4,6,8") or a list of ints; per layer group (see module docstring).
    num_experts: experts per layer for "uniform". top_k: experts used per token.
    aux_loss_weight: weight of the load-balancing loss (0: off). dropout: on the experts' input.
    """

    method = "mola"
    r: int = 8
    alpha: float = 16.0
    experts_per_layer: str | tuple[int, ...] = "uniform"
    num_experts: int = 4
    top_k: int = 2
    aux_loss_weight: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("r", "num_experts", "top_k"):
            check_positive_int(self, f)
        check_float(self, "alpha", strict=True)
        check_float(self, "aux_loss_weight")
        check_float(self, "dropout")
        if self.dropout >= 1:
            raise ConfigError(f"MoLAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        e = self.experts_per_layer
        if isinstance(e, list):
            object.__setattr__(self, "experts_per_layer", tuple(e))  # frozen + hashable
        self.groups()  # validates

    def groups(self) -> tuple[int, ...]:
        """Expert counts per layer group."""
        e = self.experts_per_layer
        if isinstance(e, str):
            if e == "uniform":
                return (self.num_experts,)
            if e in SCHEDULES:
                return SCHEDULES[e]
            try:
                counts = tuple(int(t) for t in e.split(","))
            except ValueError:
                raise ConfigError(f"MoLAConfig.experts_per_layer {e!r} is neither a schedule "
                                  f"({', '.join(['uniform', *SCHEDULES])}) nor a comma list like '2,4,6,8'") from None
        else:
            counts = tuple(e)
        if not counts or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts):
            raise ConfigError(f"MoLAConfig.experts_per_layer must hold positive integers, got {e!r}")
        return counts

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def layer_index(path: str) -> tuple[str, int] | None:
    """(container path, layer number) from the first integer component: "model.layers.3.x" -> ("model.layers", 3)."""
    m = _INT.search(path)
    return (path[:m.start(1)].rstrip("."), int(m.group(1))) if m else None


def experts_for_layers(cfg: MoLAConfig, layer: int, num_layers: int) -> int:
    """E_l: layer ``layer`` of ``num_layers`` falls in group floor(layer * G / num_layers)."""
    g = cfg.groups()
    if len(g) > num_layers:
        raise ConfigError(f"mola: experts_per_layer has {len(g)} groups {g} but the model has only {num_layers} "
                          f"layers; give at most one count per layer")
    return g[layer * len(g) // num_layers]


class MoLAPiece(LinearPiece):
    """E LoRA experts + a top-k router on one Linear/Conv1D host."""

    def __init__(self, host: nn.Module, cfg: MoLAConfig, num_experts: int) -> None:
        super().__init__(host, cfg.method)
        E, r, i, o = num_experts, cfg.r, self.in_features, self.out_features
        self.num_experts, self.top_k = E, min(cfg.top_k, E)
        self.scaling, self.aux_loss_weight = cfg.scaling, cfg.aux_loss_weight
        self.lora_A = self.param_like(E, r, i)
        self.lora_B = self.param_like(E, o, r)
        self.router = self.param_like(E, i)
        with torch.no_grad():
            for e in range(E):  # each expert like a LoRA A (kaiming on its (r, in) matrix)
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))  # nn.Linear's default
        self.dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._aux: torch.Tensor | None = None

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router for tokens x (N, in): (gates (N, E) zero off the top-k, probs (N, E), top-k ids (N, k))."""
        probs = torch.softmax((x @ self.router.T).float(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        w = top_p / top_p.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(1, top_i, w), probs, top_i

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xf = x.to(self.lora_A.dtype).reshape(-1, self.in_features)  # (N, in)
        g, probs, top_i = self.gates(xf)
        xd = self.dropout(xf)
        d = torch.zeros(xf.shape[0], self.out_features, dtype=xf.dtype, device=xf.device)  # (N, out)
        # sparse dispatch: each expert runs only on the tokens that picked it (as the authors' code)
        for e in range(self.num_experts):
            tok = (top_i == e).any(-1).nonzero().squeeze(-1)  # (n_e,)
            if tok.numel():
                h = (xd[tok] @ self.lora_A[e].T) @ self.lora_B[e].T  # (n_e, in) -> (n_e, r) -> (n_e, out)
                d = d.index_add(0, tok, h * g[tok, e, None].to(h.dtype))
        self._aux = None
        if self.training and self.aux_loss_weight > 0:
            # Mixtral / Switch: E * sum_e (tokens routed to e / N) * mean router probability of e
            E = self.num_experts
            f = torch.zeros(E, device=x.device).index_add_(
                0, top_i.reshape(-1), torch.ones(top_i.numel(), device=x.device)) / top_i.shape[0]
            self._aux = self.aux_loss_weight * E * (f * probs.mean(0)).sum()
        return y + (d * self.scaling).reshape(*y.shape[:-1], -1).to(y.dtype)

    def regularization(self) -> torch.Tensor | None:
        """The load-balancing loss of the last training forward (None if off or not run yet)."""
        return self._aux


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, MoLAConfig)
    hosts = find_linear_hosts(model, name, cfg)
    idx = {h: layer_index(h) for h in hosts}
    bad = [h for h, i in idx.items() if i is None]
    if bad:
        raise ConfigError(f"mola: cannot tell the layer of {bad[0]!r} (no layer number in its path); "
                          f"target modules inside numbered layers")
    # layer count per container (model.layers, encoder.layer, ...): 1 + its largest layer number
    counts: dict[str, int] = {}
    for n, _ in base_modules(model):
        if (li := layer_index(n)) is not None:
            counts[li[0]] = max(counts.get(li[0], 0), li[1] + 1)

    def make(h: str, host: nn.Module) -> LinearPiece:
        where, layer = idx[h]  # type: ignore[misc]
        return MoLAPiece(host, cfg, experts_for_layers(cfg, layer, counts[where]))

    return attach_linear(model, name, cfg, make)


register(MethodSpec(name="mola", config_cls=MoLAConfig, attach=attach, mergeable=False,
                    paper="Higher Layers Need More LoRA Experts (MoLA, Gao et al., 2024)"))
