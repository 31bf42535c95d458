"""`ops.linear`: the oneDNN serving matmul equals the plain reference, plain and prepacked."""
from __future__ import annotations

import pytest
import torch

from adapterkit.ops.linear import linear, linear_ref, onednn_available, prepack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 48, 130])
def test_linear_equals_reference(dtype, packed, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=g).to(dtype)
    x = torch.randn(rows, 40, generator=g).to(dtype)
    wp = prepack(w, rows_hint=48) if packed else w
    if packed and onednn_available():
        assert wp.is_mkldnn  # really the blocked layout, not the plain weight again
    got = linear(x, wp)
    assert got.dtype == dtype and got.shape == (rows, 96)
    want = linear_ref(x.double(), w.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol * 40 ** 0.5, rtol=tol)


def test_linear_takes_batched_and_non_contiguous_inputs():
    w = torch.randn(16, 8)
    x = torch.randn(8, 3, 5).transpose(0, 2)  # (5, 3, 8), not contiguous
    torch.testing.assert_close(linear(x, w), linear_ref(x, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(x, prepack(w)), linear_ref(x, w), atol=1e-5, rtol=1e-5)


def test_linear_names_a_mismatch():
    with pytest.raises(ValueError, match=r"x \(3, 5\).*weight \(16, 8\)"):
        linear(torch.randn(3, 5), torch.randn(16, 8))
    with pytest.raises(ValueError, match="bfloat16"):
        linear(torch.randn(3, 8), torch.randn(16, 8).bfloat16())


def test_prepack_leaves_what_onednn_cannot_take():
    w = torch.randn(4, 4, dtype=torch.float64)
    assert prepack(w) is w
    x = torch.randn(2, 4, dtype=torch.float64)
    assert torch.equal(linear(x, w), linear_ref(x, w))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_bias_equals_functional_linear(bias):
    from adapterkit.ops.linear import linear_bias

    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(24, 10, generator=g), (torch.randn(24, generator=g) if bias else None)
    x = torch.randn(2, 5, 10, generator=g)
    torch.testing.assert_close(linear_bias(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
    xb = x.bfloat16()  # another dtype: F.linear's own path (its own error on a mix)
    wb = w.bfloat16()
    assert torch.equal(linear_bias(xb, wb, None), torch.nn.functional.linear(xb, wb))
