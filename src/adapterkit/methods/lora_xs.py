"""LoRA-XS and LoRA-SB: a trainable r x r core between frozen projections.

* LoRA-XS (Bałazy et al., 2024, https://arxiv.org/abs/2405.17604, "LoRA-XS: Low-Rank Adaptation
  with Extremely Small Number of Parameters"): with the truncated SVD W ~ U_r S_r V_r^T of the
  host weight (out, in), the frozen projections are ``B = U_r S_r`` (out, r) and ``A = V_r^T``
  (r, in), and only ``R`` (r, r) trains::

      y = W x + b + s * B R A x,      delta_weight = s * B R A,   s = alpha / r (1 if alpha is None)

  ``A``/``B`` are recomputable from the base weight, so they are non-persistent buffers: the
  file holds only ``lora_R``, r^2 numbers per target. Singular vectors are sign-canonicalised
  (largest-magnitude entry of each column of U positive) so the recomputation is stable.
  ``R`` starts at 0 (the adapter starts as the identity) unless ``init_std > 0``.

* LoRA-SB (Ponkshe et al., 2024, https://arxiv.org/abs/2411.19557, "Initialization using Update
  Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning"): the same
  ``B R A`` structure, initialised from the first full-fine-tuning update. With Ĝ the weight
  gradient averaged over a few batches, the first update is ``dW = -init_lr * sign(Ĝ)`` (the first
  Adam step, what the authors' code uses; ``init_update="sgd"``: ``-init_lr * Ĝ``). Its truncated
  SVD ``dW ~ U_r S_r V_r^T`` gives ``B = U_r``, ``A = V_r^T``, ``R = S_r / s``, so at the start
  ``s B R A`` is the best rank-r approximation of that step (the paper's optimal initialisation;
  B and A are orthonormal, which is what removes the need to tune the scale; the authors use
  s = 1, the default here). The base weight is left unchanged (``init_lr=0`` starts from the
  identity with the same subspaces). B and A come from data, so they are persistent buffers
  saved with the adapter.

  Usage::

      cfg = prepare_lora_sb(model, LoRASBConfig(r=8), batches)   # gradients, no optimizer step
      ak.add_adapter(model, "sb", cfg)

This module also holds the helpers the other SVD/low-rank methods share (:class:`LinearPiece`,
:func:`attach_linear`, :class:`SnapshotMergeMixin`, the prepared-statistics stash).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NotMergeableError, UnsupportedModuleError
from ..inject import is_linear_like, linear_layers_except_head, resolve_targets
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora import DEFAULT_TARGETS, tied_weights


# -- shared helpers ------------------------------------------------------------------------
def check_positive_int(cfg: AdapterConfig, field: str, minimum: int = 1) -> None:
    v = getattr(cfg, field)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{type(cfg).__name__}.{field} must be an integer >= {minimum}, got {v!r}")


def check_float(cfg: AdapterConfig, field: str, lo: float = 0.0, allow_none: bool = False, strict: bool = False) -> None:
    v = getattr(cfg, field)
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > lo if strict else v >= lo)
    if not ok:
        raise ConfigError(f"{type(cfg).__name__}.{field} must be a number {'>' if strict else '>='} {lo}, got {v!r}")


class LinearPiece(AdapterModule):
    """A piece on an ``nn.Linear`` or transformers ``Conv1D`` host, seen as a matrix W (out, in)."""

    #: another module sharing the host's weight (set by :func:`attach_linear`)
    tied_with: str | None = None

    def __init__(self, host: nn.Module, method: str) -> None:
        super().__init__()
        if not is_linear_like(host):
            raise UnsupportedModuleError(f"{method} cannot attach to a module of type {type(host).__name__} "
                                         "(only nn.Linear and transformers Conv1D)")
        self.bind(host)
        self.fan_in_fan_out = not isinstance(host, nn.Linear)  # Conv1D stores W as (in, out)
        w = host.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else tuple(w.shape)

    def as_2d(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.fan_in_fan_out else w

    def weight_2d(self) -> torch.Tensor:
        """The host weight as a matrix (out, in)."""
        return self.as_2d(self.host.weight)

    def to_host_layout(self, d: torch.Tensor) -> torch.Tensor:
        return d.T if self.fan_in_fan_out else d

    def base_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` without bias. x: (..., in) -> (..., out)."""
        w = self.host.weight
        return x.to(w.dtype) @ w if self.fan_in_fan_out else F.linear(x.to(w.dtype), w)

    def param_like(self, *shape: int) -> nn.Parameter:
        w = self.host.weight
        return nn.Parameter(torch.zeros(shape, device=w.device, dtype=w.dtype))

    def check_mergeable(self) -> None:
        if self.tied_with is not None:
            raise NotMergeableError(f"cannot merge into a {type(self.host).__name__} whose weight is shared with "
                                    f"{self.tied_with!r} (tied weights): merging would change it too")

    def merge(self) -> None:
        self.check_mergeable()
        super().merge()


