"""Triton kernels for batched multi-adapter LoRA on CUDA (imported lazily by `ops.lora`).

Same math and shapes as `ops.lora` (x (T, in), A (S, R, in), B (S, out, R), scale (S,),
slots (T,) with -1 = none, y (T, out) updated in place):

  * BGMV (decode: few tokens per adapter): one program per (token, output block); each token
    reads its own adapter's rows. Pure loads + tl.sum, so any R / in / out works.
  * SGMV (prefill: long runs of one adapter): tokens sorted by slot (`LoraPlan.order`), one
    program per (segment tile of BLOCK_M tokens, output block), tiled tl.dot.

Every tensor is addressed through its strides, so transposed slot storage (the CPU layout of
`serve.adapters.LoraSlots`) and column slices of a fused output (`gu[:, :ff]`) need no copy;
Triton specializes strides equal to 1, so contiguous operands keep vectorized loads. Slot
offsets are computed in int64 (S * R * in can pass 2**31 with many slots). The per-step
metadata (int32 slots, segment / tile tables) is built once per `LoraPlan` and reused by every
layer through `plan.memo`.

Accumulation is fp32 whatever the storage dtype. Tested against `add_lora_ref` on CUDA in
tests/ops/test_ops_lora_triton.py and, without a GPU, under Triton's interpreter
(TRITON_INTERPRET=1) in tests/ops/test_ops_lora_triton_interpret.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapterkit.ops.lora import LoraPlan

# BGMV (one program per token) while adapters average at most this many tokens, else SGMV
BGMV_MAX_TOKENS_PER_ADAPTER = 2
SGMV_BLOCK_M = 32  # tokens per SGMV tile; tl.dot needs >= 16


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, slot_ptr, h_ptr, IN, R,
                        sx_t, sx_k, sa_s, sa_r, sa_k, sh_t,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    s = tl.load(slot_ptr + t).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if s >= 0:
        for k0 in range(0, IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + t * sx_t + offs_k * sx_k, mask=offs_k < IN, other=0.0).to(tl.float32)  # (K,)
            a = tl.load(a_ptr + s * sa_s + offs_r[:, None] * sa_r + offs_k[None, :] * sa_k,
                        mask=(offs_r[:, None] < R) & (offs_k[None, :] < IN), other=0.0).to(tl.float32)  # (R, K)
            acc += tl.sum(a * xk[None, :], axis=1)
    tl.store(h_ptr + t * sh_t + offs_r, acc, mask=offs_r < R)


@triton.jit
def _bgmv_expand_kernel(h_ptr, b_ptr, scale_ptr, slot_ptr, y_ptr, OUT, R,
                        sh_t, sb_s, sb_o, sb_r, sy_t, sy_n,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    s = tl.load(slot_ptr + t).to(tl.int64)
    if s >= 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            h = tl.load(h_ptr + t * sh_t + offs_r, mask=offs_r < R, other=0.0)  # (R,) fp32
            b = tl.load(b_ptr + s * sb_s + offs_n[:, None] * sb_o + offs_r[None, :] * sb_r,
                        mask=(offs_n[:, None] < OUT) & (offs_r[None, :] < R), other=0.0).to(tl.float32)
            acc += tl.sum(b * h[None, :], axis=1)
        acc = acc * tl.load(scale_ptr + s).to(tl.float32)
        y_ptrs = y_ptr + t * sy_t + offs_n * sy_n
        old = tl.load(y_ptrs, mask=offs_n < OUT, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (old + acc).to(y_ptr.dtype.element_ty), mask=offs_n < OUT)


@triton.jit
def _sgmv_kernel(x_ptr, w_ptr, scale_ptr, order_ptr, seg_slot_ptr, seg_start_ptr, seg_end_ptr,
                 tile_seg_ptr, tile_m_ptr, y_ptr, K, N,
                 sx_t, sx_k, sw_s, sw_n, sw_k, sy_t, sy_n,
                 ACCUM: tl.constexpr, SCALE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[rows] (+)= x[rows] @ W[s].T (* scale[s]) for one BLOCK_M tile of one segment.
    W (S, N, K): A for shrink (N = R, K = in), B for expand (N = out, K = R)."""
    tile = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + tile)
    m0 = tl.load(tile_m_ptr + tile)
    s = tl.load(seg_slot_ptr + seg).to(tl.int64)
    end = tl.load(seg_end_ptr + seg)
    offs_m = tl.load(seg_start_ptr + seg) + m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < end
    rows = tl.load(order_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)  # token ids of this tile
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * sx_t + offs_k[None, :] * sx_k,
                     mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)  # (M, K)
        wt = tl.load(w_ptr + s * sw_s + offs_n[None, :] * sw_n + offs_k[:, None] * sw_k,
                     mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0).to(tl.float32)  # (K, N)
        acc += tl.dot(xt, wt, input_precision="ieee")
    if SCALE:
        acc = acc * tl.load(scale_ptr + s).to(tl.float32)
    y_ptrs = y_ptr + rows[:, None] * sy_t + offs_n[None, :] * sy_n
    mask = m_ok[:, None] & (offs_n[None, :] < N)
    if ACCUM:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _check(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
           num_tokens: int) -> None:
    """Shape / device checks (host metadata only, no sync) so misuse is a ValueError naming the
    tensor rather than an out-of-bounds read in a kernel."""
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3 or y.dim() != 2:
        raise ValueError(f"lora_triton: expected x (T, in), A (S, R, in), B (S, out, R), y (T, out); got x "
                         f"{tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, y {tuple(y.shape)}")
    S, R, din = A.shape  # A defines the layer; x, y, B, scale must agree with it and the token count
    want = {"x": (x, (num_tokens, din)), "y": (y, (num_tokens, y.shape[1])), "B": (B, (S, y.shape[1], R)),
            "scale": (scale, (S,))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"lora_triton: {name} has shape {tuple(t.shape)}, expected {shape} "
                             f"(x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, y {tuple(y.shape)})")
    for name, t in (("x", x), ("A", A), ("B", B), ("scale", scale)):
        if t.device != y.device:
            raise ValueError(f"lora_triton: {name} is on {t.device}, y on {y.device}")


