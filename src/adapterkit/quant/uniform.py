"""Uniform integer weight-only quantization (int8 / int4) of base weights.

For each group ``g`` (see :mod:`.groups`) of a weight matrix (rows, cols):

* ``"absmax"`` (symmetric): ``qmax = 2**(bits-1) - 1`` (127 / 7), ``scale = max|g| / qmax``,
  ``code = clamp(round(w / scale), -qmax, qmax)`` (int8 storage), ``zero = 0``;
* ``"minmax"`` (asymmetric): ``qmax = 2**bits - 1`` (255 / 15),
  ``scale = (max g - min g) / qmax``, ``zero = round(-min g / scale)``,
  ``code = clamp(round(w / scale) + zero, 0, qmax)`` (uint8 storage).

``deq = (code - zero) * scale``. A constant-zero group gets scale 1 (its codes are 0).
``round`` is round-half-to-even (torch.round). One code per byte in memory.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .groups import group_view
from .pack import check_bits

INT_BITS = (4, 8)
SCHEMES = ("absmax", "minmax")


def _check(bits: int, scheme: str) -> None:
    check_bits(bits, INT_BITS)
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")


def int_range(bits: int, scheme: str) -> tuple[int, int]:
    """(lowest code, highest code)."""
    _check(bits, scheme)
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if scheme == "absmax" else (0, 2**bits - 1)


def quantize_int(w: torch.Tensor, bits: int = 8, group_size: int | None = -1, scheme: str = "absmax"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (rows, cols) -> (codes (rows, cols) int8 | uint8, scale (G,) float32, zero (G,) float32)."""
    lo, hi = int_range(bits, scheme)
    g = group_view(w.detach().float(), group_size)  # (G, n)
    if scheme == "absmax":
        scale = g.abs().amax(dim=1) / hi
        zero = torch.zeros_like(scale)
    else:
        gmin, gmax = g.amin(dim=1), g.amax(dim=1)
        scale = (gmax - gmin) / hi
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-equal group: any scale works
    if scheme == "minmax":
        zero = torch.round(-gmin / scale)
    codes = torch.clamp(torch.round(g / scale[:, None]) + zero[:, None], lo, hi)
    dtype = torch.int8 if scheme == "absmax" else torch.uint8
    return codes.to(dtype).reshape(w.shape), scale, zero


def dequantize_int(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   group_size: int | None = -1) -> torch.Tensor:
    """(code - zero) * scale, float32 (rows, cols)."""
    g = group_view(codes, group_size).float()  # (G, n)
    if scale.shape != (g.shape[0],) or zero.shape != (g.shape[0],):
        raise ConfigError(f"scale/zero have shapes {tuple(scale.shape)}, {tuple(zero.shape)}; codes "
                          f"{tuple(codes.shape)} with group_size={group_size} need ({g.shape[0]},)")
    return ((g - zero.float()[:, None]) * scale.float()[:, None]).reshape(codes.shape)


# -- references ------------------------------------------------------------------------------
def quantize_int_reference(w: torch.Tensor, bits: int = 8, group_size: int | None = -1, scheme: str = "absmax"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_int` one group at a time, written from the formulas in the module docstring."""
    lo, hi = int_range(bits, scheme)
    codes, scales, zeros = [], [], []
    for row in group_view(w.detach().float(), group_size):
        if scheme == "absmax":
            s, z = row.abs().max() / hi, torch.tensor(0.0)
            if s == 0:
                s = torch.tensor(1.0)
        else:
            s = (row.max() - row.min()) / hi
            if s == 0:
                s = torch.tensor(1.0)
            z = torch.round(-row.min() / s)
        codes.append(torch.clamp(torch.round(row / s) + z, lo, hi))
        scales.append(s)
        zeros.append(z)
    dtype = torch.int8 if scheme == "absmax" else torch.uint8
    return torch.stack(codes).to(dtype).reshape(w.shape), torch.stack(scales), torch.stack(zeros)


def dequantize_int_reference(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                             group_size: int | None = -1) -> torch.Tensor:
    rows = [(row.float() - zero[i]) * scale[i] for i, row in enumerate(group_view(codes, group_size))]
    return torch.stack(rows).reshape(codes.shape)
