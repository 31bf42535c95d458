"""Shared pieces of the PEFT codecs: base description, key/pattern helpers, codec tables."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import AdapterFileError, ConfigError
from ...methods.base import AdapterConfig

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
#: PEFT puts the base model behind PeftModel.base_model (a LoraModel) .model
PREFIX = "base_model.model."
#: the PEFT version whose file layout this module writes (and was tested against)
PEFT_VERSION = "0.21.2"
#: marks a module copy's native keys: ``score.modules_to_save.weight`` (PEFT: ``score.weight``)
SAVED = ".modules_to_save."


@dataclass
class BaseInfo:
    """What the PEFT writer needs to know about the base model (all optional).

    host_types: module path -> class name (``"Linear"``, ``"Conv1D"``, ``"Embedding"``...).
    module_names: every module path of the base (to export short target names when they
    select exactly the adapter's modules). task_type: PEFT's TaskType value.
    """

    host_types: dict[str, str] = field(default_factory=dict)
    module_names: list[str] | None = None
    task_type: str | None = None
    name_or_path: str | None = None
    model_config: Any = None


# ---------------------------------------------------------------------------------------
# helpers shared by the codecs
# ---------------------------------------------------------------------------------------
def hosts_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Host module paths of native keys ``<host>.<param>`` (root pieces give "") and of
    module copies ``<module>.modules_to_save.<param...>``."""
    hosts = set()
    for k in tensors:
        if SAVED in f".{k}":
            hosts.add(f".{k}".split(SAVED)[0][1:])
        else:
            hosts.add(k.rsplit(".", 1)[0] if "." in k else "")
    return sorted(hosts)


def base_info(model: nn.Module, hosts: list[str]) -> BaseInfo:
    from ...inject import base_modules

    mods = base_modules(model)
    by_name = dict(mods)
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
    return BaseInfo(
        host_types={h: type(by_name[h]).__name__ for h in hosts if h in by_name},
        module_names=[n for n, _ in mods if n],
        task_type=guess_task_type(model),
        name_or_path=name if isinstance(name, str) and name else None,
        model_config=cfg,
    )


def guess_task_type(model: nn.Module) -> str | None:
    """PEFT's TaskType for a transformers model, None when there is no match."""
    return guess_task_type_name(type(model).__name__)


def guess_task_type_name(cls: str) -> str | None:
    """PEFT's TaskType for a transformers model class name (``LlamaForCausalLM`` -> CAUSAL_LM)."""
    table = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
             ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("ForSequenceClassification", "SEQ_CLS"),
             ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))
    for suffix, task in table:
        if cls.endswith(suffix):
            return task
    return None


def peft_targets(hosts: list[str], info: BaseInfo) -> list[str]:
    """PEFT ``target_modules``: the hosts' leaf names when they select exactly the hosts
    (readable, what PEFT users write), else the full module paths (PEFT matches a list
    entry against the end of a module path, so a full path selects exactly that module)."""
    leaves = sorted({h.rsplit(".", 1)[-1] for h in hosts})
    if info.module_names is not None:
        picked = {n for n in info.module_names if any(n == t or n.endswith("." + t) for t in leaves)}
        if picked == set(hosts):
            return leaves
    return sorted(hosts)


def strip_prefix(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Drop PEFT's ``base_model.model.`` (files written by transformers' integration lack it)."""
    if tensors and all(k.startswith(PREFIX) for k in tensors):
        return {k[len(PREFIX):]: v for k, v in tensors.items()}
    if any(k.startswith(PREFIX) for k in tensors):
        odd = next(k for k in tensors if not k.startswith(PREFIX))
        raise AdapterFileError(f"{where}: tensor {odd!r} lacks the {PREFIX!r} prefix the other tensors have")
    return dict(tensors)


def pattern_key(patterns: dict[str, Any], module: str, field: str, where: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key matching ``module`` (PEFT's rule:
    ``re.match(rf"(.*\\.)?({key})$", module)``), or None."""
    for key in patterns:
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise AdapterFileError(f"{where}: PEFT field {field} has an invalid pattern {key!r}: {e}") from None
        if hit:
            return key
    return None


def refuse_fields(meta: dict[str, Any], where: str, fields: dict[str, str]) -> None:
    """AdapterFileError for the first field of ``fields`` set to a non-empty value."""
    for name, why in fields.items():
        v = meta.get(name)
        if v not in (None, False, [], {}, ""):
            raise AdapterFileError(f"{where}: PEFT field {name}={v!r} is not supported: {why}")


def check_defaults(config: AdapterConfig, mapped: set[str]) -> None:
    """Refuse to export a config field PEFT cannot express, unless it has its default value."""
    for f in dataclasses.fields(config):
        if f.name in mapped or f.name in ("targets", "modules_to_save"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if getattr(config, f.name) != default:
            raise ConfigError(
                f"{type(config).__name__}.{f.name}={getattr(config, f.name)!r} has no PEFT equivalent; "
                f"save this adapter in the native format instead"
            )


def split_copies(names: Any, tensors: dict[str, torch.Tensor], where: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split PEFT tensors into module copies (native keys) and the method's own tensors.

    ``names`` is PEFT's ``modules_to_save``; a key belongs to the copy of its shortest
    leading module path that ends with one of them (PEFT's plain ``endswith`` rule).
    Names with no tensors are fine: PEFT lists ``classifier`` and ``score`` for every
    classifier although a model has only one of them.
    """
    if names in (None, []):
        return {}, tensors
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise AdapterFileError(f"{where}: PEFT field modules_to_save={names!r} must be a list of module names")
    copies: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        parts = (key[len(PREFIX):] if key.startswith(PREFIX) else key).split(".")
        for i in range(1, len(parts)):
            host = ".".join(parts[:i])
            if any(host.endswith(n) for n in names):
                copies[f"{host}{SAVED}{'.'.join(parts[i:])}"] = t
                break
        else:
            rest[key] = t
    return copies, rest


def saved_names(hosts: list[str], info: BaseInfo) -> list[str]:
    """PEFT ``modules_to_save`` for module copies at ``hosts``: their leaf names when those
    pick exactly the hosts under PEFT's ``endswith`` rule, else the full module paths."""
    leaves = sorted({h.rsplit(".", 1)[-1] for h in hosts})
    if info.module_names is not None:
        if {n for n in info.module_names if any(n.endswith(t) for t in leaves)} == set(hosts):
            return leaves
    return sorted(hosts)


@dataclass(frozen=True)
class Codec:
    peft_type: str
    #: (config, native tensors, base) -> (PEFT config fields, PEFT tensors)
    export: Callable[[AdapterConfig, dict[str, torch.Tensor], BaseInfo], tuple[dict[str, Any], dict[str, torch.Tensor]]]


CODECS: dict[str, Codec] = {}
#: PEFT peft_type -> (meta, tensors, where) -> (method, config dict, native tensors)
IMPORTERS: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor], str],
                               tuple[str, dict[str, Any], dict[str, torch.Tensor]]]] = {}

