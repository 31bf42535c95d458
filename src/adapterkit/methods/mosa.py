"""MoSA: Mixture of Sparse Adapters (Zhang et al., 2023, https://arxiv.org/abs/2312.02923).

Split & merge a standard bottleneck adapter (:mod:`adapterkit.methods.bottleneck`, any of its
placements)::

    a(h) = dropout(W_up f(W_down h + b_down) + b_up) * s

* split: every entry of ``W_down, b_down, W_up, b_up`` is assigned to one of N modules
  (``num_modules``) by a random balanced partition, stored as a persistent uint8 buffer
  ``<param>_module`` next to each parameter (so a loaded adapter keeps its split). Module k is the
  sparse adapter with tensors ``P ⊙ M_k``, ``M_k = (module == k)``; the masks are disjoint and
  cover every entry, so ``sum_k P ⊙ M_k = P`` exactly.
* sparse training: on every forward in training mode each piece draws ``num_active`` distinct
  modules at random (torch's global RNG) and runs the sparse adapter ``P ⊙ (sum of their
  masks)``: gradients reach only the drawn modules' entries (``d(P ⊙ M)/dP = M``). One forward
  per optimizer step is assumed (with gradient accumulation or activation recomputation each
  forward draws again). ``set_mosa_modules(model, name, [k, ...])`` pins the drawn modules.
  As in the paper, nothing is rescaled: a training step runs a sparse adapter with about
  ``num_active / N`` of the entries, inference the complete one.
* merge: in eval mode the piece runs the complete adapter ``sum_k P ⊙ M_k = P``;
  :func:`mosa_merge` turns the adapter into a plain ``bottleneck`` adapter with those tensors (same
  sites, same outputs, no masks), e.g. to save or serve it as such.

Trainable parameters are exactly the bottleneck adapter's (``2 d k + k + d`` per site of width
d, bottleneck k); the masks are buffers. The paper's additional "hierarchical sparse strategy"
is not implemented. Non-linear: not mergeable into the base weights.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, ConfigError
from ..registry import MethodSpec, register
from . import bottleneck as bn
from .base import AdapterConfig, AdapterModule

#: the bottleneck tensors that are split into modules
SPLIT = (("adapter_down", "weight"), ("adapter_down", "bias"), ("adapter_up", "weight"), ("adapter_up", "bias"))


@dataclass(frozen=True)
class MoSAConfig(bn.BottleneckConfig):
    """A bottleneck adapter config (every field of :class:`BottleneckConfig`, same defaults) plus:

    num_modules: N, the number of disjoint sparse modules the adapter is split into (2..255).
    num_active: how many of them train together in one step (the paper: 1), 1..N.
    """

    method = "mosa"
    num_modules: int = 4
    num_active: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        n = self.num_modules
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 255:
            raise ConfigError(f"{name}.num_modules must be an integer in 2..255, got {n!r}")
        a = self.num_active
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= n:
            raise ConfigError(f"{name}.num_active must be an integer in 1..num_modules={n}, got {a!r}")
        if self.scaling == "learned":
            raise ConfigError(f"{name}.scaling='learned' is not supported: one scalar cannot be split into "
                              f"disjoint modules; use a number")

    def as_bottleneck(self) -> bn.BottleneckConfig:
        """The merged adapter's config: this one without the split."""
        fields = {k: v for k, v in self.to_dict().items() if k in bn.BottleneckConfig.field_names()}
        return bn.BottleneckConfig.from_dict(fields)  # type: ignore[return-value]


def balanced_split(shape: torch.Size, n: int, device: torch.device | None) -> torch.Tensor:
    """A random partition of a tensor's entries into n modules of (almost) equal size: uint8, ``shape``."""
    numel = int(torch.Size(shape).numel())
    out = torch.empty(numel, dtype=torch.uint8)
    out[torch.randperm(numel)] = (torch.arange(numel) % n).to(torch.uint8)
    return out.reshape(shape).to(device)


class _MoSA(bn.Bottleneck):
    """Mixed into each bottleneck placement class: the adapter runs on masked tensors."""

    num_modules: int
    num_active: int
    #: the modules the last training forward drew (None: eval, the complete adapter), or pinned
    mosa_active: tuple[int, ...] | None
    _pinned: tuple[int, ...] | None

    def setup_split(self, cfg: MoSAConfig) -> None:
        self.num_modules, self.num_active = cfg.num_modules, cfg.num_active
        self.mosa_active, self._pinned = None, None
        for mod, p in SPLIT:
            lin = getattr(self, mod)
            t = getattr(lin, p)
            lin.register_buffer(f"{p}_module", balanced_split(t.shape, cfg.num_modules, t.device))

    def module_tensors(self, k: int) -> dict[str, torch.Tensor]:
        """Sparse module k's tensors ``P ⊙ M_k`` by state-dict name."""
        out = {}
        for mod, p in SPLIT:
            lin = getattr(self, mod)
            out[f"{mod}.{p}"] = getattr(lin, p) * (getattr(lin, f"{p}_module") == k)
        return out

    def _draw(self) -> tuple[int, ...] | None:
        if self._pinned is not None:
            return self._pinned
        if not self.training:
            return None
        return tuple(sorted(torch.randperm(self.num_modules)[: self.num_active].tolist()))

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        """a(h) with the drawn modules' entries only (all of them in eval): (..., in) -> (..., out)."""
        sel = self._draw()
        self.mosa_active = sel
        t = {}
        for mod, p in SPLIT:
            lin = getattr(self, mod)
            v = getattr(lin, p)
            if sel is not None:
                ids = getattr(lin, f"{p}_module")
                v = v * torch.isin(ids, torch.tensor(sel, dtype=ids.dtype, device=ids.device)).to(v.dtype)
            t[f"{mod}.{p}"] = v
        h = h.to(self.adapter_down.weight.dtype)
        z = self.act(F.linear(h, t["adapter_down.weight"], t["adapter_down.bias"]))  # (..., b)
        return self.dropout(F.linear(z, t["adapter_up.weight"], t["adapter_up.bias"])) * self.scaling


class MoSASeries(_MoSA):
    pass


class MoSAParallel(_MoSA, bn.ParallelBottleneck):
    pass


class MoSALNPre(_MoSA, bn.LNPreBottleneck):
    pass


class MoSAPostLNBlock(_MoSA, bn.PostLNBlockBottleneck):
    pass


class MoSAPostLNParallel(_MoSA, bn.PostLNParallelBottleneck):
    pass


#: bottleneck placement class -> its MoSA version
KINDS: dict[type, type[_MoSA]] = {
    bn.Bottleneck: MoSASeries, bn.ParallelBottleneck: MoSAParallel, bn.LNPreBottleneck: MoSALNPre,
    bn.PostLNBlockBottleneck: MoSAPostLNBlock, bn.PostLNParallelBottleneck: MoSAPostLNParallel,
}


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, MoSAConfig)
    pieces = bn.attach(model, name, cfg)  # the bottleneck's sites and placements
    mods = dict(model.named_modules())
    for host, piece in pieces.items():
        # same tensors, masked math: switch the class (each MoSA class only adds methods)
        piece.__class__ = KINDS[type(piece)]
        piece.setup_split(cfg)  # type: ignore[attr-defined]
        # a new module starts in training mode: follow the model's, or an eval model would draw
        piece.train(mods[host].training)
    return pieces


def _pieces(model: nn.Module, name: str) -> dict[str, _MoSA]:
    from ..api import get_record

    rec = get_record(model, name)
    if rec.method != "mosa":
        raise AdapterError(f"adapter {name!r} is a {rec.method} adapter, not mosa")
    return rec.pieces  # type: ignore[return-value]


def set_mosa_modules(model: nn.Module, name: str, modules: Sequence[int] | None) -> None:
    """Pin the modules adapter ``name`` runs (train and eval) to ``modules``; ``None``: draw at
    random in training, all modules in eval (the default)."""
    pieces = _pieces(model, name)
    if modules is not None:
        n = next(iter(pieces.values())).num_modules
        mods = tuple(sorted(set(int(k) for k in modules)))
        if not mods or any(not 0 <= k < n for k in mods):
            raise ConfigError(f"set_mosa_modules: modules must be a non-empty subset of 0..{n - 1}, got {list(modules)}")
    for p in pieces.values():
        p._pinned = None if modules is None else mods


def mosa_merge(model: nn.Module, name: str, as_name: str | None = None) -> None:
    """Merge the sparse modules of MoSA adapter ``name`` into one plain ``bottleneck`` adapter.

    Its tensors are ``sum_k P ⊙ M_k`` (= the complete adapter; the masks are disjoint). With
    ``as_name=None`` it replaces ``name`` (same name, still active if it was); else it is added
    as ``as_name`` beside it.
    """
    from .. import api

    pieces = _pieces(model, name)
    cfg = api.get_adapter_config(model, name)
    assert isinstance(cfg, MoSAConfig)
    merged: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for host, p in pieces.items():
            mods = [p.module_tensors(k) for k in range(p.num_modules)]
            merged[host] = {key: torch.stack([m[key] for m in mods]).sum(0) for key in mods[0]}
    active = api.active_adapters(model)
    target = as_name or name
    if as_name is None:
        api.delete_adapter(model, name)
    rec = api.add_adapter(model, target, cfg.as_bottleneck())
    with torch.no_grad():
        for host, piece in rec.pieces.items():
            piece.load_state_dict(merged[host])
    if as_name is None and name in active:
        api.set_adapter(model, list(active))


register(MethodSpec(name="mosa", config_cls=MoSAConfig, attach=attach, mergeable=False,
                    paper="MoSA: Mixture of Sparse Adapters for Visual Efficient Tuning (Zhang et al., 2023)"))
