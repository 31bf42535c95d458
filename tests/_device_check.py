"""Catch tensors made on the CPU for a model that lives elsewhere, without a GPU.

Run the code on a ``meta`` model under :class:`DeviceMixCheck`: a CPU-made tensor (a
``torch.zeros(...)`` without ``device=``, a mask drawn on the CPU and never moved) meets a
meta tensor in some op, which the check records -- the op a CUDA model would fail on.
Explicit transfers (``.to(device)``, ``copy_``) are allowed; 0-dim CPU tensors are scalars,
which PyTorch accepts on any device.

Meta tensors hold no values, so the few value checks a merge makes (``torch.equal`` restore
checks, ``bool(...)``/``.item()`` guards, ``allclose`` probes) get fixed answers: "changed
since" (so unmerge takes its arithmetic path) and "true" (guards pass). Only the device
bookkeeping is under test here, never the numbers.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class DeviceMixCheck(TorchDispatchMode):
    """Record every op whose (non-scalar) tensor arguments and results span several devices."""

    ALLOWED = {torch.ops.aten._to_copy, torch.ops.aten.copy_, torch.ops.aten.to}  # explicit transfers
    # CUDA accepts CPU index tensors for a tensor on the device (not device indices for a CPU tensor)
    INDEXING = {torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_}
    FAKE = {torch.ops.aten.equal: False, torch.ops.aten.is_nonzero: True, torch.ops.aten._local_scalar_dense: 1,
            torch.ops.aten.allclose: True}

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_flatten((args, kwargs))[0])
        if on_meta and func.overloadpacket in self.FAKE:
            self._record(func, args, kwargs, None)
            return self.FAKE[func.overloadpacket]
        out = func(*args, **(kwargs or {}))
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        if func.overloadpacket in self.INDEXING and args[0].device.type != "cpu":
            return
        if func.overloadpacket not in self.ALLOWED:
            ts = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
            devs = sorted({t.device.type for t in ts})
            if len(devs) > 1:
                self.mixed.append(f"{func} on {devs}")
