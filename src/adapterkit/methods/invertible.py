"""Invertible adapters (MAD-X, Pfeiffer et al., 2020, https://arxiv.org/abs/2005.00052).

MAD-X's language adapters include an invertible adapter on the input embeddings: a NICE
additive coupling block (Dinh et al., 2014) applied to the output of the embedding layer, and
its exact inverse applied to the last hidden states before the (tied) output embeddings::

    x = [x1, x2]            x1: (..., d//2) the first half, x2: (..., d - d//2) the rest
    y1 = x1 + F(x2)         F: (d - d//2) -> d//2,   G: d//2 -> (d - d//2)
    y2 = x2 + G(y1)         F(u) = W_F2 f(W_F1 u + b_F1) + b_F2 (a bottleneck MLP), G alike
    inverse:  x2 = y2 - G(y1),  x1 = y1 - F(x2)           (exact: no division, no log-det)

The bottleneck MLPs have ``split // reduction_factor`` hidden units (AdapterHub's
``inv_adapter_reduction_factor``, default 2; F's from the first half's width, G's from the
second's). Their last layers start at zero, so a fresh adapter is the identity (AdapterHub
draws them at random). Trainable parameters, for width d, s1 = d // 2, s2 = d - s1,
h_F = s1 // rf, h_G = s2 // rf::

    (s2 h_F + h_F + h_F s1 + s1) + (s1 h_G + h_G + h_G s2 + s2)

Pieces: the coupling (which owns F and G) on the input-embedding module (a forward hook on its
output); and, on the output head, a parameterless piece that applies the SAME block's inverse
to the head's input (a pre-hook). Only the embedding piece holds tensors, so they are saved and
counted once. Inputs passed as ``inputs_embeds`` skip the embedding module and so the
forward block. Non-linear: not mergeable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, TargetNotFoundError, UnsupportedModuleError
from ..inject import base_modules, is_linear_like, resolve_targets, weight_io
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .bottleneck import ACTIVATIONS


@dataclass(frozen=True)
class InvertibleConfig(AdapterConfig):
    """Invertible (NICE) adapter hyper-parameters.

    targets: the ONE module whose output is the input embedding (suffix or regex); None = the
        model's ``get_input_embeddings()`` (e.g. Llama's ``embed_tokens``, BERT's ``word_embeddings``;
        AdapterHub puts it after BERT's whole ``embeddings`` block: ``targets=["embeddings"]``).
    head: where the inverse runs, on the input of: None = the model's ``get_output_embeddings()``
        if it has one (an LM head), else nowhere; True = the output embeddings, required;
        False = nowhere (e.g. a classifier); a string = the head module's name (suffix).
    reduction_factor: hidden width of F and G = their input half's width // reduction_factor (>= 1).
    non_linearity: one of bottleneck.ACTIVATIONS (AdapterHub: relu).
    """

    method = "invertible"
    head: bool | str | None = None
    reduction_factor: float = 2
    non_linearity: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not (self.head is None or isinstance(self.head, bool) or (isinstance(self.head, str) and self.head)):
            raise ConfigError(f"{name}.head must be None, True, False or a module name, got {self.head!r}")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0 or not math.isfinite(rf):
            raise ConfigError(f"{name}.reduction_factor must be a number > 0, got {rf!r}")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in ACTIVATIONS:
            raise ConfigError(f"{name}.non_linearity must be one of {', '.join(ACTIVATIONS)}; got {self.non_linearity!r}")


class _MLP(nn.Module):
    """``up(f(down(u)))``: (..., n_in) -> (..., n_out); ``up`` starts at zero."""

    def __init__(self, n_in: int, n_out: int, rf: float, act: str, ref: torch.Tensor) -> None:
        super().__init__()
        hidden = max(1, int(n_in // rf))
        self.down = nn.Linear(n_in, hidden, device=ref.device, dtype=ref.dtype)
        self.up = nn.Linear(hidden, n_out, device=ref.device, dtype=ref.dtype)
        self.act = ACTIVATIONS[act.lower()]
        with torch.no_grad():
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(u)))


class NICECoupling(AdapterModule):
    """The coupling block on the embedding output: ``forward_post`` maps it through ``coupling``."""

    def __init__(self, dim: int, cfg: InvertibleConfig, ref: torch.Tensor) -> None:
        super().__init__()
        self.s1, self.s2 = dim // 2, dim - dim // 2
        self.F = _MLP(self.s2, self.s1, cfg.reduction_factor, cfg.non_linearity, ref)
        self.G = _MLP(self.s1, self.s2, cfg.reduction_factor, cfg.non_linearity, ref)

    def coupling(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d): y1 = x1 + F(x2), y2 = x2 + G(y1)."""
        x = x.to(self.F.down.weight.dtype)
        x1, x2 = x[..., : self.s1], x[..., self.s1:]
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat([y1, y2], dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d): x2 = y2 - G(y1), x1 = y1 - F(x2)."""
        y = y.to(self.F.down.weight.dtype)
        y1, y2 = y[..., : self.s1], y[..., self.s1:]
        x2 = y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return torch.cat([x1, x2], dim=-1)

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.coupling(y).to(y.dtype)


class NICEInverse(AdapterModule):
    """On the output head: its input goes through the coupling's inverse. No tensors of its own:
    the block is referenced (not a submodule), so it is saved and counted once."""

    has_pre = True
    has_post = False

    def __init__(self, block: NICECoupling) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)

    def forward_pre(self, x: torch.Tensor) -> torch.Tensor:
        return self._block.inverse(x).to(x.dtype)


def _width(name: str, m: nn.Module) -> int:
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    for attr in ("embedding_dim", "hidden_size", "dim"):
        v = getattr(m, attr, None)
        if isinstance(v, int):
            return v
    # an embeddings block (BERT's word + position embeddings, ViT's patch projection): the
    # output width of its last embedding / linear / conv layer
    for _, c in reversed(base_modules(m)):
        if isinstance(c, nn.Embedding):
            return c.embedding_dim
        if is_linear_like(c):
            return weight_io(c)[0]
        if isinstance(c, nn.Conv2d):
            return c.out_channels
    raise UnsupportedModuleError(f"invertible adapter: cannot tell the output width of {name!r} "
                                 f"({type(m).__name__}); target the embedding layer itself")


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    for n, m in base_modules(model):
        if m is module and n:
            return n
    return None


def _io_embeddings(model: nn.Module, which: str) -> nn.Module | None:
    fn = getattr(model, f"get_{which}_embeddings", None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, InvertibleConfig)
    what = f"invertible adapter {name!r}"
    if cfg.targets is None:
        emb = _path_of(model, _io_embeddings(model, "input"))
        if emb is None:
            raise TargetNotFoundError(f"{what}: {type(model).__name__} has no get_input_embeddings(); pass "
                                      f"targets=[...] naming the embedding layer")
        hosts = [emb]
    else:
        hosts = resolve_targets(model, cfg.targets, accept=lambda n, m: True, what=what)
        if len(hosts) != 1:
            raise ConfigError(f"{what}: targets must match exactly one module (the input embedding), matched "
                              f"{len(hosts)}: {', '.join(hosts[:5])}")
    mods = dict(model.named_modules())
    host = mods[hosts[0]]
    dim = _width(hosts[0], host)
    if dim < 2:
        raise UnsupportedModuleError(f"{what}: width {dim} of {hosts[0]!r} cannot be split in two halves")
    ref = next(iter(host.parameters()), None)
    block = NICECoupling(dim, cfg, ref if ref is not None else torch.empty(0))
    pieces: dict[str, AdapterModule] = {hosts[0]: block}

    head: str | None = None
    if isinstance(cfg.head, str):
        found = resolve_targets(model, [cfg.head], accept=lambda n, m: True, what=what)
        if len(found) != 1:
            raise ConfigError(f"{what}: head={cfg.head!r} must match exactly one module, matched {len(found)}: "
                              f"{', '.join(found[:5])}")
        head = found[0]
    elif cfg.head is not False:
        head = _path_of(model, _io_embeddings(model, "output"))
        if head is None and cfg.head is True:
            raise TargetNotFoundError(f"{what}: head=True but {type(model).__name__} has no output embeddings; "
                                      f"name the head module (head='lm_head') or pass head=False")
    if head is not None:
        if head == hosts[0]:
            raise ConfigError(f"{what}: the head {head!r} is the embedding module itself")
        h = mods[head]
        if is_linear_like(h) and weight_io(h)[1] != dim:
            raise UnsupportedModuleError(f"{what}: the head {head!r} reads {weight_io(h)[1]} features but the "
                                         f"embedding {hosts[0]!r} gives {dim}: the inverse cannot sit there")
        pieces[head] = NICEInverse(block)
    return pieces


register(MethodSpec(name="invertible", config_cls=InvertibleConfig, attach=attach, mergeable=False,
                    paper="MAD-X: An Adapter-Based Framework for Multi-Task Cross-Lingual Transfer "
                          "(Pfeiffer et al., 2020)"))
