"""Reproducible training: seeding every RNG, and PyTorch's deterministic-algorithms mode.

Two runs with the same seed, data, config, machine, torch version and thread count give the
same losses bit for bit when:

* every RNG is seeded *before the adapter is created* (LoRA's ``A`` and most other adapter
  inits draw from the global torch RNG): :func:`seed_everything` (``adapterkit train`` calls
  it before loading the model; Python users call it before ``add_adapter``);
* the data order comes from a generator seeded by ``(seed, epoch)`` (the trainer's own);
* dropout draws from the global torch RNG, which the trainer seeds and checkpoints;
* ops with a nondeterministic kernel use a deterministic one:
  :func:`deterministic_algorithms` (``TrainConfig.deterministic``).

Thread count: a CPU reduction split over another number of threads may round differently, so
a resume on a machine with another ``torch.get_num_threads()`` can drift in the last bits
(the trainer warns when that happens).
"""
from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator

import torch


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, torch (CPU and every CUDA device) and numpy's global RNG.

    Args:
        seed: a non-negative integer.
    """
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def resolve_deterministic(setting: bool | str, device: torch.device) -> bool:
    """``"auto"`` means on for CPU (cheap there) and off on accelerators; a bool is taken as is."""
    if setting == "auto":
        return device.type == "cpu"
    return bool(setting)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Run the block with ``torch.use_deterministic_algorithms(True, warn_only=True)``.

    The setting is process-global, so the caller's previous setting (and cuDNN's flags) is
    restored on exit. ``warn_only``: an op with no deterministic kernel warns instead of
    aborting a long run. On CUDA, cuBLAS additionally needs the environment variable
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before the process starts (torch warns if not).

    Args:
        enabled: False makes this a no-op.
    """
    if not enabled:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings():
            # one warning per op kind, not one per step
            warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")
            yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn
