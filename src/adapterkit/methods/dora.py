"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, https://arxiv.org/abs/2402.09353).

The host weight seen as a matrix W (out, in) is split into a magnitude and a direction; LoRA
adapts the direction, a trained vector ``m`` (out,) the magnitude::

    V  = W + s B A                      (out, in)
    n  = ||V||_c = row norms of V       (out,)   -- "column-wise" in the paper's (in, out) layout
    y  = (m / n) * (W x + s B A x) + b

``m`` starts at ||W + s B A||_c so the adapter starts as the identity. As the paper (sec. 4.3)
and PEFT do, ``n`` is treated as a constant in backprop (``n.detach()``). Computed like PEFT
(so results match it): ``y + (m/n - 1) * (y - b) + (m/n) * s B A x``, with ``y - b`` replaced by
``W dropout(x)`` when dropout is active in training.

Merge: ``W' = (m / n) * (W + s B A)`` (rows scaled); the exact original W is kept from merge to
unmerge, so unmerge restores it bit for bit (or, if W changed since, e.g. another adapter was
merged on top, takes back exactly the change it made). With several adapters active on one host,
``y - b`` includes the ones applied before this piece, as in PEFT. Parameter ``lora_magnitude_vector`` has
PEFT's shape: (out,) for Linear/Conv1D, (dim,) for Embedding, (1, out, 1, 1) for Conv2d.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule, upcast
from .lora import LoRAConfig, LoRAConv2d, LoRAEmbedding, LoRALinear, LoRAPiece, attach_pieces, export


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """DoRA hyper-parameters: those of :class:`LoRAConfig` (no ``bias``, as in PEFT)."""

    method = "dora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bias:
            raise ConfigError("DoRAConfig.bias=True is not supported (the magnitude already rescales each output)")


class DoRAMixin:
    """DoRA math over any :class:`LoRAPiece` host geometry (mixed in before the LoRA class)."""

    def _init_magnitude(self: LoRAPiece) -> None:
        with torch.no_grad():
            n = self._norm()  # (out,)
        shape = (1, -1, 1, 1) if isinstance(self, LoRAConv2d) else (-1,)
        self.lora_magnitude_vector = nn.Parameter(n.to(self.A.dtype).reshape(shape).clone())

    def _norm(self: LoRAPiece, w2: torch.Tensor | None = None) -> torch.Tensor:
        """||W + s B A|| per output row, (out,), for W = ``w2`` (out, in) or the host weight.
        The LoRA product enters detached, as in PEFT."""
        w = self.weight_2d() if w2 is None else w2
        lora = (self.b_2d().to(w.dtype) @ self.a_2d().to(w.dtype)).detach()  # fp32 when w is (merge math)
        return torch.linalg.norm(w + self.scaling * lora, dim=1)

    def _scale(self: LoRAPiece) -> torch.Tensor:
        """m / n, (out,); n detached (paper sec. 4.3)."""
        return self.lora_magnitude_vector.reshape(-1) / self._norm().detach()

    def forward_post(self: LoRAPiece, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xd = self.dropout(x)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # W x + b (plus any adapter applied before this one, as in PEFT): take the bias off
            base = y
            bias = getattr(self.host, "bias", None)
            if bias is not None:
                base = base - self.channel_view(bias)
        else:
            base = self.base_branch(xd)  # W dropout(x), like PEFT
        scale = self.channel_view(self._scale().to(y.dtype))
        d = (scale - 1) * base + scale * (self.lora_out(xd).to(y.dtype))
        return y + d

    def merged_weight(self: LoRAPiece, w: torch.Tensor) -> torch.Tensor:
        """(m / n) (W + s B A) for a weight ``w`` in the host's layout; returns the host layout."""
        w2 = self.as_2d(w)
        scale = (self.lora_magnitude_vector.reshape(-1) / self._norm(w2)).to(w.dtype)[:, None]
        v = w2 + self.scaling * (self.b_2d().to(w.dtype) @ self.a_2d().to(w.dtype))
        return self.to_host_layout(scale * v)

    def delta_weight(self: LoRAPiece) -> torch.Tensor:
        """W' - W, with W' = (m/n) (W + s B A) (host layout), in W's dtype. Formed in fp32 at
        least: in bf16, W' - W would keep only the few bits W' and W do not share."""
        w = self.host.weight
        w32 = upcast(w)
        return (self.merged_weight(w32) - w32).to(w.dtype)

    def merge(self: LoRAPiece) -> None:
        self.check_mergeable()
        w = self.host.weight
        with torch.no_grad():
            before = w.detach().clone()
            w.copy_(self.merged_weight(upcast(before)).to(w.dtype))  # fp32 math, one rounding
        # W' is not W + (a function of the adapter alone): keep W to undo exactly
        self.register_buffer("_w_before_merge", before, persistent=False)
        self.merged = True

    def unmerge(self: LoRAPiece) -> None:
        w, before = self.host.weight, self._w_before_merge
        with torch.no_grad():
            merged = self.merged_weight(upcast(before)).to(w.dtype)  # bit-equal to what merge wrote
            if torch.equal(w, merged):
                w.copy_(before)
            else:  # W changed since (e.g. another adapter merged on top): take back only our change
                w.sub_(merged - before)
        del self._w_before_merge
        self.merged = False


class DoRALinear(DoRAMixin, LoRALinear):
    """DoRA on an ``nn.Linear`` or transformers ``Conv1D``."""

    def __init__(self, host: nn.Module, cfg: LoRAConfig) -> None:
        super().__init__(host, cfg)
        self._init_magnitude()


class DoRAEmbedding(DoRAMixin, LoRAEmbedding):
    """DoRA on an ``nn.Embedding``: one magnitude per embedding dimension (PEFT's layout)."""

    def __init__(self, host: nn.Embedding, cfg: LoRAConfig) -> None:
        super().__init__(host, cfg)
        self._init_magnitude()


class DoRAConv2d(DoRAMixin, LoRAConv2d):
    """DoRA on an ``nn.Conv2d``: one magnitude per output channel, shape (1, out, 1, 1)."""

    def __init__(self, host: nn.Conv2d, cfg: LoRAConfig) -> None:
        super().__init__(host, cfg)
        self._init_magnitude()


PIECES: dict[type, type[LoRAPiece]] = {nn.Linear: DoRALinear, nn.Embedding: DoRAEmbedding, nn.Conv2d: DoRAConv2d}


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, DoRAConfig)
    return attach_pieces(model, name, cfg, PIECES)


register(MethodSpec(name="dora", config_cls=DoRAConfig, attach=attach, mergeable=True, export=export,
                    paper="DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024)"))
