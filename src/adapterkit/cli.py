"""`adapterkit ...`: a thin command line over the public API.

    adapterkit train --method lora --data train.jsonl --out DIR [--model PATH|default] [--set r=8 ...]
    adapterkit generate --adapter DIR --prompt "..." [--model PATH|default]
    adapterkit info DIR
    adapterkit merge --adapter DIR --out MODEL_DIR [--model PATH|default]
    adapterkit convert --to peft|native IN OUT
    adapterkit serve --model PATH|default --adapter NAME=PATH ... (see docs/serving.md)
    adapterkit eval --model PATH|default --adapter NAME=PATH ... --task NAME|FILE ... (see docs/eval.md)
    adapterkit files upload FILE / adapterkit jobs create|list|get|cancel|events (see docs/fine-tuning.md)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import AdapterError


def _load_model(spec: str):
    from .models import load_model

    return load_model(spec)


def cmd_info(a: argparse.Namespace) -> int:
    from .formats import detect_format, read_adapter

    fmt = detect_format(a.adapter)
    saved = read_adapter(a.adapter)
    n = sum(t.numel() for t in saved.tensors.values())
    info = {
        "path": str(Path(a.adapter).resolve()),
        "format": fmt,
        "method": saved.method,
        "parameters": n,
        "tensors": len(saved.tensors),
        "config": saved.config,
    }
    base = saved.base or {}
    if base:
        info["base"] = {k: v for k, v in base.items() if k != "modules"}
        info["base"]["target_modules"] = len(base.get("modules", {}))
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter    {info['path']} ({fmt})")
    print(f"method     {saved.method}")
    print(f"parameters {n:,} in {len(saved.tensors)} tensors")
    print("config     " + ", ".join(f"{k}={v}" for k, v in saved.config.items()))
    if base:
        print("base       " + ", ".join(f"{k}={v}" for k, v in info["base"].items()))
    else:
        print("base       (no fingerprint: a PEFT file)")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from . import api

    model, tok = _load_model(a.model)
    if a.adapter:
        api.load_adapter(model, a.adapter, name="cli")
    if a.chat:
        enc = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(a.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                             temperature=a.temperature if a.temperature > 0 else None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from . import api
    from .formats.io import atomic_dir

    model, tok = _load_model(a.model)
    api.load_adapter(model, a.adapter, name="merged")
    api.merge_and_unload(model, "merged")
    with atomic_dir(a.out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"merged model written to {a.out}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .formats.peft import convert

    convert(a.src, a.dst, to=a.to)
    print(f"{a.src} -> {a.dst} ({a.to})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adapterkit", description="Parameter-efficient adapters for any PyTorch model.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="describe a saved adapter (native or PEFT)")
    s.add_argument("adapter")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("generate", help="generate text with a base model and an adapter")
    s.add_argument("--adapter", help="adapter directory (omit for the base model)")
    s.add_argument("--model", default="default", help="local HF model dir, or 'default' (SmolLM2-135M-Instruct)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("merge", help="fold an adapter into the base weights and save the merged model")
    s.add_argument("--adapter", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--model", default="default")
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("convert", help="convert an adapter between the native, PEFT and AdapterHub formats")
    s.add_argument("--to", choices=["peft", "native", "adapterhub"], required=True)
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(fn=cmd_convert)

    try:
        from .train.cli import add_train_parser
    except ImportError:  # pragma: no cover - train extras missing
        pass
    else:
        add_train_parser(sub)
    try:
        from .serve.cli import add_serve_parser
    except ImportError:  # serve extras (fastapi, uvicorn) not installed
        pass
    else:
        add_serve_parser(sub)
    from .serve.ft_cli import add_ft_parsers  # standard library only: always available

    add_ft_parsers(sub)
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
