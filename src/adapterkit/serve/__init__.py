"""Serving: an S-LoRA style engine (many adapters, one base model) and an OpenAI-compatible server.

    from adapterkit.serve import Engine, EngineConfig, create_app

Names are imported lazily so that using the engine alone does not import FastAPI/uvicorn
(the ``serve`` extra), and importing `adapterkit.serve.types` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Engine": "adapterkit.serve.engine",
    "EngineConfig": "adapterkit.serve.types",
    "SamplingParams": "adapterkit.serve.types",
    "GenerationRequest": "adapterkit.serve.types",
    "GenerationChunk": "adapterkit.serve.types",
    "GenerationOutput": "adapterkit.serve.types",
    "AdapterInfo": "adapterkit.serve.types",
    "EngineStats": "adapterkit.serve.types",
    "EngineProtocol": "adapterkit.serve.types",
    "create_app": "adapterkit.serve.server",
    "resolve_adapter_path": "adapterkit.serve.api",
    "discover_adapters": "adapterkit.serve.cli",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapterkit.serve' has no attribute {name!r}")
