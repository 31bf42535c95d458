"""Quantization groups: which elements of a weight matrix share one scale.

A weight matrix ``w`` (rows, cols) -- for a layer, rows = output channels, cols = inputs --
is split into ``G`` groups of ``n`` consecutive elements, each quantized with its own
statistics (scale, mean/zero-point)::

    group_size=None  one group: the whole tensor              G = 1,            n = rows*cols
    group_size=-1    one group per row (per output channel)    G = rows,         n = cols
    group_size=k>0   row-wise groups of k consecutive inputs   G = rows*cols/k,  n = k
                     (k must divide cols)

``-1`` for "per channel" is GPTQ's convention. In row-major order every group is contiguous,
so the grouping is a plain reshape (no copy for contiguous inputs).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


def check_group_size(group_size: int | None, what: str = "group_size") -> None:
    """Raise ConfigError unless ``group_size`` is None, -1 or a positive integer."""
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ConfigError(f"{what} must be None (per tensor), -1 (per output channel) or a positive integer, "
                          f"got {group_size!r}")


def num_groups(shape: tuple[int, ...], group_size: int | None, what: str = "weight") -> tuple[int, int]:
    """(G, n) for a matrix of ``shape`` (rows, cols); ConfigError if ``group_size`` does not fit."""
    check_group_size(group_size)
    if len(shape) != 2:
        raise ConfigError(f"quantization works on matrices; {what} has shape {tuple(shape)}")
    rows, cols = shape
    if group_size is None:
        return 1, rows * cols
    if group_size == -1:
        return rows, cols
    if cols % group_size:
        raise ConfigError(f"group_size={group_size} does not divide the {cols} input columns of {what} "
                          f"{tuple(shape)}; pick a divisor of {cols}, -1 (per channel) or None (per tensor)")
    return rows * cols // group_size, group_size


def group_view(w: torch.Tensor, group_size: int | None, what: str = "weight") -> torch.Tensor:
    """``w`` (rows, cols) as (G, n): one row per quantization group."""
    g, n = num_groups(tuple(w.shape), group_size, what)
    return w.reshape(g, n)
