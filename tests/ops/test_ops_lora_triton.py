"""Triton BGMV / SGMV kernels vs the torch reference (needs CUDA; skipped otherwise)."""
from __future__ import annotations

import pytest
import torch

from adapterkit.ops.lora import add_lora, add_lora_ref, make_plan

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("T,S,R,din,dout", [(1, 1, 16, 64, 64), (32, 32, 16, 576, 192), (300, 4, 32, 256, 512),
                                             (77, 5, 8, 96, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bgmv", "sgmv"])
def test_triton_matches_reference(T, S, R, din, dout, dtype, kind):
    from adapterkit.ops import lora_triton

    g = torch.Generator().manual_seed(T + S)
    x = torch.randn(T, din, generator=g)
    A = torch.randn(S, R, din, generator=g) / din**0.5
    B = torch.randn(S, dout, R, generator=g)
    for s in range(S):  # mixed ranks by zero padding
        r = 1 + s % R
        A[s, r:] = 0
        B[s, :, r:] = 0
    scale = torch.rand(S, generator=g) + 0.5
    slots = torch.randint(-1, S, (T,), generator=g)
    y = torch.randn(T, dout, generator=g)
    want = add_lora_ref(y.clone(), x, A, B, scale, slots)
    dev = "cuda"
    args = [t.to(dev, dtype) for t in (y, x, A, B)]
    plan = make_plan(slots.to(dev))
    if kind == "bgmv":
        got = lora_triton.bgmv(args[0], args[1], args[2], args[3], scale.to(dev), slots.to(dev))
    else:
        got = lora_triton.sgmv(args[0], args[1], args[2], args[3], scale.to(dev), plan)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)
    # the dispatcher picks one of the two on CUDA
    got2 = add_lora(y.to(dev, dtype), *args[1:], scale.to(dev), plan)
    torch.testing.assert_close(got2.float().cpu(), want, rtol=tol, atol=tol)
