"""Adapters shared across tasks with task-specific parts (VL-Adapter, Sung et al., 2022,
"VL-Adapter: Parameter-Efficient Transfer Learning for Vision-and-Language Tasks",
https://arxiv.org/abs/2112.06825).

Multi-task training of one bottleneck adapter per site whose projections are either shared
by every task or held once per task (``share``)::

    a_t(h) = W_up[t] act(W_down[t] h + b_down[t]) + b_up[t]     W_down: (b, d_in), W_up: (d_out, b)

* ``share="all"``: one adapter for every task (VL-Adapter's "Single Adapter", its most
  parameter-efficient setting: weights shared across tasks);
* ``share="down"`` / ``share="up"``: the down- or up-projection shared, the other one per
  task (the "Half-shared Adapters");
* ``share="none"``: one adapter per task ("Multiple Adapters"), in one set of tensors.

Placement as :mod:`adapterkit.methods.bottleneck` (``mode``): series ``y + a_t(y)`` after
the feed-forward block ("pfeiffer") or after attention and feed-forward ("houlsby"), or
``y + a_t(x)`` beside the feed-forward block ("parallel"); on BERT-style post-LN blocks the
series adapter sits on the block's ``dropout`` (``LN(h + a(h) + r)``), parallel is refused.

Each batch row's task id comes from ``with ak.compose.task_ids(model, ids):`` (the API of
:mod:`adapterkit.compose.routing`); with ``n_tasks == 1`` or ``share="all"`` no ids are needed.
Parameters per site (T = n_tasks; a shared part counts once)::

    T_down (b d_in + b) + T_up (d_out b + d_out)      T_x = 1 if shared else T
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, UnsupportedModuleError
from ..inject import resolve_targets
from ..methods.base import AdapterConfig, AdapterModule
from ..methods.bottleneck import ACTIVATIONS, MODE_DEFAULTS, _accept, _io, default_sites, is_post_ln_block
from ..registry import MethodSpec, register
from .routing import TaskContext, task_context

SHARES = ("all", "down", "up", "none")


# -- shared with the Hyperformer ------------------------------------------------------------------
def check_int(cfg: AdapterConfig, field: str, optional: bool = False) -> None:
    v = getattr(cfg, field)
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{type(cfg).__name__}.{field} must be a positive integer, got {v!r}")


def check_bottleneck_fields(cfg: AdapterConfig) -> None:
    """mode / reduction_factor / bottleneck_size / non_linearity, as in BottleneckConfig."""
    name = type(cfg).__name__
    mode = getattr(cfg, "mode")
    if mode not in MODE_DEFAULTS:
        raise ConfigError(f"{name}.mode must be one of {', '.join(MODE_DEFAULTS)}; got {mode!r}")
    rf = getattr(cfg, "reduction_factor")
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0 or not math.isfinite(rf):
        raise ConfigError(f"{name}.reduction_factor must be a number > 0, got {rf!r}")
    check_int(cfg, "bottleneck_size", optional=True)
    act = getattr(cfg, "non_linearity")
    if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
        raise ConfigError(f"{name}.non_linearity must be one of {', '.join(ACTIVATIONS)}; got {act!r}")


def bottleneck_width(cfg: AdapterConfig, d: int) -> int:
    b = getattr(cfg, "bottleneck_size")
    return b if b is not None else max(1, int(d // getattr(cfg, "reduction_factor")))


def adapter_sites(model: nn.Module, cfg: AdapterConfig, what: str) -> list[tuple[str, nn.Module, int, int, bool]]:
    """(host path, host, d_in, d_out, reads_input) of every adapter site, in model order.

    ``reads_input``: the adapter reads the host's input x (parallel) rather than its output y.
    """
    mode = getattr(cfg, "mode")
    hosts = (default_sites(model, mode) if cfg.targets is None
             else resolve_targets(model, cfg.targets, accept=_accept, what=what))
    mods = dict(model.named_modules())
    out = []
    for h in hosts:
        blk = mods[h]
        d_out, d_in = _io(blk)
        if is_post_ln_block(blk):
            if mode == "parallel":
                raise UnsupportedModuleError(f"{what}: mode='parallel' is not offered on the post-LN block {h!r}")
            out.append((f"{h}.dropout", blk.dropout, d_out, d_out, False))  # LN(h + a(h) + r)
        elif mode == "parallel":
            out.append((h, blk, d_in, d_out, True))
        else:
            out.append((h, blk, d_out, d_out, False))
    return out


def row_task_ids(ctx: TaskContext, n_tasks: int, n_rows: int, rows: torch.Tensor | None, who: str,
                 required: bool = True) -> torch.Tensor:
    """The task id of each of ``n_rows`` rows (the rows ``rows`` of the batch in a mixed batch).

    Without ids in the context: all zeros if ``n_tasks == 1`` or not ``required``, else AdapterError.
    """
    ids = ctx.ids
    if ids is None:
        if n_tasks > 1 and required:
            raise AdapterError(f"{who} has {n_tasks} tasks: run the model inside "
                               f"`with ak.compose.task_ids(model, ids):` (one task id per batch row)")
        return torch.zeros(n_rows, dtype=torch.long)
    if ids.numel() == 1:
        ids = ids.expand(n_rows)
    else:
        if rows is not None:
            ids = ids.index_select(0, rows.to(ids.device))
        if ids.numel() != n_rows:
            raise AdapterError(f"{who}: got {ids.numel()} task ids for a batch of {n_rows} rows")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n_tasks:
        raise AdapterError(f"{who}: task id {lo if lo < 0 else hi} is out of range [0, {n_tasks})")
    return ids


def bottleneck_rows(h: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor, wu: torch.Tensor, bu: torch.Tensor,
                    act_name: str) -> torch.Tensor:
    """A bottleneck adapter with its own weights per batch row.

    h (N, ..., d_in); wd (N, b, d_in); bd (N, b); wu (N, d_out, b); bu (N, d_out) -> (N, ..., d_out):
    ``wu[n] act(wd[n] h[n] + bd[n]) + bu[n]``.
    """
    N = h.shape[0]
    hs = h.reshape(N, -1, h.shape[-1])  # (N, L, d_in)
    z = ACTIVATIONS[act_name](torch.einsum("nli,nbi->nlb", hs, wd) + bd[:, None])  # (N, L, b)
    out = torch.einsum("nlb,nob->nlo", z, wu) + bu[:, None]  # (N, L, d_out)
    return out.reshape(*h.shape[:-1], wu.shape[1])


class TaskRowPiece(AdapterModule):
    """A piece whose output depends on each row's task id: subclasses give ``task_adapter``."""

    def __init__(self, ctx: TaskContext, n_tasks: int, reads_input: bool, who: str) -> None:
        super().__init__()
        self.ctx, self.n_tasks, self.reads_input, self.who = ctx, n_tasks, reads_input, who

    def task_adapter(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """a_{ids[n]}(h[n]) for every row n: h (N, ..., d_in), ids (N,) -> (N, ..., d_out)."""
        raise NotImplementedError

    def needs_ids(self) -> bool:
        """Whether a call without task ids is an error (with several tasks)."""
        return True

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.hook_post(self.host, x, y, None)

    def hook_post(self, host: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        h = x if self.reads_input else y
        if h is None or h.dim() < 2:
            raise AdapterError(f"{self.who} needs a batch dimension first, got {None if h is None else tuple(h.shape)}")
        if rows is not None:
            if not rows.numel():
                return y
            h = h.index_select(0, rows)
        ids = row_task_ids(self.ctx, self.n_tasks, h.shape[0], rows, self.who, self.needs_ids()).to(h.device)
        a = self.task_adapter(h, ids).to(y.dtype)
        return y + a if rows is None else y.index_add(0, rows, a)


# -- VL-Adapter -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SharedAdapterConfig(AdapterConfig):
    """A bottleneck adapter for several tasks, with shared and per-task projections.

    n_tasks: T, task ids 0..T-1. share: "all", "down", "up" or "none" (what is shared by every
    task; see the module docstring). mode: "pfeiffer", "houlsby" or "parallel" (placement).
    reduction_factor / bottleneck_size: bottleneck b = d // reduction_factor, or explicit.
    non_linearity: one of bottleneck.ACTIVATIONS. Init: W_down ~ N(0, 0.02), W_up = 0, biases 0
    (every task starts as the identity).
    """

    method = "shared_adapter"
    n_tasks: int = 1
    share: str = "all"
    mode: str = "pfeiffer"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_tasks")
        if self.share not in SHARES:
            raise ConfigError(f"SharedAdapterConfig.share must be one of {', '.join(SHARES)}; got {self.share!r}")
        check_bottleneck_fields(self)


class SharedAdapterPiece(TaskRowPiece):
    """One site: ``down_weight`` (T_down, b, d_in), ``down_bias`` (T_down, b), ``up_weight``
    (T_up, d_out, b), ``up_bias`` (T_up, d_out); T_x = 1 for a shared projection."""

    def __init__(self, host: nn.Module, d_in: int, d_out: int, reads_input: bool, cfg: SharedAdapterConfig,
                 ctx: TaskContext, who: str) -> None:
        super().__init__(ctx, cfg.n_tasks, reads_input, who)
        self.bind(host)
        b = bottleneck_width(cfg, d_in)
        td = 1 if cfg.share in ("all", "down") else cfg.n_tasks
        tu = 1 if cfg.share in ("all", "up") else cfg.n_tasks
        w = next(host.parameters(), None)
        kw = {"device": w.device if w is not None else None,
              "dtype": w.dtype if w is not None and w.is_floating_point() else None}
        self.down_weight = nn.Parameter(torch.randn(td, b, d_in, **kw) * 0.02)
        self.down_bias = nn.Parameter(torch.zeros(td, b, **kw))
        self.up_weight = nn.Parameter(torch.zeros(tu, d_out, b, **kw))  # identity at init
        self.up_bias = nn.Parameter(torch.zeros(tu, d_out, **kw))
        self.act_name = cfg.non_linearity.lower()

    def task_adapter(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        di = ids if self.down_weight.shape[0] > 1 else torch.zeros_like(ids)
        ui = ids if self.up_weight.shape[0] > 1 else torch.zeros_like(ids)
        h = h.to(self.down_weight.dtype)
        return bottleneck_rows(h, self.down_weight[di], self.down_bias[di], self.up_weight[ui], self.up_bias[ui],
                               self.act_name)

    def needs_ids(self) -> bool:
        return self.down_weight.shape[0] > 1 or self.up_weight.shape[0] > 1  # "all": one adapter for all


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, SharedAdapterConfig)
    what = f"shared_adapter {name!r}"
    ctx = task_context(model)
    return {h: SharedAdapterPiece(mod, d_in, d_out, reads_x, cfg, ctx, what)
            for h, mod, d_in, d_out, reads_x in adapter_sites(model, cfg, what)}


register(MethodSpec(name="shared_adapter", config_cls=SharedAdapterConfig, attach=attach, mergeable=False,
                    paper="VL-Adapter: Parameter-Efficient Transfer Learning for Vision-and-Language Tasks "
                          "(Sung et al., 2022)"))

__all__ = ["SharedAdapterConfig", "SharedAdapterPiece", "adapter_sites", "bottleneck_rows", "row_task_ids"]
