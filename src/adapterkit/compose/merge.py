"""Merging algebra: several LoRA-family adapters -> one ordinary LoRA adapter.

``merge_adapters(model, {"a": 0.7, "b": 0.3}, method=..., name="ab", r=8)``. Every
method works per target module on the adapters' *effective* deltas, so LoRA adapters
with different ranks, alphas or rsLoRA combine correctly, and DoRA adapters enter with
their true delta ``W' - W`` (PEFT has merged these silently wrong). Methods:

============== ========================================================== =========
method         merged delta of a module                                   exact
============== ========================================================== =========
cat            sum_i w_i D_i, factors concatenated (rank sum r_i)          yes
linear         (sum_i c_i B_i)(sum_i c_i A_i), c_i = sqrt(|w_i| s_i)      no [1]_
svd            best rank-r approximation of sum_i w_i D_i                 if rank<=r
ties           TIES (trim to density, elect sign, disjoint mean), rank r   no
dare_linear    sum_i w_i DARE(D_i) (drop 1-density, rescale), rank r      no
dare_ties      TIES with DARE instead of trimming, rank r                 no
magnitude_prune sum_i w_i prune(D_i, density), rank r                      no
============== ========================================================== =========

Sparse diffs (``sft``) merge with ``cat`` / ``linear`` into one sparse diff: the union of
their positions with the weighted sum of their values (exact).

.. [1] PEFT's "linear": factors averaged separately (needs equal ranks); exact for one
   adapter or adapters sharing their subspaces. cat and linear refuse DoRA (its delta
   is not a product of its factors).

The result has ``alpha = r`` (scaling 1): all scales are folded into B.

Devices and dtypes: everything is computed in fp32 on the adapters' own device (a CUDA
model merges on CUDA), then cast once to the new adapter's dtype (bf16 stays bf16). DARE's
random masks are drawn on the CPU from ``seed`` and moved to that device, so one seed gives
the same merge on every device.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..api import add_adapter, delete_adapter, get_record
from ..errors import ConfigError
from ..methods.dora import DoRAMixin
from ..methods.lora import LoRAConfig, LoRAPiece

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_FACTORED = ("cat", "linear")


def merge_adapters(
    model: nn.Module,
    weights: Mapping[str, float],
    method: str = "cat",
    name: str = "merged",
    r: int | None = None,
    density: float = 1.0,
    seed: int = 0,
) -> str:
    """Attach a new LoRA adapter ``name`` that merges the weighted adapters.

    ``r``: the target rank for the re-factorising methods (default: the largest input
    rank). ``density``: the fraction of each delta kept by ties / dare / magnitude_prune.
    ``seed``: DARE's random drop. Returns ``name``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if not weights:
        raise ConfigError("merge_adapters needs at least one adapter")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    recs = {n: get_record(model, n) for n in weights}
    if any(rec.method == "sft" for rec in recs.values()):
        return _merge_sparse(model, recs, weights, method, name)
    for n, rec in recs.items():
        if rec.method not in ("lora", "dora"):
            raise ConfigError(f"adapter {n!r} is a {rec.method} adapter; merge_adapters combines lora and dora adapters")
        if method in _FACTORED and rec.method == "dora":
            raise ConfigError(f"adapter {n!r} is DoRA: its delta is not B @ A, so method {method!r} would be wrong; "
                              f"use 'svd', 'ties', 'dare_linear', 'dare_ties' or 'magnitude_prune'")
    hosts = list(dict.fromkeys(h for rec in recs.values() for h in rec.pieces))
    ranks = {n: rec.config.r for n, rec in recs.items()}  # type: ignore[attr-defined]
    if method == "cat":
        r_new = sum(ranks.values())
    elif method == "linear":
        if len(set(ranks.values())) > 1:
            raise ConfigError(f"method 'linear' needs equal ranks, got {ranks}; use 'cat' (exact) or 'svd'")
        r_new = next(iter(ranks.values()))
    else:
        r_new = r if r is not None else max(ranks.values())
    if not isinstance(r_new, int) or r_new <= 0:
        raise ConfigError(f"r must be a positive integer, got {r_new!r}")

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(seed)  # CPU: the same masks whatever the device
    for h in hosts:
        pieces = {n: rec.pieces.get(h) for n, rec in recs.items()}
        ref = next(p for p in pieces.values() if p is not None)
        assert isinstance(ref, LoRAPiece)
        out_f, in_f = ref.as_2d(ref.host.weight).shape
        if method == "cat":
            factors[h] = _cat(pieces, weights, ranks, out_f, in_f)
        elif method == "linear":
            factors[h] = _linear(pieces, weights, r_new, out_f, in_f)
        else:
            deltas = [(weights[n], _delta_2d(p)) for n, p in pieces.items() if p is not None]
            factors[h] = svd_factors(_combine(method, deltas, density, gen), r_new)

    cfg = LoRAConfig(r=r_new, alpha=float(r_new), targets="^(" + "|".join(re.escape(h) for h in hosts) + ")$")
    rec = add_adapter(model, name, cfg)
    try:
        with torch.no_grad():
            for h, piece in rec.pieces.items():
                assert isinstance(piece, LoRAPiece)
                b, a = factors[h]
                piece.A.copy_(a.reshape(piece.A.shape).to(device=piece.A.device, dtype=piece.A.dtype))
                piece.B.copy_(b.reshape(piece.B.shape).to(device=piece.B.device, dtype=piece.B.dtype))
    except BaseException:
        delete_adapter(model, name)
        raise
    return name


