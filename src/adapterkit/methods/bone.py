"""Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large Language
Models (Kang, 2024, https://arxiv.org/abs/2409.15371).

The host weight W (out, in) is cut into b x b blocks W[j, i] (j over out/b row blocks, i over
in/b column blocks). "Weight guide": the trainable blocks are multiplied by the weight's own
blocks, so the update keeps being steered by W during training.

* variant "bat" (default; Block Affine Transformation, PEFT's ``init_weights="bat"``): one
  trainable b x b matrix per row block, ``bone_block`` (out/b, b, b)::

      W'[j, i] = W[j, i] + W[j, i] @ B_j + B_j       (every column block i)

  so ``delta_weight = W_blocks @ B + B`` depends on W; merge keeps the exact W for unmerge.
  Needs b | in and b | out.
* variant "shared" (the block-sharing Bone structure, PEFT's default ``MissConfig``): one
  ``bone_block`` (b, out) added to every column block of W (the last, partial block takes its
  first rows)::

      W'[:, i*b:(i+1)*b] = W[:, i*b:(i+1)*b] + B^T,   y = W x + b + (sum_i x_i) @ B

Both start at B = 0 (identity), are mergeable, and have b * out trainable parameters per target.
Parity with PEFT's MiSS layers (Bone was renamed MiSS in PEFT) is tested.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora_xs import LinearPiece, SnapshotMergeMixin, attach_linear, check_float, check_positive_int

VARIANTS = ("bat", "shared")


@dataclass(frozen=True)
class BoneConfig(AdapterConfig):
    """Bone hyper-parameters.

    r: block size b ("bat": must divide in and out of every target; "shared": b <= in).
    variant: "bat" (weight-guided block affine, default) or "shared" (see module docstring).
    dropout: on the input of the "shared" branch (train mode only; PEFT's ``miss_dropout``).
    init: "zeros" (identity start, default) or "random" (kaiming-uniform, for tests).
    """

    method = "bone"
    r: int = 64
    variant: str = "bat"
    dropout: float = 0.0
    init: str = "zeros"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        if self.variant not in VARIANTS:
            raise ConfigError(f"BoneConfig.variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        check_float(self, "dropout")
        if self.dropout >= 1:
            raise ConfigError(f"BoneConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dropout > 0 and self.variant == "bat":
            raise ConfigError("BoneConfig.dropout applies to variant='shared' only (the 'bat' update is a weight)")
        if self.init not in ("zeros", "random"):
            raise ConfigError(f"BoneConfig.init must be 'zeros' or 'random', got {self.init!r}")


class BonePiece(SnapshotMergeMixin, LinearPiece):
    """Bone on one Linear/Conv1D host (both variants)."""

    def __init__(self, host: nn.Module, cfg: BoneConfig, where: str) -> None:
        super().__init__(host, cfg.method)
        b, o, i = cfg.r, self.out_features, self.in_features
        self.r, self.variant = b, cfg.variant
        if cfg.variant == "bat":
            if i % b or o % b:
                raise ConfigError(f"bone variant 'bat': block size r={b} must divide both dimensions of {where!r} "
                                  f"(out={o}, in={i}); pick r dividing {math.gcd(o, i)}")
            self.bone_block = self.param_like(o // b, b, b)
        else:
            if b > i:
                raise ConfigError(f"bone: block size r={b} exceeds in_features={i} of {where!r}")
            self.bone_block = self.param_like(b, o)
        if cfg.init == "random":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.bone_block, a=math.sqrt(5))
        self.dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    # -- the update as a matrix (out, in) ------------------------------------------------
    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        B, b = self.bone_block, self.r
        o, i = self.out_features, self.in_features
        if self.variant == "shared":  # B^T repeated over the column blocks, cut at in
            return B.T.repeat(1, -(-i // b))[:, :i]
        # (o, i) -> (o/b, b, i/b, b) -> (i/b, o/b, b, b): blocks W[j, i] indexed [i, j]
        wb = w2.to(B.dtype).reshape(o // b, b, i // b, b).permute(2, 0, 1, 3)
        d = wb @ B + B  # B (o/b, b, b) broadcasts over the column blocks
        return d.permute(1, 2, 0, 3).reshape(o, i)

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, b = self.bone_block, self.r
        xc = x.to(B.dtype)
        if self.variant == "shared":
            xd = self.dropout(xc)
            pad = (-xd.shape[-1]) % b
            if pad:
                xd = F.pad(xd, (0, pad))
            s = xd.reshape(*xd.shape[:-1], -1, b).sum(-2)  # (..., in) -> (..., in/b, b) -> (..., b)
            return y + (s @ B).to(y.dtype)  # (..., out)
        # weight-guided: the update needs W's blocks, so it is formed as a matrix (like PEFT)
        return y + F.linear(xc, self.delta_2d(self.weight_2d())).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.to_host_layout(self.delta_2d(self.weight_2d()))

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.to_host_layout(self.delta_2d(self.as_2d(w))).to(w.dtype)


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, BoneConfig)
    return attach_linear(model, name, cfg, lambda h, host: BonePiece(host, cfg, h))


register(MethodSpec(name="bone", config_cls=BoneConfig, attach=attach, mergeable=True,
                    paper="Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for "
                          "Large Language Models (Kang, 2024)"))