class SnapshotMergeMixin:
    """Merge for pieces whose delta depends on W itself (Hydra, Bone): W' = f(W).

    The exact W is kept from merge to unmerge (bit-exact restore); if W changed in between
    (another adapter merged on top), unmerge takes back only the change it made.
    Subclasses implement ``merged_weight(w) -> w'`` in the host layout.
    """

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge(self) -> None:
        self.check_mergeable()  # type: ignore[attr-defined]
        w = self.host.weight  # type: ignore[attr-defined]
        with torch.no_grad():
            before = w.detach().clone()
            w.copy_(self.merged_weight(before).to(w.dtype))
        self.register_buffer("_w_before_merge", before, persistent=False)  # type: ignore[attr-defined]
        self.merged = True

    def unmerge(self) -> None:
        w, before = self.host.weight, self._w_before_merge  # type: ignore[attr-defined]
        with torch.no_grad():
            merged = self.merged_weight(before).to(w.dtype)
            if torch.equal(w, merged):
                w.copy_(before)
            else:
                w.sub_(merged - before)
        del self._w_before_merge  # type: ignore[attr-defined]
        self.merged = False


def find_linear_hosts(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, nn.Module]:
    """Target Linear/Conv1D modules of ``cfg`` (``targets=None``: LoRA's default targets)."""
    hosts = resolve_targets(model, cfg.targets, accept=lambda n, m: is_linear_like(m), defaults=DEFAULT_TARGETS,
                            fallback=linear_layers_except_head, what=f"{cfg.method} adapter {name!r}")
    mods = dict(model.named_modules())
    return {h: mods[h] for h in hosts}


def attach_linear(model: nn.Module, name: str, cfg: AdapterConfig,
                  make: Callable[[str, nn.Module], LinearPiece]) -> dict[str, AdapterModule]:
    """One piece per target host: ``make(host_path, host)``."""
    hosts = find_linear_hosts(model, name, cfg)
    tied = tied_weights(model, hosts)
    pieces: dict[str, AdapterModule] = {}
    for h, host in hosts.items():
        p = make(h, host)
        p.train(host.training)  # a piece added to a model in eval mode starts in eval mode too
        p.tied_with = tied.get(h)
        pieces[h] = p
    return pieces


