"""``adapterkit train``: a thin command line over :class:`Trainer` and the public API.

    adapterkit train --method lora --data train.jsonl [--eval-data eval.jsonl] --out DIR \\
        [--model default|tiny|PATH] [--set r=8 --set alpha=16 --set targets=q_proj,v_proj] \\
        [--steps N | --epochs E] [--lr 2e-4] [--batch-size 8] [--grad-accum 1] [--resume]

``--method full`` fine-tunes every base weight instead (the reference row of quality tables;
no ``--set``/``--name``) and saves the whole model to ``OUT/model`` (see :mod:`adapterkit.train.full`).

``--set key=value`` sets a field of the method's config; values are parsed as int, float,
bool (true/false), none, or a comma-separated list; a single plain name for a list field
(``--set targets=q_proj``) becomes a one-element list. Unknown keys are refused with the
closest valid field.

Under ``torchrun --nproc_per_node K`` or ``accelerate launch`` the same command trains on K
processes (``--batch-size`` is per process; see docs/distributed.md); only rank 0 prints.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

from adapterkit.errors import ConfigError, did_you_mean

_DESCRIPTION = (
    "Train an adapter on JSONL data (the loss is on completions / assistant turns only) and save it\n"
    "to OUT/adapter; checkpoints, metrics.jsonl and loss.png also go to OUT.\n\n"
    "--set KEY=VALUE sets a field of the method's config (int, float, true/false, none, or a\n"
    "comma-separated list; one plain name for a list field becomes a one-element list).\n"
    "Example: adapterkit train --method lora --data train.jsonl --out runs/a --set r=8 --set targets=q_proj,v_proj"
)
_NAME = re.compile(r"^[\w.\-]+$")  # a plain module name, not a regex


def parse_value(text: str) -> Any:
    """``"8" -> 8, "0.1" -> 0.1, "true" -> True, "none" -> None, "a,b" -> ["a", "b"]``, else the string."""
    s = text.strip()
    if "," in s:
        return [parse_value(x) for x in s.split(",") if x.strip()]
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def _is_list_field(annotation: Any) -> bool:
    """True if the field's type admits a list/tuple (e.g. ``tuple[str, ...] | str | None``)."""
    origins = {typing.get_origin(a) or a for a in (typing.get_args(annotation) or (annotation,))}
    origins.add(typing.get_origin(annotation) or annotation)
    return bool(origins & {list, tuple})


