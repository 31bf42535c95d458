"""AdapterFusion (Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning", https://arxiv.org/abs/2005.00247).

Two-stage transfer: N adapters are trained on N source tasks, then frozen; a *fusion* layer
learns, per token, an attention over their outputs. On every host where one of them sits,
with ``y`` the host's output before the adapters (d wide) and ``a_n = f_n(x, y) - y`` the
output delta of source adapter ``n`` (a bottleneck adapter's ``up(act(down(y)))``)::

    q   = Q y                         (..., d)       Q, K, V: Linear(d, d) with bias
    k_n = K a_n,  v_n = V a_n         (..., d)
    p   = softmax_n(q . k_n / T)      (..., N)       T: temperature
    out = y + sum_n p_n v_n           (..., d)

V starts as the identity and Q, K as N(0, 0.02) (AdapterHub's "dynamic" fusion), so a
fresh fusion is an average of the adapters. AdapterHub's regulariser ``c * ||V - I||^2``
(c = 0.01) is the pieces' :meth:`regularization` (``ak.api.regularization_loss``).

The fusion layers are an ordinary adapter of method ``"fusion"`` (they train, save and load
like any other); its pieces sit on the fused adapters' hosts and read those adapters from
the same host, by name::

    ak.compose.add_fusion(model, "fusion_ab", ["a", "b"])   # freezes a and b
    ak.set_adapter(model, ak.compose.Fuse("a", "b", name="fusion_ab"))

Only output-side adapters can be fused (every LoRA-family adapter; bottleneck adapters on
pre-LN blocks and BERT's ``original_ln_before=False``); the BERT Pfeiffer placement, which
rewrites a LayerNorm's input, is refused with a typed error. Loading a saved fusion needs
the fused adapters attached under the names it was trained with.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..api import add_adapter, get_record
from ..errors import AdapterError, AdapterNotFoundError, ConfigError, UnsupportedModuleError
from ..inject import CONTAINER, is_linear_like, weight_io
from ..methods.base import AdapterConfig, AdapterModule
from ..methods.bottleneck import Bottleneck
from ..registry import MethodSpec, register
from ..state import AdapterRecord, Composition, get_state

#: methods that read other adapters themselves: they cannot be fused or scaled in turn
READERS = ("fusion", "scalearn")


# -- what fusion and ScaLearn share: frozen source adapters read on a host -----------------------
def check_sources(cfg_name: str, adapters: Any) -> tuple[str, ...]:
    """Validate a config's ``adapters`` field: a non-empty list of distinct names."""
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ConfigError(f"{cfg_name}.adapters must be a non-empty list of adapter names, got {adapters!r}")
    if not all(isinstance(a, str) and a for a in adapters):
        raise ConfigError(f"{cfg_name}.adapters must hold adapter names (strings), got {adapters!r}")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"{cfg_name}.adapters names an adapter twice: {list(adapters)}")
    return tuple(adapters)


def source_hosts(model: nn.Module, name: str, sources: Sequence[str], what: str) -> list[tuple[str, nn.Module, int]]:
    """(host path, host, output width d) of every host of the source adapters, in model order.

    Raises AdapterNotFoundError for a missing source and UnsupportedModuleError for a source
    piece that is not output-side (it rewrites the host's input instead).
    """
    state = get_state(model, create=True)
    if name in sources:
        raise ConfigError(f"{what} cannot read itself: {name!r} is in its adapters")
    recs = [state.record(s) for s in sources]
    for rec in recs:
        if rec.method in READERS:
            raise ConfigError(f"{what}: adapter {rec.name!r} is itself a {rec.method} adapter; "
                              f"combine the source adapters directly")
    mods = dict(model.named_modules())
    order = {n: i for i, n in enumerate(mods)}
    hosts = sorted({h for rec in recs for h in rec.pieces}, key=order.__getitem__)
    out = []
    for h in hosts:
        pieces = [(rec.name, rec.pieces[h]) for rec in recs if h in rec.pieces]
        for n, p in pieces:
            if p.has_pre or not p.has_post:
                raise UnsupportedModuleError(
                    f"{what}: adapter {n!r} acts on the input of {h!r} ({type(p).__name__}); only output-side "
                    f"adapters can be combined (for BERT bottleneck adapters use original_ln_before=False)")
        out.append((h, mods[h], _width(h, mods[h], [p for _, p in pieces])))
    return out


