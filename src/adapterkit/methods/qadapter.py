"""Low-precision adapters (Jie et al., 2023, https://arxiv.org/abs/2307.16867).

"Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision
Redundancy": adapter weights sit in flat minima, so they survive very low precision; the
paper trains LoRA and bottleneck adapters with their weight matrices quantized in the loop
(quantization-aware training) down to 1 bit, and stores only the codes.

``QAdapterConfig(base_method="lora" | "bottleneck", bits=1|2|4|8, group_size, codebook,
base_config={...the wrapped method's fields...})``:

* every weight matrix of the wrapped adapter (LoRA ``lora_A`` (r, in) / ``lora_B`` (out, r);
  bottleneck ``adapter_down.weight`` (b, d) / ``adapter_up.weight`` (d, b)) keeps a latent
  fp parameter ``w`` (what the optimizer updates) and the forward uses ``Q(w)``: per group,
  standardise, snap to the 2**bits-level Gaussian codebook, de-standardise (see
  :mod:`adapterkit.quant.normal`: 1 bit = ``mu + sign(w - mu) * 0.798 sigma``), with the
  paper's straight-through estimator in backward;
* biases, LoRA's optional bias and a learned bottleneck scaling stay fp32 (the paper's
  adapters have no biases; they are O(d) and do not change the file size much);
* the wrapped method's math is unchanged: LoRA ``y + s Q(B) Q(A) x`` (mergeable:
  ``delta_weight = s Q(B) Q(A)``), bottleneck ``up(f(down(h)))`` with quantized matrices
  (not mergeable);
* as in the paper's code, the zero-initialised factor (LoRA B / bottleneck W_up) starts at
  trunc-normal(0, 1e-3) instead: a constant matrix has no spread to standardise, so the
  adapter starts *near* (not exactly) the identity.

Files hold the PACKED codes: ``<host>.lora_A.qcodes`` (uint8, ceil(numel * bits / 8)
bytes: 8 codes/byte at 1 bit, 4 at 2, 2 at 4), ``.qmean`` and ``.qstd`` (float32, one per
group) instead of the fp tensor, so a 4-bit adapter file is ~1/8 of its fp32 size. Loading
unpacks them; until the optimizer changes a weight, the forward uses exactly the loaded
codes (the latent weight is set to their dequantized values).

Trainable parameters: those of the wrapped method (the latent weights), e.g. LoRA
``r (in + out)`` per host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModuleError
from ..inject import is_linear_like, linear_layers_except_head, resolve_targets
from ..quant import (
    BITS,
    check_bits,
    check_group_size,
    dequantize_normal,
    fake_quantize_normal,
    num_groups,
    pack_bits,
    packed_size,
    quantize_normal,
    unpack_bits,
)
from ..quant.normal import RULES
from ..registry import MethodSpec, register
from . import bottleneck as bn
from .base import AdapterConfig, AdapterModule
from .lora import BASE_CHANGING_INITS, DEFAULT_TARGETS, LoRAConfig, LoRALinear, tied_weights

BASE_METHODS: dict[str, type[AdapterConfig]] = {"lora": LoRAConfig, "bottleneck": bn.BottleneckConfig}
#: suffixes of the saved tensors that replace one quantized fp weight
SUFFIXES = (".qcodes", ".qmean", ".qstd")


@dataclass(frozen=True)
class QAdapterConfig(AdapterConfig):
    """Quantized adapter: a LoRA or bottleneck adapter whose weight matrices are ``bits`` wide.

    base_method: "lora" or "bottleneck": the adapter that is quantized.
    bits: 1, 2, 4 or 8 bits per weight.
    group_size: None = one mean/scale per matrix (the paper), -1 = per output row, k > 0 =
        row-wise groups of k consecutive inputs (k must divide the matrix's columns).
    codebook: "lloyd" (MSE-optimal levels for N(0, 1)) or "median" (the authors' code).
    base_config: the wrapped config's fields (e.g. ``{"r": 8, "alpha": 16}``), without
        ``targets`` (this config's ``targets`` is passed on). Normalised to every field.
    """

    method = "qadapter"
    base_method: str = "lora"
    bits: int = 1
    group_size: int | None = None
    codebook: str = "lloyd"
    base_config: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.base_method not in BASE_METHODS:
            raise ConfigError(f"{name}.base_method must be one of {', '.join(BASE_METHODS)}, got {self.base_method!r}")
        check_bits(self.bits, BITS, f"{name}.bits")
        check_group_size(self.group_size, f"{name}.group_size")
        if self.codebook not in RULES:
            raise ConfigError(f"{name}.codebook must be one of {', '.join(RULES)}, got {self.codebook!r}")
        given = dict(self.base_config or {})
        if "targets" in given:
            raise ConfigError(f"{name}.base_config must not hold 'targets'; set {name}.targets instead")
        full = BASE_METHODS[self.base_method].from_dict({**given, "targets": self.targets}).to_dict()
        full.pop("targets")
        if self.base_method == "lora" and full["init"] in BASE_CHANGING_INITS:
            raise ConfigError(f"{name}: LoRA init={full['init']!r} rewrites the base weights; use kaiming or gaussian")
        # frozen and hashable: the wrapped fields as sorted (name, value) pairs
        object.__setattr__(self, "base_config", tuple(sorted(full.items())))

    def base(self) -> AdapterConfig:
        """The wrapped method's config (with this config's targets)."""
        return BASE_METHODS[self.base_method].from_dict({**dict(self.base_config), "targets": self.targets})

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["base_config"] = dict(self.base_config)
        return out

    @classmethod
    def wrap(cls, base: AdapterConfig, bits: int = 1, group_size: int | None = None,
             codebook: str = "lloyd") -> "QAdapterConfig":
        """``QAdapterConfig.wrap(ak.LoRAConfig(r=8), bits=2)``."""
        methods = {c: k for k, c in BASE_METHODS.items()}
        if type(base) not in methods:
            raise ConfigError(f"qadapter wraps {', '.join(BASE_METHODS)} configs, got {type(base).__name__}")
        fields = base.to_dict()
        targets = fields.pop("targets")
        return cls(targets=targets, base_method=methods[type(base)], bits=bits, group_size=group_size,
                   codebook=codebook, base_config=fields)


# -- quantized parameters --------------------------------------------------------------
class QuantizedParams:
    """Mixin for an nn.Module whose 2-D parameters ``_qnames`` run quantized.

    ``qweight(name)``: the fake-quantized weight for the forward. The module's state dict
    holds ``<name>.qcodes`` (packed uint8) / ``.qmean`` / ``.qstd`` instead of ``<name>``.
    """

    _qnames: tuple[str, ...] = ()

    def setup_quant(self, names: tuple[str, ...], bits: int, group_size: int | None, codebook: str) -> None:
        self._qnames, self.bits, self.group_size, self.codebook = names, bits, group_size, codebook
        #: names whose codes were loaded from a file (kept in buffers ``_q_<name>_codes/mean/std``)
        self._qloaded: set[str] = set()
        #: name -> ((version, data_ptr, device, dtype), Q(w)) for calls without autograd
        self._qcache: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}
        for n in names:
            w = getattr(self, n)
            num_groups(tuple(w.shape), group_size, f"{type(self).__name__}.{n}")  # ConfigError if it does not fit

    def _loaded(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The loaded (codes, mean, std) while the latent weight still equals their dequantized
        values (re-quantizing those would give other statistics, hence other codes). Compared by
        value, so it survives ``.to()`` and ``deepcopy``; dropped once training moves the weight."""
        if name not in self._qloaded:
            return None
        b = name.replace(".", "_")
        ld = getattr(self, f"_q_{b}_codes"), getattr(self, f"_q_{b}_mean"), getattr(self, f"_q_{b}_std")
        w = getattr(self, name).detach()
        if torch.equal(w, dequantize_normal(*ld, self.bits, self.group_size, self.codebook).to(w)):
            return ld
        self._qloaded.discard(name)
        for part in ("codes", "mean", "std"):
            delattr(self, f"_q_{b}_{part}")
        return None

    def qweight(self, name: str) -> torch.Tensor:
        """Q(w): value = dequantized codes, gradient = the paper's STE. Same shape/dtype as w."""
        w = getattr(self, name)
        grad = torch.is_grad_enabled() and w.requires_grad
        # inference: quantize once per weight version (not on every call)
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        hit = self._qcache.get(name)
        if not grad and hit is not None and hit[0] == key:
            return hit[1]
        ld = self._loaded(name)
        deq = None if ld is None else dequantize_normal(*ld, self.bits, self.group_size, self.codebook)
        out = fake_quantize_normal(w, self.bits, self.group_size, self.codebook, deq=deq)
        if not grad:
            self._qcache[name] = (key, out)
        return out

    def quantized(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 (rows, cols), mean (G,), std (G,)) of what the forward uses now."""
        ld = self._loaded(name)
        if ld is not None:
            return ld
        return quantize_normal(getattr(self, name), self.bits, self.group_size, self.codebook)

    # state dict: packed codes instead of the fp weight
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        for n in self._qnames:
            destination.pop(prefix + n, None)
            codes, mean, std = self.quantized(n)
            destination[prefix + n + ".qcodes"] = pack_bits(codes, self.bits)
            destination[prefix + n + ".qmean"] = mean.float()
            destination[prefix + n + ".qstd"] = std.float()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        got: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for n in self._qnames:
            keys = [prefix + n + s for s in SUFFIXES]
            if not all(k in state_dict for k in keys):
                continue  # a plain fp weight (or missing: the parent reports it)
            packed, mean, std = (state_dict.pop(k) for k in keys)
            w = getattr(self, n)
            g, _ = num_groups(tuple(w.shape), self.group_size)
            if packed.dtype != torch.uint8 or packed.numel() != packed_size(w.numel(), self.bits) \
                    or mean.shape != (g,) or std.shape != (g,):
                error_msgs.append(f"{prefix}{n}: packed codes {tuple(packed.shape)} {packed.dtype}, stats "
                                  f"{tuple(mean.shape)}/{tuple(std.shape)} do not fit a {tuple(w.shape)} weight at "
                                  f"{self.bits} bits with group_size={self.group_size}")
                continue
            codes = unpack_bits(packed.reshape(-1).to(torch.uint8), self.bits, w.numel()).reshape(w.shape)
            mean, std = mean.float(), std.float()
            state_dict[prefix + n] = dequantize_normal(codes, mean, std, self.bits, self.group_size,
                                                       self.codebook).to(w.dtype)
            got[n] = (codes, mean, std)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,  # type: ignore[misc]
                                      missing_keys, unexpected_keys, error_msgs)
        for n, (codes, mean, std) in got.items():
            w = getattr(self, n)
            b = n.replace(".", "_")
            # non-persistent buffers: they follow .to(device) but never reach a state dict
            self.register_buffer(f"_q_{b}_codes", codes.to(w.device), persistent=False)  # type: ignore[attr-defined]
            self.register_buffer(f"_q_{b}_mean", mean.to(w.device), persistent=False)  # type: ignore[attr-defined]
            self.register_buffer(f"_q_{b}_std", std.to(w.device), persistent=False)  # type: ignore[attr-defined]
            self._qloaded.add(n)


def _near_zero_init(w: torch.Tensor) -> None:
    """The paper's init of the otherwise-zero factor: trunc-normal(0, 1e-3) in [-2e-3, 2e-3]."""
    with torch.no_grad():
        nn.init.trunc_normal_(w, mean=0.0, std=1e-3, a=-2e-3, b=2e-3)


class QLoRALinearPiece(QuantizedParams, LoRALinear):
    """LoRA on a Linear / Conv1D with quantized factors: ``y + s Q(B) Q(A) dropout(x)``."""

    def __init__(self, host: nn.Module, base: LoRAConfig, cfg: QAdapterConfig) -> None:
        super().__init__(host, base)
        if base.init in ("kaiming", "gaussian"):  # B would be exactly 0
            _near_zero_init(self.lora_B)
        self.setup_quant(("lora_A", "lora_B"), cfg.bits, cfg.group_size, cfg.codebook)

    def a_2d(self) -> torch.Tensor:
        return self.qweight("lora_A")  # (r, in)

    def b_2d(self) -> torch.Tensor:
        return self.qweight("lora_B")  # (out, r)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a_2d(), self.b_2d()
        return (x.to(a.dtype) @ a.T) @ b.T  # (..., in) -> (..., r) -> (..., out)


class QuantLinear(QuantizedParams, nn.Linear):
    """nn.Linear computing ``x Q(W)^T + b`` (the bottleneck's down/up projections)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight("weight"), self.bias)

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg: QAdapterConfig) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(lin.weight)
            if lin.bias is not None:
                q.bias.copy_(lin.bias)
        q.setup_quant(("weight",), cfg.bits, cfg.group_size, cfg.codebook)
        return q


def quantize_bottleneck(piece: bn.Bottleneck, cfg: QAdapterConfig) -> bn.Bottleneck:
    """Swap the piece's projections for quantized ones (same state-dict names)."""
    piece.adapter_down = QuantLinear.from_linear(piece.adapter_down, cfg)
    up = QuantLinear.from_linear(piece.adapter_up, cfg)
    if not bool(up.weight.detach().any()):  # W_up = 0 at init: give it spread (paper's init)
        _near_zero_init(up.weight)
    piece.adapter_up = up
    return piece


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, QAdapterConfig)
    base = cfg.base()
    if isinstance(base, bn.BottleneckConfig):
        return {h: quantize_bottleneck(p, cfg) for h, p in bn.attach(model, name, base).items()}  # type: ignore[arg-type]
    assert isinstance(base, LoRAConfig)
    hosts = resolve_targets(model, cfg.targets, accept=lambda n, m: is_linear_like(m), defaults=DEFAULT_TARGETS,
                            fallback=linear_layers_except_head, what=f"qadapter (lora) adapter {name!r}")
    mods = dict(model.named_modules())
    tied = tied_weights(model, {h: mods[h] for h in hosts})
    pieces: dict[str, AdapterModule] = {}
    for h in hosts:
        if not is_linear_like(mods[h]):
            raise UnsupportedModuleError(f"qadapter (lora) attaches to Linear / Conv1D layers, not {h!r} "
                                         f"({type(mods[h]).__name__})")
        p = QLoRALinearPiece(mods[h], base, cfg)
        p.tied_with = tied.get(h)
        pieces[h] = p
    return pieces


def packed_bytes(cfg: QAdapterConfig, shape: tuple[int, int]) -> int:
    """Bytes a quantized (rows, cols) weight takes in the file: codes + 2 float32 per group."""
    g, _ = num_groups(shape, cfg.group_size)
    return packed_size(math.prod(shape), cfg.bits) + 8 * g


register(MethodSpec(name="qadapter", config_cls=QAdapterConfig, attach=attach, mergeable=True,
                    paper="Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision "
                          "Redundancy (Jie et al., 2023)"))
