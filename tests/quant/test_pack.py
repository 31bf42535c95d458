"""Bit packing: fast path == plain-Python reference, exact round trip for every width."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterkit.errors import ConfigError
from adapterkit.quant import pack_bits, pack_bits_reference, packed_size, unpack_bits, unpack_bits_reference


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_round_trip_and_reference(bits: int, numel: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_size(numel, bits),)
    assert packed.numel() == -(-numel * bits // 8)  # ceil(numel * bits / 8)
    assert torch.equal(packed, pack_bits_reference(codes, bits))
    assert torch.equal(unpack_bits(packed, bits, numel), codes)
    assert torch.equal(unpack_bits_reference(packed, bits, numel), codes)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_round_trip_property(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=50))
    codes = torch.tensor(values, dtype=torch.uint8).reshape(-1)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, len(values)), codes)


def test_layout_is_little_end_first() -> None:
    # 1 bit: codes 1,0,0,0,0,0,0,1 -> bit 0 and bit 7 set; 4 bits: (3, 10) -> 3 | 10 << 4
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [129]
    assert pack_bits(torch.tensor([3, 10], dtype=torch.uint8), 4).tolist() == [3 | 10 << 4]
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="bits must be one of"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ConfigError, match="does not fit in 2 bits"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ConfigError, match="uint8"):
        pack_bits(torch.zeros(4, dtype=torch.int64), 2)
    with pytest.raises(ConfigError, match="need 2"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)
