"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023,
https://arxiv.org/abs/2303.08566, "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning").

Stage 1 (:func:`prepare_spt`, data needed once): a gradient-based sensitivity per weight
entry, accumulated over a few batches (the paper's released code sums ``g^2``; "taylor"
sums the first-order Taylor term ``|g * w|``), then, under a trainable-parameter budget:

* rank every entry of every target matrix by sensitivity (one global ranking) and take the
  top tau entries;
* a matrix W (out, in) holding ``c`` of them gets *structured* tuning -- a LoRA of rank r,
  ``r (in + out)`` parameters -- when ``c >= threshold``; the default threshold is
  ``r (in + out) / threshold_ratio`` (the released code's ``alpha``, 5); otherwise its c
  entries are tuned directly (*unstructured*: a sparse delta on fixed positions);
* tau is the largest value whose total ``sum(unstructured c) + sum(LoRA r (in + out))`` fits
  the budget; the slack left is filled with the next most sensitive entries of the
  unstructured matrices (never pushing one over its threshold), so the adapter has exactly
  ``budget`` trainable parameters whenever the targets can absorb it.

Stage 2 is ordinary training of the adapter: :class:`SPTSparsePiece` (``spt_indices`` fixed
flat positions in W (out, in), persistent; ``spt_values`` trainable, from 0) on unstructured
matrices and a plain LoRA piece (``lora_A`` (r, in), ``lora_B`` (out, r), B = 0) on structured
ones. Both are mergeable. Usage::

    cfg = prepare_spt(model, SPTConfig(budget=100_000, r=8), batches, loss_fn)
    ak.add_adapter(model, "spt", cfg)

The returned config lists the LoRA matrices and the number of entries of each sparse one, so
``ak.load_adapter`` rebuilds the adapter from the file alone. Like the paper's vectors
(biases, norms) and classifier head, parameters outside the targeted Linear layers are left
to the user (e.g. train a new head directly).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TargetNotFoundError
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora import LoRAConfig, LoRALinear, tied_weights
from .lora_xs import LinearPiece, default_lm_loss, run_batch, stash, take
from .sft import SparseDeltaPiece, find_body_linears, normalise_sizes

CRITERIA = ("grad_sq", "taylor")
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class SPTSparsePiece(SparseDeltaPiece):
    PREFIX = "spt"


@dataclass(frozen=True)
class SPTConfig(AdapterConfig):
    """SPT hyper-parameters.

    targets: default None = every Linear/Conv1D except the output head.
    budget: total trainable parameters (sparse entries + LoRA parameters).
    r, lora_alpha: rank and scaling numerator (s = lora_alpha / r) of the structured LoRAs.
    threshold: sensitive entries at which a matrix switches to LoRA; None uses
    ``r (in + out) / threshold_ratio`` per matrix.
    criterion: "grad_sq" (sum of g^2 over batches, the released code) or "taylor" (sum |g w|).
    lora_modules, sizes: the allocation, filled by :func:`prepare_spt` (leave None).
    init_from: "prepare" or "file" (set when loading).
    """

    method = "spt"
    budget: int = 10_000
    r: int = 8
    lora_alpha: float = 16.0
    threshold: int | None = None
    threshold_ratio: float = 5.0
    criterion: str = "grad_sq"
    lora_modules: tuple[str, ...] | None = None
    sizes: tuple[tuple[str, int], ...] | None = None
    init_from: str = "prepare"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for f, lo in (("budget", 1), ("r", 1)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name}.{f} must be an integer >= {lo}, got {v!r}")
        t = self.threshold
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 1):
            raise ConfigError(f"{name}.threshold must be an integer >= 1 or None, got {t!r}")
        for f in ("lora_alpha", "threshold_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name}.{f} must be a number > 0, got {v!r}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"{name}.criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.init_from not in ("prepare", "file"):
            raise ConfigError(f"{name}.init_from must be 'prepare' or 'file', got {self.init_from!r}")
        if self.lora_modules is not None:
            if not all(isinstance(m, str) for m in self.lora_modules):
                raise ConfigError(f"{name}.lora_modules must be module paths, got {self.lora_modules!r}")
            object.__setattr__(self, "lora_modules", tuple(self.lora_modules))
        normalise_sizes(self)

    def for_loading(self) -> "SPTConfig":
        return self.replace(init_from="file")  # type: ignore[return-value]

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(r=self.r, alpha=self.lora_alpha)


# -- stage 1 -------------------------------------------------------------------------------------
def spt_sensitivity(model: nn.Module, hosts: dict[str, nn.Module], batches: Iterable[Any],
                    loss_fn: LossFn | None = None, criterion: str = "grad_sq") -> dict[str, torch.Tensor]:
    """Per-entry sensitivity (out, in) float32 of each host weight, summed over ``batches``:
    ``g^2`` ("grad_sq") or ``|g * w|`` ("taylor"). Nothing is stepped, no ``.grad`` is written,
    ``requires_grad`` flags are restored."""
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    loss_fn = loss_fn or model_loss
    names = list(hosts)
    ws = [hosts[h].weight for h in names]
    flags = [w.requires_grad for w in ws]
    sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in ws]
    n = 0
    try:
        for w in ws:
            w.requires_grad_(True)
        for batch in batches:
            gs = torch.autograd.grad(loss_fn(model, batch), ws, allow_unused=True)
            for s, w, g in zip(sums, ws, gs):
                if g is not None:
                    s += g.float().pow(2) if criterion == "grad_sq" else (g.float() * w.detach().float()).abs()
            n += 1
    finally:
        for w, f in zip(ws, flags):
            w.requires_grad_(f)
    if n == 0:
        raise ConfigError("no batches given: the sensitivity needs at least one batch")
    return {h: LinearPiece(hosts[h], "spt").as_2d(s) for h, s in zip(names, sums)}