def _slots_i32(plan: LoraPlan, device: torch.device) -> torch.Tensor:
    """plan.slots as int32 on `device`, made once per plan (step), shared by every layer."""
    key = ("triton_slots", str(device))
    got = plan.memo.get(key)
    if got is None:
        got = plan.memo[key] = plan.slots.to(device=device, dtype=torch.int32)
    return got


def _sgmv_meta(plan: LoraPlan, device: torch.device, block_m: int) -> tuple[torch.Tensor, ...]:
    """(order, seg_slot, seg_start, seg_end, tile_seg, tile_m) int32 on `device`, built once per
    (plan, device, block_m) from one host table and ONE host-to-device copy; every layer reuses it."""
    key = ("triton_sgmv", str(device), block_m)
    got = plan.memo.get(key)
    if got is None:
        segs = plan.segments
        tiles = [(i, m) for i, (_, a, b) in enumerate(segs) for m in range(0, b - a, block_m)]
        host = [s for s, _, _ in segs] + [a for _, a, _ in segs] + [b for _, _, b in segs]
        host += [i for i, _ in tiles] + [m for _, m in tiles]
        flat = torch.tensor(host, dtype=torch.int32).to(device)
        n, nt = len(segs), len(tiles)
        got = (plan.order.to(device=device, dtype=torch.int32), flat[:n], flat[n:2 * n], flat[2 * n:3 * n],
               flat[3 * n:3 * n + nt], flat[3 * n + nt:])
        plan.memo[key] = got
    return got


def bgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
         slots: torch.Tensor) -> torch.Tensor:
    """Decode-style kernel pair (shrink then expand), fp32 intermediate h (T, R).

    Args:
        y: (T, out) output, updated in place (any strides, e.g. a column slice).
        x: (T, in) input; A: (S, R, in); B: (S, out, R) (any strides); scale: (S,).
        slots: (T,) slot per token, -1 = no adapter (int32 on y's device avoids a conversion).
    Returns:
        y.
    Raises:
        ValueError: shapes or devices disagree.
    """
    _check(y, x, A, B, scale, slots.shape[0])
    T, IN = x.shape
    S, R, _ = A.shape
    OUT = B.shape[1]
    slots = slots.to(device=y.device, dtype=torch.int32)
    if T == 0 or R == 0 or OUT == 0:
        return y
    h = torch.empty(T, R, dtype=torch.float32, device=x.device)
    BR = _pow2(R, 16, 64)
    _bgmv_shrink_kernel[(T, triton.cdiv(R, BR))](x, A, slots, h, IN, R, x.stride(0), x.stride(1), A.stride(0),
                                                 A.stride(1), A.stride(2), h.stride(0), BLOCK_R=BR, BLOCK_K=128)
    BN = 128
    _bgmv_expand_kernel[(T, triton.cdiv(OUT, BN))](h, B, scale, slots, y, OUT, R, h.stride(0), B.stride(0),
                                                   B.stride(1), B.stride(2), y.stride(0), y.stride(1),
                                                   BLOCK_N=BN, BLOCK_R=BR)
    return y


def sgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
         plan: LoraPlan, block_m: int = SGMV_BLOCK_M) -> torch.Tensor:
    """Prefill-style segmented kernel pair over tokens sorted by slot.

    Args:
        y, x, A, B, scale: as in `bgmv`.
        plan: `make_plan(slots)` for this step; its metadata tables are cached in `plan.memo`.
        block_m: tokens per tile, a power of two >= 16 (tl.dot's minimum).
    Returns:
        y.
    Raises:
        ValueError: shapes or devices disagree, or block_m is not a power of two >= 16.
    """
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"sgmv: block_m must be a power of two >= 16, got {block_m}")
    _check(y, x, A, B, scale, plan.num_tokens)
    S, R, IN = A.shape
    OUT = B.shape[1]
    if not plan.segments or R == 0 or OUT == 0:
        return y
    order, seg_slot, seg_start, seg_end, tile_seg, tile_m = _sgmv_meta(plan, y.device, block_m)
    ntiles = tile_seg.shape[0]
    # rows of tokens without a slot are never read: every row of a segment is fully written
    h = torch.empty(x.shape[0], R, dtype=torch.float32, device=x.device)
    BR = _pow2(R, 16, 64)
    _sgmv_kernel[(ntiles, triton.cdiv(R, BR))](
        x, A, scale, order, seg_slot, seg_start, seg_end, tile_seg, tile_m, h, IN, R,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), h.stride(0), h.stride(1),
        ACCUM=False, SCALE=False, BLOCK_M=block_m, BLOCK_N=BR, BLOCK_K=64)
    _sgmv_kernel[(ntiles, triton.cdiv(OUT, 64))](
        h, B, scale, order, seg_slot, seg_start, seg_end, tile_seg, tile_m, y, R, OUT,
        h.stride(0), h.stride(1), B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1),
        ACCUM=True, SCALE=True, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=BR)
    return y


def add_lora_triton(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                    plan: LoraPlan) -> torch.Tensor:
    """CUDA dispatch: BGMV when adapters have few tokens each (decode), SGMV otherwise.

    Args / Returns / Raises: as `bgmv` and `sgmv`; `plan` is shared by every layer of the step.
    """
    if not plan.any:
        return y
    if plan.num_tokens <= BGMV_MAX_TOKENS_PER_ADAPTER * len(plan.segments):
        return bgmv(y, x, A, B, scale, _slots_i32(plan, y.device))
    return sgmv(y, x, A, B, scale, plan)
