"""ScaLearn (Frohmann et al., 2024, "ScaLearn: Simple and Highly Parameter-Efficient Task
Transfer by Learning to Scale", https://arxiv.org/abs/2310.01217).

Two-stage transfer like AdapterFusion, but the transfer layer only *scales* the frozen
source adapters' outputs. On every host of the N source adapters, with ``y`` the host's
output before the adapters and ``a_n = f_n(x, y) - y`` source ``n``'s output delta::

    out = y + sum_n omega_n * a_n         y, a_n: (..., d)

Variants (``ScaLearnConfig``), trainable parameters for H hosts of width d:

================== ============================================ ==============
variant            omega_n                                      parameters
================== ============================================ ==============
ScaLearn           a vector (d,) per host per source            H * N * d
ScaLearnUniform    a scalar per host per source (uniform=True)  H * N
ScaLearn++         a vector (d,) per source, every host         N * d
                   (shared=True)
ScaLearnUniform++  a scalar per source, every host              N
                   (uniform=True, shared=True)
================== ============================================ ==============

No softmax, no normalisation: the coefficients are free (the paper's point). ``init``
(default 1/N: a fresh ScaLearn is the average of its sources) sets every coefficient.
The shared variants keep their coefficients in one piece on the root model (state-dict key
``adapterkit.<name>.omega``, saved as ``omega``); every host then needs the same width d.
Hosts are those of the sources (AdapterFusion's sites), each with N coefficients even
where some source has no piece (they are unused there).

    ak.compose.add_scalearn(model, "s", ["a", "b"], uniform=True, shared=True)   # 2 parameters
    ak.set_adapter(model, ak.compose.ScaLearn("a", "b", name="s"))
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..api import add_adapter
from ..errors import ConfigError
from ..methods.base import AdapterConfig, AdapterModule
from ..registry import MethodSpec, register
from ..state import AdapterRecord
from .fusion import ReaderBlock, check_sources, freeze, source_deltas, source_hosts, sources_present


@dataclass(frozen=True)
class ScaLearnConfig(AdapterConfig):
    """Scaling coefficients over frozen source adapters.

    adapters: the source adapters' names, in order (attached, output-side).
    uniform: one scalar per source (ScaLearnUniform) instead of a d-vector (ScaLearn).
    shared: one set of coefficients for every host (the "++" variants).
    init: the initial value of every coefficient; None = 1 / len(adapters).
    targets: must stay None: the coefficients sit on the sources' hosts.
    """

    method = "scalearn"
    adapters: tuple[str, ...] = ()
    uniform: bool = False
    shared: bool = False
    init: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "adapters", check_sources("ScaLearnConfig", self.adapters))
        if self.targets is not None:
            raise ConfigError("ScaLearnConfig.targets must be None: ScaLearn sits on its source adapters' hosts")
        for f in ("uniform", "shared"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"ScaLearnConfig.{f} must be true or false, got {getattr(self, f)!r}")
        if self.init is not None and (isinstance(self.init, bool) or not isinstance(self.init, (int, float))):
            raise ConfigError(f"ScaLearnConfig.init must be a number or None, got {self.init!r}")

    @property
    def init_value(self) -> float:
        return 1.0 / len(self.adapters) if self.init is None else float(self.init)


def _omega(n: int, d: int, cfg: ScaLearnConfig, like: nn.Module) -> nn.Parameter:
    w = next(like.parameters(), None)
    dev = w.device if w is not None else None
    dt = w.dtype if w is not None and w.is_floating_point() else None
    shape = (n,) if cfg.uniform else (n, d)
    return nn.Parameter(torch.full(shape, cfg.init_value, device=dev, dtype=dt))


class SharedOmega(AdapterModule):
    """The "++" variants' coefficients, on the root model: ``omega`` (N,) or (N, d). No hooks."""

    has_post = False

    def __init__(self, omega: nn.Parameter) -> None:
        super().__init__()
        self.omega = omega


class ScaLearnPiece(AdapterModule):
    """``y + sum_n omega_n * a_n`` on one host; ``omega`` its own (N,) / (N, d) or the shared one."""

    def __init__(self, host: nn.Module, d: int, cfg: ScaLearnConfig, shared: SharedOmega | None) -> None:
        super().__init__()
        self.bind(host)
        self.adapters = cfg.adapters
        self.present = sources_present(host, cfg.adapters)
        if shared is None:
            self.omega = _omega(len(cfg.adapters), d, cfg, host)
        else:
            # a plain attribute, not a submodule: the shared tensor is saved and counted once, at the root
            object.__setattr__(self, "_shared", shared)

    def coefficients(self) -> torch.Tensor:
        """omega: (N,) or (N, d)."""
        shared = self.__dict__.get("_shared")
        return shared.omega if shared is not None else self.omega

    def forward_post(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        om = self.coefficients()
        out = y
        for n, a in enumerate(source_deltas(self.host, self.adapters, self.present, x, y)):
            if a is not None:
                out = out + (om[n] * a.to(om.dtype)).to(y.dtype)  # om[n]: () or (d,), broadcast over (..., d)
        return out


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, ScaLearnConfig)
    what = f"scalearn adapter {name!r}"
    hosts = source_hosts(model, name, cfg.adapters, what)
    pieces: dict[str, AdapterModule] = {}
    shared = None
    if cfg.shared:
        widths = {h: d for h, _, d in hosts}
        if not cfg.uniform and len(set(widths.values())) > 1:
            raise ConfigError(f"{what}: shared vector coefficients need one width, but the hosts' widths differ: "
                              f"{widths}; use uniform=True or shared=False")
        shared = SharedOmega(_omega(len(cfg.adapters), hosts[0][2], cfg, hosts[0][1]))
        pieces[""] = shared
    for h, mod, d in hosts:
        pieces[h] = ScaLearnPiece(mod, d, cfg, shared)
    return pieces


register(MethodSpec(name="scalearn", config_cls=ScaLearnConfig, attach=attach, mergeable=False,
                    paper="ScaLearn: Simple and Highly Parameter-Efficient Task Transfer by Learning to Scale "
                          "(Frohmann et al., 2024)"))


def add_scalearn(model: nn.Module, name: str, adapters: Sequence[str], uniform: bool = False, shared: bool = False,
                 init: float | None = None, freeze_sources: bool = True) -> AdapterRecord:
    """Attach ScaLearn coefficients ``name`` over ``adapters`` (and freeze those). Activate with
    ``ak.set_adapter(model, ScaLearn(*adapters, name=name))``."""
    cfg = ScaLearnConfig(adapters=tuple(adapters), uniform=uniform, shared=shared, init=init)
    rec = add_adapter(model, name, cfg)
    if freeze_sources:
        freeze(model, cfg.adapters)
    return rec


class ScaLearn(ReaderBlock):
    """``ScaLearn("a", "b", name="s")``: the ScaLearn adapter ``name`` over adapters a, b."""

    piece_cls = ScaLearnPiece
    kind = "scalearn"


__all__ = ["ScaLearnConfig", "ScaLearnPiece", "ScaLearn", "add_scalearn"]
