"""``adapterkit eval``: score a base model and many adapters on tasks in one engine pass.

    adapterkit eval --model PATH|default --adapter NAME=DIR ... --task arithmetic --task my.jsonl \
        [--limit 200] [--out eval_out] [--predictions]

Prints a table, writes ``OUT/results.json`` and ``OUT/results.png`` (see docs/eval.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from adapterkit.errors import ConfigError


def _adapter_arg(text: str) -> tuple[str, str]:
    """``NAME=DIR`` or ``DIR`` (named by its folder)."""
    name, sep, path = text.partition("=")
    if not sep:
        return Path(text).name, text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter: expected NAME=DIR or DIR, got {text!r}")
    return name, path


def cmd_eval(a: argparse.Namespace) -> int:
    from adapterkit.eval import evaluate, format_table, write_report
    from adapterkit.models import load_model
    from adapterkit.serve.types import EngineConfig

    adapters: dict[str, str] = {}
    for name, path in a.adapter or []:
        if name in adapters:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    model, tok = load_model(a.model)
    cfg: Any = None
    if a.max_loras is not None or a.dtype != "float32" or a.device != "cpu":
        from adapterkit.formats import read_adapter

        rank = max([int(read_adapter(p).config.get("r", 8)) for p in adapters.values()] or [8])
        cfg = EngineConfig(max_loras=a.max_loras or max(1, min(len(adapters), 32)), max_lora_rank=rank,
                           dtype=a.dtype, device=a.device, max_model_len=a.max_model_len)
    res = evaluate(model, tok, a.task, adapters, include_base=not a.no_base, engine_config=cfg, limit=a.limit,
                   progress=not a.no_progress)
    print(format_table(res))
    files = write_report(res, a.out, predictions=a.predictions)
    b = res.batching
    print(f"\n{len(res.scores)} models x {len(res.tasks)} tasks in {res.seconds:.1f} s; "
          f"{b.mixed_steps}/{b.steps} forward steps mixed models (up to {b.max_models_per_step} in one)")
    print(f"wrote {files['json']} and {files['png']}")
    return 0


def add_eval_parser(sub: Any) -> None:
    """Register the ``eval`` subcommand on the top-level parser's subparsers."""
    s = sub.add_parser("eval", help="evaluate a base model and many adapters on tasks (one batched pass)")
    s.add_argument("--model", default="default", help="local HF model dir, or 'default' (SmolLM2-135M-Instruct)")
    s.add_argument("--adapter", action="append", type=_adapter_arg, metavar="NAME=DIR",
                   help="a LoRA adapter (native or PEFT dir); repeat for many")
    s.add_argument("--task", action="append", required=True,
                   help="built-in task (arithmetic, commonsense_mc, sentiment, dates, ...), a .jsonl or a spec .json; repeat")
    s.add_argument("--limit", type=int, default=None, help="most examples per task (built-in tasks: 200)")
    s.add_argument("--out", default="eval_out", help="directory for results.json and results.png")
    s.add_argument("--predictions", action="store_true", help="also write every generated answer to the JSON")
    s.add_argument("--no-base", action="store_true", help="do not score the base model itself")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--max-loras", type=int, default=None, help="adapter slots in the engine (default: one each, <= 32)")
    s.add_argument("--max-model-len", type=int, default=2048)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", default="cpu")
    s.set_defaults(fn=cmd_eval)
