"""DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
Adaptation (Valipour et al., 2023, https://arxiv.org/abs/2210.07558).

LoRA factors of the largest rank r_max, ``lora_A`` (r_max, in) and ``lora_B`` (out, r_max), are
trained for a whole range of ranks at once. Each training forward samples b uniformly from
[r_min, r_max] and uses only the first b rows of A and columns of B, with the paper's scaling::

    y = W x + b_host + (alpha / b) * B[:, :b] A[:b] x

With ``update="last"`` (the paper's algorithm) only the b-th row of A and b-th column of B get
gradients in that step (the first b-1 are detached), which sorts the information by index like
nested dropout; ``update="all"`` trains all of the first b. Each piece samples its own b.

In eval mode the rank is ``eval_rank`` (default r_max): the trained adapter can be used at any
rank <= r_max without retraining, via the config (``eval_rank``) or :func:`truncate_dylora`
(also after loading). Mergeable at the current eval rank; trainable parameters r_max (in + out)
per target, the same tensors (names and shapes) as a LoRA of rank r_max.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError, ConfigError
from ..registry import MethodSpec, register
from ..state import get_state
from .base import AdapterConfig, AdapterModule
from .lora_xs import LinearPiece, attach_linear, check_float, check_positive_int


@dataclass(frozen=True)
class DyLoRAConfig(AdapterConfig):
    """DyLoRA hyper-parameters.

    r: the largest rank r_max. r_min: the smallest rank sampled in training (1 <= r_min <= r).
    alpha: scaling numerator; a rank-b forward scales by alpha / b. dropout: on the adapter's
    input (train mode only). update: "last" (only the b-th component trains in a step, the
    paper's algorithm) or "all". eval_rank: rank used outside training (None: r).
    """

    method = "dylora"
    r: int = 8
    r_min: int = 1
    alpha: float = 16.0
    dropout: float = 0.0
    update: str = "last"
    eval_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_positive_int(self, "r_min")
        if self.r_min > self.r:
            raise ConfigError(f"DyLoRAConfig.r_min={self.r_min} must be <= r={self.r}")
        check_float(self, "alpha", strict=True)
        check_float(self, "dropout")
        if self.dropout >= 1:
            raise ConfigError(f"DyLoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.update not in ("last", "all"):
            raise ConfigError(f"DyLoRAConfig.update must be 'last' or 'all', got {self.update!r}")
        if self.eval_rank is not None:
            check_positive_int(self, "eval_rank")
            if self.eval_rank > self.r:
                raise ConfigError(f"DyLoRAConfig.eval_rank={self.eval_rank} must be <= r={self.r}")


class DyLoRAPiece(LinearPiece):
    """Nested-rank LoRA on one Linear/Conv1D host."""

    def __init__(self, host: nn.Module, cfg: DyLoRAConfig) -> None:
        super().__init__(host, cfg.method)
        self.r, self.r_min, self.alpha, self.update = cfg.r, cfg.r_min, cfg.alpha, cfg.update
        self.eval_rank = cfg.eval_rank or cfg.r
        self.lora_A = self.param_like(cfg.r, self.in_features)
        self.lora_B = self.param_like(self.out_features, cfg.r)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        #: the rank used by the last forward (for inspection and tests)
        self.last_rank = self.eval_rank

    def factors(self, b: int, train_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:b] (b, in), B[:, :b] (out, b); with ``train_last`` only the b-th component keeps its gradient."""
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        if train_last and b > 1:
            A = torch.cat([A[:-1].detach(), A[-1:]], 0)
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], 1)
        return A, B

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.training:
            b = int(torch.randint(self.r_min, self.r + 1, ()).item())
            A, B = self.factors(b, self.update == "last")
        else:
            b = self.eval_rank
            A, B = self.factors(b, False)
        self.last_rank = b
        h = (self.dropout(x.to(A.dtype)) @ A.T) @ B.T  # (..., in) -> (..., b) -> (..., out)
        return y + (h * (self.alpha / b)).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        b = self.eval_rank
        return self.to_host_layout((self.alpha / b) * (self.lora_B[:, :b] @ self.lora_A[:b]))


def truncate_dylora(model: nn.Module, name: str, r: int) -> None:
    """Use DyLoRA adapter ``name`` at rank ``r`` (1 <= r <= r_max) from now on, without retraining.

    Sets every piece's eval rank and records ``eval_rank=r`` in the adapter's config (so a
    later ``save_adapter`` keeps it). The full factors are kept: any other rank stays available."""
    rec = get_state(model).record(name)
    cfg = rec.config
    if not isinstance(cfg, DyLoRAConfig):
        raise ConfigError(f"adapter {name!r} is a {rec.method} adapter, not dylora")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= cfg.r:
        raise ConfigError(f"truncate_dylora: rank must be an integer in [1, {cfg.r}] for adapter {name!r}, got {r!r}")
    if any(p.merged for p in rec.pieces.values()):
        raise AdapterError(f"adapter {name!r} is merged; unmerge it before changing its rank")
    for p in rec.pieces.values():
        assert isinstance(p, DyLoRAPiece)
        p.eval_rank = r
    rec.config = cfg.replace(eval_rank=r)


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, DyLoRAConfig)
    return attach_linear(model, name, cfg, lambda h, host: DyLoRAPiece(host, cfg))


register(MethodSpec(name="dylora", config_cls=DyLoRAConfig, attach=attach, mergeable=True,
                    paper="DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free "
                          "Low-Rank Adaptation (Valipour et al., 2023)"))
