"""LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685), rsLoRA, PiSSA and OLoRA inits.

For a host with weight ``W`` seen as a matrix (out, in)::

    y = W x + b + s * (B A dropout(x) + b_lora),   A: (r, in), B: (out, r)
    s = alpha / r            (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r))

``delta_weight() = s * B @ A`` (in the host's weight layout) folds into ``W`` on merge;
the optional bias (PEFT's ``lora_B.bias``, scaled by ``s`` like PEFT) folds into ``b``.

Hosts and parameter shapes (the names and shapes PEFT uses, minus its ``.weight``):

* ``nn.Linear`` / transformers ``Conv1D`` (GPT-2; stores W as (in, out)):
  ``lora_A`` (r, in), ``lora_B`` (out, r);
* ``nn.Embedding`` (num_embeddings, dim): ``lora_embedding_A`` (r, num_embeddings),
  ``lora_embedding_B`` (dim, r); delta = onehot(x) @ A.T @ B.T * s. As in PEFT, dropout
  does not apply to embeddings (their input is token ids) and a bias is not offered;
* ``nn.Conv2d``: ``lora_A`` (r, in, kh, kw) is a conv with the host's kernel, stride,
  padding and dilation; ``lora_B`` (out, r, 1, 1) a 1x1 conv.

Inits (``LoRAConfig.init``), every one but "random" makes the adapter start as the identity:

* "kaiming" (PEFT's default ``init_lora_weights=True``): A kaiming-uniform(a=sqrt(5)), B = 0;
* "gaussian" (PEFT's "gaussian"): A ~ N(0, 1/r^2) (std 1/r), B = 0;
* "random" (PEFT's ``init_lora_weights=False``, for tests): A and B both random;
* "pissa" (Meng et al., 2024, https://arxiv.org/abs/2404.02948): W = U S V^T, A = sqrt(S_r/s) V_r^T,
  B = U_r sqrt(S_r/s); the host weight becomes the residual W - s B A;
* "olora" (Büyükakyüz, 2024, https://arxiv.org/abs/2406.01775): W = Q R, A = R[:r], B = Q[:, :r];
  the host weight becomes W - s B A.

PiSSA/OLoRA change the base weight, so the initial factors A0, B0 are kept (non-persistent
buffers) to (a) save the adapter as a plain LoRA relative to the ORIGINAL weight (rank 2r:
A' = [A; A0], B' = [B, -B0], PEFT's conversion) and (b) restore the base on delete.
For embeddings, "kaiming"/"gaussian" follow PEFT: A = 0, B ~ N(0, 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NotMergeableError, UnsupportedModuleError
from ..inject import base_modules, is_linear_like, linear_layers_except_head, resolve_targets
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

INITS = ("kaiming", "gaussian", "random", "pissa", "olora")
#: inits that rewrite the host weight (W -> W - s B0 A0)
BASE_CHANGING_INITS = ("pissa", "olora")


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA hyper-parameters.

    r: rank of the update. alpha: scaling numerator (s = alpha/r, or alpha/sqrt(r) with
    use_rslora). dropout: on the adapter's input (train mode only). bias: also train a
    bias on the update branch (PEFT's ``lora_bias``). init: one of :data:`INITS`, see the
    module docstring ("kaiming" is PEFT's default).
    """

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    bias: bool = False
    init: Literal["kaiming", "gaussian", "random", "pissa", "olora"] = "kaiming"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"{name}.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ConfigError(f"{name}.alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"{name}.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"{name}.use_rslora must be true or false, got {self.use_rslora!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"{name}.bias must be true or false, got {self.bias!r}")
        if self.init not in INITS:
            raise ConfigError(f"{name}.init must be one of {', '.join(INITS)}; got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def for_loading(self) -> "LoRAConfig":
        # the saved tensors overwrite A/B; PiSSA/OLoRA must not rewrite the fresh base
        return self.replace(init="gaussian") if self.init in BASE_CHANGING_INITS else self  # type: ignore[return-value]


class LoRAPiece(AdapterModule):
    """What every LoRA host type shares; subclasses say how the host's weight maps to a
    matrix (out, in) and how to run the low-rank branch on the host's input."""

    A_NAME: str = "lora_A"
    B_NAME: str = "lora_B"
    #: another module sharing the host's weight (set by attach): merging would change it too
    tied_with: str | None = None

    def __init__(self, host: nn.Module, cfg: LoRAConfig, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.bind(host)
        dev, dt = host.weight.device, host.weight.dtype
        self.r, self.scaling, self.init = cfg.r, cfg.scaling, cfg.init
        self.register_parameter(self.A_NAME, nn.Parameter(torch.zeros(a_shape, device=dev, dtype=dt)))
        self.register_parameter(self.B_NAME, nn.Parameter(torch.zeros(b_shape, device=dev, dtype=dt)))
        self.lora_bias = nn.Parameter(torch.zeros(b_shape[0], device=dev, dtype=dt)) if cfg.bias else None
        self.dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._initialise(cfg.init)

    # -- host geometry (subclasses) ------------------------------------------------------
    def as_2d(self, w: torch.Tensor) -> torch.Tensor:
        """A tensor in the host weight's layout as the matrix (out, in) (a view where possible)."""
        raise NotImplementedError

    def weight_2d(self) -> torch.Tensor:
        """The host weight as a matrix (out, in)."""
        return self.as_2d(self.host.weight)

    def to_host_layout(self, d: torch.Tensor) -> torch.Tensor:
        """A matrix (out, in) in the host weight's own layout and shape."""
        raise NotImplementedError

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` (unscaled, no dropout, no bias) in the host output's layout."""
        raise NotImplementedError

    def channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector (out,) shaped to broadcast against the host output."""
        return v

    # -- the factors as matrices -----------------------------------------------------------
    @property
    def A(self) -> torch.Tensor:  # the parameter, host-specific shape
        return getattr(self, self.A_NAME)

    @property
    def B(self) -> torch.Tensor:
        return getattr(self, self.B_NAME)

    def a_2d(self) -> torch.Tensor:
        return self.A.reshape(self.r, -1)  # (r, in)

    def b_2d(self) -> torch.Tensor:
        return self.B.reshape(self.B.shape[0], self.r)  # (out, r)

    # -- init --------------------------------------------------------------------------
    def _initialise(self, init: str) -> None:
        A, B = self.A, self.B
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(A, std=1.0 / self.r)
            elif init == "random":  # both factors random, like nn.Linear's default init
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            else:
                self._init_from_weight(init)

    def _init_from_weight(self, init: str) -> None:
        """PiSSA / OLoRA: factors from a decomposition of W; host weight := W - s B A."""
        w = self.host.weight
        if not w.is_floating_point():
            raise ConfigError(f"{init} init needs a floating-point host weight, got {w.dtype}")
        W = self.weight_2d().detach().to(torch.float32)  # (out, in)
        r, s = self.r, self.scaling
        if r > min(W.shape):
            raise ConfigError(f"{init} init: r={r} exceeds min(out, in)={min(W.shape)} of a weight {tuple(W.shape)}")
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
            root = torch.sqrt(S[:r] / s)  # so that s * B @ A is exactly the top-r part
            a, b = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
        else:  # olora
            Q, R = torch.linalg.qr(W)  # Q (out, k), R (k, in)
            a, b = R[:r], Q[:, :r]
        res = W - s * (b @ a)
        with torch.no_grad():
            self.A.copy_(a.reshape(self.A.shape))
            self.B.copy_(b.reshape(self.B.shape))
            w.copy_(self.to_host_layout(res).to(w.dtype))
        # the initial factors, in the parameters' own shapes, for export and on_delete
        self.register_buffer("lora_A0", self.A.detach().clone(), persistent=False)
        self.register_buffer("lora_B0", self.B.detach().clone(), persistent=False)

    # -- math --------------------------------------------------------------------------
    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """``s * (B A x + b_lora)``; x already dropped out."""
        d = self.lora_branch(x)
        if self.lora_bias is not None:
            d = d + self.channel_view(self.lora_bias)
        return d * self.scaling

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.lora_out(self.dropout(x)).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.to_host_layout((self.b_2d() @ self.a_2d()) * self.scaling)

    # -- merge -------------------------------------------------------------------------
    def check_mergeable(self) -> None:
        if self.tied_with is not None:
            raise NotMergeableError(
                f"cannot merge into a {type(self.host).__name__} whose weight is shared with {self.tied_with!r} "
                f"(tied weights): merging would change {self.tied_with!r} too"
            )

    def merge(self) -> None:
        self.check_mergeable()
        host = self.host
        if self.lora_bias is not None and getattr(host, "bias", None) is None:
            # checked before touching anything, so a failed merge leaves the base intact
            raise NotMergeableError(
                f"cannot merge a LoRA bias into {type(host).__name__} {tuple(host.weight.shape)}: it has no bias"
            )
        super().merge()
        self._merge_bias(+1)

    def unmerge(self) -> None:
        super().unmerge()
        self._merge_bias(-1)

    def _merge_bias(self, sign: int) -> None:
        if self.lora_bias is not None:
            b = self.host.bias
            with torch.no_grad():
                b.add_((sign * self.scaling * self.lora_bias).to(b.dtype))

    def on_delete(self) -> None:
        """PiSSA/OLoRA: give the base its original weight back (W_res + s B0 A0)."""
        a0 = getattr(self, "lora_A0", None)
        if a0 is None:
            return
        w = self.host.weight
        b0 = self.lora_B0
        d = (b0.reshape(b0.shape[0], self.r).float() @ a0.reshape(self.r, -1).float()) * self.scaling
        with torch.no_grad():
            w.copy_((w.float() + self.to_host_layout(d)).to(w.dtype))


class LoRALinear(LoRAPiece):
    """LoRA on an ``nn.Linear`` or a transformers ``Conv1D`` (W stored as (in, out))."""

    def __init__(self, host: nn.Module, cfg: LoRAConfig) -> None:
        self.fan_in_fan_out = not isinstance(host, nn.Linear)  # Conv1D stores W transposed
        w = host.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else (w.shape[0], w.shape[1])
        super().__init__(host, cfg, (cfg.r, in_f), (out_f, cfg.r))

    def as_2d(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.fan_in_fan_out else w

    def to_host_layout(self, d: torch.Tensor) -> torch.Tensor:
        return d.T if self.fan_in_fan_out else d

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., r) -> (..., out)
        return (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T

    def base_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` without the host bias. x: (..., in) -> (..., out)."""
        w = self.host.weight
        return x.to(w.dtype) @ w if self.fan_in_fan_out else F.linear(x.to(w.dtype), w)


class LoRAEmbedding(LoRAPiece):
    """LoRA on an ``nn.Embedding`` (num_embeddings, dim): the "in" side is the vocabulary."""

    A_NAME = "lora_embedding_A"
    B_NAME = "lora_embedding_B"

    def __init__(self, host: nn.Embedding, cfg: LoRAConfig) -> None:
        if cfg.bias:
            raise ConfigError(f"{cfg.method} bias=True is not supported on nn.Embedding (PEFT does not offer it either)")
        num, dim = host.weight.shape
        super().__init__(host, cfg, (cfg.r, num), (dim, cfg.r))
        self.dropout = nn.Identity()  # token ids cannot be dropped out (as in PEFT)

    def _initialise(self, init: str) -> None:
        if init in ("kaiming", "gaussian"):  # PEFT / loralib: A = 0, B ~ N(0, 1)
            with torch.no_grad():
                nn.init.zeros_(self.A)
                nn.init.normal_(self.B)
        elif init == "random":
            with torch.no_grad():
                nn.init.normal_(self.A)
                nn.init.normal_(self.B)
        else:
            self._init_from_weight(init)

    def as_2d(self, w: torch.Tensor) -> torch.Tensor:
        return w.T  # (num, dim) -> (dim, num)

    def to_host_layout(self, d: torch.Tensor) -> torch.Tensor:
        return d.T

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        # x: (...) token ids -> (..., r) -> (..., dim); padding_idx only masks gradients, as in PEFT
        h = F.embedding(x, self.lora_embedding_A.T, padding_idx=self.host.padding_idx,
                        scale_grad_by_freq=self.host.scale_grad_by_freq)
        return h @ self.lora_embedding_B.T

    def base_branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.host.weight)


class LoRAConv2d(LoRAPiece):
    """LoRA on an ``nn.Conv2d``: A = conv(in -> r, host kernel/stride/padding/dilation), B = 1x1 conv."""

    def __init__(self, host: nn.Conv2d, cfg: LoRAConfig) -> None:
        if host.groups != 1:
            raise UnsupportedModuleError(f"{cfg.method} cannot attach to a grouped Conv2d (groups={host.groups})")
        if host.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"{cfg.method} cannot attach to a Conv2d with padding_mode={host.padding_mode!r} (only 'zeros')"
            )
        out_c, in_c, kh, kw = host.weight.shape
        super().__init__(host, cfg, (cfg.r, in_c, kh, kw), (out_c, cfg.r, 1, 1))

    def as_2d(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1)  # (out, in*kh*kw)

    def to_host_layout(self, d: torch.Tensor) -> torch.Tensor:
        return d.reshape(self.host.weight.shape)

    def channel_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 1, 1)  # broadcasts against (B, out, H, W) and (out, H, W)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host
        # x: (B, in, H, W) -> (B, r, H', W') -> (B, out, H', W')
        z = F.conv2d(x.to(self.lora_A.dtype), self.lora_A, None, h.stride, h.padding, h.dilation)
        return F.conv2d(z, self.lora_B)

    def base_branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host
        return F.conv2d(x.to(h.weight.dtype), h.weight, None, h.stride, h.padding, h.dilation, h.groups)


def is_lora_host(m: nn.Module) -> bool:
    return is_linear_like(m) or isinstance(m, (nn.Embedding, nn.Conv2d))


def make_piece(host: nn.Module, cfg: LoRAConfig, kinds: dict[type, type[LoRAPiece]] | None = None) -> LoRAPiece:
    """The piece class for ``host``'s type (``kinds`` lets DoRA pass its own classes)."""
    kinds = kinds or PIECES
    for t, cls in kinds.items():
        if isinstance(host, t):
            return cls(host, cfg)
    if is_linear_like(host):  # transformers Conv1D, matched by name to avoid importing transformers
        return kinds[nn.Linear](host, cfg)
    raise UnsupportedModuleError(f"{cfg.method} cannot attach to a module of type {type(host).__name__}")


PIECES: dict[type, type[LoRAPiece]] = {nn.Linear: LoRALinear, nn.Embedding: LoRAEmbedding, nn.Conv2d: LoRAConv2d}


def find_hosts(model: nn.Module, name: str, cfg: LoRAConfig) -> dict[str, nn.Module]:
    hosts = resolve_targets(
        model, cfg.targets, accept=lambda n, m: is_lora_host(m), defaults=DEFAULT_TARGETS,
        fallback=linear_layers_except_head, what=f"{cfg.method} adapter {name!r}",
    )
    mods = dict(model.named_modules())
    return {h: mods[h] for h in hosts}


def tied_weights(model: nn.Module, hosts: dict[str, nn.Module]) -> dict[str, str]:
    """host path -> another module sharing its weight (GPT-2's wte and lm_head, ...)."""
    owners: dict[int, list[str]] = {}
    for n, m in base_modules(model):
        w = m.__dict__.get("_parameters", {}).get("weight")
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(n)
    out = {}
    for h, host in hosts.items():
        others = [n for n in owners.get(id(host.weight), []) if n != h]
        if others:
            out[h] = others[0]
    return out


def attach_pieces(model: nn.Module, name: str, cfg: LoRAConfig,
                  kinds: dict[type, type[LoRAPiece]] | None = None) -> dict[str, AdapterModule]:
    """One piece per target host; shared by LoRA and DoRA."""
    hosts = find_hosts(model, name, cfg)
    tied = tied_weights(model, hosts)
    if cfg.init in BASE_CHANGING_INITS and tied:
        h = next(iter(tied))
        raise ConfigError(f"{cfg.method} init={cfg.init!r} rewrites the weight of {h!r}, which is shared with "
                          f"{tied[h]!r} (tied weights); that would change {tied[h]!r} too. Use another init "
                          f"or leave {h!r} out of targets")
    pieces: dict[str, AdapterModule] = {}
    try:
        for h, host in hosts.items():
            p = make_piece(host, cfg, kinds)
            p.tied_with = tied.get(h)
            pieces[h] = p
    except BaseException:
        for p in pieces.values():  # PiSSA/OLoRA already rewrote some base weights: undo
            p.on_delete()
        raise
    return pieces


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, LoRAConfig)
    return attach_pieces(model, name, cfg)


def export(cfg: AdapterConfig, tensors: dict[str, Any], pieces: dict[str, AdapterModule]
           ) -> tuple[AdapterConfig, dict[str, Any]]:
    """Save PiSSA/OLoRA as a plain LoRA relative to the ORIGINAL base weight (PEFT's conversion).

    W_res + s B A = W + s (B A - B0 A0) = W + s' B' A' with A' = [A; A0] (2r, in),
    B' = [B, -B0] (out, 2r), r' = 2r and alpha' chosen so that s' = s:
    alpha' = 2 alpha (s = alpha/r), or sqrt(2) alpha with rsLoRA (s = alpha/sqrt(r)).
    """
    assert isinstance(cfg, LoRAConfig)
    if cfg.init not in BASE_CHANGING_INITS:
        return cfg, tensors
    out = dict(tensors)
    for host_name, piece in pieces.items():
        assert isinstance(piece, LoRAPiece)
        pre = f"{host_name}." if host_name else ""
        ka, kb = pre + piece.A_NAME, pre + piece.B_NAME
        a0, b0 = piece.lora_A0, piece.lora_B0
        out[ka] = torch.cat([tensors[ka], a0.to(tensors[ka].dtype)], dim=0)
        out[kb] = torch.cat([tensors[kb], -b0.to(tensors[kb].dtype)], dim=1)
    alpha = cfg.alpha * (math.sqrt(2.0) if cfg.use_rslora else 2.0)
    return cfg.replace(r=2 * cfg.r, alpha=alpha, init="gaussian"), out


register(MethodSpec(name="lora", config_cls=LoRAConfig, attach=attach, mergeable=True, export=export,
                    paper="LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021)"))
