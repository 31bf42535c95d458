"""Hydra: Multi-head Low-rank Adaptation (Kim et al., 2024, https://arxiv.org/abs/2309.06922).

A parallel low-rank branch (like LoRA: new features from the input) and a sequential one (a
low-rank map applied to the pre-trained layer's output h = W x + b: a linear combination of the
pre-trained features), for a host W (out, in) with bias b::

    y = h + s * (B1 A1 x + B2 A2 h),   h = W x + b
      A1 (r, in), B1 (out, r)          parallel    (``par_A``, ``par_B``)
      A2 (r2, out), B2 (out, r2)       sequential  (``seq_A``, ``seq_B``)
    delta_weight = s * (B1 A1 + B2 A2 W),   bias change s * B2 A2 b,   s = alpha / r

As in the authors' code the sequential branch sees the layer's bias too (their reparameterisation
folds it into the merged bias). It is computed as ``B2 ((A2 W) x + A2 b)`` with the small (r2, in)
matrix A2 W (no second full matmul). As in LoRA, A's are kaiming-uniform and B's zero, so the
adapter starts as the identity. Merge folds W' = W + s(B1 A1 + B2 A2 W) and b' = b + s B2 A2 b;
since the change depends on W and b, both are kept exactly from merge to unmerge. Trainable
parameters per target: r (in + out) + 2 r2 out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora_xs import LinearPiece, SnapshotMergeMixin, attach_linear, check_float, check_positive_int


@dataclass(frozen=True)
class HydraConfig(AdapterConfig):
    """Hydra hyper-parameters.

    r: rank of the parallel branch. r_seq: rank of the sequential branch (None: r).
    alpha: scaling numerator, s = alpha / r for both branches. dropout: on the parallel
    branch's input (train mode only).
    """

    method = "hydra"
    r: int = 8
    r_seq: int | None = None
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        if self.r_seq is not None:
            check_positive_int(self, "r_seq")
        check_float(self, "alpha", strict=True)
        check_float(self, "dropout")
        if self.dropout >= 1:
            raise ConfigError(f"HydraConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class HydraPiece(SnapshotMergeMixin, LinearPiece):
    """Parallel + sequential low-rank branches on one Linear/Conv1D host."""

    def __init__(self, host: nn.Module, cfg: HydraConfig) -> None:
        super().__init__(host, cfg.method)
        r, r2, o, i = cfg.r, cfg.r_seq or cfg.r, self.out_features, self.in_features
        self.scaling = cfg.scaling
        self.par_A, self.par_B = self.param_like(r, i), self.param_like(o, r)
        self.seq_A, self.seq_B = self.param_like(r2, o), self.param_like(o, r2)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.par_A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.seq_A, a=math.sqrt(5))
        self.dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.par_A.dtype)
        par = (self.dropout(xc) @ self.par_A.T) @ self.par_B.T  # (..., in) -> (..., r) -> (..., out)
        a2w = self.seq_A @ self.weight_2d().to(self.seq_A.dtype)  # (r2, out) @ (out, in) -> (r2, in)
        z = xc @ a2w.T  # A2 W x: (..., in) -> (..., r2)
        bias = getattr(self.host, "bias", None)
        if bias is not None:
            z = z + self.seq_A @ bias.to(self.seq_A.dtype)  # + A2 b
        seq = z @ self.seq_B.T  # (..., r2) -> (..., out)
        return y + ((par + seq) * self.scaling).to(y.dtype)

    def bias_delta(self, b: torch.Tensor) -> torch.Tensor:
        """s B2 A2 b, (out,)."""
        return self.scaling * (self.seq_B @ (self.seq_A @ b.to(self.seq_A.dtype)))

    def merge(self) -> None:
        super().merge()
        b = getattr(self.host, "bias", None)
        if b is not None:
            with torch.no_grad():
                before = b.detach().clone()
                b.copy_((before + self.bias_delta(before)).to(b.dtype))
            self.register_buffer("_b_before_merge", before, persistent=False)

    def unmerge(self) -> None:
        super().unmerge()
        b = getattr(self.host, "bias", None)
        if b is not None:
            before = self._b_before_merge
            with torch.no_grad():
                merged = (before + self.bias_delta(before)).to(b.dtype)
                if torch.equal(b, merged):
                    b.copy_(before)
                else:  # changed since (another adapter merged on top): take back only our change
                    b.sub_(merged - before)
            del self._b_before_merge

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """s (B1 A1 + B2 A2 W) for a weight W (out, in)."""
        w2 = w2.to(self.par_A.dtype)
        return self.scaling * (self.par_B @ self.par_A + self.seq_B @ (self.seq_A @ w2))

    def delta_weight(self) -> torch.Tensor:
        return self.to_host_layout(self.delta_2d(self.weight_2d()))

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.to_host_layout(self.delta_2d(self.as_2d(w))).to(w.dtype)


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, HydraConfig)
    return attach_linear(model, name, cfg, lambda h, host: HydraPiece(host, cfg))


register(MethodSpec(name="hydra", config_cls=HydraConfig, attach=attach, mergeable=True,
                    paper="Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning (Kim et al., 2024)"))
