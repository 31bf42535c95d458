"""Task routing over a shared inventory of LoRA modules: Poly and MHR.

* Poly / Polytropon (Ponti et al., 2023, "Combining Parameter-efficient Modules for
  Task-level Generalisation", https://arxiv.org/abs/2202.13914);
* MHR, MHR-z, MHR-mu (Caccia et al., 2023, "Multi-Head Adapter Routing for Cross-Task
  Generalization", https://arxiv.org/abs/2211.03831).

Every target layer holds an inventory of K LoRA modules ("skills") and a routing matrix
Z of T tasks; a batch row of task t uses the adapter whose parameters are the
routing-weighted AVERAGE of the inventory's parameters (not of their outputs)::

    lora_A (K, r, in)    lora_B (K, out, r)    routing_logits Z (T, h, K)
    w[t, j] = route(Z[t, j])                                       (h, K)
    A_t[:, head j of in]  = sum_k w[t, j, k] A_k[:, head j of in]  (r, in)
    B_t[head j of out, :] = sum_k w[t, j, k] B_k[head j of out, :] (out, r)
    y = W x + b + s * B_t A_t x,     s = alpha / r

``h = n_heads``: Poly is h = 1; MHR splits A along its input dim and B along its output
dim into h contiguous blocks, each with its own routing (as in the authors' ``mttl`` code,
which interleaves the blocks instead; the parametrisation is the same up to a fixed
permutation). ``route``:

* "poly" (the papers'): training: ``sigmoid((Z + log u - log(1 - u)) / temperature)``,
  u ~ U(0, 1) drawn per batch row (a relaxed Bernoulli / Gumbel-sigmoid sample), eval:
  ``sigmoid(Z)``; then
  normalised over the K skills (``w / (sum_k w + 1e-12)``);
* "softmax": ``softmax(Z / temperature)`` over the K skills.

Task ids are per batch row: ``with ak.compose.task_ids(model, ids): model(x)``.
New tasks: :func:`new_task_adapter` ``mode="z"`` (MHR-z: copy the inventory, freeze it,
train only a fresh router) or ``mode="mu"`` (MHR-mu: the uniform average of the inventory
as a plain LoRA to fine-tune). :func:`task_lora` exports one task's adapter as a plain LoRA
(exact). Trainable parameters per target: K r (in + out) + T h K.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..api import add_adapter, delete_adapter, get_record
from ..errors import AdapterError, ConfigError
from ..methods.base import AdapterConfig, AdapterModule
from ..methods.lora import LoRAConfig, LoRAPiece
from ..methods.lora_xs import LinearPiece, attach_linear, check_float, check_positive_int
from ..registry import MethodSpec, register

ROUTINGS = ("poly", "softmax")
_CTX_ATTR = "_adapterkit_task_ids"
TaskIds = torch.Tensor | Sequence[int] | int | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PolyConfig(AdapterConfig):
    """Poly / MHR hyper-parameters.

    n_tasks: T, rows of the routing matrix (task ids 0..T-1). n_skills: K, LoRA modules
    in each layer's inventory. n_heads: h, routing heads (1: Poly; >1: MHR); must divide
    the in and out features of every target. r, alpha: rank and scaling numerator of each
    inventory module (s = alpha / r). routing: "poly" (Gumbel-sigmoid in training, sigmoid
    in eval, normalised) or "softmax". temperature: of the relaxation (both routings).
    dropout: on the adapter's input. shared_routing: one routing matrix for every layer (kept
    on the model root, key ``routing_logits``) instead of one per target layer.
    """

    method = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_heads: int = 1
    r: int = 4
    alpha: float = 8.0
    routing: str = "poly"
    temperature: float = 1.0
    dropout: float = 0.0
    shared_routing: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("n_tasks", "n_skills", "n_heads", "r"):
            check_positive_int(self, f)
        check_float(self, "alpha", strict=True)
        check_float(self, "temperature", strict=True)
        check_float(self, "dropout")
        if self.dropout >= 1:
            raise ConfigError(f"PolyConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.shared_routing, bool):
            raise ConfigError(f"PolyConfig.shared_routing must be true or false, got {self.shared_routing!r}")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"PolyConfig.routing must be one of {', '.join(ROUTINGS)}; got {self.routing!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class TaskContext:
    """The task ids of the current call, shared by every Poly piece of one model (a plain
    object, so it never reaches a state dict). ``ids``: (B,) int64 or None."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None


def task_context(model: nn.Module) -> TaskContext:
    ctx = model.__dict__.get(_CTX_ATTR)
    if ctx is None:
        ctx = model.__dict__[_CTX_ATTR] = TaskContext()
    return ctx


