"""Learned gates over EXISTING adapters: MeteoRA and MixDA.

Both add a gate (a trainable piece) on every host where the chosen expert adapters have
pieces; the experts stay as they were attached (frozen by :func:`meteora` / :func:`mixda`),
and the gate mixes their *deltas* ``d_e(x, y) = f_e(x, y) - y`` (LoRA: ``s B A x``; a
parallel bottleneck: ``a(x)``; a series one: ``a(y)``) token by token::

    y' = y + sum_e g_e(x) d_e(x, y)          x: the host's input token (in,), y: its output

* MeteoRA (Xu et al., 2024, "MeteoRA: Multiple-tasks Embedded LoRA for Large Language
  Models", https://arxiv.org/abs/2405.13053): per LoRA'd layer a gate ``G`` (E, in) without
  bias (nn.Linear's init), ``K = top-k(G x)``, ``g = softmax over K of (G x)_K`` (0 off K);
  only the chosen experts run on a token (sparse dispatch).
* MixDA (Diao et al., 2023, "Mixture-of-Domain-Adapters: Decoupling and Injecting Domain
  Knowledge to Pre-trained Language Models' Memories", https://arxiv.org/abs/2306.05406):
  domain adapters parallel to the FFN (``BottleneckConfig(mode="parallel")`` on ``mlp``,
  trained on domain data: stage 1) and a mixture gate on the FFN input ``g = sigmoid(G x + c)``
  (or softmax), trained with an optional task adapter (stage 2):
  ``mixda(model, ["med", "law"], task_adapter="task")`` activates ``Stack(gate, task)``.

The gate's last weights are kept per piece (``last_gates``, (..., E), detached) for
routing statistics (:func:`last_gates`). Input-dependent: not mergeable.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..api import add_adapter, get_record, set_adapter
from ..errors import AdapterError, ConfigError, UnsupportedModuleError
from ..inject import CONTAINER, base_modules, is_linear_like, resolve_targets, weight_io
from ..methods.base import AdapterConfig, AdapterModule
from ..methods.bottleneck import Bottleneck, ParallelBottleneck
from ..methods.lora import LoRAPiece
from ..methods.lora_xs import check_positive_int
from ..registry import MethodSpec, register
from ..state import get_state
from .blocks import Stack

GATES = ("sigmoid", "softmax")


@dataclass(frozen=True)
class _GateConfig(AdapterConfig):
    """adapters: the expert adapters' names (attached before this one). targets: restrict the
    gates to these hosts (default: every host where an expert has a piece)."""

    adapters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.adapters
        if isinstance(a, (list, tuple)):
            object.__setattr__(self, "adapters", tuple(a))  # frozen + hashable; lists come from JSON
        name = type(self).__name__
        if not self.adapters or not all(isinstance(n, str) and n for n in self.adapters):
            raise ConfigError(f"{name}.adapters must be a non-empty list of adapter names, got {a!r}")
        if len(set(self.adapters)) != len(self.adapters):
            raise ConfigError(f"{name}.adapters names an adapter twice: {list(self.adapters)}")


@dataclass(frozen=True)
class MeteoRAConfig(_GateConfig):
    """MeteoRA: top_k experts per token (softmax over the chosen ones)."""

    method = "meteora"
    top_k: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "top_k")
        if self.top_k > len(self.adapters):
            raise ConfigError(f"MeteoRAConfig.top_k={self.top_k} exceeds the {len(self.adapters)} adapters")


@dataclass(frozen=True)
class MixDAConfig(_GateConfig):
    """MixDA: gate "sigmoid" (independent weights, the paper's) or "softmax" over the adapters."""

    method = "mixda"
    gate: str = "sigmoid"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate not in GATES:
            raise ConfigError(f"MixDAConfig.gate must be one of {', '.join(GATES)}; got {self.gate!r}")


def expert_delta(piece: AdapterModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``f(x, y) - y`` of an additive piece, computed directly where the method allows it."""
    # only where the piece's forward is LoRA's own (DoRA subclasses LoRAPiece but is not additive)
    if isinstance(piece, LoRAPiece) and type(piece).forward_post is LoRAPiece.forward_post:
        return piece.lora_out(piece.dropout(x))
    if isinstance(piece, ParallelBottleneck):
        return piece.adapter(x)
    if type(piece) is Bottleneck:
        return piece.adapter(y)
    return piece.forward_post(x, y) - y


class GatePiece(AdapterModule):
    """A gate over the experts' pieces on one host (looked up in the host's container at
    each call, so they are never registered twice)."""

    def __init__(self, host: nn.Module, in_features: int, experts: tuple[str, ...], adapter: str,
                 top_k: int | None, gate: str, bias: bool) -> None:
        super().__init__()
        self.bind(host)
        w = next(host.parameters(), None)
        self.gate = nn.Linear(in_features, len(experts), bias=bias,
                              device=None if w is None else w.device, dtype=None if w is None else w.dtype)
        self.experts, self.adapter, self.top_k, self.kind = experts, adapter, top_k, gate
        self.last_gates: torch.Tensor | None = None
        #: training only: the last forward's gate input (N, in), detached, and its token shape (B, ...);
        #: routing_loss recomputes the logits from it, so it never back-propagates through a graph
        #: the language-model loss has already freed
        self.train_inputs: tuple[torch.Tensor, torch.Size] | None = None
        self._token_shape = torch.Size()

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gate weights (N, E) for tokens x (N, in) and the chosen expert ids (N, k) (top-k only)."""
        logits = self.gate(x.to(self.gate.weight.dtype)).float()  # (N, E)
        self.train_inputs = (x.detach(), self._token_shape) if self.training else None
        if self.top_k is not None:
            top_v, top_i = logits.topk(self.top_k, dim=-1)  # (N, k)
            return torch.zeros_like(logits).scatter(1, top_i, torch.softmax(top_v, dim=-1)), top_i
        if self.kind == "softmax":
            return torch.softmax(logits, dim=-1), None
        return torch.sigmoid(logits), None

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.host._modules[CONTAINER]
        self._token_shape = x.shape[:-1]
        xf = x.reshape(-1, x.shape[-1])  # (N, in)
        yf = y.reshape(-1, y.shape[-1])  # (N, out)
        g, top_i = self.gates(xf)
        self.last_gates = g.detach().reshape(*x.shape[:-1], -1)
        d = torch.zeros_like(yf, dtype=torch.float32 if yf.dtype in (torch.float16, torch.bfloat16) else yf.dtype)
        for e, name in enumerate(self.experts):
            piece = c[name] if name in c else None  # type: ignore[operator]
            if piece is None:  # this expert has no piece here: it contributes nothing
                continue
            if piece.merged:
                raise AdapterError(f"{self.adapter!r}: expert adapter {name!r} is merged into the base weights; "
                                   f"unmerge it first")
            if top_i is None:
                de = expert_delta(piece, xf, yf)
                d = d + de.to(d.dtype) * g[:, e, None].to(d.dtype)
                continue
            tok = (top_i == e).any(-1).nonzero().squeeze(-1)  # (n_e,) tokens that chose expert e
            if tok.numel():
                de = expert_delta(piece, xf[tok], yf[tok])  # (n_e, out)
                d = d.index_add(0, tok, de.to(d.dtype) * g[tok, e, None].to(d.dtype))
        return y + d.reshape(y.shape).to(y.dtype)


def _in_features(host: nn.Module, pieces: list[AdapterModule]) -> int:
    """Width of the host's main input (the gate's input)."""
    if is_linear_like(host):
        return weight_io(host)[1]
    if isinstance(host, nn.Embedding):
        raise UnsupportedModuleError("a gate cannot read the token ids an nn.Embedding receives")
    for p in pieces:
        if isinstance(p, ParallelBottleneck):
            return p.adapter_down.in_features
    for _, m in base_modules(host):
        if is_linear_like(m):
            return weight_io(m)[1]
    raise UnsupportedModuleError(f"cannot tell the input width of a {type(host).__name__} (it holds no Linear)")


def _attach(model: nn.Module, name: str, cfg: _GateConfig, top_k: int | None, gate: str, bias: bool
            ) -> dict[str, AdapterModule]:
    state = get_state(model, create=True)
    recs = [state.record(n) for n in cfg.adapters]  # AdapterNotFoundError names a missing one
    for r in recs:
        if r.method in ("meteora", "mixda", "poly"):
            raise ConfigError(f"{cfg.method} adapter {name!r}: expert {r.name!r} is a {r.method} adapter; "
                              f"experts must be plain adapters (lora, bottleneck, ...)")
        for h, p in r.pieces.items():
            if p.has_pre or not p.has_post:
                raise UnsupportedModuleError(
                    f"{cfg.method} adapter {name!r}: expert {r.name!r} changes the input of {h!r} "
                    f"({type(p).__name__}); only output-side pieces (LoRA, parallel/series bottleneck) can be gated")
    hosts = list(dict.fromkeys(h for r in recs for h in r.pieces))
    if cfg.targets is not None:
        keep = set(resolve_targets(model, cfg.targets, accept=lambda n, m: n in hosts, what=f"{cfg.method} {name!r}"))
        hosts = [h for h in hosts if h in keep]
    mods = dict(model.named_modules())
    out: dict[str, AdapterModule] = {}
    for h in hosts:
        if not h:
            raise UnsupportedModuleError(f"{cfg.method}: expert pieces on the root model cannot be gated")
        pieces = [r.pieces[h] for r in recs if h in r.pieces]
        p = GatePiece(mods[h], _in_features(mods[h], pieces), cfg.adapters, name, top_k, gate, bias)
        p.train(mods[h].training)
        out[h] = p
    return out


def attach_meteora(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, MeteoRAConfig)
    return _attach(model, name, cfg, cfg.top_k, "softmax", bias=False)


def attach_mixda(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, MixDAConfig)
    return _attach(model, name, cfg, None, cfg.gate, bias=True)


register(MethodSpec(name="meteora", config_cls=MeteoRAConfig, attach=attach_meteora, mergeable=False,
                    paper="MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models (Xu et al., 2024)"))
register(MethodSpec(name="mixda", config_cls=MixDAConfig, attach=attach_mixda, mergeable=False,
                    paper="Mixture-of-Domain-Adapters (Diao et al., 2023)"))


# -- user helpers ------------------------------------------------------------------------------
def freeze_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """``requires_grad=False`` on every parameter of the named adapters (the experts)."""
    for n in names:
        for p in get_record(model, n).pieces.values():
            p.requires_grad_(False)


def meteora(model: nn.Module, adapters: Sequence[str], top_k: int = 1, name: str = "moe",
            targets: Sequence[str] | str | None = None) -> str:
    """Embed the attached adapters ``adapters`` as experts behind token-level top-k gates.

    Adds the gates as adapter ``name`` (trainable), freezes the experts and activates
    ``name``: train it with the Trainer on a mixture of the tasks' data. Returns ``name``.
    """
    add_adapter(model, name, MeteoRAConfig(adapters=tuple(adapters), top_k=top_k, targets=targets))
    freeze_adapters(model, adapters)
    set_adapter(model, name)
    return name


def mixda(model: nn.Module, domain_adapters: Sequence[str], gate: str = "sigmoid", name: str = "mixda",
          task_adapter: str | None = None) -> str:
    """MixDA stage 2: a mixture gate ``name`` over the (frozen) domain adapters, activated
    alone or, with ``task_adapter`` (already attached, trainable), as ``Stack(name, task_adapter)``."""
    add_adapter(model, name, MixDAConfig(adapters=tuple(domain_adapters), gate=gate))
    freeze_adapters(model, domain_adapters)
    set_adapter(model, Stack(name, task_adapter) if task_adapter is not None else name)
    return name


def routing_loss(model: nn.Module, name: str) -> torch.Tensor:
    """Cross-entropy of the gate logits of the last TRAINING forward of gate adapter ``name``
    against each row's own expert: row b's tokens should pick expert ``task_ids[b]`` (an index
    into the config's ``adapters``; rows labelled with :func:`adapterkit.compose.routing.task_ids`).
    Mean over tokens, then over the gated hosts; each gate is trained on its own (detached)
    input. Pass ``lambda m: w * routing_loss(m, name)`` as a
    Trainer ``loss_terms`` entry: with ``top_k=1`` the softmax over one chosen logit is always 1,
    so the language-model loss alone gives a top-1 gate no gradient."""
    from .routing import task_context

    ids = task_context(model).ids
    if ids is None:
        raise AdapterError(f"routing_loss({name!r}) needs the rows' task ids: run the forward inside "
                           f"`with ak.compose.task_ids(model, ids):`")
    terms = []
    for h, p in get_record(model, name).pieces.items():
        if not isinstance(p, GatePiece):
            raise ConfigError(f"adapter {name!r} is not a meteora/mixda gate")
        if p.train_inputs is None:
            continue
        x, shape = p.train_inputs
        logits = p.gate(x.to(p.gate.weight.dtype)).float()  # (N, E)
        rows = ids.to(logits.device)
        if rows.numel() == 1:
            rows = rows.expand(shape[0])
        if rows.numel() != shape[0] or int(rows.max()) >= len(p.experts) or int(rows.min()) < 0:
            raise AdapterError(f"routing_loss({name!r}): task ids {rows.tolist()} do not fit a batch of {shape[0]} "
                               f"rows and {len(p.experts)} experts")
        target = rows.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).reshape(-1)  # (N,)
        terms.append(torch.nn.functional.cross_entropy(logits, target))
    if not terms:
        raise AdapterError(f"routing_loss({name!r}): no training forward ran through the gates (call model.train())")
    return torch.stack(terms).mean()


def last_gates(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Host path -> the gate weights (..., E) of the last forward of gate adapter ``name``."""
    out = {}
    for h, p in get_record(model, name).pieces.items():
        if not isinstance(p, GatePiece):
            raise ConfigError(f"adapter {name!r} is not a meteora/mixda gate")
        if p.last_gates is not None:
            out[h] = p.last_gates
    return out


__all__ = ["MeteoRAConfig", "MixDAConfig", "GatePiece", "meteora", "mixda", "freeze_adapters", "last_gates", "routing_loss",
           "expert_delta"]
