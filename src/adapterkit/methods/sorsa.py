"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation
(Cao, 2024, https://arxiv.org/abs/2409.00055).

The host weight W (out, in) is split by its SVD W = U S V^T into a principal part of the top r
singular triplets and a frozen residual::

    W = W_r + W_p,   W_p = U_p diag(S_p) V_p^T,   U_p (out, r), S_p (r,), V_p^T (r, in)

U_p, S_p, V_p^T train (parameters ``sorsa_U``, ``sorsa_S``, ``sorsa_Vh``); W_r stays frozen. The
paper's orthonormal regularizer, returned by :meth:`SORSAPiece.regularization` (summed over
targets by ``adapterkit.api.regularization_loss``)::

    gamma * (||U_p^T U_p - I||_F^2 + ||V_p^T V_p - I||_F^2)     (V_p^T V_p: rows of V_p^T orthonormal)

(the squared form, whose gradient 4 U_p (U_p^T U_p - I) the paper analyses; the authors' code
uses the unsquared norm averaged over matrices; both vanish exactly at orthonormality).

Instead of rewriting the base weight into W_r (as the paper's code does), the piece keeps the
initial triplet (U0, S0, V0^T: non-persistent buffers, recomputed from the base by the same SVD
when loading) and adds ``(U_p S_p V_p^T - U0 S0 V0^T) x``: the same model and gradients, while
the base stays shared by other adapters and mixed batches. Mergeable:
``delta_weight = U_p S_p V_p^T - U0 S0 V0^T``. Trainable parameters: r (out + in + 1) per target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule, upcast
from .lora_xs import LinearPiece, attach_linear, check_float, check_positive_int, svd_top


@dataclass(frozen=True)
class SORSAConfig(AdapterConfig):
    """SORSA hyper-parameters.

    r: number of principal singular triplets that train (r <= min(out, in) of every target).
    gamma: weight of the orthonormal regularizer (0 disables it).
    """

    method = "sorsa"
    r: int = 8
    gamma: float = 4e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_float(self, "gamma")


class SORSAPiece(LinearPiece):
    """Trainable principal triplet over the frozen residual of one Linear/Conv1D host."""

    def __init__(self, host: nn.Module, cfg: SORSAConfig, where: str) -> None:
        super().__init__(host, cfg.method)
        self.r, self.gamma = cfg.r, cfg.gamma
        U, S, Vh = svd_top(self.weight_2d(), cfg.r, where)  # (out, r), (r,), (r, in)
        dt, dev = host.weight.dtype, host.weight.device
        self.sorsa_U = nn.Parameter(U.to(dev, dt).clone())
        self.sorsa_S = nn.Parameter(S.to(dev, dt).clone())
        self.sorsa_Vh = nn.Parameter(Vh.to(dev, dt).clone())
        # the initial principal part, recomputable from the base: subtracted so W_r stays W - W_p0
        self.register_buffer("sorsa_U0", U.to(dev, dt), persistent=False)
        self.register_buffer("sorsa_S0", S.to(dev, dt), persistent=False)
        self.register_buffer("sorsa_Vh0", Vh.to(dev, dt), persistent=False)

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.sorsa_U.dtype)
        new = ((xc @ self.sorsa_Vh.T) * self.sorsa_S) @ self.sorsa_U.T  # (..., in) -> (..., r) -> (..., out)
        old = ((xc @ self.sorsa_Vh0.T) * self.sorsa_S0) @ self.sorsa_U0.T
        return y + (new - old).to(y.dtype)

    def principal(self) -> torch.Tensor:
        """W_p = U_p diag(S_p) V_p^T, (out, in)."""
        return (self.sorsa_U * self.sorsa_S) @ self.sorsa_Vh

    def delta_weight(self) -> torch.Tensor:
        # W_p - W_p0: a small difference of two large products, so formed in fp32 at least
        new = (upcast(self.sorsa_U) * upcast(self.sorsa_S)) @ upcast(self.sorsa_Vh)
        old = (upcast(self.sorsa_U0) * upcast(self.sorsa_S0)) @ upcast(self.sorsa_Vh0)
        return self.to_host_layout((new - old).to(self.sorsa_U.dtype))

    def regularization(self) -> torch.Tensor | None:
        if self.gamma == 0:
            return None
        U, Vh = self.sorsa_U.float(), self.sorsa_Vh.float()
        eye = torch.eye(self.r, device=U.device)
        return self.gamma * ((U.T @ U - eye).pow(2).sum() + (Vh @ Vh.T - eye).pow(2).sum())


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, SORSAConfig)
    return attach_linear(model, name, cfg, lambda h, host: SORSAPiece(host, cfg, h))


register(MethodSpec(name="sorsa", config_cls=SORSAConfig, attach=attach, mergeable=True,
                    paper="SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of "
                          "Large Language Models (Cao, 2024)"))