@contextmanager
def task_ids(model: nn.Module, ids: TaskIds) -> Iterator[None]:
    """Route every batch row by its task id inside the block.

    ``ids``: one task id per batch row (a list or (B,) int tensor), one int for every row,
    or a callable ``input_ids (B, T) -> (B,)`` evaluated at each call of ``model`` (so the
    :class:`~adapterkit.train.Trainer`, which only passes ``input_ids``, can train Poly on
    a mixture of tasks). Ids are checked against each adapter's ``n_tasks`` when it runs.
    """
    ctx = task_context(model)
    prev = ctx.ids
    handle = None
    if callable(ids) and not isinstance(ids, torch.Tensor):
        fn = ids

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inp = kwargs.get("input_ids", args[0] if args else None)
            if not isinstance(inp, torch.Tensor):
                raise ConfigError("task_ids(model, fn): the model was called without input_ids to compute task ids from")
            ctx.ids = _as_ids(fn(inp))

        handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        ctx.ids = _as_ids(ids)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        ctx.ids = prev


def _as_ids(ids: Any) -> torch.Tensor:
    if isinstance(ids, bool):
        raise ConfigError(f"task ids must be integers, got {ids!r}")
    if isinstance(ids, int):
        return torch.tensor([ids], dtype=torch.long)  # broadcast over the batch
    t = torch.as_tensor(ids)
    if t.dim() != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ConfigError(f"task ids must be a non-empty 1-D integer tensor/list (one per batch row), "
                          f"got dtype {t.dtype} shape {tuple(t.shape)}")
    return t.to(torch.long)


