"""Composable sparse fine-tuning: LT-SFT (Ansell et al., 2022, https://arxiv.org/abs/2110.07560,
"Composable Sparse Fine-Tuning for Cross-Lingual Transfer").

A sparse fine-tuning (SFT) is a sparse difference vector added to the pretrained weights.
LT-SFT finds its support with the Lottery Ticket idea:

1. phase 1: fully fine-tune the targeted weights for a few steps, W0 -> W1;
2. keep the k entries with the largest ``|W1 - W0|`` (one global ranking over all targets;
   ``k = round(density * numel)`` or an exact ``budget``);
3. phase 2: reset to W0 and train only those k entries.

Here the result is an adapter: per target host (an ``nn.Linear`` / ``Conv1D`` seen as a
matrix W (out, in)) a fixed index buffer ``sft_indices`` (k_h,) of flat row-major positions
in W (persistent: saved) and a trainable ``sft_values`` (k_h,) starting at 0 (the reset)::

    W' = W + scatter(indices, values),      y = x W'^T + b = x W^T + b + x scatter(...)^T

So SFTs compose by addition: ``ak.set_adapter(model, ["lang", "task"])`` applies
``W + D_lang + D_task``, exactly the paper's composition; merge writes the k entries
(the originals are kept while merged, so unmerge is bit-exact). Trainable parameters: k
(summed over targets). Usage::

    cfg = prepare_sft(model, SFTConfig(density=0.01), batches, steps=20, lr=1e-3)  # phase 1
    ak.add_adapter(model, "lang", cfg)                                               # phase 2 trains it

``prepare_sft(model, cfg, indices={host: flat indices})`` skips phase 1 and uses given
positions. The config returned by ``prepare_sft`` records how many entries each target has
(``sizes``), so ``ak.load_adapter`` rebuilds the adapter from the file alone.

:class:`SparseDeltaPiece` is shared with SPT (:mod:`adapterkit.methods.spt`).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterFileError, ConfigError, IncompatibleBaseError
from ..inject import is_linear_like, linear_layers_except_head, resolve_targets
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora import tied_weights
from .lora_xs import LinearPiece, default_lm_loss, stash, take

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class SparseDeltaPiece(LinearPiece):
    """``y + x D^T`` with D (out, in) zero except ``D.flat[indices] = values``.

    ``<prefix>_indices`` (k,) long: distinct flat row-major positions in the host weight seen
    as (out, in) (persistent buffer); ``<prefix>_values`` (k,): the trainable differences.
    """

    PREFIX = "sft"
    #: "auto": gather/scatter when k <= in_features (cheaper than a dense (out, in) matmul and
    #: saves only x[..., cols] (N, k)), else a dense delta; "gather" / "dense" force a path
    path: str = "auto"

    def __init__(self, host: nn.Module, method: str, indices: torch.Tensor) -> None:
        super().__init__(host, method)
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        check_indices(idx, self.out_features * self.in_features, f"{method} indices")
        self.register_buffer(f"{self.PREFIX}_indices", idx.to(host.weight.device), persistent=True)
        self.register_parameter(f"{self.PREFIX}_values", self.param_like(idx.numel()))

    @property
    def indices(self) -> torch.Tensor:
        return getattr(self, f"{self.PREFIX}_indices")

    @property
    def values(self) -> torch.Tensor:
        return getattr(self, f"{self.PREFIX}_values")

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row (output) and column (input) of every entry, each (k,)."""
        idx = self.indices
        return torch.div(idx, self.in_features, rounding_mode="floor"), idx % self.in_features

    def dense_2d(self) -> torch.Tensor:
        """D as a matrix (out, in) (differentiable w.r.t. the values)."""
        v = self.values
        return v.new_zeros(self.out_features * self.in_features).index_add(0, self.indices, v).view(
            self.out_features, self.in_features)

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = self.values
        if v.numel() == 0:
            return y
        x = x.to(v.dtype)
        use_gather = self.path == "gather" or (self.path == "auto" and v.numel() <= self.in_features)
        if use_gather:
            rows, cols = self.rows_cols()
            contrib = x.index_select(-1, cols) * v  # (..., k)
            return y.to(v.dtype).index_add(-1, rows, contrib).to(y.dtype)
        return y + F.linear(x, self.dense_2d()).to(y.dtype)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        return self.to_host_layout(self.dense_2d().detach())

    # exact merge: only the k entries change, and their original values are kept
    def merge(self) -> None:
        self.check_mergeable()
        w2 = self.weight_2d()
        rows, cols = self.rows_cols()
        with torch.no_grad():
            before = w2[rows, cols].clone()
            w2[rows, cols] = before + self.values.to(w2.dtype)
        self.register_buffer("_entries_before_merge", before, persistent=False)
        self.merged = True

    def unmerge(self) -> None:
        w2, before = self.weight_2d(), self._entries_before_merge
        rows, cols = self.rows_cols()
        v = self.values.to(w2.dtype)
        with torch.no_grad():
            now = w2[rows, cols]
            w2[rows, cols] = before if torch.equal(now, before + v) else now - v
        del self._entries_before_merge
        self.merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        key = f"{prefix}{self.PREFIX}_indices"
        if key in state_dict:  # a file's indices must be valid positions before they are used
            check_indices(state_dict[key].reshape(-1), self.out_features * self.in_features, key, AdapterFileError)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def check_indices(idx: torch.Tensor, numel: int, what: str, err: type[Exception] = ConfigError) -> None:
    """Flat positions must be integers in [0, numel) and distinct."""
    if idx.is_floating_point() or idx.is_complex():
        raise err(f"{what} must be integer positions, got dtype {idx.dtype}")
    if idx.numel() == 0:
        return
    if int(idx.min()) < 0 or int(idx.max()) >= numel:
        raise err(f"{what} must lie in [0, {numel}), got values in [{int(idx.min())}, {int(idx.max())}]")
    if torch.unique(idx).numel() != idx.numel():
        raise err(f"{what} holds repeated positions")


