"""Batched multi-adapter LoRA: references vs plain dense math, fast paths vs the reference."""
from __future__ import annotations

import pytest
import torch

from adapterkit.ops.lora import (
    BACKENDS,
    add_lora,
    add_lora_cpu,
    add_lora_bgmv,
    add_lora_grouped,
    add_lora_ref,
    lora_expand_ref,
    lora_shrink_ref,
    make_plan,
)


def _case(T: int, S: int, R: int, din: int, dout: int, dtype: torch.dtype, seed: int = 0,
          none_frac: float = 0.25, mixed_ranks: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, din, generator=g).to(dtype)
    A = torch.randn(S, R, din, generator=g) / din**0.5
    B = torch.randn(S, dout, R, generator=g)
    if mixed_ranks:  # each slot uses only its first r_s ranks: zero padding, as the engine stores them
        ranks = torch.randint(1, R + 1, (S,), generator=g)
        for s in range(S):
            A[s, ranks[s]:] = 0
            B[s, :, ranks[s]:] = 0
    scale = torch.rand(S, generator=g) + 0.5
    slots = torch.randint(0, S, (T,), generator=g)
    slots[torch.rand(T, generator=g) < none_frac] = -1
    y = torch.randn(T, dout, generator=g).to(dtype)
    return y, x, A.to(dtype), B.to(dtype), scale, slots


def _dense(y, x, A, B, scale, slots):
    """Independent math: per token, y += x @ (scale * B @ A).T (the merged delta weight)."""
    out = y.double().clone()
    for t in range(x.shape[0]):
        s = int(slots[t])
        if s >= 0:
            out[t] += x[t].double() @ (scale[s].double() * B[s].double() @ A[s].double()).T
    return out


@pytest.mark.parametrize("T,S,R", [(1, 1, 1), (7, 3, 4), (33, 8, 16), (64, 2, 8)])
def test_reference_matches_dense_math(T, S, R):
    y, x, A, B, scale, slots = _case(T, S, R, 24, 40, torch.float32)
    want = _dense(y, x, A, B, scale, slots)
    got = add_lora_ref(y.clone(), x, A, B, scale, slots)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # shrink + expand compose to the same thing
    h = lora_shrink_ref(x, A, slots)
    got2 = lora_expand_ref(y.clone(), h, B, scale, slots)
    torch.testing.assert_close(got2.double(), want, rtol=1e-5, atol=1e-5)
    assert (h[slots < 0] == 0).all()