def _width(path: str, host: nn.Module, pieces: Sequence[AdapterModule]) -> int:
    """The width of the host's output that the adapters change."""
    for p in pieces:
        if isinstance(p, Bottleneck):
            return p.adapter_up.out_features
    if is_linear_like(host):
        return weight_io(host)[0]
    if isinstance(host, nn.Embedding):
        return host.embedding_dim
    raise UnsupportedModuleError(f"cannot tell the output width of {path!r} ({type(host).__name__})")


def sources_present(host: nn.Module, sources: Sequence[str]) -> tuple[bool, ...]:
    """Which sources have a piece on ``host`` (recorded when a reader is attached)."""
    c = host._modules.get(CONTAINER)
    return tuple(c is not None and n in c for n in sources)


def source_deltas(host: nn.Module, sources: Sequence[str], present: Sequence[bool], x: torch.Tensor | None,
                  y: torch.Tensor) -> list[torch.Tensor | None]:
    """Each source adapter's output delta ``f_n(x, y) - y`` on this host (None: no piece here).

    ``y``: (..., d), the host's output before the adapters. The sources are read from the
    host's container, so they need not be active. ``present``: which sources had a piece here
    when the reader was attached; one gone since (deleted) is an error, not a silent skip.
    """
    c = host._modules.get(CONTAINER)
    out: list[torch.Tensor | None] = []
    for n, was in zip(sources, present):
        if c is None or n not in c:
            if was:
                raise AdapterNotFoundError(f"adapter {n!r} was deleted but an adapter combining it still reads it "
                                           f"(on {type(host).__name__}); delete that one too or re-attach {n!r}")
            out.append(None)
            continue
        p = c[n]
        if p.merged:
            raise AdapterError(f"adapter {n!r} is merged into the base weights; unmerge it before combining it")
        out.append(p.hook_post(host, x, y, None) - y)
    return out


# -- the method -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusionConfig(AdapterConfig):
    """AdapterFusion layers over frozen source adapters.

    adapters: the fused adapters' names, in order (they must be attached, output-side).
    temperature: T of the softmax over adapters (> 0).
    regularization: c of the regulariser ``c * ||V - I||_F^2`` per host (AdapterHub: 0.01; 0 = off).
    targets: must stay None: the fusion sits on every host of its adapters.
    """

    method = "fusion"
    adapters: tuple[str, ...] = ()
    temperature: float = 1.0
    regularization: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "adapters", check_sources("FusionConfig", self.adapters))
        if self.targets is not None:
            raise ConfigError("FusionConfig.targets must be None: fusion layers sit on the fused adapters' hosts")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"FusionConfig.temperature must be > 0, got {t!r}")
        c = self.regularization
        if isinstance(c, bool) or not isinstance(c, (int, float)) or c < 0:
            raise ConfigError(f"FusionConfig.regularization must be >= 0, got {c!r}")


class FusionPiece(AdapterModule):
    """The Q, K, V projections of one host (each Linear(d, d)); reads its sources from the host."""

    def __init__(self, host: nn.Module, d: int, cfg: FusionConfig) -> None:
        super().__init__()
        self.bind(host)
        w = next(host.parameters(), None)
        dev = w.device if w is not None else None
        dt = w.dtype if w is not None and w.is_floating_point() else None
        self.adapters, self.temperature, self.reg = cfg.adapters, float(cfg.temperature), float(cfg.regularization)
        self.present = sources_present(host, cfg.adapters)
        self.query = nn.Linear(d, d, device=dev, dtype=dt)
        self.key = nn.Linear(d, d, device=dev, dtype=dt)
        self.value = nn.Linear(d, d, device=dev, dtype=dt)
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.value.weight.copy_(torch.eye(d))  # identity: a fresh fusion averages the adapters
            nn.init.zeros_(self.value.bias)

    def forward_post(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        deltas = [a for a in source_deltas(self.host, self.adapters, self.present, x, y) if a is not None]
        if not deltas:
            return y
        dt = self.query.weight.dtype
        a = torch.stack(deltas, dim=-2).to(dt)  # (..., N, d)
        q = self.query(y.to(dt))  # (..., d)
        k, v = self.key(a), self.value(a)  # (..., N, d)
        scores = torch.einsum("...d,...nd->...n", q, k) / self.temperature  # (..., N)
        p = torch.softmax(scores, dim=-1)
        return y + torch.einsum("...n,...nd->...d", p, v).to(y.dtype)

    def regularization(self) -> torch.Tensor | None:
        if self.reg == 0:
            return None
        w = self.value.weight
        return self.reg * (w - torch.eye(w.shape[0], device=w.device, dtype=w.dtype)).pow(2).sum()


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, FusionConfig)
    hosts = source_hosts(model, name, cfg.adapters, f"fusion adapter {name!r}")
    return {h: FusionPiece(mod, d, cfg) for h, mod, d in hosts}


