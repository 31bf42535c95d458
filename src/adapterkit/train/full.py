"""Full fine-tuning: every base weight trainable, through the same :class:`Trainer`.

The reference row of every quality table ("100%"). It is the adapter trainer with nothing
frozen: the same data path, loss, AdamW / schedule, checkpoints (every weight goes into
``trainable.safetensors``), resume and metrics. At the end the whole model is written to
``out_dir/model`` as an HF directory with safetensors weights (and the tokenizer), which
``adapterkit eval --model DIR``, ``load_model(DIR)`` and the serving engine load as a base.

    from adapterkit.train import TrainConfig
    from adapterkit.train.full import train_full
    res = train_full(model, "train.jsonl", config=TrainConfig(out_dir="runs/full", lr=2e-5, steps=200),
                     tokenizer=tokenizer)
    res.model_dir  # runs/full/model

A model with adapters attached is refused: full fine-tuning would also train the adapters'
weights and save a base that silently contains them.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from adapterkit.errors import ConfigError
from adapterkit.train.config import TrainConfig
from adapterkit.train.trainer import Trainer, TrainResult

METHOD = "full"  #: the ``adapterkit train --method`` spelling
MODEL_DIR = "model"  #: the saved model's folder inside ``out_dir``


@dataclass(frozen=True)
class FullTrainResult:
    """What :func:`train_full` did.

    Attributes:
        train: the trainer's :class:`TrainResult` (steps, losses, checkpoints, timing).
        model_dir: the saved HF model directory (``out_dir/model``), or None on non-main ranks.
        trainable: parameters trained (every parameter of the model, tied ones counted once).
    """

    train: TrainResult
    model_dir: Path | None
    trainable: int


def check_full_model(model: nn.Module) -> None:
    """Refuse models that full fine-tuning cannot train as a plain base.

    Raises:
        ConfigError: adapters attached (adapterkit or PEFT), or no parameters at all.
    """
    from adapterkit.api import list_adapters  # lazy: the core imports nothing from train/

    names = list_adapters(model)
    if names:
        raise ConfigError(f"full fine-tuning trains the base model itself, but adapters {names} are attached; "
                          "delete them (adapterkit.delete_adapter) or train the adapter instead of 'full'")
    if getattr(model, "peft_config", None):
        raise ConfigError("full fine-tuning got a PEFT model (it has peft_config); pass the base model "
                          "(PeftModel.unload() / get_base_model()) or train the adapter instead")
    if not any(True for _ in model.parameters()):
        raise ConfigError(f"{type(model).__name__} has no parameters to fine-tune")


@contextmanager
def all_trainable(model: nn.Module) -> Iterator[int]:
    """Make every parameter trainable inside the block; yields their count (tied ones once).

    The previous ``requires_grad`` flags come back afterwards, so a model loaded frozen
    (``load_model`` returns eval-mode weights) is frozen again once trained.
    """
    before = {id(p): p.requires_grad for p in model.parameters()}
    params = list(model.parameters())  # deduplicated: a tied embedding / lm_head counts once
    for p in params:
        p.requires_grad_(True)
    try:
        yield sum(p.numel() for p in params)
    finally:
        for p in params:
            p.requires_grad_(before[id(p)])


def save_model(model: nn.Module, tokenizer: Any, out: str | os.PathLike[str]) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` as an HF directory, atomically.

    Everything goes to a temporary sibling first and is renamed onto ``out`` at the end, so
    a crash leaves the previous directory (if any) or nothing, never half a model.

    Args:
        model: an HF ``PreTrainedModel`` (``save_pretrained``).
        tokenizer: its tokenizer, or None (then the directory holds only the model).
        out: the directory to (re)write.
    Returns:
        ``out`` as a Path.
    Raises:
        ConfigError: the model has no ``save_pretrained`` (not an HF model).
    """
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"cannot save {type(model).__name__} as a model directory: it has no save_pretrained "
                          "(full fine-tuning saves HF models)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp))  # transformers 5 writes safetensors only
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        if not any(tmp.glob("*.safetensors")):
            raise ConfigError(f"{type(model).__name__}.save_pretrained wrote no .safetensors file into {tmp}")
        old = None
        if out.exists():  # move the previous result aside, swap, then delete it
            old = out.parent / f".old-{out.name}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def train_full(model: nn.Module, train_data: Any, eval_data: Any = None, config: TrainConfig | None = None,
               tokenizer: Any = None, resume: bool | str | Path = False) -> FullTrainResult:
    """Fine-tune every weight of ``model`` with the adapter :class:`Trainer` and save it.

    Args:
        model: an HF causal LM without adapters (trained in place).
        train_data / eval_data: as for :class:`Trainer` (JSONL path, records, datasets).
        config: hyper-parameters (full fine-tuning wants a much lower lr than adapters,
            e.g. 1e-5 .. 1e-4); ``fsdp`` is refused (it shards a *frozen* base).
        tokenizer: the tokenizer (text data; saved next to the model).
        resume: as :meth:`Trainer.train` (checkpoints hold every weight).
    Returns:
        :class:`FullTrainResult`; the model is in ``out_dir/model``.
    Raises:
        ConfigError: adapters attached, a PEFT model, ``fsdp=True``, or a model that cannot be saved.
        CheckpointError / DataError / TrainingDivergedError: as :meth:`Trainer.train`.
    """
    cfg = config if config is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    check_full_model(model)
    if cfg.fsdp:
        raise ConfigError("TrainConfig.fsdp shards the frozen base of an adapter run; full fine-tuning has no "
                          "frozen base: use fsdp=False")
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"full fine-tuning saves an HF model directory; {type(model).__name__} has no save_pretrained")
    with all_trainable(model) as n:
        trainer = Trainer(model, train_data, eval_data=eval_data, config=cfg, tokenizer=tokenizer)
        res = trainer.train(resume=resume)
        model.eval()
        model_dir = save_model(model, tokenizer, Path(cfg.out_dir) / MODEL_DIR) if trainer.dist.is_main else None
    return FullTrainResult(train=res, model_dir=model_dir, trainable=n)