def model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Default loss: the model's own ``.loss`` for a dict batch with labels, else the causal-LM loss."""
    if isinstance(batch, dict) and "input_ids" not in batch:
        out = run_batch(model, batch)
        loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise ConfigError(f"{type(model).__name__} returned no loss for the batch; pass loss_fn=(model, batch) -> loss")
        return loss
    return default_lm_loss(model, batch)


@dataclass
class Allocation:
    """SPT's choice: LoRA on ``lora`` hosts, sparse ``indices`` (sorted flat positions) elsewhere."""

    lora: list[str]
    indices: dict[str, torch.Tensor]
    total: int


def spt_allocate(scores: dict[str, torch.Tensor], budget: int, r: int, threshold: int | None = None,
                 threshold_ratio: float = 5.0) -> Allocation:
    """Allocate the budget over ``scores`` {host: (out, in) sensitivity} (see module docstring)."""
    names = list(scores)
    shapes = [tuple(scores[h].shape) for h in names]
    numel = torch.tensor([scores[h].numel() for h in names])
    lora_cost = torch.tensor([r * (o + i) for o, i in shapes])  # r (in + out) per matrix
    thr = (torch.full_like(lora_cost, threshold, dtype=torch.float64) if threshold is not None
           else lora_cost.double() / threshold_ratio)
    # bookkeeping on the CPU whatever the model's device (the pieces move their indices to the
    # weight's device); mixing device scores with the CPU index tensors below fails on CUDA
    flat = torch.cat([scores[h].reshape(-1).float().cpu() for h in names])
    host_of = torch.repeat_interleave(torch.arange(len(names)), numel)
    order = torch.sort(flat, descending=True, stable=True).indices  # global ranking
    hid = host_of[order]  # host of the j-th most sensitive entry
    H = len(names)

    def counts(tau: int) -> torch.Tensor:
        return torch.bincount(hid[:tau], minlength=H)

    def total(c: torch.Tensor) -> int:
        structured = c.double() >= thr
        return int(torch.where(structured, lora_cost, c).sum())

    lo, hi = 0, flat.numel()  # total(counts(tau)) is nondecreasing in tau: largest tau that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(counts(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    tau = lo
    c = counts(tau)
    structured = c.double() >= thr
    slack = budget - total(c)
    chosen = order[:tau][~structured[hid[:tau]]]
    if slack > 0 and tau < flat.numel():  # top up unstructured matrices below their thresholds
        rest, rh = order[tau:], hid[tau:]
        keep = ~structured[rh]
        rest, rh = rest[keep], rh[keep]
        room = (torch.ceil(thr) - 1 - c.double()).clamp(min=0).long()  # entries each may still take
        by_host = torch.sort(rh, stable=True)
        first = torch.searchsorted(by_host.values, torch.arange(H))
        rank = torch.empty_like(rh)
        rank[by_host.indices] = torch.arange(rh.numel()) - first[by_host.values]  # rank within its host
        extra = rest[rank < room[rh]][:slack]
        chosen = torch.cat([chosen, extra])
    starts = torch.cumsum(numel, 0) - numel
    ch = host_of[chosen]
    indices = {h: (chosen[ch == j] - starts[j]).sort().values for j, h in enumerate(names) if not structured[j]}
    lora = [h for j, h in enumerate(names) if structured[j]]
    n_total = sum(int(t.numel()) for t in indices.values()) + int(lora_cost[structured].sum())
    return Allocation(lora=lora, indices=indices, total=n_total)


