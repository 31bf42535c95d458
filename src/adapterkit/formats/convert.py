"""Convert adapter directories between the native format, PEFT's and AdapterHub's, without a training run.

    from adapterkit.formats.convert import convert
    convert("out/math", "out/math-peft", to="peft")                 # native -> PEFT
    convert("peft-dir", "out/native", to="native", model=base)      # PEFT -> native (+ fingerprint)
    convert("ah-dir", "out/native", to="native")                    # AdapterHub -> native
    convert("out/math", "out/math-ah", to="adapterhub")             # native -> AdapterHub

AdapterHub files record the base's model_type and hidden size; writing one needs them (and the
number of layers) from the native fingerprint or from ``model``. The AdapterHub adapter's name
(inside its tensor keys) is the output directory's name.

PEFT files carry no base fingerprint. PEFT -> native with ``model`` checks the adapter
against it (every tensor shape, by attaching it for a moment; the model is left as it
was) and records the model's fingerprint; without a model the native file has
``base: null`` and is checked by shapes only when loaded. Native -> PEFT needs no model:
the native fingerprint gives the module types (GPT-2's Conv1D -> ``fan_in_fan_out``), the
task type and the sizes PEFT's prompt-learning configs record; a ``model`` is checked
against the fingerprint and lets the targets be written as short leaf names.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry import get_method
from . import read_adapter
from .native import _CONFIG_DIMS, check_fingerprint, fingerprint, write_native
from .peft import BaseInfo, base_info, write_peft_info
from .peft.common import guess_task_type_name, hosts_of


def convert(in_dir: str | Path, out_dir: str | Path, to: str = "peft", model: nn.Module | None = None) -> Path:
    """Rewrite the adapter in ``in_dir`` (native, PEFT or AdapterHub, detected) into ``out_dir`` in format
    ``to`` ("peft", "adapterhub" or "native"/"adapterkit"), atomically. Returns ``out_dir``."""
    if to not in ("peft", "adapterhub", "native", "adapterkit"):
        raise ConfigError(f"convert: unknown target format {to!r}; use 'peft', 'adapterhub' or 'native'")
    saved = read_adapter(in_dir)
    spec = get_method(saved.method)
    config = spec.config_cls.from_dict(saved.config)
    hosts = [h for h in hosts_of(saved.tensors) if h]
    if to == "peft":
        if model is not None:
            check_fingerprint(model, saved.base, str(in_dir))
            info = base_info(model, hosts_of(saved.tensors))
        else:
            info = info_from_fingerprint(saved.base)
        return write_peft_info(out_dir, info, saved.method, config, saved.tensors)
    if to == "adapterhub":
        return _to_adapterhub(saved, config, in_dir, out_dir, model)
    base = saved.base
    if model is not None:
        check_on(model, in_dir)
        base = fingerprint(model, hosts)
    return write_native(out_dir, saved.method, config.to_dict(), saved.tensors, base)  # type: ignore[arg-type]


def _to_adapterhub(saved: Any, config: Any, in_dir: str | Path, out_dir: str | Path, model: nn.Module | None) -> Path:
    """Write ``saved`` as an AdapterHub directory; the base from ``model`` (checked) or the file's fingerprint."""
    from .adapterhub import desc_from_fingerprint, desc_from_model, write_adapterhub_desc

    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(out_dir).name) or "adapter"
    if model is None:
        return write_adapterhub_desc(out_dir, desc_from_fingerprint(saved.base), saved.method, config, saved.tensors,
                                     name)
    check_fingerprint(model, saved.base, str(in_dir))
    return write_adapterhub_desc(out_dir, desc_from_model(model), saved.method, config, saved.tensors, name,
                                 num_labels=getattr(getattr(model, "config", None), "num_labels", None))


def info_from_fingerprint(base: dict[str, Any] | None) -> BaseInfo:
    """What a native fingerprint tells the PEFT writer about the base (empty for None)."""
    if not base:
        return BaseInfo()
    modules = base.get("modules") or {}
    dims = {k: base[k] for k in _CONFIG_DIMS if k in base}
    arch = base.get("architecture")
    return BaseInfo(
        host_types={n: e.get("type") for n, e in modules.items() if isinstance(e, dict) and e.get("type")},
        task_type=guess_task_type_name(arch) if isinstance(arch, str) else None,
        model_config=SimpleNamespace(**dims) if dims else None,
    )


def check_on(model: nn.Module, path: str | Path) -> None:
    """Attach the adapter at ``path`` to ``model`` and detach it again: every check of
    :func:`adapterkit.load_adapter` (tensor names and shapes), with the model left as it was."""
    from ..api import delete_adapter, list_adapters, load_adapter

    taken = set(list_adapters(model))
    name = next(f"_convert_check{i}" for i in range(len(taken) + 1) if f"_convert_check{i}" not in taken)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}  # add_adapter freezes the base
    try:
        load_adapter(model, path, name=name)
        delete_adapter(model, name)
    finally:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
