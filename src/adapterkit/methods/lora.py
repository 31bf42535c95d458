"""LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) and rsLoRA.

For a host with weight ``W`` (out, in)::

    y = W x + (B A dropout(x)) * s,   A: (r, in), B: (out, r),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

``delta_weight() = s * B @ A`` folds into ``W`` on merge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import is_linear_like, linear_layers_except_head, resolve_targets
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule

#: default targets by architecture family, first that matches wins
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen2, Phi, OPT, BART, Whisper
    ("c_attn",),  # GPT-2
    ("query", "value"),  # BERT, RoBERTa, ViT
    ("q", "v"),  # T5
    ("query_key_value",),  # Falcon, BLOOM, GPT-NeoX
    ("qkv",),  # timm ViT
)


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA hyper-parameters.

    r: rank of the update. alpha: scaling numerator (s = alpha/r, or alpha/sqrt(r) with
    use_rslora). dropout: on the adapter's input. bias: also train a bias on the update
    branch. init: "gaussian" (A ~ N(0, 1/r), B = 0), "kaiming" (A kaiming-uniform, B = 0).
    """

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    bias: bool = False
    init: Literal["gaussian", "kaiming"] = "kaiming"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"{type(self).__name__}.r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ConfigError(f"{type(self).__name__}.alpha must be > 0, got {self.alpha!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"{type(self).__name__}.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("gaussian", "kaiming"):
            raise ConfigError(f"{type(self).__name__}.init must be one of gaussian, kaiming; got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def weight_io(host: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or transformers Conv1D (which stores W as (in, out))."""
    if isinstance(host, nn.Linear):
        return host.out_features, host.in_features
    w = host.weight  # Conv1D: (in, out)
    return w.shape[1], w.shape[0]


class LoRALinear(AdapterModule):
    """LoRA on a Linear (or transformers Conv1D) host."""

    def __init__(self, host: nn.Module, cfg: LoRAConfig) -> None:
        super().__init__()
        out_f, in_f = weight_io(host)
        dev, dt = host.weight.device, host.weight.dtype
        self.r, self.scaling = cfg.r, cfg.scaling
        self.fan_in_fan_out = not isinstance(host, nn.Linear)  # Conv1D stores W transposed
        self.lora_A = nn.Parameter(torch.empty(cfg.r, in_f, device=dev, dtype=dt))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_f, cfg.r, device=dev, dtype=dt))  # (out, r)
        self.lora_bias = nn.Parameter(torch.zeros(out_f, device=dev, dtype=dt)) if cfg.bias else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        if cfg.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / cfg.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (..., in), y: (..., out)
        h = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T  # (..., r)
        d = (h @ self.lora_B.T) * self.scaling  # (..., out)
        if self.lora_bias is not None:
            d = d + self.lora_bias
        return y + d.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        d = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return d.T if self.fan_in_fan_out else d

    def merge(self) -> None:
        super().merge()
        if self.lora_bias is not None:
            self._merge_bias(+1)

    def unmerge(self) -> None:
        super().unmerge()
        if self.lora_bias is not None:
            self._merge_bias(-1)

    def _merge_bias(self, sign: int) -> None:
        host = self.host
        with torch.no_grad():
            if host.bias is None:
                raise ConfigError(f"cannot merge a LoRA bias into {type(host).__name__} without a bias")
            host.bias.add_(sign * self.lora_bias.to(host.bias.dtype))


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, LoRAConfig)
    hosts = resolve_targets(
        model, cfg.targets, accept=lambda n, m: is_linear_like(m), defaults=DEFAULT_TARGETS,
        fallback=linear_layers_except_head, what=f"{cfg.method} adapter {name!r}",
    )
    mods = dict(model.named_modules())
    return {h: LoRALinear(mods[h], cfg) for h in hosts}


register(MethodSpec(name="lora", config_cls=LoRAConfig, attach=attach, mergeable=True,
                    paper="LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021)"))
