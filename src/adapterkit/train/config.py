"""``TrainConfig``: the trainer's hyper-parameters, and the learning-rate schedules."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapterkit.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")

#: fields that change the computation: resuming with a different value is refused, because
#: the continued run would no longer be the run that wrote the checkpoint.
RESUME_SENSITIVE = (
    "lr", "steps", "epochs", "batch_size", "grad_accum", "warmup_steps", "warmup_ratio",
    "schedule", "weight_decay", "max_grad_norm", "seed", "max_length",
)


@dataclass(frozen=True)
class TrainConfig:
    """Trainer hyper-parameters (frozen, validated on creation).

    Attributes:
        out_dir: where checkpoints/, metrics.jsonl, loss.png and adapter/ go.
        lr: peak learning rate of AdamW.
        steps: optimizer steps to run; exclusive with ``epochs``. Neither given: 1 epoch.
        epochs: passes over the training data (may be fractional); exclusive with ``steps``.
        batch_size: examples per micro-batch (per process under torchrun / accelerate launch).
        grad_accum: micro-batches per optimizer step (effective batch = batch_size * grad_accum).
        warmup_steps: linear warmup length in steps; exclusive with ``warmup_ratio``.
        warmup_ratio: warmup as a fraction of the total steps.
        schedule: decay after warmup: "cosine" (to 0), "linear" (to 0) or "constant".
        weight_decay: AdamW decoupled decay, applied to params with >= 2 dims only (1-D
            scales such as IA3 vectors or DoRA magnitudes are not pulled towards 0).
        max_grad_norm: clip the global grad norm to this; None or 0 disables clipping.
        bf16: "auto" (bf16 autocast on a CUDA device that supports it; off on CPU, where
            it is slower), True (always) or False (never).
        gradient_checkpointing: recompute activations in backward (HF models), saves memory.
        eval_every: evaluate every N steps (0: only at the end); needs eval data.
        save_every: checkpoint every N steps and at the end (0: no checkpoints).
        keep_last: how many newest checkpoints to keep.
        seed: seeds python/torch/numpy RNGs and the data order (seed before ``add_adapter``
            too, for the adapter's init: :func:`adapterkit.train.seed_everything`).
        deterministic: run with ``torch.use_deterministic_algorithms`` (see
            :mod:`adapterkit.train.repro`): "auto" (on for CPU, off on CUDA), True or False.
        log_every: write a metrics record every N steps (and at the last step).
        max_length: truncate examples to this many tokens (None: no limit).
        progress: show a tqdm progress bar.
        fsdp: under torchrun / accelerate launch, shard the frozen base with FSDP2
            ``fully_shard`` (the adapter stays replicated; see :mod:`adapterkit.train.distributed`).
    """

    out_dir: str | Path = "runs/adapter"
    lr: float = 2e-4
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    seed: int = 0
    deterministic: bool | Literal["auto"] = "auto"
    log_every: int = 10
    max_length: int | None = 1024
    progress: bool = True
    fsdp: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{field} {why}, got {getattr(self, field)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a finite number > 0")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"TrainConfig: give steps or epochs, not both (steps={self.steps}, epochs={self.epochs})")
        if self.steps is not None and not (is_int(self.steps) and self.steps > 0):
            raise bad("steps", "must be a positive integer")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise bad("epochs", "must be > 0")
        for f in ("batch_size", "grad_accum", "log_every"):
            if not (is_int(getattr(self, f)) and getattr(self, f) > 0):
                raise bad(f, "must be a positive integer")
        for f in ("warmup_steps", "eval_every", "save_every", "keep_last", "seed"):
            if not (is_int(getattr(self, f)) and getattr(self, f) >= 0):
                raise bad(f, "must be an integer >= 0")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0.0 <= self.warmup_ratio < 1.0):
            raise bad("warmup_ratio", "must be in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError(f"TrainConfig: give warmup_steps or warmup_ratio, not both ({self.warmup_steps}, {self.warmup_ratio})")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise bad("weight_decay", "must be >= 0")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0):
            raise bad("max_grad_norm", "must be >= 0 or None")
        if not isinstance(self.fsdp, bool):
            raise bad("fsdp", "must be True or False")
        for f in ("bf16", "deterministic"):
            if not (isinstance(getattr(self, f), bool) or getattr(self, f) == "auto"):
                raise bad(f, 'must be True, False or "auto"')
        if self.max_length is not None and not (is_int(self.max_length) and self.max_length >= 2):
            raise bad("max_length", "must be an integer >= 2 or None")

    def total_steps(self, num_examples: int, world_size: int = 1) -> int:
        """Optimizer steps of the run for ``num_examples`` examples and ``world_size`` processes
        (``batch_size`` is per process, so an epoch has ``num_examples / (batch_size * world_size)`` batches)."""
        if self.steps is not None:
            return self.steps
        batches_per_epoch = math.ceil(num_examples / (self.batch_size * world_size))
        return max(1, math.ceil((self.epochs or 1.0) * batches_per_epoch / self.grad_accum))

    def resolved_warmup(self, total: int) -> int:
        return self.warmup_steps if self.warmup_steps else int(self.warmup_ratio * total)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total``.

    Warmup (``step < warmup``): ``(step + 1) / warmup``, so the first step already moves
    and the peak is reached at the last warmup step. Then with
    ``p = (step - warmup) / (total - warmup)`` (in [0, 1)):
    cosine ``0.5 * (1 + cos(pi * p))``, linear ``1 - p``, constant ``1``.
    The factor never reaches 0 inside the run, so no step is wasted.
    """
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return 1.0 - p
    return 1.0


def make_lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    """The ``LambdaLR`` function for :func:`lr_factor` (a plain function: state dicts stay small)."""

    def fn(step: int) -> float:
        return lr_factor(step, total, warmup, schedule)

    return fn