# -- routing math (pure) ---------------------------------------------------------------------
def route(logits: torch.Tensor, routing: str, temperature: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Routing weights from logits (..., K): normalised over the last dim.

    ``noise``: logistic noise ``log u - log(1 - u)`` of the logits' shape (training, "poly").
    """
    if routing == "softmax":
        return torch.softmax(logits / temperature, dim=-1)
    z = logits if noise is None else (logits + noise) / temperature
    w = torch.sigmoid(z)
    return w / (w.sum(-1, keepdim=True) + 1e-12)


def mix_factors(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row factors from routing weights w (N, h, K), inventory A (K, r, in), B (K, out, r).

    Returns A_n (N, r, in) and B_n (N, out, r): head j mixes the j-th block of A's input
    columns and of B's output rows with its own weights w[:, j].
    """
    K, r, i = A.shape
    o = B.shape[1]
    h = w.shape[1]
    Ah = A.reshape(K, r, h, i // h)  # (K, r, h, i/h)
    Bh = B.reshape(K, h, o // h, r)  # (K, h, o/h, r)
    An = torch.einsum("nhk,krhd->nrhd", w, Ah).reshape(-1, r, i)
    Bn = torch.einsum("nhk,khor->nhor", w, Bh).reshape(-1, o, r)
    return An, Bn


class PolyRouter(AdapterModule):
    """The routing matrix shared by every layer (``shared_routing=True``), a piece on the model
    root that does nothing in the forward pass itself."""

    has_post = False

    def __init__(self, cfg: PolyConfig, ref: torch.Tensor) -> None:
        super().__init__()
        self.routing_logits = nn.Parameter(torch.empty(cfg.n_tasks, cfg.n_heads, cfg.n_skills,
                                                       device=ref.device, dtype=ref.dtype))
        with torch.no_grad():
            nn.init.uniform_(self.routing_logits, -1e-3, 1e-3)


class PolyPiece(LinearPiece):
    """The inventory and routing matrix of one Linear/Conv1D host."""

    def __init__(self, host: nn.Module, cfg: PolyConfig, ctx: TaskContext, adapter: str,
                 router: PolyRouter | None = None) -> None:
        super().__init__(host, cfg.method)
        K, r, h, i, o = cfg.n_skills, cfg.r, cfg.n_heads, self.in_features, self.out_features
        if i % h or o % h:
            raise ConfigError(f"poly adapter {adapter!r}: n_heads={h} must divide in_features={i} and "
                              f"out_features={o} of {type(host).__name__}")
        self.n_tasks, self.n_heads, self.routing, self.temperature = cfg.n_tasks, h, cfg.routing, cfg.temperature
        self.scaling, self.adapter = cfg.scaling, adapter
        self.ctx = ctx
        self.lora_A = self.param_like(K, r, i)
        self.lora_B = self.param_like(K, o, r)
        # a list, not an attribute: the shared router must not register twice in the state dict
        self._router = [router] if router is not None else []
        if router is None:
            self.routing_logits = self.param_like(cfg.n_tasks, h, K)
        with torch.no_grad():
            for k in range(K):  # each skill like a fresh LoRA: A kaiming, B = 0 (identity start)
                nn.init.kaiming_uniform_(self.lora_A[k], a=math.sqrt(5))
            if router is None:
                nn.init.uniform_(self.routing_logits, -1e-3, 1e-3)  # near-uniform routing (mttl's init)
        self.dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @property
    def logits(self) -> torch.Tensor:
        """The routing matrix Z (T, h, K) this layer uses (its own, or the shared one)."""
        return self._router[0].routing_logits if self._router else self.routing_logits

    def noise(self, shape: torch.Size) -> torch.Tensor:
        """Logistic noise for the relaxed-Bernoulli sample (training, "poly" routing)."""
        u = torch.rand(shape, device=self.lora_A.device).clamp(1e-6, 1 - 1e-6)
        return (u.log() - (-u).log1p()).to(self.lora_A.dtype)

    def weights(self, ids: torch.Tensor) -> torch.Tensor:
        """Routing weights (N, h, K) of the task ids (N,)."""
        z = self.logits[ids]  # (N, h, K)
        noisy = self.training and self.routing == "poly"
        return route(z, self.routing, self.temperature, self.noise(z.shape) if noisy else None)

    def _ids(self, batch: int, rows: torch.Tensor | None) -> torch.Tensor:
        ids = self.ctx.ids
        if ids is None:
            if self.n_tasks == 1:
                ids = torch.zeros(1, dtype=torch.long)
            else:
                raise AdapterError(f"poly adapter {self.adapter!r} has {self.n_tasks} tasks: run the model inside "
                                   f"`with ak.compose.task_ids(model, ids):` (one task id per batch row)")
        if ids.numel() == 1:
            ids = ids.expand(batch if rows is None else rows.numel())
        else:
            if rows is not None:
                ids = ids.index_select(0, rows.to(ids.device))
            if ids.numel() != batch:
                raise AdapterError(f"poly adapter {self.adapter!r}: got {ids.numel()} task ids for a batch of "
                                   f"{batch} rows")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.n_tasks:
            raise AdapterError(f"poly adapter {self.adapter!r}: task id {lo if lo < 0 else hi} is out of range "
                               f"[0, {self.n_tasks})")
        return ids.to(self.lora_A.device)

    def task_factors(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_n (N, r, in), B_n (N, out, r)) of the task ids (N,)."""
        return mix_factors(self.weights(ids), self.lora_A, self.lora_B)

    def delta(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``s * B_t A_t x`` per row. x (N, ..., in), ids (N,) -> (N, ..., out)."""
        N = x.shape[0]
        xs = self.dropout(x.to(self.lora_A.dtype)).reshape(N, -1, self.in_features)  # (N, T, in)
        if self.training and self.routing == "poly":
            # a fresh relaxed-Bernoulli sample per row (per example, as in the authors' code)
            An, Bn = self.task_factors(ids)  # (N, r, in), (N, out, r)
            inv = torch.arange(N, device=ids.device)
        else:  # deterministic routing: rows of one task share factors, mixed once per distinct task
            uniq, inv = torch.unique(ids, return_inverse=True)
            An, Bn = self.task_factors(uniq)  # (U, r, in), (U, out, r)
        h = torch.einsum("nti,nri->ntr", xs, An[inv])  # (N, T, r)
        d = torch.einsum("ntr,nor->nto", h, Bn[inv])  # (N, T, out)
        return (d * self.scaling).reshape(*x.shape[:-1], self.out_features)

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.hook_post(self.host, x, y, None)

    def hook_post(self, host: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if x.dim() < 2:
            raise AdapterError(f"poly adapter {self.adapter!r} needs a batch dimension first, got input {tuple(x.shape)}")
        if rows is None:
            return y + self.delta(x, self._ids(x.shape[0], None)).to(y.dtype)
        if not rows.numel():
            return y
        ids = self._ids(rows.numel(), rows)
        d = self.delta(x.index_select(0, rows), ids)
        return y.index_add(0, rows, d.to(y.dtype))


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, PolyConfig)
    ctx = task_context(model)
    router = None
    if cfg.shared_routing:
        ref = next((p for p in model.parameters()), torch.empty(0))
        router = PolyRouter(cfg, ref)
    pieces = attach_linear(model, name, cfg, lambda h, host: PolyPiece(host, cfg, ctx, name, router))
    if router is not None:
        pieces[""] = router  # on the model root: saved under the key "routing_logits"
    return pieces


register(MethodSpec(name="poly", config_cls=PolyConfig, attach=attach, mergeable=False,
                    paper="Multi-Head Adapter Routing for Cross-Task Generalization (Caccia et al., 2023); "
                          "Polytropon (Ponti et al., 2023)"))


# -- inventory helpers -------------------------------------------------------------------------
def _poly_pieces(model: nn.Module, name: str) -> dict[str, PolyPiece]:
    """The adapter's per-layer pieces (the shared router, if any, left out)."""
    rec = get_record(model, name)
    if rec.method != "poly":
        raise ConfigError(f"adapter {name!r} is a {rec.method} adapter, not a poly adapter")
    return {h: p for h, p in rec.pieces.items() if isinstance(p, PolyPiece)}


def set_trainable(model: nn.Module, name: str, inventory: bool = True, router: bool = True) -> None:
    """Choose what of poly adapter ``name`` trains: the inventory (A, B), the router, both."""
    for p in _poly_pieces(model, name).values():
        p.lora_A.requires_grad_(inventory)
        p.lora_B.requires_grad_(inventory)
        p.logits.requires_grad_(router)


def task_lora(model: nn.Module, name: str, task: int | None, new_name: str) -> str:
    """Attach a plain LoRA adapter ``new_name`` equal to task ``task``'s adapter of poly
    adapter ``name`` (eval-mode routing; exact), or with ``task=None`` to the uniform
    average of the inventory (MHR-mu: A = mean_k A_k, B = mean_k B_k). Returns ``new_name``."""
    pieces = _poly_pieces(model, name)
    cfg = get_record(model, name).config
    assert isinstance(cfg, PolyConfig)
    if task is not None and not (isinstance(task, int) and 0 <= task < cfg.n_tasks):
        raise ConfigError(f"task must be an int in [0, {cfg.n_tasks}) or None (uniform average), got {task!r}")
    hosts = list(pieces)

    lcfg = LoRAConfig(r=cfg.r, alpha=cfg.alpha, targets="^(" + "|".join(re.escape(h) for h in hosts) + ")$")
    rec = add_adapter(model, new_name, lcfg)
    try:
        with torch.no_grad():
            for h, lp in rec.pieces.items():
                pp = pieces[h]
                assert isinstance(lp, LoRAPiece)
                if task is None:
                    A, B = pp.lora_A.mean(0), pp.lora_B.mean(0)
                else:
                    z = pp.logits[task][None]  # (1, h, K)
                    An, Bn = mix_factors(route(z, pp.routing, pp.temperature), pp.lora_A, pp.lora_B)
                    A, B = An[0], Bn[0]
                lp.A.copy_(A.reshape(lp.A.shape))
                lp.B.copy_(B.reshape(lp.B.shape))
    except BaseException:
        delete_adapter(model, new_name)
        raise
    return new_name


def new_task_adapter(model: nn.Module, src: str, name: str, n_tasks: int = 1, mode: str = "z") -> str:
    """An adapter for NEW tasks from trained poly adapter ``src``.

    ``mode="z"`` (MHR-z): a poly adapter ``name`` with ``n_tasks`` fresh routers over a copy
    of ``src``'s inventory, which is frozen: only the routing trains (T h K parameters per
    layer). ``mode="mu"`` (MHR-mu): a plain LoRA ``name``, the uniform average of the
    inventory, to fine-tune (``n_tasks`` unused). ``src`` is frozen in both modes.
    """
    if mode == "mu":
        task_lora(model, src, None, name)
    elif mode == "z":
        cfg = get_record(model, src).config
        assert isinstance(cfg, PolyConfig)
        rec = add_adapter(model, name, cfg.replace(n_tasks=n_tasks))
        with torch.no_grad():
            for h, p in _poly_pieces(model, src).items():
                q = rec.pieces[h]
                assert isinstance(q, PolyPiece)
                q.lora_A.copy_(p.lora_A)
                q.lora_B.copy_(p.lora_B)
        set_trainable(model, name, inventory=False, router=True)
    else:
        raise ConfigError(f"mode must be 'z' (MHR-z: train the routing only) or 'mu' (MHR-mu: averaged LoRA), got {mode!r}")
    set_trainable(model, src, inventory=False, router=False)
    return name


__all__ = ["PolyConfig", "PolyPiece", "PolyRouter", "TaskContext", "task_ids", "route", "mix_factors", "set_trainable",
           "task_lora", "new_task_adapter"]