def prepare_spt(model: nn.Module, cfg: SPTConfig, batches: Iterable[Any],
                loss_fn: LossFn | None = None) -> SPTConfig:
    """Stage 1 of SPT: sensitivity over ``batches`` and the budget allocation; returns the
    config for ``ak.add_adapter`` (which consumes the kept positions).

    ``loss_fn(model, batch) -> loss``; default: the model's ``.loss`` for dict batches
    holding labels (e.g. ``{"pixel_values": x, "labels": y}``), the causal-LM loss for token ids."""
    if not isinstance(cfg, SPTConfig):
        raise ConfigError(f"prepare_spt needs an SPTConfig, got {type(cfg).__name__}")
    hosts = find_body_linears(model, "spt", cfg)
    scores = spt_sensitivity(model, hosts, batches, loss_fn, cfg.criterion)
    alloc = spt_allocate(scores, cfg.budget, cfg.r, cfg.threshold, cfg.threshold_ratio)
    out = cfg.replace(lora_modules=tuple(alloc.lora), init_from="prepare",
                      sizes=tuple((h, int(t.numel())) for h, t in alloc.indices.items() if t.numel()))
    stash(model, out, {h: t for h, t in alloc.indices.items() if t.numel()})
    return out  # type: ignore[return-value]


# -- stage 2 -------------------------------------------------------------------------------------
def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, SPTConfig)
    if cfg.lora_modules is None or cfg.sizes is None:
        raise ConfigError("spt needs its allocation: call adapterkit.methods.prepare_spt(model, cfg, batches) and "
                          "pass the config it returns to add_adapter (or load a saved adapter)")
    sizes = dict(cfg.sizes)
    idx = take(model, cfg, "prepare_spt") if cfg.init_from == "prepare" else {h: torch.arange(k) for h, k in sizes.items()}
    mods = dict(model.named_modules())
    wanted = [*cfg.lora_modules, *sizes]
    for h in wanted:
        if h not in mods:
            raise TargetNotFoundError(f"spt adapter {name!r}: the model has no module {h!r}")
    hosts = {h: mods[h] for h in wanted}
    tied = tied_weights(model, hosts)
    pieces: dict[str, AdapterModule] = {}
    lcfg = cfg.lora_config()
    for h in cfg.lora_modules:
        LinearPiece(mods[h], "spt")  # validates the host type
        p: Any = LoRALinear(mods[h], lcfg)
        p.tied_with = tied.get(h)
        pieces[h] = p
    for h in sizes:
        if h in pieces:
            raise ConfigError(f"spt: module {h!r} is listed both as a LoRA matrix and a sparse one")
        p = SPTSparsePiece(mods[h], "spt", idx[h])
        p.tied_with = tied.get(h)
        pieces[h] = p
    return pieces


register(MethodSpec(name="spt", config_cls=SPTConfig, attach=attach, mergeable=True,
                    paper="Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning (SPT, He et al., ICCV 2023)"))
