"""Gaussian-codebook quantization (Jie et al., 2023): codebooks, fast path vs reference, STE."""
from __future__ import annotations

import math

import pytest
import torch

from adapterkit.errors import ConfigError
from adapterkit.quant import (
    dequantize_normal,
    dequantize_normal_reference,
    fake_quantize_normal,
    normal_codebook,
    quantize_normal,
    quantize_normal_reference,
)


def test_lloyd_max_levels_match_the_literature() -> None:
    # 1 bit: +-E|X| = +-sqrt(2/pi); 2 bits: Max (1960) +-0.4528, +-1.510; 4 bits: outer level 2.733
    assert torch.allclose(normal_codebook(1)[0], torch.tensor([-1.0, 1.0]) * math.sqrt(2 / math.pi))
    assert torch.allclose(normal_codebook(2)[0], torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104]), atol=1e-4)
    assert abs(float(normal_codebook(4)[0][-1]) - 2.7326) < 1e-3
    # the authors' code's rule: 1 bit = +-ppf(3/4)
    assert torch.allclose(normal_codebook(1, "median")[0], torch.tensor([-0.6745, 0.6745]), atol=1e-4)
    for bits in (1, 2, 4, 8):
        levels, t = normal_codebook(bits)
        assert levels.shape == (2**bits,) and t.shape == (2**bits - 1,)
        assert bool((levels[1:] > levels[:-1]).all()) and torch.allclose(levels, -levels.flip(0), atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_lloyd_has_the_lowest_error_on_gaussian_weights(bits: int) -> None:
    x = torch.randn(1, 100_000, generator=torch.Generator().manual_seed(0))
    errs = {}
    for rule in ("lloyd", "median"):
        c, m, s = quantize_normal(x, bits, None, rule)
        errs[rule] = float(((dequantize_normal(c, m, s, bits, None, rule) - x) ** 2).mean())
    # a uniform absmax grid with the same number of levels, for scale
    step = 2 * x.abs().max() / (2**bits - 1)
    uni = torch.round((x + x.abs().max()) / step) * step - x.abs().max()
    assert errs["lloyd"] < errs["median"] < float(((uni - x) ** 2).mean())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group_size", [None, -1, 4])
@pytest.mark.parametrize("rule", ["lloyd", "median"])
def test_fast_path_matches_reference(bits: int, group_size: int | None, rule: str) -> None:
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(bits)) * 0.3 + 0.1
    c, m, s = quantize_normal(w, bits, group_size, rule)
    rc, rm, rs = quantize_normal_reference(w, bits, group_size, rule)
    assert c.dtype == torch.uint8 and c.shape == w.shape and int(c.max()) < 2**bits
    assert torch.equal(c, rc) and torch.allclose(m, rm, atol=1e-6) and torch.allclose(s, rs, atol=1e-6)
    groups = {None: 1, -1: 6, 4: 12}[group_size]
    assert m.shape == (groups,) and s.shape == (groups,)
    d = dequantize_normal(c, m, s, bits, group_size, rule)
    assert torch.allclose(d, dequantize_normal_reference(c, m, s, bits, group_size, rule), atol=1e-6)
    # re-quantizing the dequantized values with the same statistics gives the same codes
    assert torch.allclose(fake_quantize_normal(w, bits, group_size, rule), d, atol=1e-6)


def test_one_bit_is_sign_and_scale() -> None:
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    c, m, s = quantize_normal(w, 1, -1)
    d = dequantize_normal(c, m, s, 1, -1)
    expect = m[:, None] + torch.sign(w - m[:, None]) * math.sqrt(2 / math.pi) * s[:, None]
    assert torch.allclose(d, expect, atol=1e-6)


def test_straight_through_gradient() -> None:
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    q = fake_quantize_normal(w, 2, None)
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    (q * g).sum().backward()
    # the paper's STE: w_q = (q + w_n - sg(w_n)) sigma + mu, differentiated through mu and sigma too
    w2 = w.detach().clone().requires_grad_(True)
    mu, sigma = w2.mean(), torch.sqrt(w2.var(unbiased=False) + 1e-10)
    wn = (w2 - mu) / sigma
    levels, t = normal_codebook(2)
    qq = levels[torch.bucketize(wn.detach(), t)]
    ((qq + wn - wn.detach()) * sigma + mu).mul(g).sum().backward()
    assert w.grad is not None and torch.allclose(w.grad, w2.grad, atol=1e-5)
    assert float(w.grad.abs().sum()) > 0
    # a constant matrix (zero spread) still has a finite gradient
    z = torch.zeros(3, 3, requires_grad=True)
    fake_quantize_normal(z, 1).sum().backward()
    assert bool(torch.isfinite(z.grad).all())


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="bits must be one of"):
        normal_codebook(3)
    with pytest.raises(ConfigError, match="rule"):
        normal_codebook(2, "uniform")
    with pytest.raises(ConfigError, match="does not divide the 8 input columns"):
        quantize_normal(torch.randn(4, 8), 2, 3)
    with pytest.raises(ConfigError, match="group_size must be"):
        quantize_normal(torch.randn(4, 8), 2, 0)