def svd_top(w: torch.Tensor, r: int, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD of a matrix (out, in) in float32, signs canonicalised.

    Returns U (out, r), S (r,), Vh (r, in). Each singular pair is flipped so that the
    largest-magnitude entry of U[:, i] is positive: recomputing from the same W gives the
    same factors (needed where the factors are non-persistent buffers)."""
    if r > min(w.shape):
        raise ConfigError(f"r={r} exceeds min(out, in)={min(w.shape)} of the weight {tuple(w.shape)} of {where!r}")
    U, S, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True))).reshape(-1)
    sign[sign == 0] = 1
    return U * sign, S, Vh * sign[:, None]


# -- statistics computed from data before add_adapter (LoRA-SB, CorDA) -----------------------
def stash(model: nn.Module, cfg: AdapterConfig, stats: dict[str, Any]) -> None:
    """Keep per-host statistics on the model until ``add_adapter(model, name, cfg)`` uses them."""
    model.__dict__.setdefault("_adapterkit_prepared", {})[cfg] = stats


def take(model: nn.Module, cfg: AdapterConfig, prepare: str) -> dict[str, Any]:
    got = model.__dict__.get("_adapterkit_prepared", {}).pop(cfg, None)
    if got is None:
        raise ConfigError(f"{cfg.method} needs statistics from data: call adapterkit.methods.{prepare}(model, cfg, "
                          f"batches) with this exact config before add_adapter (or load a saved adapter)")
    return got


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call the model on one batch: a dict (keyword arguments), a tuple/list (positional) or a tensor."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def default_lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Causal-LM loss of a transformers model: a tensor of token ids or a dict with
    ``input_ids`` (``labels`` default to the ids)."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ConfigError("batches must be token-id tensors or dicts with 'input_ids' (or pass loss_fn=...)")
    batch = {"labels": batch["input_ids"], **batch}
    out = model(**batch)
    loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(f"{type(model).__name__} returned no loss for the batch; pass loss_fn=(model, batch) -> loss")
    return loss


# -- LoRA-XS / LoRA-SB -----------------------------------------------------------------------
@dataclass(frozen=True)
class LoRAXSConfig(AdapterConfig):
    """LoRA-XS hyper-parameters.

    r: size of the trainable core R (r x r), r <= min(out, in) of every target.
    alpha: scaling numerator, s = alpha / r; None means s = 1.
    init_std: R ~ N(0, init_std^2) at creation; 0 (default) starts as the identity.
    """

    method = "lora_xs"
    r: int = 8
    alpha: float | None = None
    init_std: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_float(self, "alpha", allow_none=True, strict=True)
        check_float(self, "init_std")

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


@dataclass(frozen=True)
class LoRASBConfig(LoRAXSConfig):
    """LoRA-SB hyper-parameters: those of :class:`LoRAXSConfig` (``init_std`` unused), plus

    init_lr: step size of the simulated first full-fine-tuning step; the adapter starts at
    its best rank-r approximation (0: identity start; the authors use the first warm-up
    step's learning rate). init_update: "adam" (dW = -init_lr * sign(grad), the first Adam
    step) or "sgd" (dW = -init_lr * grad).
    init_from: "prepare" (statistics from :func:`prepare_lora_sb`) or "file" (empty
    projections filled by ``load_adapter``; set automatically when loading).
    """

    method = "lora_sb"
    init_lr: float = 1e-4
    init_update: str = "adam"
    init_from: str = "prepare"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(self, "init_lr")
        if self.init_update not in ("adam", "sgd"):
            raise ConfigError(f"LoRASBConfig.init_update must be 'adam' or 'sgd', got {self.init_update!r}")
        if self.init_from not in ("prepare", "file"):
            raise ConfigError(f"LoRASBConfig.init_from must be 'prepare' or 'file', got {self.init_from!r}")

    def for_loading(self) -> "LoRASBConfig":
        return self.replace(init_from="file")  # type: ignore[return-value]


class LoRAXSPiece(LinearPiece):
    """``y + s * B R A x``: ``lora_A`` (r, in), ``lora_B`` (out, r) frozen buffers, ``lora_R`` (r, r) trained."""

    def __init__(self, host: nn.Module, cfg: LoRAXSConfig, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor,
                 persistent: bool) -> None:
        super().__init__(host, cfg.method)
        w = host.weight
        self.r, self.scaling = cfg.r, cfg.scaling
        self.register_buffer("lora_A", A.to(w.device, w.dtype).contiguous(), persistent=persistent)
        self.register_buffer("lora_B", B.to(w.device, w.dtype).contiguous(), persistent=persistent)
        self.lora_R = nn.Parameter(R.to(w.device, w.dtype).contiguous())

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., r) -> (..., r) -> (..., out)
        h = ((x.to(self.lora_R.dtype) @ self.lora_A.T) @ self.lora_R.T) @ self.lora_B.T
        return y + (h * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.to_host_layout(self.scaling * (self.lora_B @ self.lora_R @ self.lora_A))


def attach_xs(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, LoRAXSConfig)

    def make(h: str, host: nn.Module) -> LinearPiece:
        p = LinearPiece(host, cfg.method)  # geometry only: validates the host type
        U, S, Vh = svd_top(p.weight_2d(), cfg.r, h)
        R = torch.randn(cfg.r, cfg.r) * cfg.init_std if cfg.init_std > 0 else torch.zeros(cfg.r, cfg.r)
        return LoRAXSPiece(host, cfg, A=Vh, B=U * S, R=R, persistent=False)

    return attach_linear(model, name, cfg, make)


def attach_sb(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, LoRASBConfig)
    grads = take(model, cfg, "prepare_lora_sb") if cfg.init_from == "prepare" else None
    r = cfg.r

    def make(h: str, host: nn.Module) -> LinearPiece:
        geo = LinearPiece(host, cfg.method)
        if grads is None:  # loading: the file fills A, B and R
            z = torch.zeros
            return LoRAXSPiece(host, cfg, z(r, geo.in_features), z(geo.out_features, r), z(r, r), persistent=True)
        g = grads.get(h)
        if g is None or not torch.any(g != 0):
            raise ConfigError(f"lora_sb: the batches gave no gradient for {h!r}; is it used by the model's forward?")
        step = torch.sign(g) if cfg.init_update == "adam" else g  # Adam's first step is lr * sign(g)
        U, S, Vh = svd_top(-cfg.init_lr * step if cfg.init_lr > 0 else -step, r, h)  # dW
        R = torch.diag(S / cfg.scaling) if cfg.init_lr > 0 else torch.zeros(r, r)
        return LoRAXSPiece(host, cfg, A=Vh, B=U, R=R, persistent=True)

    return attach_linear(model, name, cfg, make)


def estimate_weight_gradients(model: nn.Module, hosts: dict[str, nn.Module], batches: Iterable[Any],
                              loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Mean gradient of the loss w.r.t. each host's weight, as a matrix (out, in) in float32.

    Uses ``torch.autograd.grad`` (no ``.grad`` is written, nothing is stepped); the
    weights' ``requires_grad`` flags are restored afterwards."""
    loss_fn = loss_fn or default_lm_loss
    names = list(hosts)
    weights = [hosts[h].weight for h in names]
    flags = [w.requires_grad for w in weights]
    sums: list[torch.Tensor | None] = [None] * len(names)
    n = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            gs = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
            for i, g in enumerate(gs):
                if g is not None:
                    sums[i] = g.float() if sums[i] is None else sums[i] + g.float()
            n += 1
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    if n == 0:
        raise ConfigError("no batches given: the gradient estimate needs at least one batch")
    out = {}
    for h, s in zip(names, sums):
        if s is not None:
            s = s / n
            out[h] = s.T if not isinstance(hosts[h], nn.Linear) else s  # Conv1D: (in, out) -> (out, in)
    return out


def prepare_lora_sb(model: nn.Module, cfg: LoRASBConfig, batches: Iterable[Any],
                    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> LoRASBConfig:
    """Estimate the first full-fine-tuning gradient of every target weight over ``batches``
    and keep it for ``add_adapter(model, name, cfg)`` (which consumes it). Returns ``cfg``.

    ``loss_fn(model, batch) -> loss``; default: the causal-LM loss of a transformers model
    (batches of token ids, or dicts with ``input_ids``)."""
    if not isinstance(cfg, LoRASBConfig):
        raise ConfigError(f"prepare_lora_sb needs a LoRASBConfig, got {type(cfg).__name__}")
    hosts = find_linear_hosts(model, "lora_sb", cfg)
    stash(model, cfg, estimate_weight_gradients(model, hosts, batches, loss_fn))
    return cfg


register(MethodSpec(name="lora_xs", config_cls=LoRAXSConfig, attach=attach_xs, mergeable=True,
                    paper="LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., 2024)"))
register(MethodSpec(name="lora_sb", config_cls=LoRASBConfig, attach=attach_sb, mergeable=True,
                    paper="Initialization using Update Approximation is a Silver Bullet for Extremely Efficient "
                          "Low-Rank Fine-Tuning (LoRA-SB, Ponkshe et al., 2024)"))
