"""Gaussian-codebook quantization of adapter weights (Jie et al., 2023).

"Revisiting the Parameter Efficiency of Adapters from the Perspective of Precision
Redundancy" (https://arxiv.org/abs/2307.16867): adapter weights are close to Gaussian, so
each group (see :mod:`.groups`) is standardised and snapped to the ``L = 2**bits`` levels
that minimise the quantization error of a standard normal variable::

    mu, sigma = mean(g), sqrt(var(g) + eps^2)        per group g
    code      = argmin_j |(w - mu) / sigma - level_j|  (nearest level; thresholds = midpoints)
    deq(w)    = level_code * sigma + mu

1 bit is "sign + scale": levels +-sqrt(2/pi) (Lloyd-Max), i.e. w ~ mu + sign(w - mu) * 0.798 sigma.

Codebooks (``rule``):

* ``"lloyd"`` (default): the Lloyd-Max quantizer of N(0, 1) -- each level the conditional
  mean of its bin, thresholds the midpoints -- the MSE-optimal L-level quantizer;
* ``"median"``: the fixed point used by the authors' released code (each level the
  probability-median of its bin, ``ppf((cdf(lo) + cdf(hi)) / 2)``; 1 bit: +-0.674).

Training (QAT) uses :func:`fake_quantize_normal`: the forward value is exactly the
dequantized weight; the gradient is the paper's straight-through estimator through the
standardisation: ``w_q = ((q + w_n - sg(w_n)) * sigma + mu``, with ``sg`` stop-gradient, so
gradients flow to the latent fp weight and through mu and sigma.
``sigma`` uses ``sqrt(var + eps^2)`` (the paper: ``std + 1e-5``) so a constant group has a
finite gradient.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..errors import ConfigError
from .groups import group_view
from .pack import check_bits

RULES = ("lloyd", "median")
EPS = 1e-5
MAX_ITERS = 3000


@lru_cache(maxsize=None)
def _codebook64(bits: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = 2**bits
    # start from the Panter-Dite compander (level density ~ pdf^(1/3): the N(0, 3) quantiles,
    # asymptotically MSE-optimal), refine with fixed-point steps. Lloyd's iteration is slow for
    # many levels: 8 bits stops at the cap, within ~1e-5 of the fixed point (far below float32
    # weight noise); 1-4 bits converge to 1e-13.
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    levels = torch.special.ndtri(u) * (3.0**0.5 if rule == "lloyd" else 1.0)
    for _ in range(MAX_ITERS):
        t = (levels[1:] + levels[:-1]) / 2  # (n-1,) thresholds
        edges = torch.cat([t.new_tensor([-torch.inf]), t, t.new_tensor([torch.inf])])  # (n+1,)
        cdf = torch.special.ndtr(edges)
        if rule == "lloyd":  # E[X | lo < X < hi] = (pdf(lo) - pdf(hi)) / (cdf(hi) - cdf(lo))
            pdf = torch.exp(-0.5 * edges.clamp(-40, 40) ** 2) / (2 * torch.pi) ** 0.5
            new = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])
        else:
            new = torch.special.ndtri((cdf[1:] + cdf[:-1]) / 2)
        done = float((new - levels).abs().max()) < 1e-13
        levels = new
        if done:
            break
    return levels, (levels[1:] + levels[:-1]) / 2


def normal_codebook(bits: int, rule: str = "lloyd") -> tuple[torch.Tensor, torch.Tensor]:
    """(levels (2**bits,), thresholds (2**bits - 1,)) for N(0, 1), float32, ascending."""
    check_bits(bits)
    if rule not in RULES:
        raise ConfigError(f"codebook rule must be one of {', '.join(RULES)}, got {rule!r}")
    levels, thresholds = _codebook64(bits, rule)
    return levels.float(), thresholds.float()


def _stats(g: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and sigma = sqrt(var + eps^2), each (G,). Differentiable."""
    mu = g.mean(dim=1)
    var = g.var(dim=1, unbiased=False)
    return mu, torch.sqrt(var + eps * eps)


def quantize_normal(w: torch.Tensor, bits: int, group_size: int | None = None, rule: str = "lloyd",
                    eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (rows, cols) -> (codes uint8 (rows, cols) in [0, 2**bits), mean (G,), sigma (G,)) float32."""
    levels, thresholds = normal_codebook(bits, rule)
    g = group_view(w.detach().float(), group_size)  # (G, n)
    mu, sigma = _stats(g, eps)
    wn = (g - mu[:, None]) / sigma[:, None]
    # nearest level == the bin between consecutive midpoints (ties go to the lower level)
    codes = torch.bucketize(wn, thresholds.to(wn.device))
    return codes.to(torch.uint8).reshape(w.shape), mu, sigma


def dequantize_normal(codes: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor, bits: int,
                      group_size: int | None = None, rule: str = "lloyd") -> torch.Tensor:
    """Inverse of :func:`quantize_normal`: float32 (rows, cols) = level[code] * sigma + mean."""
    levels, _ = normal_codebook(bits, rule)
    g = group_view(codes, group_size).long()  # (G, n)
    if mean.shape != (g.shape[0],) or sigma.shape != (g.shape[0],):
        raise ConfigError(f"quantization statistics have shapes {tuple(mean.shape)}, {tuple(sigma.shape)}; codes "
                          f"{tuple(codes.shape)} with group_size={group_size} need ({g.shape[0]},)")
    q = levels.to(codes.device)[g]
    return (q * sigma.float()[:, None] + mean.float()[:, None]).reshape(codes.shape)


def fake_quantize_normal(w: torch.Tensor, bits: int, group_size: int | None = None, rule: str = "lloyd",
                         eps: float = EPS, deq: torch.Tensor | None = None) -> torch.Tensor:
    """QAT forward: value = the dequantized weight (or ``deq`` if given: e.g. codes loaded from a
    file), gradient = the paper's straight-through estimator. w (rows, cols) -> same shape/dtype."""
    levels, thresholds = normal_codebook(bits, rule)
    g = group_view(w.float(), group_size)  # (G, n)
    mu, sigma = _stats(g, eps)
    wn = (g - mu[:, None]) / sigma[:, None]
    q = levels.to(w.device)[torch.bucketize(wn.detach(), thresholds.to(w.device))]  # (G, n)
    ste = ((q + wn - wn.detach()) * sigma[:, None] + mu[:, None]).reshape(w.shape)
    if deq is None:
        deq = (q * sigma.detach()[:, None] + mu.detach()[:, None]).reshape(w.shape)
    # value exactly ``deq`` (ste - sg(ste) is 0.0), gradient that of ``ste``
    return (deq.float() + (ste - ste.detach())).to(w.dtype)


# -- references ------------------------------------------------------------------------------
def quantize_normal_reference(w: torch.Tensor, bits: int, group_size: int | None = None, rule: str = "lloyd",
                              eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_normal` group by group, nearest level by explicit distance argmin."""
    levels, _ = normal_codebook(bits, rule)
    g = group_view(w.detach().float(), group_size)
    codes, mus, sigmas = [], [], []
    for row in g:
        mu = row.mean()
        sigma = torch.sqrt(((row - mu) ** 2).mean() + eps * eps)
        wn = (row - mu) / sigma
        codes.append((wn[:, None] - levels[None, :]).abs().argmin(dim=1))
        mus.append(mu)
        sigmas.append(sigma)
    return torch.stack(codes).to(torch.uint8).reshape(w.shape), torch.stack(mus), torch.stack(sigmas)


def dequantize_normal_reference(codes: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor, bits: int,
                                group_size: int | None = None, rule: str = "lloyd") -> torch.Tensor:
    levels, _ = normal_codebook(bits, rule)
    g = group_view(codes, group_size)
    rows = [torch.stack([levels[int(c)] for c in row]) * sigma[i] + mean[i] for i, row in enumerate(g)]
    return torch.stack(rows).reshape(codes.shape)
