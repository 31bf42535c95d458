"""PEFT <-> adapterkit for (IA)^3 (PEFT ``peft_type: "IA3"``).

Same parameter name and shapes on both sides: ``<host>.ia3_l`` is (out, 1) for an
output-scaled module and (1, in) for an input-scaled ("feed-forward") one; PEFT's key is
``base_model.model.<host>.ia3_l``. Which modules are feed-forward comes from PEFT's
``feedforward_modules`` with PEFT's own rule (a list entry matches a module path that
ends with it; a string is a full-match regex) and is checked against the tensor shapes.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ...errors import AdapterFileError, ConfigError
from ...methods.base import AdapterConfig
from .common import CODECS, IMPORTERS, PREFIX, BaseInfo, Codec, check_defaults, hosts_of, peft_targets, strip_prefix



def _is_ff(feedforward: Any, host: str) -> bool:
    """PEFT's IA3Model._check_target_module_feedforward."""
    if isinstance(feedforward, str):
        return bool(re.fullmatch(feedforward, host))
    return any(host.endswith(t) for t in (feedforward or ()))


def import_ia3(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
               where: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    feedforward = meta.get("feedforward_modules")
    out: dict[str, torch.Tensor] = {}
    ff: list[str] = []
    for key, t in strip_prefix(tensors, where).items():
        if not key.endswith(".ia3_l"):
            raise AdapterFileError(f"{where}: tensor {key!r} is not an (IA)^3 tensor (expected keys ending in .ia3_l)")
        host = key[: -len(".ia3_l")]
        if t.dim() != 2 or 1 not in t.shape:
            raise AdapterFileError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}; (IA)^3 vectors are "
                                   f"(out, 1) or (1, in)")
        is_ff = _is_ff(feedforward, host)
        if is_ff and t.shape[0] != 1 or not is_ff and t.shape[1] != 1:
            want = "(1, in) (it is in feedforward_modules)" if is_ff else "(out, 1) (it is not in feedforward_modules)"
            raise AdapterFileError(f"{where}: tensor {key!r} has shape {tuple(t.shape)} but should be {want}")
        if is_ff:
            ff.append(host)
        out[f"{host}.ia3_l"] = t
    if not out:
        raise AdapterFileError(f"{where}: the PEFT IA3 adapter holds no ia3_l tensors")
    hosts = sorted(k.rsplit(".", 1)[0] for k in out)
    return "ia3", {"targets": hosts, "feedforward_targets": sorted(ff) or None}, out


def export_ia3(config: AdapterConfig, tensors: dict[str, torch.Tensor],
               info: BaseInfo) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    check_defaults(config, {"feedforward_targets"})
    out: dict[str, torch.Tensor] = {}
    ff: list[str] = []
    for key, t in tensors.items():
        host, _, param = key.rpartition(".")
        if not host or param != "ia3_l":
            raise ConfigError(f"tensor {key!r} has no PEFT (IA)^3 equivalent")
        if t.shape[0] == 1 and t.shape[1] != 1:
            ff.append(host)
        elif t.shape[0] == 1 == t.shape[1]:  # the shape cannot tell input from output scaling
            raise ConfigError(f"cannot export (IA)^3 module {host!r} with a (1, 1) vector to PEFT: input or "
                              f"output scaling is ambiguous")
        out[f"{PREFIX}{host}.ia3_l"] = t
    hosts = hosts_of(tensors)
    targets = peft_targets(hosts, info)
    # PEFT wants feedforward_modules to be a subset of target_modules (as strings), and its
    # feed-forward rule is a plain endswith: leaf names only when the targets are leaf names
    # too and they pick exactly the feed-forward hosts
    leaves = sorted({h.rsplit(".", 1)[-1] for h in ff})
    short = set(leaves) <= set(targets) and {h for h in hosts if _is_ff(leaves, h)} == set(ff)
    ff_names = leaves if short else sorted(ff)
    peft_config = {
        "task_type": info.task_type if info.task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM") else None,
        "target_modules": targets, "feedforward_modules": ff_names,
        "fan_in_fan_out": any(info.host_types.get(h) == "Conv1D" for h in hosts),
        "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None,
    }
    return peft_config, out


CODECS["ia3"] = Codec("IA3", export_ia3)
IMPORTERS["IA3"] = import_ia3