IMPLS = {"grouped": add_lora_grouped, "bgmv": add_lora_bgmv, "cpu": add_lora_cpu,
         "add_lora": lambda y, x, A, B, s, p: add_lora(y, x, A, B, s, p.slots)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("T,S,R,din,dout", [(1, 1, 8, 16, 16), (5, 4, 4, 32, 16), (32, 32, 16, 64, 48),
                                             (96, 3, 32, 48, 80), (40, 8, 1, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("none_frac", [0.0, 0.3, 1.0])
def test_fast_paths_match_reference(impl, T, S, R, din, dout, dtype, none_frac):
    y, x, A, B, scale, slots = _case(T, S, R, din, dout, dtype, seed=T * 31 + S, none_frac=none_frac)
    want = add_lora_ref(y.clone(), x, A, B, scale, slots)
    got = IMPLS[impl](y.clone(), x, A, B, scale, make_plan(slots))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-1)  # bf16 rounds h and y
    torch.testing.assert_close(got, want, **tol)
    # rows without an adapter are untouched bit for bit
    assert torch.equal(got[slots < 0], y[slots < 0])


def test_in_place_on_a_column_slice():
    """The engine adds LoRA into slices of a fused qkv output: a non-contiguous view."""
    y, x, A, B, scale, slots = _case(12, 4, 8, 16, 24, torch.float32)
    for impl in (add_lora_grouped, add_lora_bgmv, add_lora_cpu):
        big = torch.zeros(12, 60)
        view = big[:, 10:34]
        view.copy_(y)
        impl(view, x, A, B, scale, make_plan(slots))
        torch.testing.assert_close(big[:, 10:34], add_lora_ref(y.clone(), x, A, B, scale, slots))
        assert (big[:, :10] == 0).all() and (big[:, 34:] == 0).all()


def test_plan_segments_cover_only_present_adapters():
    slots = torch.tensor([3, -1, 3, 0, 7, -1, 0, 3])
    p = make_plan(slots)
    assert [s for s, _, _ in p.segments] == [0, 3, 7]
    assert sum(b - a for _, a, b in p.segments) == 6
    for s, a, b in p.segments:
        assert (slots[p.order[a:b]] == s).all()
    assert p.valid.tolist() == [0, 2, 3, 4, 6, 7]
    assert p.runs == () and p.short.tolist() == [0, 2, 3, 4, 6, 7]  # no run reaches LONG_RUN
    assert not make_plan(torch.full((4,), -1)).any


def test_backend_table_is_explicit():
    assert BACKENDS["cpu"] is add_lora_cpu
    assert "cuda" in BACKENDS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bgmv_with_true_ranks_and_slot_storage_layout(dtype):
    """The engine's CPU slots store A^T (S, in, R) and B^T (S, R, out) and pass transposed views,
    with per-slot ranks so the expand skips the zero padding: same result as the reference."""
    g = torch.Generator().manual_seed(3)
    S, R, din, dout, T = 6, 16, 40, 24, 29
    ranks = torch.tensor([16, 8, 1, 4, 0, 12])
    At = torch.zeros(S, din, R)
    Bt = torch.zeros(S, R, dout)
    for s in range(S):
        At[s, :, :ranks[s]] = torch.randn(din, int(ranks[s]), generator=g)
        Bt[s, :ranks[s]] = torch.randn(int(ranks[s]), dout, generator=g)
    A, B = At.to(dtype).transpose(1, 2), Bt.to(dtype).transpose(1, 2)  # logical (S, R, in), (S, out, R)
    scale = torch.rand(S, generator=g) + 0.5
    slots = torch.randint(-1, S, (T,), generator=g)
    x = torch.randn(T, din, generator=g).to(dtype)
    y = torch.randn(T, dout, generator=g).to(dtype)
    want = add_lora_ref(y.clone(), x, A, B, scale, slots)
    got = add_lora_bgmv(y.clone(), x, A, B, scale, make_plan(slots, ranks=ranks))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-1)
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(got[slots < 0], y[slots < 0])


def test_plan_runs_split_prefill_chunks_from_decode_tokens():
    """Decode tokens first (one per sequence), then two prefill chunks: the chunks are runs."""
    from adapterkit.ops.lora import LONG_RUN

    n = LONG_RUN
    slots = torch.tensor([2, -1, 0, 2] + [1] * n + [-1] * n + [2] * (n + 3) + [0] * (n - 1))
    p = make_plan(slots)
    assert p.runs == ((1, 4, 4 + n, -1), (2, 4 + 2 * n, 7 + 3 * n, -1))
    assert make_plan(slots, ranks=torch.tensor([4, 5, 6])).runs[1] == (2, 4 + 2 * n, 7 + 3 * n, 6)
    assert p.short.tolist() == [0, 2, 3] + list(range(7 + 3 * n, 6 + 4 * n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_mixed_runs_and_singles(dtype):
    """Long runs (matmuls at true rank) and single tokens (bgmv) in one batch, as in a step that
    mixes prefill chunks and decodes: equal to the reference."""
    from adapterkit.ops.lora import LONG_RUN

    g = torch.Generator().manual_seed(5)
    S, R, din, dout = 5, 8, 24, 40
    slots = torch.tensor([3, -1, 0, 4, 1] + [2] * (LONG_RUN + 2) + [-1] * 3 + [0] * LONG_RUN + [1, 1])
    T = slots.shape[0]
    ranks = torch.tensor([8, 3, 5, 1, 0])
    A, B = torch.zeros(S, R, din), torch.zeros(S, dout, R)
    for s in range(S):
        A[s, :ranks[s]] = torch.randn(int(ranks[s]), din, generator=g)
        B[s, :, :ranks[s]] = torch.randn(dout, int(ranks[s]), generator=g)
    A, B = A.to(dtype), B.to(dtype)
    scale = torch.rand(S, generator=g) + 0.5
    x = torch.randn(T, din, generator=g).to(dtype)
    y = torch.randn(T, dout, generator=g).to(dtype)
    want = add_lora_ref(y.clone(), x, A, B, scale, slots)
    plan = make_plan(slots, ranks=ranks)
    assert len(plan.runs) == 2
    got = add_lora_cpu(y.clone(), x, A, B, scale, plan)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=1e-1)
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(got[slots < 0], y[slots < 0])
    # scale None: B already multiplied by the scaling (how the engine's slots store it)
    Bscaled = (B.float() * scale.view(-1, 1, 1)).to(dtype)
    got2 = add_lora_cpu(y.clone(), x, A, Bscaled, None, plan)
    torch.testing.assert_close(got2, want, **tol)
