"""Bit packing: 1/2/4/8-bit codes stored densely in uint8 bytes.

``pack_bits(codes, bits)``: ``codes`` holds integers in [0, 2**bits); ``per = 8 // bits``
codes share one byte, code ``i`` at bit offset ``(i % per) * bits`` of byte ``i // per``
(little-end first, the layout of the reference code of Jie et al. 2023)::

    bits=1: 8 codes / byte    bits=2: 4 codes / byte    bits=4: 2 codes / byte    bits=8: 1

The last byte is zero-padded. ``unpack_bits(packed, bits, numel)`` inverts it exactly.
Each fast (vectorised) function has a plain-Python reference beside it.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

BITS = (1, 2, 4, 8)


def check_bits(bits: int, allowed: tuple[int, ...] = BITS, what: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, allowed))}, got {bits!r}")


def packed_size(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits: ceil(numel * bits / 8)."""
    per = 8 // bits
    return (numel + per - 1) // per


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ConfigError(f"codes must be a uint8 tensor, got {codes.dtype} (shape {tuple(codes.shape)})")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ConfigError(f"codes hold {int(codes.max())}, which does not fit in {bits} bits "
                          f"(shape {tuple(codes.shape)})")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 (any shape, values < 2**bits) -> packed uint8 (ceil(numel*bits/8),)."""
    _check_codes(codes, bits)
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.clone()
    per = 8 // bits
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per, device=flat.device, dtype=torch.int32) * bits  # (per,)
    # (m, per) codes, each shifted to its slot; slots never overlap, so sum == bitwise or
    return (flat.reshape(-1, per).to(torch.int32) << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """packed uint8 (ceil(numel*bits/8),) -> codes uint8 (numel,)."""
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ConfigError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_size(numel, bits):
        raise ConfigError(f"packed codes hold {packed.numel()} bytes; {numel} codes of {bits} bits need "
                          f"{packed_size(numel, bits)}")
    if bits == 8:
        return packed.clone()
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits  # (per,)
    mask = (1 << bits) - 1
    codes = (packed.to(torch.int32)[:, None] >> shifts) & mask  # (m, per)
    return codes.reshape(-1)[:numel].to(torch.uint8)


# -- references ------------------------------------------------------------------------------
def pack_bits_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain-Python :func:`pack_bits`: one code at a time."""
    _check_codes(codes, bits)
    per = 8 // bits
    values = [int(v) for v in codes.reshape(-1).tolist()]
    out = [0] * packed_size(len(values), bits)
    for i, v in enumerate(values):
        out[i // per] |= v << ((i % per) * bits)
    return torch.tensor(out, dtype=torch.uint8)


def unpack_bits_reference(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Plain-Python :func:`unpack_bits`."""
    per = 8 // bits
    data = [int(b) for b in packed.tolist()]
    out = [(data[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1) for i in range(numel)]
    return torch.tensor(out, dtype=torch.uint8)
