"""What the AdapterHub codecs share: the base description, architecture tables, refusals.

AdapterHub (the ``adapters`` package, 1.x) saves a directory with ``adapter_config.json``::

    {"config": {...the method's config...}, "name": "x", "model_type": "bert",
     "model_class": "BertForSequenceClassification", "hidden_size": 768, "model_name": "...",
     "version": "adapters.1.3.0"}

and the weights in ``pytorch_adapter.bin`` (or ``adapter.safetensors`` with ``use_safetensors``)
under the full parameter names of the model, with the adapter name inside
(``bert.encoder.layer.0.output.adapters.x.adapter_down.0.weight``). Every key therefore names the
module it belongs to, which is how the codecs find the sites, whatever the config says.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import AdapterFileError, ConfigError

AH_VERSION = "adapters.1.3.0"
AH_WEIGHTS_BIN = "pytorch_adapter.bin"
AH_WEIGHTS = "adapter.safetensors"

#: model_type -> the layer's children AdapterHub hooks, for the families whose math was checked
#: against the real package. "post_ln": BERT-style ``LN(dropout(dense(u)) + input_tensor)`` output
#: blocks; "pre_ln": attention/MLP blocks whose output the decoder layer adds to the residual stream.
FAMILIES: dict[str, str] = {"bert": "post_ln", "roberta": "post_ln", "llama": "pre_ln", "gpt2": "pre_ln"}
#: pre-LN model_type -> (attention block, feed-forward block) relative to the decoder layer
PRE_LN_BLOCKS: dict[str, tuple[str, str]] = {"llama": ("self_attn", "mlp"), "gpt2": ("attn", "mlp")}
#: model_type -> {module relative to the layer: (AdapterHub LoRA location, attention matrix)}.
#: Note AdapterHub's Llama names: "intermediate" wraps down_proj and "output" wraps up_proj.
LORA_SITES: dict[str, dict[str, tuple[str, str | None]]] = {
    "bert": {"attention.self.query": ("selfattn", "q"), "attention.self.key": ("selfattn", "k"),
             "attention.self.value": ("selfattn", "v"), "intermediate.dense": ("intermediate", None),
             "output.dense": ("output", None)},
    "llama": {"self_attn.q_proj": ("selfattn", "q"), "self_attn.k_proj": ("selfattn", "k"),
              "self_attn.v_proj": ("selfattn", "v"), "mlp.down_proj": ("intermediate", None),
              "mlp.up_proj": ("output", None)},
    "gpt2": {"attn.c_attn": ("selfattn", "qkv"), "mlp.c_fc": ("intermediate", None), "mlp.c_proj": ("output", None)},
}
LORA_SITES["roberta"] = LORA_SITES["bert"]

#: a layer's module path: ``bert.encoder.layer.3``, ``model.layers.3``, ``transformer.h.3``
LAYER_RE = re.compile(r"^(?P<layer>(?:.+\.)?(?:layer|layers|h)\.(?P<idx>\d+))(?:\.(?P<rest>.+))?$")


@dataclass
class BaseDesc:
    """What the AdapterHub files record of the base model."""

    model_type: str
    model_class: str
    hidden_size: int
    num_layers: int | None = None
    model_name: str = ""

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]


def desc_from_model(model: nn.Module) -> BaseDesc:
    """The :class:`BaseDesc` of a live transformers model (ConfigError without a usable config)."""
    cfg = getattr(model, "config", None)
    mt, hs = getattr(cfg, "model_type", None), getattr(cfg, "hidden_size", None)
    if not isinstance(mt, str) or not isinstance(hs, int):
        raise ConfigError(f"AdapterHub export needs a transformers model with config.model_type and hidden_size; "
                          f"{type(model).__name__} has none")
    return BaseDesc(model_type=mt, model_class=type(model).__name__, hidden_size=hs,
                    num_layers=getattr(cfg, "num_hidden_layers", None),
                    model_name=str(getattr(cfg, "name_or_path", "") or ""))


def desc_from_fingerprint(base: dict[str, Any] | None) -> BaseDesc:
    """The :class:`BaseDesc` from a native file's base fingerprint (ConfigError when it lacks one)."""
    if not base or not isinstance(base.get("model_type"), str) or not isinstance(base.get("hidden_size"), int):
        raise ConfigError("AdapterHub export needs the base model's model_type and hidden_size: pass model=..., "
                          "or convert an adapter whose file records its base (a native file saved from a model)")
    n = base.get("num_hidden_layers", base.get("n_layer"))
    return BaseDesc(model_type=base["model_type"], model_class=str(base.get("architecture") or ""),
                    hidden_size=base["hidden_size"], num_layers=n if isinstance(n, int) else None)


def check_family(model_type: Any, where: str, export: bool = False) -> str:
    """The family of ``model_type``; an error naming the supported ones for any other."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    known = ", ".join(sorted(FAMILIES))
    msg = (f"{where}: AdapterHub model_type {model_type!r} is not supported; adapterkit maps AdapterHub "
           f"adapters for {known} (the architectures whose placements were checked against the adapters package)")
    raise (ConfigError(msg) if export else AdapterFileError(msg))


def refuse(where: str, field: str, value: Any, why: str) -> AdapterFileError:
    """The error for an AdapterHub config value adapterkit cannot reproduce (raise it)."""
    return AdapterFileError(f"{where}: AdapterHub config field {field!r} = {value!r} is not supported: {why}")


def check_fields(cfg: dict[str, Any], rules: dict[str, Any], where: str) -> None:
    """Every key of ``cfg`` must be in ``rules``; a rule is None (any value is fine), or a
    (predicate, reason) pair that the value must satisfy. Unknown fields are refused by name."""
    for k, v in cfg.items():
        if k not in rules:
            raise AdapterFileError(f"{where}: AdapterHub config field {k!r} is not known to adapterkit "
                                   f"(written by a newer adapters version?); refusing to ignore it")
        rule = rules[k]
        if rule is not None and not rule[0](v):
            raise refuse(where, k, v, rule[1])


def split_layer(path: str) -> tuple[str, int, str]:
    """``(layer path, layer index, rest)`` of a module path inside a transformer layer (ValueError if not)."""
    m = LAYER_RE.match(path)
    if not m:
        raise ValueError(path)
    return m["layer"], int(m["idx"]), m["rest"] or ""


def leave_out(desc: BaseDesc, used: set[int], what: str) -> list[int]:
    """The AdapterHub ``leave_out`` list: the base's layers without the adapter."""
    if desc.num_layers is None:
        raise ConfigError(f"AdapterHub export of {what}: the base's number of layers is unknown")
    bad = sorted(i for i in used if i >= desc.num_layers)
    if bad:
        raise ConfigError(f"AdapterHub export of {what}: layer {bad[0]} is beyond the base's {desc.num_layers} layers")
    return [i for i in range(desc.num_layers) if i not in used]


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
