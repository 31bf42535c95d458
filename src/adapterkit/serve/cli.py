"""`adapterkit serve`: start the OpenAI-compatible server on one base model and many adapters.

    adapterkit serve --model default --adapter-root adapters/ --adapter math=out/math \\
        --max-loras 8 --max-lora-rank 64 --api-key sk-local --port 8000

Every subdirectory of an ``--adapter-root`` that holds an adapter (native:
``adapter_config.json`` + ``adapter.safetensors``; PEFT: ``adapter_config.json`` +
``adapter_model.safetensors``) is registered at start under its directory name; the roots are
also the only places ``POST /v1/load_lora_adapter`` may load from (an ``--adapter-root``
turns runtime loading on). One that fails to register (corrupt files, another base, an
invalid name) is skipped with a warning and listed as failed by ``GET /v1/adapters``; the
server starts with the rest. ``--adapter NAME=PATH`` registers one more adapter from any path
(the operator's command line is trusted); if that one fails, the server does not start.

This module imports FastAPI/uvicorn only inside `run_serve`, so ``adapterkit --help`` works
without the ``serve`` extra.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterkit.errors import ConfigError

log = logging.getLogger("adapterkit.serve")
DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # = server.DEFAULT_MAX_BODY_BYTES (not imported: no FastAPI here)
DEFAULT_MAX_FILE_BYTES = 64 * 2**20  # = ft_api.DEFAULT_MAX_FILE_BYTES


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to an argparse ``subparsers`` object; returns its parser."""
    s = subparsers.add_parser("serve", help="serve a base model and its adapters over an OpenAI-compatible API",
                              description=__doc__.split("\n\nThis module")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", default="default", help="local HF model dir, or 'default' (SmolLM2-135M-Instruct)")
    s.add_argument("--served-model-name", default=None,
                   help="name of the base model in `model` and /v1/models (default: --model as given)")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="register an adapter at start (repeatable)")
    s.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="register every adapter subdirectory at start, and allow runtime loads from it (repeatable)")
    s.add_argument("--max-loras", type=int, default=8, help="adapter slots on the device")
    s.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted")
    s.add_argument("--max-cpu-loras", type=int, default=None, help="adapters cached in host memory (default all)")
    s.add_argument("--pool-gib", type=float, default=1.0,
                   help="GiB of the unified pool that holds the KV cache pages and the adapters in device slots "
                        "(as vLLM's VLLM_CPU_KVCACHE_SPACE; default 1). Requests wait when it is full")
    s.add_argument("--max-queue", type=int, default=4096, help="waiting requests before 429")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    s.add_argument("--max-model-len", type=int, default=2048, help="prompt + output tokens per sequence")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", default="cpu")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of prompt prefixes already computed under the same adapter (default on)")
    s.add_argument("--cpu-prepack", action=argparse.BooleanOptionalAction, default=False,
                   help="prepack the base weights for oneDNN: faster CPU steps, but a second copy of the weights "
                        "when the model's dtype is the served dtype (default off)")
    s.add_argument("--api-key", default=os.environ.get("ADAPTERKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default $ADAPTERKIT_API_KEY)")
    s.add_argument("--unload-timeout", type=float, default=600.0,
                   help="seconds an unload waits for the adapter's requests to finish")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413 (default %(default)s = 4 MiB)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    f = s.add_argument_group("fine-tuning (OpenAI's fine-tuning API, trained inside the engine; docs/fine-tuning.md)")
    f.add_argument("--enable-fine-tuning", action="store_true",
                   help="accept fine-tuning jobs (/v1/files, /v1/fine_tuning/jobs) on the served base model")
    f.add_argument("--state-dir", default=None,
                   help="uploaded files, jobs, checkpoints and trained adapters (default: "
                        "<first --adapter-root>/.adapterkit-state, else ./adapterkit-state)")
    f.add_argument("--max-fine-tuning-jobs", type=int, default=1,
                   help="jobs queued or running at once; more get 429 (default %(default)s)")
    f.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                   help="largest training file upload; larger ones get 413 (default %(default)s = 64 MiB)")
    f.add_argument("--ft-token-share", type=float, default=0.25,
                   help="while requests run, a training slice holds at most this share of a step's token "
                        "budget (--max-num-batched-tokens); inference keeps the rest (default %(default)s)")
    f.add_argument("--ft-time-share", type=float, default=0.2,
                   help="while requests run, training takes at most this share of the engine's time "
                        "(default %(default)s)")
    r = s.add_argument_group("scale-out (Ray Serve; needs the ray extra, see docs/serving.md)")
    r.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: --replicas engines behind one ingress, routed by adapter")
    r.add_argument("--replicas", type=int, default=2, help="engine replicas under --ray")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica under --ray")
    s.set_defaults(fn=run_serve)
    return s


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """``["math=out/math", ...]`` -> ``{"math": "out/math"}``. Raises ConfigError naming the spec."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapter: expected NAME=PATH, got {spec!r}")
        name = name.strip()
        if name in out:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        problem = _name_problem(name)
        if problem:
            raise ConfigError(f"--adapter: {problem}")
        out[name] = path.strip()
    return out


def _name_problem(name: str) -> str | None:
    from adapterkit.serve.api import adapter_name_problem

    return adapter_name_problem(name)


def discover_adapters(roots: Sequence[str | os.PathLike[str]]) -> dict[str, Path]:
    """Every adapter subdirectory of each root, keyed by its directory name (sorted by name).

    A subdirectory that is a symlink resolving outside its root is skipped (with a warning),
    the same containment rule runtime loads follow.

    Raises:
        ConfigError: a root is not a directory, or two roots hold the same adapter name.
    """
    from adapterkit.serve.api import is_adapter_dir, is_within

    found: dict[str, Path] = {}
    for root in roots:
        root_real = Path(os.path.realpath(root))
        if not root_real.is_dir():
            raise ConfigError(f"--adapter-root: {str(root)!r} is not a directory")
        for sub in sorted(root_real.iterdir()):
            if not (sub.is_dir() and is_adapter_dir(sub)):
                continue
            real = Path(os.path.realpath(sub))
            if not is_within(real, root_real):
                log.warning("skipping adapter %s: it resolves to %s, outside its root", sub, real)
                continue
            if sub.name in found:
                raise ConfigError(f"--adapter-root: adapter name {sub.name!r} is found in both "
                                  f"{found[sub.name]} and {sub}; rename one directory")
            found[sub.name] = real
    return found


def pool_bytes(gib: float) -> int:
    """--pool-gib as bytes (ConfigError names the flag when it is not a positive size)."""
    if not isinstance(gib, (int, float)) or not gib > 0 or gib != gib or gib == float("inf"):
        raise ConfigError(f"--pool-gib: must be a positive number of GiB, got {gib!r}")
    return max(1, int(gib * 2**30))


def engine_config(args: argparse.Namespace) -> Any:
    """The `EngineConfig` for parsed ``serve`` arguments (ConfigError names a bad field)."""
    from adapterkit.serve.types import EngineConfig

    ft: dict[str, Any] = {}
    if getattr(args, "enable_fine_tuning", False):
        ft = {"fine_tuning": True, "fine_tuning_dir": str(state_dir(args) / "training"),
              "max_fine_tuning_jobs": args.max_fine_tuning_jobs, "ft_token_share": args.ft_token_share,
              "ft_time_share": args.ft_time_share}
    return EngineConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_queue=args.max_queue,
                        max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs,
                        pool_bytes=pool_bytes(args.pool_gib),
                        max_model_len=args.max_model_len, dtype=args.dtype, device=args.device,
                        enable_prefix_caching=args.enable_prefix_caching, cpu_prepack=args.cpu_prepack, **ft)


def state_dir(args: argparse.Namespace) -> Path:
    """The fine-tuning state directory: --state-dir, else under the first adapter root (hidden,
    so root discovery skips it), else ./adapterkit-state."""
    if args.state_dir:
        return Path(args.state_dir)
    return Path(args.adapter_root[0]) / ".adapterkit-state" if args.adapter_root else Path("adapterkit-state")


def base_model_name(args: argparse.Namespace) -> str:
    """The base model's name in requests: --served-model-name, else the --model argument as
    given (vLLM's rule), with ``default`` shown as the embedded model's real name."""
    if args.served_model_name:
        return str(args.served_model_name)
    if args.model == "default":
        from adapterkit.models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return str(args.model)


def build_app(args: argparse.Namespace, engine: Any | None = None) -> Any:
    """Load the model (unless `engine` is given), register the start-up adapters, build the app."""
    from adapterkit.serve.ft_api import FineTuning
    from adapterkit.serve.ft_store import FTStore
    from adapterkit.serve.server import create_app

    if args.max_file_bytes < 1 or args.max_fine_tuning_jobs < 1:
        raise ConfigError("--max-file-bytes and --max-fine-tuning-jobs: must be >= 1, got "
                          f"{args.max_file_bytes} and {args.max_fine_tuning_jobs}")
    store = FTStore(state_dir(args)) if args.enable_fine_tuning else None
    explicit = parse_adapter_specs(args.adapter)
    discovered = discover_adapters(args.adapter_root)
    clash = sorted(set(explicit) & set(discovered))
    if clash:
        raise ConfigError(f"--adapter: {clash} also found under --adapter-root; use another name")
    owns_engine = engine is None
    if engine is None:
        import torch

        from adapterkit.models import load_model
        from adapterkit.serve.engine import Engine

        config = engine_config(args)
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
        engine = Engine(model, tokenizer, config, model_name=base_model_name(args))
    try:
        failures = register_discovered(engine, discovered)
        for name, path in explicit.items():  # the operator named these: a failure stops the start
            info = engine.register_adapter(name, str(path))
            log.info("registered adapter %r (rank %d) from %s", name, info.rank, path)
        ft = FineTuning(store, engine, base_model_name(args), args.max_file_bytes)
        return create_app(engine, adapter_roots=args.adapter_root, api_key=args.api_key,
                          served_model_name=base_model_name(args), unload_timeout=args.unload_timeout,
                          shutdown_engine=owns_engine, max_body_bytes=args.max_body_bytes,
                          startup_failures=failures, fine_tuning=ft)
    except BaseException:
        if owns_engine:
            engine.shutdown()
        raise


def register_discovered(engine: Any, discovered: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """Register the adapters found under the roots; one that fails is skipped, not fatal.

    Args:
        engine: the engine to register into.
        discovered: name -> directory, from `discover_adapters`.
    Returns:
        The failures, name -> (path, reason); each is also logged as a warning.
    """
    failures: dict[str, tuple[str, str]] = {}
    for name, path in discovered.items():
        reason = _name_problem(name)
        if reason is None:
            try:
                info = engine.register_adapter(name, str(path))
            except Exception as exc:  # any reason: a bad directory must not keep the server down
                reason = f"{type(exc).__name__}: {exc}"
            else:
                log.info("registered adapter %r (rank %d) from %s", name, info.rank, path)
                continue
        log.warning("skipping adapter directory %s: %s", path, reason)
        failures[name] = (str(path), reason)
    return failures


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of ``adapterkit serve``: build the app and run uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - depends on the install
        print("error: `adapterkit serve` needs the serve extra: pip install 'adapterkit[serve]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "ray", False):
        if args.enable_fine_tuning:
            print("error: --enable-fine-tuning is not supported with --ray (jobs train inside one engine)",
                  file=sys.stderr)
            return 2
        try:
            from adapterkit.serve.ray import run_ray  # imports ray: only here, so the package works without it
        except ImportError:  # pragma: no cover - depends on the install
            print("error: `adapterkit serve --ray` needs Ray Serve: pip install 'adapterkit[ray]'", file=sys.stderr)
            return 2
        return run_ray(args)
    app = build_app(args)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who can reach the port can use it", args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
