"""PaCA: Partial Connection Adaptation (Woo et al., 2025, https://arxiv.org/abs/2503.01905).

PaCA fine-tunes ``r`` randomly chosen *columns* (input connections) of each target weight
W (out, in) instead of adding an adapter layer. With the chosen columns ``cols`` (r,) and
the trainable change ``delta`` (out, r) of those columns::

    W' = W + scatter_cols(delta)          i.e. W'[:, cols] = W[:, cols] + delta
    y  = x W'^T + b = x W^T + b + x[..., cols] delta^T

The host's own matmul computes ``x W^T + b``; the piece adds ``x[..., cols] delta^T``
through :class:`PartialColumnsFn`, which saves only ``x[..., cols]`` (N, r) for backward
(the gradient of ``delta`` is ``g^T x[..., cols]``) and ``delta`` for the input gradient
(``g delta`` scattered into the selected input features). LoRA, by comparison, saves the
whole input ``x`` (N, in) for ``dA`` plus ``A x`` (N, r), and runs two thin matmuls per
direction instead of one. That is PaCA's claimed training speed/memory win (the base
matmul is the same in both); ``benchmarks/paca_vs_lora.py`` measures it.

Representing the update as a piece parameter over a FIXED column index (a persistent
buffer ``paca_cols``) rather than unfreezing base columns means several adapters coexist,
mixed batches work, the file holds only the diff (``paca_delta`` and ``paca_cols``), and
merge/unmerge are exact (the columns' original values are kept while merged).

Trainable parameters: ``r * out_features`` per target.

:class:`ColumnDeltaPiece` is shared with S2FT (:mod:`adapterkit.methods.s2ft`), which
selects whole attention heads / FFN channels as the columns.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AdapterFileError, ConfigError
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora_xs import LinearPiece, attach_linear, check_positive_int
from .sft import check_indices


class PartialColumnsFn(torch.autograd.Function):
    """``y + x[..., cols] @ delta.T`` saving only ``x[..., cols]`` and ``delta``.

    y: (..., out), x: (..., in), cols: (r,) long, delta: (out, r); same dtype.
    Backward: dy passes through; d delta = dy^T x[..., cols] (out, r);
    dx = scatter of dy @ delta (..., r) into the ``cols`` features of a zero (..., in).
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        xs = x.index_select(-1, cols)  # (..., r): the only activation kept for backward
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xs.reshape(-1, xs.shape[-1]), delta.T)  # (N, out)
        ctx.save_for_backward(xs, cols, delta)
        ctx.in_features = x.shape[-1]
        return out.reshape(y.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        xs, cols, delta = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        d_delta = g2.T @ xs.reshape(-1, xs.shape[-1]) if ctx.needs_input_grad[3] else None  # (out, r)
        dx = None
        if ctx.needs_input_grad[1]:
            gs = g2 @ delta  # (N, r)
            dx = gs.new_zeros(gs.shape[0], ctx.in_features).index_copy_(1, cols, gs)  # cols are distinct
            dx = dx.reshape(*g.shape[:-1], ctx.in_features)
        return (g if ctx.needs_input_grad[0] else None), dx, None, d_delta


def partial_columns(y: torch.Tensor, x: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Reference math of :class:`PartialColumnsFn` in plain autograd ops (same result)."""
    return y + x.index_select(-1, cols) @ delta.T


class ColumnDeltaPiece(LinearPiece):
    """A trainable change ``<prefix>_delta`` (out, k) of the columns ``<prefix>_cols`` (k,) of the host
    weight (out, in). ``cols`` must be distinct; they are a persistent buffer, saved with the adapter."""

    PREFIX = "paca"

    def __init__(self, host: nn.Module, method: str, cols: torch.Tensor) -> None:
        super().__init__(host, method)
        cols = torch.as_tensor(cols).reshape(-1)
        check_indices(cols, self.in_features, f"{method} columns")
        cols = cols.long()
        w = host.weight
        self.register_buffer(f"{self.PREFIX}_cols", cols.to(w.device), persistent=True)
        self.register_parameter(f"{self.PREFIX}_delta", self.param_like(self.out_features, cols.numel()))

    @property
    def cols(self) -> torch.Tensor:
        return getattr(self, f"{self.PREFIX}_cols")

    @property
    def delta(self) -> torch.Tensor:
        return getattr(self, f"{self.PREFIX}_delta")

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        key = f"{prefix}{self.PREFIX}_cols"
        if key in state_dict:  # a file's columns must be valid before they are used
            check_indices(state_dict[key].reshape(-1), self.in_features, key, AdapterFileError)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.delta
        return PartialColumnsFn.apply(y.to(d.dtype), x.to(d.dtype), self.cols, d).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        d = torch.zeros(self.out_features, self.in_features, dtype=self.delta.dtype, device=self.delta.device)
        d[:, self.cols] = self.delta
        return self.to_host_layout(d)

    # exact merge: only the selected columns change, and their original values are kept
    def merge(self) -> None:
        self.check_mergeable()
        w2 = self.weight_2d()  # a view of the host weight
        with torch.no_grad():
            before = w2[:, self.cols].clone()
            w2[:, self.cols] = before + self.delta.to(w2.dtype)
        self.register_buffer("_cols_before_merge", before, persistent=False)
        self.merged = True

    def unmerge(self) -> None:
        w2, before = self.weight_2d(), self._cols_before_merge
        with torch.no_grad():
            now = w2[:, self.cols]
            if torch.equal(now, before + self.delta.to(w2.dtype)):
                w2[:, self.cols] = before  # bit-exact restore
            else:  # something else changed these columns meanwhile: take back only our change
                w2[:, self.cols] = now - self.delta.to(w2.dtype)
        del self._cols_before_merge
        self.merged = False


def host_generator(seed: int, host_name: str) -> torch.Generator:
    """A generator seeded by the config's seed and the host's path (stable across runs)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(host_name.encode())) % (2**63))


@dataclass(frozen=True)
class PaCAConfig(AdapterConfig):
    """PaCA hyper-parameters.

    r: number of input columns of each target weight that train (r <= in_features).
    seed: seeds the random column choice (per target, combined with the module path); the
    chosen columns are saved with the adapter, so loading never re-draws them.
    """

    method = "paca"
    r: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"PaCAConfig.seed must be an integer >= 0, got {self.seed!r}")


class PaCAPiece(ColumnDeltaPiece):
    PREFIX = "paca"


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, PaCAConfig)

    def make(h: str, host: nn.Module) -> LinearPiece:
        geo = LinearPiece(host, cfg.method)
        if cfg.r > geo.in_features:
            raise ConfigError(f"paca r={cfg.r} exceeds in_features={geo.in_features} of {h!r} "
                              f"(weight {tuple(host.weight.shape)})")
        cols = torch.randperm(geo.in_features, generator=host_generator(cfg.seed, h))[: cfg.r].sort().values
        return PaCAPiece(host, cfg.method, cols)

    return attach_linear(model, name, cfg, make)


register(MethodSpec(name="paca", config_cls=PaCAConfig, attach=attach, mergeable=True,
                    paper="PaCA: Partial Connection Adaptation for Efficient Fine-Tuning (Woo et al., 2025)"))
