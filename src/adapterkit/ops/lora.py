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
  * CPU `grouped`        tokens sorted by slot once per step (`LoraPlan`), two matmuls per
                         adapter PRESENT in the batch (never a loop over registered adapters)
  * CPU `gather`         gather A[slots], B[slots] and two torch.bmm calls: a constant number
                         of ops, wins when tokens per adapter are few
  * CPU `slotbmm`        scatter tokens into (S, m, in) per slot, two bmm on the slot tensors
                         in place (no weight copy): wins for decode with most slots present
  * CUDA                 Triton kernels in `lora_triton.py` (imported lazily)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Measured with benchmarks/decode_step.py shapes on 2 CPU cores: gathering weights per token
# (constant op count) beats per-adapter matmuls while each adapter has few tokens.
GATHER_MAX_TOKENS_PER_ADAPTER = 2
# slotbmm computes S * max_run rows: allow a few tokens per slot and up to 4x idle slots
SLOTBMM_MAX_RUN = 4
SLOTBMM_MAX_IDLE = 4


@dataclass(frozen=True)
class LoraPlan:
    """Per-step metadata shared by every LoRA layer of one forward pass.

    slots:    (T,) int64 slot per token, -1 = none
    order:    (T,) int64 permutation sorting tokens by slot (stable)
    segments: [(slot, start, end)] runs of `order` with the same slot >= 0
    any:      some token has an adapter
    max_run:  most tokens any one slot has (m)
    valid:    (Tv,) ids of tokens with a slot, sorted by slot
    pad_index:(Tv,) their row in a (S * m) per-slot padded layout: slot * m + rank in its run
    """

    slots: torch.Tensor
    order: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    any: bool
    max_run: int = 0
    valid: torch.Tensor | None = None
    pad_index: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.slots.shape[0])


def make_plan(slots: torch.Tensor) -> LoraPlan:
    """Sort tokens by slot once per step. slots: (T,) int64 in [-1, S)."""
    slots = slots.to(torch.int64)
    order = torch.argsort(slots, stable=True)
    uniq, counts = torch.unique_consecutive(slots[order], return_counts=True)
    segments, start, pad = [], 0, []
    for s, c in zip(uniq.tolist(), counts.tolist()):
        if s >= 0:
            segments.append((s, start, start + c))
        start += c
    if not segments:
        return LoraPlan(slots=slots, order=order, segments=(), any=False)
    m = max(b - a for _, a, b in segments)
    first = segments[0][1]
    for s, a, b in segments:
        pad.append(torch.arange(s * m, s * m + (b - a)))
    return LoraPlan(slots=slots, order=order, segments=tuple(segments), any=True, max_run=m, valid=order[first:],
                    pad_index=torch.cat(pad).to(slots.device))


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


def add_lora_gather(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    scale: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
    """Gather each token's weights and run two bmm: a constant number of ops per layer.

    Tokens with slot -1 use slot 0's weights with scale 0 (no branch, exact zero delta for
    finite weights).
    """
    if not plan.any:
        return y
    slots = plan.slots
    valid = slots >= 0
    idx = slots.clamp(min=0)  # (T,)
    s = torch.where(valid, scale[idx], torch.zeros((), dtype=scale.dtype, device=scale.device))  # (T,)
    h = torch.bmm(x.unsqueeze(1), A[idx].transpose(1, 2))  # (T, 1, R)
    h = h * s.view(-1, 1, 1).to(h.dtype)
    y += torch.bmm(h, B[idx].transpose(1, 2)).squeeze(1)  # (T, out)
    return y


def add_lora_slotbmm(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     scale: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
    """Scatter tokens into a per-slot padded batch (S, m, in) and run two bmm straight on the slot
    tensors: the adapter weights are read in place, never gathered (copied) per token.

    Work is S * m rows, so it wins when most slots are present and each has few tokens (decode).
    """
    if not plan.any:
        return y
    S, m = A.shape[0], plan.max_run
    assert plan.valid is not None and plan.pad_index is not None
    xp = x.new_zeros(S * m, x.shape[1])
    xp[plan.pad_index] = x[plan.valid]
    h = torch.bmm(xp.view(S, m, -1), A.transpose(1, 2))  # (S, m, R)
    h = h * scale.view(S, 1, 1).to(h.dtype)
    d = torch.bmm(h, B.transpose(1, 2)).view(S * m, -1)  # (S * m, out)
    y.index_add_(0, plan.valid, d[plan.pad_index])
    return y


def add_lora_cpu(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 scale: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
    """CPU dispatch (measured with benchmarks/decode_step.py and the op grid in the tests):
    `slotbmm` when each present adapter has few tokens and most slots are present (decode),
    `gather` when adapters have few tokens each but most slots are idle, else `grouped`."""
    if not plan.any:
        return y
    if plan.max_run <= SLOTBMM_MAX_RUN and A.shape[0] <= SLOTBMM_MAX_IDLE * len(plan.segments):
        return add_lora_slotbmm(y, x, A, B, scale, plan)
    if plan.num_tokens <= GATHER_MAX_TOKENS_PER_ADAPTER * len(plan.segments):
        return add_lora_gather(y, x, A, B, scale, plan)
    return add_lora_grouped(y, x, A, B, scale, plan)


def _add_lora_cuda(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   scale: torch.Tensor, plan: LoraPlan) -> torch.Tensor:
    from adapterkit.ops import lora_triton  # lazy: triton only exists on CUDA installs

    return lora_triton.add_lora_triton(y, x, A, B, scale, plan)


LoraImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoraPlan], torch.Tensor]

# device type -> implementation; anything missing falls back to the grouped torch path
BACKENDS: dict[str, LoraImpl] = {"cpu": add_lora_cpu, "cuda": _add_lora_cuda}


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
             plan: LoraPlan | torch.Tensor) -> torch.Tensor:
    """y += batched LoRA(x) in place with the backend for y's device. `plan` may be a slot
    tensor (a plan is made) but pass a `make_plan` result to share it across layers.

    x (T, in), A (S, R, in), B (S, out, R), scale (S,), y (T, out) -> y.
    """
    if isinstance(plan, torch.Tensor):
        plan = make_plan(plan)
    impl = BACKENDS.get(y.device.type, add_lora_grouped)
    return impl(y, x, A, B, scale, plan)
