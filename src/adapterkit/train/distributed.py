"""Multi-process (data-parallel) training under ``torchrun`` / ``accelerate launch``.

Both launchers start one process per rank with ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in the environment; :func:`setup` reads them and joins
(or reuses) the default process group: gloo for a model on CPU, nccl for one on CUDA.

How a step is split (so ``K`` ranks x batch ``b`` computes what 1 rank x batch ``K*b`` does):

* the data order is the trainer's seeded permutation; global batch ``i`` is
  ``perm[i*K*b : (i+1)*K*b]`` and rank ``r`` takes the ``r``-th slice of ``b`` of it;
* every rank normalises its summed token loss by the *global* count of supervised tokens of
  the step (one all-reduce of the counts before backward), so the sum of the ranks' gradients
  is exactly the 1-process gradient;
* the gradients of the trainable (adapter) parameters are summed with one all-reduce of a
  flat buffer per optimizer step, after the last micro-batch, not per micro-batch.

Why not ``DistributedDataParallel``: the base is frozen and tiny adapters are all there is to
reduce; DDP would need ``find_unused_parameters`` for adapters that skip some calls (prefix
tuning, routed mixtures), reduces once per micro-batch unless wrapped in ``no_sync``, and
averages (divides by ``K``), which breaks the "normalise by the step's supervised tokens"
rule when the ranks hold different numbers of tokens. A manual sum is exact and simpler.
"""
from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adapterkit.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job (``world_size == 1``: not distributed)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files, logs and shows a progress bar."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by torchrun / accelerate launch)") from None


def env_info() -> DistInfo:
    """The rank layout from the launcher's environment (or the live process group).

    Returns:
        ``DistInfo()`` (world 1) when neither ``WORLD_SIZE > 1`` nor an initialised group exists.
    Raises:
        ConfigError: malformed ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_world_size(), dist.get_rank(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"inconsistent launcher environment: WORLD_SIZE={world}, RANK={rank}")
    return DistInfo(world, rank, local)


def setup(device: torch.device) -> DistInfo:
    """Join the default process group if the launcher asked for more than one process.

    Args:
        device: the model's device; CUDA means nccl (and that device becomes current),
            anything else gloo.
    Returns:
        The rank layout.
    Raises:
        ConfigError: distributed torch is unavailable, or a CUDA model sits on another GPU
            than ``cuda:LOCAL_RANK`` (K ranks would share one GPU).
    """
    info = env_info()
    if not info.enabled:
        return info
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        if device.index is not None and device.index != info.local_rank:
            raise ConfigError(f"rank {info.rank} (LOCAL_RANK={info.local_rank}) has its model on {device}; "
                              f"move it to cuda:{info.local_rank}, one GPU per rank")
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)  # env:// rendezvous: MASTER_ADDR/PORT, RANK, WORLD_SIZE
        atexit.register(_destroy)  # torch warns at exit about a group that was never destroyed
        log.debug("rank %d/%d joined the %s process group", info.rank, info.world_size, backend)
    return info


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (a no-op without a process group); returns ``t``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo, device: torch.device) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; nccl ships them via ``device``)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def broadcast_params(params: list[nn.Parameter]) -> None:
    """Copy rank 0's trainable tensors to every rank (an unseeded adapter init differs per rank)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not params:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, [p.data for p in params])


def _unflatten_into(flat: torch.Tensor, targets: list[torch.Tensor]) -> None:
    off = 0
    for t in targets:
        n = t.numel()
        t.copy_(flat[off : off + n].view_as(t).to(t.dtype))
        off += n


def all_reduce_grads(params: list[nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of ``params`` and the scalar ``extra`` over the ranks, in one call.

    A parameter no rank produced a gradient for keeps ``grad=None`` (so AdamW skips it, as in
    a 1-process run); one that only some ranks touched gets zeros elsewhere before the sum.

    Args:
        params: the trainable parameters (same order on every rank).
        extra: a float scalar to sum along (the step's loss sum).
    Returns:
        The summed ``extra``.
    """
    has = torch.tensor([p.grad is not None for p in params] + [True], dtype=torch.float32, device=extra.device)
    all_reduce_sum(has)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # float32 buffer: the sums are exact to rounding and fp32 is what AdamW's states use anyway
    flat = torch.cat([p.grad.reshape(-1).float() for p in live] + [extra.reshape(1).float()])
    all_reduce_sum(flat)
    _unflatten_into(flat[:-1], [p.grad for p in live])
    return flat[-1]


def shard_frozen_base(model: nn.Module, device: torch.device) -> int:
    """FSDP2: shard the frozen base over the ranks; the trainable (adapter) parameters stay whole.

    Every block named in the HF model's ``_no_split_modules`` (the decoder layers) and then the
    root get ``fully_shard``; each rank keeps ``1/K`` of every frozen weight and all-gathers a
    block's weights just for its forward and backward. The adapter's parameters are passed as
    ``ignored_params``: they are small, stay ordinary replicated tensors, and are summed by
    :func:`all_reduce_grads` like in the unsharded mode, so checkpoints, ``save_adapter`` and
    the "same curve as 1 process" property are unchanged. The model stays sharded afterwards.

    Args:
        model: the model with its adapter attached, inside an initialised process group.
        device: its device (``cpu`` works with gloo, ``cuda:LOCAL_RANK`` with nccl).
    Returns:
        How many modules were sharded (the root included).
    Raises:
        ConfigError: no process group, or a torch without ``fully_shard(ignored_params=...)``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("fsdp=True needs a multi-process launch (torchrun / accelerate launch)")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - torch < 2.6
        raise ConfigError(f"fsdp=True needs torch.distributed.fsdp.fully_shard (FSDP2): {e}") from None
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    trainable = {p for p in model.parameters() if p.requires_grad}
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names and m is not model]
    for m in blocks:  # inner units first: a root-only shard would gather the whole model at once
        fully_shard(m, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    return len(blocks) + 1


def reshard(model: nn.Module) -> None:
    """Free the gathered weights of a ``fully_shard``-ed root after a forward with no backward.

    FSDP2 keeps the root's parameters unsharded from a forward until its backward; after an
    eval (no backward) they would stay whole, on every rank, until the next step.
    """
    fn = getattr(model, "reshard", None)
    if callable(fn):
        fn()