def _merge_sparse(model: nn.Module, recs, weights: Mapping[str, float], method: str, name: str) -> str:
    """Sparse diffs (LT-SFT) merge exactly: the union of positions, weighted sum of values."""
    from ..methods.sft import SFTConfig, prepare_sft

    bad = [n for n, rec in recs.items() if rec.method != "sft"]
    if bad:
        raise ConfigError(f"adapter {bad[0]!r} is not a sparse diff: merge sparse diffs (sft) only with each other")
    if method not in ("cat", "linear"):
        raise ConfigError(f"sparse diffs merge with 'cat' or 'linear' (the exact weighted sum), not {method!r}")
    hosts = list(dict.fromkeys(h for rec in recs.values() for h in rec.pieces))
    union: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for h in hosts:
        pieces = [(weights[n], rec.pieces[h]) for n, rec in recs.items() if h in rec.pieces]
        dev = pieces[0][1].values.device
        idx = torch.cat([p.indices.to(dev) for _, p in pieces])
        val = torch.cat([w * p.values.detach().to(dev, torch.float32) for w, p in pieces])
        union[h], inverse = torch.unique(idx, sorted=True, return_inverse=True)
        values[h] = torch.zeros(union[h].numel(), device=dev, dtype=torch.float32).index_add(0, inverse, val)
    targets = "^(" + "|".join(re.escape(h) for h in hosts) + ")$"
    cfg = prepare_sft(model, SFTConfig(targets=targets), indices=union)
    rec = add_adapter(model, name, cfg)
    with torch.no_grad():
        for h, piece in rec.pieces.items():
            piece.values.copy_(values[h].to(device=piece.values.device, dtype=piece.values.dtype))
    return name


# -- per-module pieces ---------------------------------------------------------------------
def _delta_2d(p: LoRAPiece) -> torch.Tensor:
    """The piece's effective weight delta as an fp32 matrix (out, in)."""
    with torch.no_grad():
        if isinstance(p, DoRAMixin):  # W' - W formed in fp32 (in bf16 it would keep a few bits)
            w = p.host.weight.detach().float()
            return p.as_2d(p.merged_weight(w) - w)
        return (p.b_2d().float() @ p.a_2d().float()) * p.scaling


def _device(pieces) -> torch.device:
    """The device of the module's pieces (they live with their host's weight)."""
    return next(p for p in pieces.values() if p is not None).a_2d().device