def normalise_sizes(cfg: AdapterConfig, field: str = "sizes") -> None:
    """``((host, k), ...)`` from JSON lists, validated (frozen: set once in __post_init__)."""
    v = getattr(cfg, field)
    if v is None:
        return
    try:
        pairs = tuple((str(h), int(k)) for h, k in (v.items() if isinstance(v, Mapping) else v))
    except (TypeError, ValueError):
        raise ConfigError(f"{type(cfg).__name__}.{field} must be (module path, count) pairs, got {v!r}") from None
    if any(k < 0 for _, k in pairs):
        raise ConfigError(f"{type(cfg).__name__}.{field} counts must be >= 0, got {pairs!r}")
    object.__setattr__(cfg, field, pairs)


@dataclass(frozen=True)
class SFTConfig(AdapterConfig):
    """LT-SFT hyper-parameters.

    targets: default ``None`` = every Linear/Conv1D layer except the output head (the paper
    fine-tunes the whole body). density: fraction of the targeted weight entries that train
    (k = round(density * numel)). budget: exact k, overrides density. sizes: entries per
    target, ``((module path, k), ...)``, filled by :func:`prepare_sft` (leave None).
    init_from: "prepare" (positions from :func:`prepare_sft`) or "file" (set when loading).
    """

    method = "sft"
    density: float = 0.01
    budget: int | None = None
    sizes: tuple[tuple[str, int], ...] | None = None
    init_from: str = "prepare"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ConfigError(f"{name}.density must be in (0, 1], got {d!r}")
        b = self.budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ConfigError(f"{name}.budget must be an integer >= 1 or None, got {b!r}")
        if self.init_from not in ("prepare", "file"):
            raise ConfigError(f"{name}.init_from must be 'prepare' or 'file', got {self.init_from!r}")
        normalise_sizes(self)

    def for_loading(self) -> "SFTConfig":
        return self.replace(init_from="file")  # type: ignore[return-value]


def find_body_linears(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, nn.Module]:
    """Targets of ``cfg``; ``None``: every Linear/Conv1D except the output head."""
    hosts = resolve_targets(model, cfg.targets, accept=lambda n, m: is_linear_like(m), defaults=(),
                            fallback=linear_layers_except_head, what=f"{cfg.method} adapter {name!r}")
    mods = dict(model.named_modules())
    return {h: mods[h] for h in hosts}


def sparse_pieces(model: nn.Module, hosts: dict[str, nn.Module], method: str,
                  indices: Mapping[str, torch.Tensor], cls: type[SparseDeltaPiece] = SparseDeltaPiece
                  ) -> dict[str, AdapterModule]:
    tied = tied_weights(model, hosts)
    pieces: dict[str, AdapterModule] = {}
    for h, host in hosts.items():
        p = cls(host, method, indices[h])
        p.tied_with = tied.get(h)
        pieces[h] = p
    return pieces


def sizes_or_fail(cfg: AdapterConfig, hosts: Iterable[str]) -> dict[str, int]:
    sizes = dict(getattr(cfg, "sizes") or ())
    missing = [h for h in hosts if h not in sizes]
    if missing:
        raise IncompatibleBaseError(f"{cfg.method} config has no entry count (sizes) for module {missing[0]!r}; "
                                    "was the adapter made for another model?")
    return sizes


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, SFTConfig)
    hosts = find_body_linears(model, name, cfg)
    if cfg.init_from == "file":  # the file fills indices and values
        sizes = sizes_or_fail(cfg, hosts)
        idx = {h: torch.arange(sizes[h]) for h in hosts}  # placeholders of the right length
    else:
        idx = take(model, cfg, "prepare_sft")
    return sparse_pieces(model, hosts, cfg.method, idx)