register(MethodSpec(name="fusion", config_cls=FusionConfig, attach=attach, mergeable=False,
                    paper="AdapterFusion: Non-Destructive Task Composition for Transfer Learning "
                          "(Pfeiffer et al., 2021)"))


# -- user API -------------------------------------------------------------------------------------
def freeze(model: nn.Module, names: Sequence[str]) -> None:
    """Stop gradients to the adapters ``names`` (the frozen sources of a transfer adapter)."""
    for n in names:
        for p in get_record(model, n).pieces.values():
            p.requires_grad_(False)


def add_fusion(model: nn.Module, name: str, adapters: Sequence[str], temperature: float = 1.0,
               regularization: float = 0.01, freeze_sources: bool = True) -> AdapterRecord:
    """Attach fusion layers ``name`` over ``adapters`` (and freeze those, the paper's second
    stage). Activate with ``ak.set_adapter(model, Fuse(*adapters, name=name))``."""
    cfg = FusionConfig(adapters=tuple(adapters), temperature=temperature, regularization=regularization)
    rec = add_adapter(model, name, cfg)
    if freeze_sources:
        freeze(model, cfg.adapters)
    return rec


class ReaderBlock(Composition):
    """A block naming a reader adapter (fusion, ScaLearn) and the sources it reads, in order.

    Equivalent to activating the reader alone; the block also checks that it reads exactly
    these adapters, in this order.
    """

    #: the reader's piece class and the block's name in messages (set by subclasses)
    piece_cls: type[AdapterModule] = AdapterModule
    kind = "reader"

    def __init__(self, *adapters: str, name: str) -> None:
        self.adapters = check_sources(type(self).__name__, list(adapters))
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{type(self).__name__} needs the {self.kind} adapter's name, got name={name!r}")
        self.name = name

    def adapter_names(self) -> tuple[str, ...]:
        return (*self.adapters, self.name)

    def pre(self, host: nn.Module, container: nn.ModuleDict, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs  # sources are output-side only (checked when the reader was added)

    def post(self, host: nn.Module, container: nn.ModuleDict, x: torch.Tensor | None, y: torch.Tensor
             ) -> torch.Tensor:
        block = type(self).__name__
        piece = container[self.name] if self.name in container else None
        if piece is None:
            if any(n in container for n in self.adapters):
                raise AdapterNotFoundError(f"{block}: adapter {self.name!r} has no {self.kind} layer on this host")
            return y
        if not piece.has_post:  # e.g. ScaLearn++'s shared coefficients on the root model
            return y
        if not isinstance(piece, self.piece_cls):
            raise ConfigError(f"{block}: adapter {self.name!r} is not a {self.kind} adapter ({type(piece).__name__})")
        if piece.adapters != self.adapters:  # type: ignore[attr-defined]
            raise ConfigError(f"{block}: {self.kind} adapter {self.name!r} reads "
                              f"{list(piece.adapters)}, not {list(self.adapters)}")  # type: ignore[attr-defined]
        return piece.hook_post(host, x, y, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.adapters))}, name={self.name!r})"


class Fuse(ReaderBlock):
    """``Fuse("a", "b", name="fusion_ab")``: the fusion adapter ``name`` over adapters a, b."""

    piece_cls = FusionPiece
    kind = "fusion"


__all__ = ["FusionConfig", "FusionPiece", "Fuse", "ReaderBlock", "add_fusion", "freeze", "source_deltas",
           "source_hosts"]
