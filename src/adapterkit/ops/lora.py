"""Batched multi-adapter LoRA (S-LoRA / Punica BGMV-SGMV semantics). Imports only torch.

Every token t of a flattened batch carries a slot index `slots[t]` into stacked slot tensors;
slot -1 means "no adapter" (base model only). The math, for each token t with s = slots[t] >= 0:

    h[t] = x[t] @ A[s].T                     # shrink:  (in,)  -> (R,)
    y[t] += (h[t] @ B[s].T) * scale[s]       # expand:  (R,)   -> (out,)

Shapes: x (T, in), A (S, R, in), B (S, out, R), scale (S,), slots (T,) int64 in [-1, S),
y (T, out) updated IN PLACE and returned. Mixed ranks are handled by zero padding to R
(= max rank): the padded rows of A / columns of B are zero, so they add exactly nothing.

Implementations (chosen by an explicit table keyed by device type, see `add_lora`):
  * `add_lora_ref`       plain per-token loop, the reference
  * CPU `add_lora_cpu`   long runs of consecutive tokens on one adapter (a prefill chunk) as two
                         matmuls on slices (at the adapter's true rank); every other token through
                         `add_lora_bgmv`
  * CPU `add_lora_bgmv`  BGMV on CPU: two fused gather-multiply-accumulate passes
                         (`embedding_bag` with per-sample weights), so each token reads only its
                         own adapter's weights, in place, and the expand only its true rank. The
                         cost does not depend on how many slots exist or are idle: the decode path
  * `add_lora_grouped`   tokens sorted by slot once per step (`LoraPlan`), two matmuls per
                         adapter PRESENT in the batch (never a loop over registered adapters):
                         the generic fallback for devices without a kernel
  * CUDA                 Triton kernels in `lora_triton.py` (imported lazily)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# CPU: a run of at least this many consecutive tokens on one adapter (a prefill chunk) is done
# as two matmuls on slices; shorter runs (decode tokens) go through BGMV. Measured on 2 cores
# at SmolLM2 widths with benchmarks/lora_ops.py (fp32 and bf16; see docs/benchmarks.md).
LONG_RUN = 64


@dataclass(frozen=True)
class LoraPlan:
    """Per-step metadata shared by every LoRA layer of one forward pass.

    slots:    (T,) int64 slot per token, -1 = none
    ranks:    (S,) int64 true rank per slot (rows past it are zero padding), or None
    order:    (T,) int64 permutation sorting tokens by slot (stable)
    segments: [(slot, start, end)] runs of `order` with the same slot >= 0
    any:      some token has an adapter
    valid:    (Tv,) ids of tokens with a slot, ascending
    runs:     [(slot, start, end, rank)] maximal runs of CONSECUTIVE tokens on one slot, >= LONG_RUN
              long (rank: the slot's true rank, -1 if unknown)
    short:    (Ts,) ids of tokens with a slot outside those runs, ascending (None if none)
    """

    slots: torch.Tensor
    order: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    any: bool
    valid: torch.Tensor | None = None
    runs: tuple[tuple[int, int, int, int], ...] = ()
    short: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # per-shape index tensors

    @property
    def num_tokens(self) -> int:
        return int(self.slots.shape[0])


def make_plan(slots: torch.Tensor, ranks: torch.Tensor | None = None) -> LoraPlan:
    """Sort tokens by slot and find long runs, once per step. slots: (T,) int64 in [-1, S);
    ranks: optional (S,) true rank per slot (lets the kernels skip zero padding)."""
    slots = slots.to(torch.int64)
    order = torch.argsort(slots, stable=True)
    uniq, counts = torch.unique_consecutive(slots[order], return_counts=True)
    segments, start = [], 0
    for s, c in zip(uniq.tolist(), counts.tolist()):
        if s >= 0:
            segments.append((s, start, start + c))
        start += c
    if not segments:
        return LoraPlan(slots=slots, order=order, segments=(), any=False)
    runs, short, lo = [], [], 0
    sl = slots.tolist()
    rl = ranks.tolist() if ranks is not None else None
    for t in range(1, len(sl) + 1):
        if t == len(sl) or sl[t] != sl[lo]:
            if sl[lo] >= 0:
                if t - lo >= LONG_RUN:
                    runs.append((sl[lo], lo, t, rl[sl[lo]] if rl is not None else -1))
                else:
                    short.extend(range(lo, t))
            lo = t
    return LoraPlan(slots=slots, order=order, segments=tuple(segments), any=True, valid=torch.nonzero(slots >= 0).view(-1),
                    runs=tuple(runs), short=torch.tensor(short, dtype=torch.int64, device=slots.device) if short else None,
                    ranks=None if ranks is None else ranks.to(device=slots.device, dtype=torch.int64))


def add_lora_ref(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 scale: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Reference: one token at a time, fp32 accumulation. Shapes as in the module doc."""
    for t in range(x.shape[0]):
        s = int(slots[t])
        if s < 0:
            continue
        h = x[t].float() @ A[s].float().T  # (R,)
        y[t] += ((h @ B[s].float().T) * scale[s].float()).to(y.dtype)  # (out,)
    return y


def lora_shrink_ref(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Reference shrink: h[t] = x[t] @ A[slots[t]].T (0 where slot -1). -> (T, R)."""
    h = torch.zeros(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        if int(slots[t]) >= 0:
            h[t] = x[t].float() @ A[int(slots[t])].float().T
    return h.to(x.dtype)


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                    slots: torch.Tensor) -> torch.Tensor:
    """Reference expand: y[t] += (h[t] @ B[slots[t]].T) * scale[slots[t]]. h (T, R), y (T, out)."""
    for t in range(h.shape[0]):
        s = int(slots[t])
        if s >= 0:
            y[t] += ((h[t].float() @ B[s].float().T) * scale[s].float()).to(y.dtype)
    return y


# ----------------------------------------------------------------------------- CPU fast paths
def add_lora_grouped(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     scale: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
    """Per adapter present in the batch: y[idx] += (x[idx] @ A[s].T @ B[s].T) * scale[s].

    The loop runs over `plan.segments` (adapters in this batch, <= max_loras), not over the
    registered adapters.
    """
    if not plan.any:
        return y
    for s, a, b in plan.segments:
        if b - a == x.shape[0]:  # the whole batch on one adapter: no gather / scatter
            y += (x @ A[s].T) @ (B[s].T * scale[s])  # (T, out)
            continue
        idx = plan.order[a:b]  # (n,)
        d = (x[idx] @ A[s].T) @ (B[s].T * scale[s])  # (n, out); scale folded into the small B
        y.index_add_(0, idx, d)
    return y


def _bgmv_index(plan: LoraPlan, tokens: torch.Tensor, din: int, R: int) -> tuple[torch.Tensor, ...]:
    """Bag indices for `add_lora_bgmv` over `tokens`, built once per (plan, in, R) and shared by
    every layer. Shrink bag of token i: rows s_i * in + [0, in) of A^T viewed (S * in, R),
    weighted by x[i]. Expand bag of token i: rows s_i * R + [0, r_i) of B^T viewed (S * R, out),
    weighted by h[i] (r_i = the slot's true rank when the plan knows it)."""
    key = ("bgmv", id(tokens), din, R)
    got = plan.memo.get(key)
    if got is None or got[0] is not tokens:
        dev = plan.slots.device
        s = plan.slots[tokens]  # (n,)
        n = s.shape[0]
        shrink_idx = (s.view(-1, 1) * din + torch.arange(din, device=dev)).view(-1)
        shrink_off = torch.arange(n, device=dev) * din
        rk = plan.ranks[s].clamp(max=R) if plan.ranks is not None else torch.full_like(s, R)
        off = torch.cumsum(rk, 0) - rk
        tok = torch.repeat_interleave(torch.arange(n, device=dev), rk)
        within = torch.arange(tok.shape[0], device=dev) - off[tok]
        got = (tokens, s, shrink_idx, shrink_off, s[tok] * R + within, off, tok * R + within)
        plan.memo[key] = got  # holds `tokens`, so its id cannot be reused while the plan lives
    return got[1:]


def _flat_tables(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (S, R, in), B (S, out, R) -> row tables A^T (S * in, R), B^T (S * R, out); free when A and
    B are transposed views of such storage (`serve.adapters.LoraSlots` on CPU), else a copy."""
    S, R, din = A.shape
    At, Bt = A.transpose(1, 2), B.transpose(1, 2)
    At = At if At.is_contiguous() else At.contiguous()
    Bt = Bt if Bt.is_contiguous() else Bt.contiguous()
    return At.view(S * din, R), Bt.view(S * R, B.shape[1])


def _bag_sum(table: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[j] * table[idx[j]] per bag: `F.embedding_bag(mode="sum")` without its
    Python-side argument checks (called ~240 times per step; the indices are built above)."""
    if table.device.type != "cpu":
        return F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=weights)
    return torch.embedding_bag(table, idx, offsets, False, 0, False, weights, False)[0]


def add_lora_bgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  scale: torch.Tensor | None, plan: LoraPlan, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """BGMV on CPU: for each token (all with a slot, or `tokens`), h = A[s] x and
    y += scale[s] * B[s] h, each as one fused gather-multiply-accumulate over the slot tensors
    (`embedding_bag` with per-sample weights). No weight is copied and no slot outside the batch
    is read. scale None: B already holds the scaling (`serve.adapters.LoraSlots`)."""
    if not plan.any:
        return y
    tokens = plan.valid if tokens is None else tokens
    assert tokens is not None
    R, din = A.shape[1], A.shape[2]
    At, Bt = _flat_tables(A, B)
    s, shrink_idx, shrink_off, expand_idx, expand_off, hpos = _bgmv_index(plan, tokens, din, R)
    xv = x if tokens.shape[0] == x.shape[0] else x[tokens]  # all tokens: `tokens` is then 0..T-1
    h = _bag_sum(At, shrink_idx, shrink_off, xv.to(At.dtype).reshape(-1))  # (n, R)
    if scale is not None:
        h = h * scale[s].view(-1, 1).to(h.dtype)
    d = _bag_sum(Bt, expand_idx, expand_off, h.reshape(-1)[hpos])  # (n, out)
    if tokens.shape[0] == y.shape[0]:
        y.add_(d.to(y.dtype))
    else:
        y.index_add_(0, tokens, d.to(y.dtype))
    return y


def add_lora_cpu(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 scale: torch.Tensor | None, plan: LoraPlan) -> torch.Tensor:
    """CPU path: runs of >= LONG_RUN consecutive tokens on one adapter as two matmuls on slices
    (at the slot's true rank); all other tokens through `add_lora_bgmv`. scale None: B already
    holds the scaling."""
    if not plan.any:
        return y
    for s, a, b, r in plan.runs:
        r = A.shape[1] if r < 0 else r
        if r:
            Bs = B[s, :, :r].T
            y[a:b] += (x[a:b] @ A[s, :r].T) @ (Bs if scale is None else Bs * scale[s])
    if plan.short is not None:
        add_lora_bgmv(y, x, A, B, scale, plan, plan.short)
    return y


def _add_lora_cuda(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   scale: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
    from adapterkit.ops import lora_triton  # lazy: triton only exists on CUDA installs

    return lora_triton.add_lora_triton(y, x, A, B, scale, plan)


LoraImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoraPlan], torch.Tensor]

# device type -> implementation; anything missing falls back to the grouped torch path
BACKENDS: dict[str, LoraImpl] = {"cpu": add_lora_cpu, "cuda": _add_lora_cuda}


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | None,
             plan: LoraPlan | torch.Tensor) -> torch.Tensor:
    """y += batched LoRA(x) in place with the backend for y's device. `plan` may be a slot
    tensor (a plan is made) but pass a `make_plan` result to share it across layers.

    x (T, in), A (S, R, in), B (S, out, R), scale (S,), y (T, out) -> y.
    """
    if isinstance(plan, torch.Tensor):
        plan = make_plan(plan)
    impl = BACKENDS.get(y.device.type, add_lora_grouped)
    if scale is None and impl is not add_lora_cpu:  # B holds the scaling; other kernels multiply by ones
        scale = torch.ones(A.shape[0], dtype=A.dtype, device=A.device)
    return impl(y, x, A, B, scale, plan)
