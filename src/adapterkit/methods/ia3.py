"""(IA)^3 (Liu et al., 2022, https://arxiv.org/abs/2205.05638): learned rescaling vectors.

For a Linear host ``y = W x + b`` (W: (out, in)) and a learned vector ``l`` (init ones):

* output scaling (keys, values; "non-feed-forward" targets): ``y' = (W x + b) * l``,
  ``ia3_l``: (out, 1). Merge: ``W' = diag(l) W`` (rows), ``b' = b * l``.
* input scaling (the FFN down projection; ``feedforward_targets``): ``y' = W (x * l) + b``,
  ``ia3_l``: (1, in). Merge: ``W' = W diag(l)`` (columns); the bias is untouched.

Parameter names and shapes are PEFT's (``ia3_l``), so PEFT interop is a key rename. transformers'
Conv1D (GPT-2) stores W as (in, out): the same vectors scale its columns / rows instead.
Unmerge divides back (exact up to rounding for l != 0).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, NotMergeableError, TargetNotFoundError
from ..inject import base_modules, is_linear_like, match_suffix, resolve_targets, weight_io
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule

#: default (targets, feedforward_targets) by architecture, first that matches wins (PEFT's table)
DEFAULT_TARGETS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("k_proj", "v_proj", "down_proj"), ("down_proj",)),  # Llama, Mistral
    (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),  # GPT-2
    (("key", "value", "output.dense"), ("output.dense",)),  # BERT, RoBERTa
    (("k_proj", "v_proj", "fc2"), ("fc2",)),  # ViT (transformers >= 5), OPT
)




@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """(IA)^3 hyper-parameters (PEFT's IA3Config names).

    targets: Linear/Conv1D modules to rescale (suffixes or a regex); None = the architecture's
        defaults (Llama k_proj, v_proj, down_proj; GPT-2 c_attn, mlp.c_proj; BERT key, value,
        output.dense), whose feed-forward set is then also the default.
    feedforward_targets: which targets have their *input* scaled (suffixes or a regex, matched
        like targets; every match must also be a target). None: the default set when targets is
        None, else no module.
    """

    method = "ia3"
    feedforward_targets: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        ff = self.feedforward_targets
        if isinstance(ff, (list, tuple)):
            if not all(isinstance(x, str) and x for x in ff):
                raise ConfigError(f"IA3Config.feedforward_targets must be non-empty strings, got {ff!r}")
            object.__setattr__(self, "feedforward_targets", tuple(ff))
        elif ff is not None and not (isinstance(ff, str) and ff):
            raise ConfigError(f"IA3Config.feedforward_targets must be a list of names, a regex or None, got {ff!r}")
        if ff is not None and self.targets is None:
            raise ConfigError("IA3Config.feedforward_targets needs explicit targets (they must be a subset of targets)")


class IA3Out(AdapterModule):
    """Output scaling: ``y * l``; ``ia3_l``: (out, 1)."""

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        out_f, _ = weight_io(host)
        w = host.weight
        self.fan_in_fan_out = not isinstance(host, nn.Linear)  # Conv1D: W is (in, out)
        self.ia3_l = nn.Parameter(torch.ones(out_f, 1, device=w.device, dtype=w.dtype))  # (out, 1)

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # y: (..., out)
        return (y * self.ia3_l.flatten()).to(y.dtype)

    def _weight_scale(self) -> torch.Tensor:
        return self.ia3_l.T if self.fan_in_fan_out else self.ia3_l  # broadcasts over W's out axis

    def merge(self) -> None:
        self._scale_host(lambda t, s: t.mul_(s))
        self.merged = True

    def unmerge(self) -> None:
        self._scale_host(lambda t, s: t.div_(s))
        self.merged = False

    def _scale_host(self, op: Callable[[torch.Tensor, torch.Tensor], object]) -> None:
        host = self.host
        with torch.no_grad():
            if not bool((self.ia3_l != 0).all()):
                raise NotMergeableError(f"cannot merge (IA)^3 into {type(host).__name__}: ia3_l has zeros (unmerge could not undo it)")
            op(host.weight, self._weight_scale().to(host.weight.dtype))
            if getattr(host, "bias", None) is not None:
                op(host.bias, self.ia3_l.flatten().to(host.bias.dtype))


class IA3In(IA3Out):
    """Input scaling (feed-forward): ``W (x * l)``; ``ia3_l``: (1, in)."""

    has_pre = True
    has_post = False

    def __init__(self, host: nn.Module) -> None:
        AdapterModule.__init__(self)
        _, in_f = weight_io(host)
        w = host.weight
        self.fan_in_fan_out = not isinstance(host, nn.Linear)
        self.ia3_l = nn.Parameter(torch.ones(1, in_f, device=w.device, dtype=w.dtype))  # (1, in)

    def forward_pre(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in)
        return (x * self.ia3_l.flatten()).to(x.dtype)

    def _scale_host(self, op: Callable[[torch.Tensor, torch.Tensor], object]) -> None:
        host = self.host
        with torch.no_grad():
            if not bool((self.ia3_l != 0).all()):
                raise NotMergeableError(f"cannot merge (IA)^3 into {type(host).__name__}: ia3_l has zeros (unmerge could not undo it)")
            op(host.weight, self._weight_scale().to(host.weight.dtype))  # the bias is not scaled


def _select(names: list[str], targets: tuple[str, ...] | str) -> list[str]:
    import re

    if isinstance(targets, str):
        rx = re.compile(targets)
        return [n for n in names if rx.fullmatch(n)]
    return [n for n in names if any(match_suffix(n, t) for t in targets)]


def resolve(model: nn.Module, cfg: IA3Config, what: str) -> tuple[list[str], set[str]]:
    """(target module paths, the subset that is input-scaled)."""
    names = [n for n, _ in base_modules(model) if n]
    if cfg.targets is None:
        for tg, ff in DEFAULT_TARGETS:
            if all(any(match_suffix(n, t) for n in names) for t in tg):
                hosts = resolve_targets(model, tg, accept=lambda n, m: is_linear_like(m), what=what)
                return hosts, set(_select(hosts, ff))
        raise TargetNotFoundError(
            f"no default (IA)^3 targets for {type(model).__name__}; pass targets=[...] and feedforward_targets=[...]"
        )
    hosts = resolve_targets(model, cfg.targets, accept=lambda n, m: is_linear_like(m), what=what)
    if cfg.feedforward_targets is None:
        return hosts, set()
    ff_all = _select(names, cfg.feedforward_targets)
    outside = [n for n in ff_all if n not in hosts]
    if outside or not ff_all:
        bad = outside[0] if outside else cfg.feedforward_targets
        raise ConfigError(
            f"IA3Config.feedforward_targets must select a subset of targets: {bad!r} "
            + ("is not a target" if outside else "matches no module")
        )
    return hosts, set(ff_all)


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, IA3Config)
    hosts, ff = resolve(model, cfg, f"{cfg.method} adapter {name!r}")
    mods = dict(model.named_modules())
    return {h: (IA3In(mods[h]) if h in ff else IA3Out(mods[h])) for h in hosts}


register(MethodSpec(name="ia3", config_cls=IA3Config, attach=attach, mergeable=True,
                    paper="Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
                          "Learning (Liu et al., 2022)"))
