"""One registry of adapter methods, keyed by name (``ak.list_methods()``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ConfigError, did_you_mean
from .methods.base import AdapterConfig, AdapterModule

#: attach(model, adapter_name, config) -> {host module path ("" = root): piece}
AttachFn = Callable[[nn.Module, str, AdapterConfig], dict[str, AdapterModule]]
#: export(config, {key: tensor}, pieces) -> (config to save, tensors to save)
ExportFn = Callable[[AdapterConfig, dict[str, Any], dict[str, AdapterModule]], tuple[AdapterConfig, dict[str, Any]]]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the library needs to know about one method."""

    name: str
    config_cls: type[AdapterConfig]
    attach: AttachFn
    paper: str = ""
    mergeable: bool = False
    #: optional rewrite of what is saved (e.g. PiSSA saved as a plain LoRA delta)
    export: ExportFn | None = None


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    if spec.config_cls.method != spec.name:
        raise ValueError(f"{spec.config_cls.__name__}.method is {spec.config_cls.method!r}, expected {spec.name!r}")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown adapter method {name!r}.{did_you_mean(name, _METHODS)} "
                          f"Known: {', '.join(sorted(_METHODS))}") from None


def list_methods() -> list[str]:
    """Registry keys of every adapter method, sorted."""
    _load_builtin()
    return sorted(_METHODS)


def make_config(method: str, **fields: Any) -> AdapterConfig:
    """``make_config("lora", r=8)``: the method's config; unknown fields name the closest one."""
    return get_method(method).config_cls.from_dict(fields)


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods on import)