def parse_sets(method: str, items: list[str]) -> dict[str, Any]:
    """Parse ``--set k=v`` items into config fields of ``method``.

    Raises:
        ConfigError: an item without ``=``, or a key that is not a field of the method's
            config (naming the closest field).
    """
    from adapterkit.registry import get_method

    cls = get_method(method).config_cls
    hints = typing.get_type_hints(cls)
    names = [n for n in cls.field_names()]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in names:
            raise ConfigError(f"{cls.__name__} ({method}) has no field {key!r}.{did_you_mean(key, names)} "
                              f"Fields: {', '.join(names)}")
        val = parse_value(raw)
        if isinstance(val, str) and _NAME.match(val) and _is_list_field(hints.get(key)):
            val = [val]
        out[key] = val
    return out


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse subparsers object (``fn`` default: :func:`run_train`)."""
    p = subparsers.add_parser("train", help="train an adapter on a JSONL file",
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True,
                   help="adapter method (see adapterkit.list_methods()), or 'full' to fine-tune every base weight")
    p.add_argument("--data", required=True, help='training JSONL: {"prompt","completion"} or {"messages": [...]} per line')
    p.add_argument("--eval-data", help="evaluation JSONL (same formats)")
    p.add_argument("--out", required=True, help="run dir: checkpoints/, metrics.jsonl, loss.png, adapter/")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), 'tiny' (random, for smoke tests) or a local HF dir")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where to train; 'cuda' under torchrun uses cuda:LOCAL_RANK (one GPU per process)")
    p.add_argument("--name", help="adapter name (default: the method)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="method config field, repeatable")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int)
    g.add_argument("--epochs", type=float)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--warmup-ratio", type=float, default=0.0)
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--max-length", type=int, default=1024)
    g.add_argument("--bf16", choices=["auto", "true", "false"], default="auto")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: never)")
    g.add_argument("--keep-last", type=int, default=2)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--seed", type=int, default=0, help="seeds the adapter's init, dropout and the data order")
    g.add_argument("--deterministic", choices=["auto", "true", "false"], default="auto",
                   help="torch.use_deterministic_algorithms during training (auto: on for CPU)")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun / accelerate launch: shard the frozen base with FSDP2 (adapter replicated)")
    p.set_defaults(fn=run_train)
    return p


def _device(name: str) -> Any:
    """``cpu``, or ``cuda:LOCAL_RANK`` (0 outside torchrun).

    Raises:
        ConfigError: ``cuda`` without a CUDA device.
    """
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)")
    from adapterkit.train.distributed import env_info

    return torch.device("cuda", env_info().local_rank)


def _load(model: str, device: Any) -> tuple[Any, Any]:
    if model == "tiny":
        from adapterkit.train.toy import toy_llama, toy_tokenizer

        return toy_llama().to(device), toy_tokenizer()
    from adapterkit.models import load_model

    return load_model(model, device=device)


def run_train(args: argparse.Namespace) -> int:
    """Run ``adapterkit train``; prints a summary and returns the exit code.

    Raises:
        AdapterError subclasses (ConfigError, DataError, CheckpointError, ModelLoadError ...)
        for bad input; ``adapterkit.cli.main`` prints them.
    """
    import adapterkit as ak
    from adapterkit.train.config import TrainConfig
    from adapterkit.train.repro import seed_everything
    from adapterkit.train.trainer import Trainer

    full = args.method == "full"
    if full:
        _check_full_args(args)  # before the (slow) model load: fail fast
    else:
        fields = parse_sets(args.method, args.sets)  # before the (slow) model load: fail fast
        adapter_cfg = ak.make_config(args.method, **fields)
    cfg = TrainConfig(
        out_dir=Path(args.out), lr=args.lr, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio,
        schedule=args.schedule, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
        bf16={"auto": "auto", "true": True, "false": False}[args.bf16],
        gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
        save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every, seed=args.seed,
        max_length=args.max_length, progress=args.progress, fsdp=getattr(args, "fsdp", False),
        deterministic={"auto": "auto", "true": True, "false": False}[args.deterministic],
    )
    # before the adapter exists: its init (e.g. LoRA's A) draws from the global RNGs, and an
    # unseeded init made two same-seed runs differ from the first step on
    seed_everything(args.seed)
    model, tokenizer = _load(args.model, _device(getattr(args, "device", "cpu")))
    if full:
        return _run_full(args, model, tokenizer, cfg)
    name = args.name or args.method
    ak.add_adapter(model, name, adapter_cfg)
    trainer = Trainer(model, args.data, eval_data=args.eval_data, config=cfg, tokenizer=tokenizer, adapter_name=name)
    if not trainer.dist.is_main:  # only rank 0 reports
        trainer.train(resume=args.resume)
        return 0
    n_train = ak.trainable_parameters(model, name)
    world = f" on {trainer.dist.world_size} processes" if trainer.dist.enabled else ""
    print(f"training {args.method} adapter {name!r} ({n_train:,} params) on {len(trainer.train_ds)} examples "
          f"({trainer.train_ds.num_supervised:,} supervised tokens){world}", file=sys.stderr)
    res = trainer.train(resume=args.resume)
    summary = {
        "adapter": str(res.adapter_dir), "steps": res.steps, "final_loss": res.final_loss, "eval_loss": res.eval_loss,
        "metrics": str(res.metrics_path), "plot": str(res.plot_path),
        "last_checkpoint": str(res.last_checkpoint) if res.last_checkpoint else None,
        "resumed_from": str(res.resumed_from) if res.resumed_from else None,
        "elapsed_s": round(res.elapsed_s, 2),
    }
    print(json.dumps(summary, indent=1))
    return 0


def _check_full_args(args: argparse.Namespace) -> None:
    """``--method full`` has no adapter: refuse the flags that only make sense with one.

    Raises:
        ConfigError: ``--set``, ``--name`` or ``--fsdp`` given with ``--method full``.
    """
    if args.sets:
        raise ConfigError(f"--method full trains every base weight and has no adapter config; drop --set {args.sets[0]!r}")
    if args.name:
        raise ConfigError(f"--method full saves a whole model to OUT/model, not a named adapter; drop --name {args.name!r}")
    if getattr(args, "fsdp", False):
        raise ConfigError("--fsdp shards the frozen base of an adapter run; --method full has no frozen base")


def _run_full(args: argparse.Namespace, model: Any, tokenizer: Any, cfg: Any) -> int:
    from adapterkit.train.full import train_full

    n = sum(p.numel() for p in model.parameters())
    print(f"full fine-tuning ({n:,} params) on {args.data}", file=sys.stderr)
    res = train_full(model, args.data, eval_data=args.eval_data, config=cfg, tokenizer=tokenizer, resume=args.resume)
    t = res.train
    summary = {
        "model": str(res.model_dir) if res.model_dir else None, "trainable": res.trainable, "steps": t.steps,
        "final_loss": t.final_loss, "eval_loss": t.eval_loss, "metrics": str(t.metrics_path), "plot": str(t.plot_path),
        "last_checkpoint": str(t.last_checkpoint) if t.last_checkpoint else None,
        "resumed_from": str(t.resumed_from) if t.resumed_from else None, "elapsed_s": round(t.elapsed_s, 2),
    }
    if res.model_dir is not None:
        print(json.dumps(summary, indent=1))
    return 0
