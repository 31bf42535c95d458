"""CorDA: Context-Oriented Decomposition Adaptation of Large Language Models
(Yang et al., 2024, https://arxiv.org/abs/2406.05223).

For each target W (out, in), the covariance of its input activations over a few calibration
samples, C = X^T X / N (in, in), orients the decomposition::

    C' = C + damp * mean(diag C) * I            (damping keeps C' invertible, as in PEFT)
    W C' = U S V^T   =>   W = U S (V^T C'^-1)   (exact)

and r of those components become a trainable LoRA (the rest stay frozen):

* ``mode="kpm"`` (knowledge-preserved): the r components with the SMALLEST singular values,
  calibrated on data whose knowledge should be kept (e.g. QA samples): the frozen part keeps
  what the model does on that context;
* ``mode="ipm"`` (instruction-previewed): the LARGEST r, calibrated on the fine-tuning task's
  instructions: the adapter starts with the components that matter for the task.

With s = alpha / r: B0 = U_r sqrt(S_r / s) (out, r), A0 = sqrt(S_r / s) V_r^T C'^-1 (r, in),
so s B0 A0 is exactly the chosen part of W. The paper (and PEFT) rewrite the base weight into the
residual W - s B0 A0; here the base stays shared and the piece adds ``s (B A - B0 A0) x`` (same
model, same gradients): ``lora_A``/``lora_B`` train, B0/A0 are persistent buffers
(``corda_A0``/``corda_B0``: data-derived, saved, so loading needs no calibration data).
Mergeable: delta = s (B A - B0 A0). Trainable parameters: r (in + out) per target.

Usage::

    cfg = prepare_corda(model, CorDAConfig(r=8, mode="kpm"), batches)   # covariances via hooks
    ak.add_adapter(model, "c", cfg)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule, main_input, upcast
from .lora_xs import LinearPiece, attach_linear, check_float, check_positive_int, find_linear_hosts, run_batch, stash, take


@dataclass(frozen=True)
class CorDAConfig(AdapterConfig):
    """CorDA hyper-parameters.

    r: number of trainable components (rank). alpha: scaling numerator, s = alpha / r.
    mode: "kpm" (adapt the smallest-r context-oriented components) or "ipm" (the largest r).
    damp: relative damping added to the covariance's diagonal (doubled until C is positive definite).
    init_from: "prepare" (covariances from :func:`prepare_corda`) or "file" (set when loading).
    """

    method = "corda"
    r: int = 8
    alpha: float = 16.0
    mode: str = "kpm"
    damp: float = 0.01
    init_from: str = "prepare"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_float(self, "alpha", strict=True)
        check_float(self, "damp", strict=True)
        if self.mode not in ("kpm", "ipm"):
            raise ConfigError(f"CorDAConfig.mode must be 'kpm' (knowledge-preserved) or 'ipm' "
                              f"(instruction-previewed), got {self.mode!r}")
        if self.init_from not in ("prepare", "file"):
            raise ConfigError(f"CorDAConfig.init_from must be 'prepare' or 'file', got {self.init_from!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def for_loading(self) -> "CorDAConfig":
        return self.replace(init_from="file")  # type: ignore[return-value]


def damped(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """C + damp * mean(diag C) * I, damp doubled until Cholesky succeeds (C' positive definite)."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    scale = cov.diagonal().mean().clamp_min(1e-12)
    for _ in range(30):
        c = cov + damp * scale * eye
        if torch.linalg.cholesky_ex(c).info.item() == 0:
            return c
        damp *= 2
    raise ConfigError("CorDA: the input covariance is not usable (NaN/Inf or degenerate); check the batches")


def corda_factors(w: torch.Tensor, cov: torch.Tensor, r: int, mode: str, scaling: float, damp: float,
                  where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r)) with s B0 A0 = the chosen r components of W = U S V^T C'^-1."""
    w = w.detach().float()
    if r > min(w.shape):
        raise ConfigError(f"corda: r={r} exceeds min(out, in)={min(w.shape)} of the weight {tuple(w.shape)} of {where!r}")
    c = damped(cov.float(), damp)
    U, S, Vh = torch.linalg.svd(w @ c, full_matrices=False)  # (out, k), (k,), (k, in)
    sel = slice(0, r) if mode == "ipm" else slice(S.shape[0] - r, S.shape[0])
    U, S, Vh = U[:, sel], S[sel], Vh[sel]
    Vc = torch.linalg.solve(c, Vh.T).T  # V^T C'^-1 (C' symmetric), (r, in)
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vc, U * root[None, :]