# -- phase 1: lottery-ticket positions ---------------------------------------------------------
def weight_changes(model: nn.Module, hosts: dict[str, nn.Module], batches: Iterable[Any], loss_fn: LossFn | None,
                   steps: int, lr: float, optimizer: str = "sgd") -> dict[str, torch.Tensor]:
    """``|W1 - W0|`` (out, in) per host after ``steps`` full fine-tuning steps of the host
    weights only (every other parameter is left alone). W0 and the ``requires_grad`` flags
    are restored exactly afterwards.

    optimizer: "sgd" (default: after a few steps |W1 - W0| ranks the accumulated gradient)
    or "adamw" (the paper's optimizer; note that its first steps move every entry by about
    ``lr``, so it needs more steps before the ranking means anything)."""
    if optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    loss_fn = loss_fn or default_lm_loss
    names = list(hosts)
    ws = [hosts[h].weight for h in names]
    flags = [w.requires_grad for w in ws]
    w0 = [w.detach().clone() for w in ws]
    opt = (torch.optim.SGD(ws, lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(ws, lr=lr, weight_decay=0.0))
    it = itertools.cycle(batches) if not isinstance(batches, torch.Tensor) else itertools.repeat(batches)
    done = 0
    try:
        for w in ws:
            w.requires_grad_(True)
        for batch in itertools.islice(it, steps):
            gs = torch.autograd.grad(loss_fn(model, batch), ws, allow_unused=True)
            for w, g in zip(ws, gs):
                w.grad = torch.zeros_like(w) if g is None else g
            opt.step()
            done += 1
        out = {}
        for h, w, b in zip(names, ws, w0):
            geo = LinearPiece(hosts[h], "sft")
            out[h] = geo.as_2d((w.detach() - b).abs().float())
    finally:
        with torch.no_grad():
            for w, b, f in zip(ws, w0, flags):
                w.copy_(b)
                w.grad = None
                w.requires_grad_(f)
    if done == 0:
        raise ConfigError("no batches given: phase 1 needs at least one batch")
    return out


def top_k_positions(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """One global top-k over every host's score matrix: {host: sorted flat indices}."""
    names = list(scores)
    flat = torch.cat([scores[h].reshape(-1) for h in names])
    if not 1 <= k <= flat.numel():
        raise ConfigError(f"the number of entries to tune must be in [1, {flat.numel()}], got {k}")
    picked = torch.topk(flat, k, sorted=False).indices
    out, start = {}, 0
    for h in names:
        n = scores[h].numel()
        sel = picked[(picked >= start) & (picked < start + n)] - start
        out[h] = sel.sort().values
        start += n
    return out


def prepare_sft(model: nn.Module, cfg: SFTConfig, batches: Iterable[Any] | None = None,
                loss_fn: LossFn | None = None, steps: int = 10, lr: float = 1e-3, optimizer: str = "sgd",
                indices: Mapping[str, torch.Tensor] | None = None) -> SFTConfig:
    """Phase 1 of LT-SFT: choose the positions; returns the config for ``add_adapter``.

    Runs ``steps`` fine-tuning steps on the target weights over ``batches`` (cycled;
    ``loss_fn(model, batch) -> loss``, default the causal-LM loss of token-id batches), ranks
    ``|W1 - W0|`` globally and keeps k = ``cfg.budget`` or round(density * numel) entries.
    The model's weights are left exactly as they were. With ``indices={module path: flat
    positions in W (out, in)}`` phase 1 is skipped (every target needs an entry; may be empty).
    """
    if not isinstance(cfg, SFTConfig):
        raise ConfigError(f"prepare_sft needs an SFTConfig, got {type(cfg).__name__}")
    hosts = find_body_linears(model, "sft", cfg)
    if indices is not None:
        unknown = [h for h in indices if h not in hosts]
        if unknown:
            raise ConfigError(f"indices given for {unknown[0]!r}, which is not a target; targets: {list(hosts)[:6]}")
        idx = {}
        for h, host in hosts.items():
            if h not in indices:
                raise ConfigError(f"indices has no entry for target {h!r} (pass an empty tensor to leave it out)")
            geo = LinearPiece(host, "sft")
            t = torch.as_tensor(indices[h]).reshape(-1)
            check_indices(t, geo.out_features * geo.in_features, f"indices[{h!r}]")
            idx[h] = t.long().sort().values
    else:
        if batches is None:
            raise ConfigError("prepare_sft needs batches for phase 1 (or indices=...)")
        scores = weight_changes(model, hosts, batches, loss_fn, steps, lr, optimizer)
        total = sum(s.numel() for s in scores.values())
        k = cfg.budget if cfg.budget is not None else max(1, round(cfg.density * total))
        idx = top_k_positions(scores, k)
    out = cfg.replace(sizes=tuple((h, int(t.numel())) for h, t in idx.items()), init_from="prepare")
    stash(model, out, idx)
    return out  # type: ignore[return-value]


register(MethodSpec(name="sft", config_cls=SFTConfig, attach=attach, mergeable=True,
                    paper="Composable Sparse Fine-Tuning for Cross-Lingual Transfer (LT-SFT, Ansell et al., 2022)"))
