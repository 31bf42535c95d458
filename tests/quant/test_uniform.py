"""int8 / int4 weight-only quantization: fast path vs reference, ranges, error bounds."""
from __future__ import annotations

import pytest
import torch

from adapterkit.errors import ConfigError
from adapterkit.quant import dequantize_int, dequantize_int_reference, int_range, quantize_int, quantize_int_reference


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, -1, 8])
@pytest.mark.parametrize("scheme", ["absmax", "minmax"])
def test_fast_path_matches_reference(bits: int, group_size: int | None, scheme: str) -> None:
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(bits)) + 0.2
    w[2] = 0.0  # a constant row: scale falls back to 1, codes stay exact
    c, s, z = quantize_int(w, bits, group_size, scheme)
    rc, rs, rz = quantize_int_reference(w, bits, group_size, scheme)
    assert torch.equal(c, rc) and torch.allclose(s, rs) and torch.equal(z, rz)
    lo, hi = int_range(bits, scheme)
    assert c.dtype == (torch.int8 if scheme == "absmax" else torch.uint8)
    assert int(c.min()) >= lo and int(c.max()) <= hi
    d = dequantize_int(c, s, z, group_size)
    assert torch.allclose(d, dequantize_int_reference(c, s, z, group_size))
    # round-to-nearest: every element within half a step (of its group's scale) of the original
    step = s.repeat_interleave(w.numel() // s.numel()).reshape(w.shape)
    assert bool(((d - w).abs() <= step / 2 + 1e-6).all())
    if group_size == -1:
        assert torch.equal(d[2], torch.zeros(16))


def test_int8_is_much_finer_than_int4() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    err = {b: float((dequantize_int(*quantize_int(w, b)) - w).norm() / w.norm()) for b in (4, 8)}
    assert err[8] < 0.01 < err[4] < 0.2 and err[4] / err[8] > 10


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="bits must be one of 4, 8"):
        quantize_int(torch.randn(2, 2), 2)
    with pytest.raises(ConfigError, match="scheme"):
        quantize_int(torch.randn(2, 2), 8, -1, "nf4")
    with pytest.raises(ConfigError, match="need"):
        dequantize_int(torch.zeros(2, 4, dtype=torch.int8), torch.ones(3), torch.zeros(3), -1)