class CorDAPiece(LinearPiece):
    """``y + s (B A - B0 A0) x`` on one Linear/Conv1D host."""

    def __init__(self, host: nn.Module, cfg: CorDAConfig, A0: torch.Tensor, B0: torch.Tensor) -> None:
        super().__init__(host, cfg.method)
        w = host.weight
        self.r, self.scaling = cfg.r, cfg.scaling
        self.lora_A = nn.Parameter(A0.to(w.device, w.dtype).clone())
        self.lora_B = nn.Parameter(B0.to(w.device, w.dtype).clone())
        self.register_buffer("corda_A0", A0.to(w.device, w.dtype).clone())
        self.register_buffer("corda_B0", B0.to(w.device, w.dtype).clone())

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.lora_A.dtype)
        new = (xc @ self.lora_A.T) @ self.lora_B.T  # (..., in) -> (..., r) -> (..., out)
        old = (xc @ self.corda_A0.T) @ self.corda_B0.T
        return y + ((new - old) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        # B A - B0 A0 cancels (both start equal): formed in fp32 at least, then cast back
        d = upcast(self.lora_B) @ upcast(self.lora_A) - upcast(self.corda_B0) @ upcast(self.corda_A0)
        return self.to_host_layout((self.scaling * d).to(self.lora_A.dtype))


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, CorDAConfig)
    covs = take(model, cfg, "prepare_corda") if cfg.init_from == "prepare" else None

    def make(h: str, host: nn.Module) -> LinearPiece:
        geo = LinearPiece(host, cfg.method)
        if covs is None:  # loading: the file fills every tensor
            return CorDAPiece(host, cfg, torch.zeros(cfg.r, geo.in_features), torch.zeros(geo.out_features, cfg.r))
        cov = covs.get(h)
        if cov is None:
            raise ConfigError(f"corda: no calibration inputs reached {h!r}; is it used by the model's forward?")
        A0, B0 = corda_factors(geo.weight_2d(), cov, cfg.r, cfg.mode, cfg.scaling, cfg.damp, h)
        return CorDAPiece(host, cfg, A0, B0)

    return attach_linear(model, name, cfg, make)


@torch.no_grad()
def collect_covariances(model: nn.Module, hosts: dict[str, nn.Module], batches: Iterable[Any],
                        forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, torch.Tensor]:
    """Mean input covariance X^T X / N (in, in), float32, of every host over all tokens of ``batches``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(h: str):
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = main_input(mod, args, kwargs).detach().float()
            x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            sums[h] = sums[h] + x.T @ x if h in sums else x.T @ x
            counts[h] = counts.get(h, 0) + x.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(h), with_kwargs=True) for h, m in hosts.items()]
    n = 0
    try:
        for batch in batches:
            (forward_fn or run_batch)(model, batch)
            n += 1
    finally:
        for hd in handles:
            hd.remove()
    if n == 0:
        raise ConfigError("prepare_corda: no batches given; the covariances need at least one")
    return {h: s / counts[h] for h, s in sums.items()}


def prepare_corda(model: nn.Module, cfg: CorDAConfig, batches: Iterable[Any],
                  forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> CorDAConfig:
    """Run ``batches`` through ``model`` (no gradients) to collect each target's input covariance,
    and keep them for ``add_adapter(model, name, cfg)`` (which consumes them). Returns ``cfg``.

    ``batches``: tensors (passed positionally), tuples (positional) or dicts (keyword arguments),
    or any objects with ``forward_fn(model, batch)``. kpm: use samples of the knowledge to keep
    (e.g. QA data); ipm: samples of the fine-tuning task."""
    if not isinstance(cfg, CorDAConfig):
        raise ConfigError(f"prepare_corda needs a CorDAConfig, got {type(cfg).__name__}")
    hosts = find_linear_hosts(model, "corda", cfg)
    stash(model, cfg, collect_covariances(model, hosts, batches, forward_fn))
    return cfg


register(MethodSpec(name="corda", config_cls=CorDAConfig, attach=attach, mergeable=True,
                    paper="CorDA: Context-Oriented Decomposition Adaptation of Large Language Models (Yang et al., 2024)"))
