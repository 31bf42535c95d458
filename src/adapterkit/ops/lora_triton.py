"""Triton kernels for batched multi-adapter LoRA on CUDA (imported lazily by `ops.lora`).

Same math and shapes as `ops.lora` (x (T, in), A (S, R, in), B (S, out, R), scale (S,),
slots (T,) with -1 = none, y (T, out) updated in place):

  * BGMV (decode: few tokens per adapter): one program per (token, output block); each token
    reads its own adapter's rows. Pure loads + tl.sum, so any R / in / out works.
  * SGMV (prefill: long runs of one adapter): tokens sorted by slot (`LoraPlan.order`), one
    program per (segment tile of BLOCK_M tokens, output block), tiled tl.dot.

Accumulation is fp32 whatever the storage dtype. Tested against `add_lora_ref` in
tests/ops/test_lora_triton.py (skipped without CUDA).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapterkit.ops.lora import LoraPlan

# BGMV (one program per token) while adapters average at most this many tokens, else SGMV
BGMV_MAX_TOKENS_PER_ADAPTER = 2


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, slot_ptr, h_ptr, IN, R,
                        sx_t, sa_s, sa_r, sh_t,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    s = tl.load(slot_ptr + t)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if s >= 0:
        for k0 in range(0, IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + t * sx_t + offs_k, mask=offs_k < IN, other=0.0).to(tl.float32)  # (K,)
            a = tl.load(a_ptr + s * sa_s + offs_r[:, None] * sa_r + offs_k[None, :],
                        mask=(offs_r[:, None] < R) & (offs_k[None, :] < IN), other=0.0).to(tl.float32)  # (R, K)
            acc += tl.sum(a * xk[None, :], axis=1)
    tl.store(h_ptr + t * sh_t + offs_r, acc, mask=offs_r < R)


@triton.jit
def _bgmv_expand_kernel(h_ptr, b_ptr, scale_ptr, slot_ptr, y_ptr, OUT, R,
                        sh_t, sb_s, sb_o, sy_t,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    s = tl.load(slot_ptr + t)
    if s >= 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            h = tl.load(h_ptr + t * sh_t + offs_r, mask=offs_r < R, other=0.0)  # (R,) fp32
            b = tl.load(b_ptr + s * sb_s + offs_n[:, None] * sb_o + offs_r[None, :],
                        mask=(offs_n[:, None] < OUT) & (offs_r[None, :] < R), other=0.0).to(tl.float32)
            acc += tl.sum(b * h[None, :], axis=1)
        acc = acc * tl.load(scale_ptr + s).to(tl.float32)
        y_ptrs = y_ptr + t * sy_t + offs_n
        old = tl.load(y_ptrs, mask=offs_n < OUT, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (old + acc).to(y_ptr.dtype.element_ty), mask=offs_n < OUT)


@triton.jit
def _sgmv_kernel(x_ptr, w_ptr, scale_ptr, order_ptr, seg_slot_ptr, seg_start_ptr, seg_end_ptr,
                 tile_seg_ptr, tile_m_ptr, y_ptr, K, N,
                 sx_t, sw_s, sw_n, sy_t,
                 ACCUM: tl.constexpr, SCALE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[rows] (+)= x[rows] @ W[s].T (* scale[s]) for one BLOCK_M tile of one segment.
    W (S, N, K): A for shrink (N = R, K = in), B for expand (N = out, K = R)."""
    tile = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + tile)
    m0 = tl.load(tile_m_ptr + tile)
    s = tl.load(seg_slot_ptr + seg)
    end = tl.load(seg_end_ptr + seg)
    offs_m = tl.load(seg_start_ptr + seg) + m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < end
    rows = tl.load(order_ptr + offs_m, mask=m_ok, other=0)  # token ids of this tile
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * sx_t + offs_k[None, :],
                     mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)  # (M, K)
        wt = tl.load(w_ptr + s * sw_s + offs_n[None, :] * sw_n + offs_k[:, None],
                     mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0).to(tl.float32)  # (K, N)
        acc += tl.dot(xt, wt, input_precision="ieee")
    if SCALE:
        acc = acc * tl.load(scale_ptr + s).to(tl.float32)
    y_ptrs = y_ptr + rows[:, None] * sy_t + offs_n[None, :]
    mask = m_ok[:, None] & (offs_n[None, :] < N)
    if ACCUM:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def bgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
         slots: torch.Tensor) -> torch.Tensor:
    """Decode-style kernel pair (shrink then expand), fp32 intermediate h (T, R)."""
    T, IN = x.shape
    S, R, _ = A.shape
    OUT = B.shape[1]
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
    slots = slots.to(torch.int32).contiguous()
    h = torch.empty(T, R, dtype=torch.float32, device=x.device)
    BR = _pow2(R, 16, 64)
    _bgmv_shrink_kernel[(T, triton.cdiv(R, BR))](x, A, slots, h, IN, R, x.stride(0), A.stride(0), A.stride(1),
                                                 h.stride(0), BLOCK_R=BR, BLOCK_K=128)
    assert y.stride(1) == 1, "y must have unit stride on the last dim"
    BN = 128
    _bgmv_expand_kernel[(T, triton.cdiv(OUT, BN))](h, B, scale, slots, y, OUT, R, h.stride(0), B.stride(0),
                                                   B.stride(1), y.stride(0), BLOCK_N=BN, BLOCK_R=BR)
    return y


def sgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
         plan: LoraPlan, block_m: int = 32) -> torch.Tensor:
    """Prefill-style segmented kernel pair over tokens sorted by slot."""
    T, IN = x.shape
    S, R, _ = A.shape
    OUT = B.shape[1]
    dev = x.device
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
    segs = plan.segments
    seg_slot = torch.tensor([s for s, _, _ in segs], dtype=torch.int32, device=dev)
    seg_start = torch.tensor([a for _, a, _ in segs], dtype=torch.int32, device=dev)
    seg_end = torch.tensor([b for _, _, b in segs], dtype=torch.int32, device=dev)
    tiles = [(i, m) for i, (_, a, b) in enumerate(segs) for m in range(0, b - a, block_m)]
    tile_seg = torch.tensor([i for i, _ in tiles], dtype=torch.int32, device=dev)
    tile_m = torch.tensor([m for _, m in tiles], dtype=torch.int32, device=dev)
    order = plan.order.to(torch.int32).to(dev)
    h = torch.zeros(T, R, dtype=torch.float32, device=dev)
    BR = _pow2(R, 16, 64)
    _sgmv_kernel[(len(tiles), triton.cdiv(R, BR))](
        x, A, scale, order, seg_slot, seg_start, seg_end, tile_seg, tile_m, h, IN, R,
        x.stride(0), A.stride(0), A.stride(1), h.stride(0),
        ACCUM=False, SCALE=False, BLOCK_M=block_m, BLOCK_N=BR, BLOCK_K=64)
    assert y.stride(1) == 1, "y must have unit stride on the last dim"
    _sgmv_kernel[(len(tiles), triton.cdiv(OUT, 64))](
        h, B, scale, order, seg_slot, seg_start, seg_end, tile_seg, tile_m, y, R, OUT,
        h.stride(0), B.stride(0), B.stride(1), y.stride(0),
        ACCUM=True, SCALE=True, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=BR)
    return y


def add_lora_triton(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                    plan: LoraPlan) -> torch.Tensor:
    """CUDA dispatch: BGMV when adapters have few tokens each (decode), SGMV otherwise."""
    if not plan.any:
        return y
    if plan.num_tokens <= BGMV_MAX_TOKENS_PER_ADAPTER * len(plan.segments):
        return bgmv(y, x, A, B, scale, plan.slots.to(y.device))
    return sgmv(y, x, A, B, scale, plan)