def _cat(pieces, weights, ranks, out_f, in_f):
    dev, f32 = _device(pieces), torch.float32
    bs, as_ = [], []
    for n, p in pieces.items():
        r = ranks[n]
        if p is None:  # this adapter has no piece on the module: zero block keeps ranks uniform
            bs.append(torch.zeros(out_f, r, device=dev, dtype=f32))
            as_.append(torch.zeros(r, in_f, device=dev, dtype=f32))
        else:
            bs.append(p.b_2d().detach().float() * (weights[n] * p.scaling))
            as_.append(p.a_2d().detach().float())
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)  # (out, sum r), (sum r, in)


def _linear(pieces, weights, r, out_f, in_f):
    dev, f32 = _device(pieces), torch.float32
    b = torch.zeros(out_f, r, device=dev, dtype=f32)
    a = torch.zeros(r, in_f, device=dev, dtype=f32)
    for n, p in pieces.items():
        if p is None:
            continue
        c = (abs(weights[n]) * p.scaling) ** 0.5
        sign = 1.0 if weights[n] >= 0 else -1.0
        b += sign * c * p.b_2d().detach().float()
        a += c * p.a_2d().detach().float()
    return b, a


def svd_factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-r approximation of ``delta`` (Eckart-Young).

    Args:
        delta: (out, in), any float dtype and device.
        r: the rank of the factors; columns beyond ``delta``'s rank are zero.

    Returns:
        B (out, r) and A (r, in) on ``delta``'s device in its dtype (the SVD itself runs in
        fp32 at least: half-precision SVD is unsupported and too imprecise).
    """
    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    k = min(r, S.numel())
    b = torch.zeros(delta.shape[0], r, device=delta.device, dtype=work.dtype)
    a = torch.zeros(r, delta.shape[1], device=delta.device, dtype=work.dtype)
    b[:, :k] = U[:, :k] * S[:k]
    a[:k] = Vh[:k]
    return b.to(delta.dtype), a.to(delta.dtype)


def _combine(method: str, deltas: list[tuple[float, torch.Tensor]], density: float, gen: torch.Generator):
    D = torch.stack([d for _, d in deltas])  # (n, out, in)
    ws = torch.tensor([w for w, _ in deltas], device=D.device, dtype=D.dtype).view(-1, 1, 1)
    if method == "svd":
        return (ws * D).sum(0)
    if method == "magnitude_prune":
        return (ws * torch.stack([prune_magnitude(d, density) for d in D])).sum(0)
    if method == "dare_linear":
        return (ws * torch.stack([dare(d, density, gen) for d in D])).sum(0)
    if method == "ties":
        return ties(torch.stack([prune_magnitude(d, density) for d in D]), ws)
    if method == "dare_ties":
        return ties(torch.stack([dare(d, density, gen) for d in D]), ws)
    raise AssertionError(method)


# -- the merge kernels (pure functions) ----------------------------------------------------
def prune_magnitude(d: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest |value|; zero the rest."""
    if density >= 1.0:
        return d
    k = max(1, int(round(density * d.numel())))
    thresh = d.abs().flatten().kthvalue(d.numel() - k + 1).values
    return torch.where(d.abs() >= thresh, d, torch.zeros_like(d))


def dare(d: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al., 2023): drop each entry with prob 1-density, rescale kept ones by 1/density.

    The mask is drawn from ``gen`` (a CPU generator) and moved to ``d``'s device: the same
    seed drops the same entries on every device."""
    if density >= 1.0:
        return d
    keep = (torch.rand(d.shape, generator=gen, device=gen.device) < density).to(d.device)
    return torch.where(keep, d / density, torch.zeros_like(d))


def ties(D: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """TIES (Yadav et al., 2023) on trimmed deltas ``D`` (n, out, in) with weights ``ws`` (n,1,1):
    elect each entry's sign from the weighted sum, average the weighted entries that agree."""
    W = ws.to(device=D.device, dtype=D.dtype) * D
    sign = torch.where(W.sum(0) >= 0, 1.0, -1.0).to(W.dtype)
    agree = (torch.sign(W) == sign) & (W != 0)
    total = (W * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return total / count
