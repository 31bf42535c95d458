"""The adapter contract shared by every method.

An adapter is a set of :class:`AdapterModule` pieces, each attached to one *host* module
of the user's model (a ``q_proj`` Linear, an ``mlp`` block, or the root model for prompt
tuning). A piece lives in ``host.adapterkit[<adapter name>]``, so the model's own
state-dict keys never change; the adapter's keys are the host's path plus
``.adapterkit.<name>.<param>``.

The host's forward hooks (installed once per host by :mod:`adapterkit.state`) call the
pieces of the adapters that are active for the current call:

* ``forward_pre(x) -> x``: transform the host's input tensor (e.g. (IA)^3 on FFN inputs);
* ``forward_post(x, y) -> y``: given the host's input ``x`` and main output ``y``
  (e.g. LoRA: ``y + B(A(x)) * s``; a series bottleneck: ``y + up(f(down(y)))``).

Both work on the whole batch; the dispatcher restricts them to the rows that use the
adapter in a mixed batch (:func:`adapterkit.adapter_batch`). Pieces that need the full
call (prompt and prefix tuning rewrite keyword arguments of the root model) override
``hook_pre`` / ``hook_post`` instead.
"""
from __future__ import annotations

import copy
import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, NotMergeableError, did_you_mean


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every method's config: a small frozen dataclass validated on creation.

    ``targets``: module-name suffixes (``["q_proj", "v_proj"]`` matches every module
    whose dotted path ends in ``.q_proj`` or ``.v_proj``), a regex string matched
    against full module paths, or ``None`` for the method's default targets, resolved
    by module names when the adapter is added.
    """

    method: ClassVar[str] = ""
    targets: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        t = self.targets
        if isinstance(t, (list, tuple)):
            if not t:
                raise ConfigError(f"{type(self).__name__}.targets is empty; use None for the method's defaults")
            if not all(isinstance(x, str) and x for x in t):
                raise ConfigError(f"{type(self).__name__}.targets must be non-empty strings, got {t!r}")
            # frozen: normalise once, at construction, so the config is hashable
            object.__setattr__(self, "targets", tuple(t))
        elif t is not None and not (isinstance(t, str) and t):
            raise ConfigError(f"{type(self).__name__}.targets must be a list of names, a regex string or None, got {t!r}")

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        names = cls.field_names()
        for k in data:
            if k not in names:
                raise ConfigError(f"{cls.__name__} has no field {k!r}.{did_you_mean(k, names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def for_loading(self) -> "AdapterConfig":
        """The config to build an empty adapter that saved tensors will fill.

        Methods whose initialisation changes the base model (PiSSA, OLoRA) override this
        so that loading never re-runs it.
        """
        return self


class AdapterModule(nn.Module):
    """One adapter's piece on one host module. Subclasses override what they need."""

    #: the piece transforms the host's input (``forward_pre``)
    has_pre: ClassVar[bool] = False
    #: the piece transforms the host's output (``forward_post``)
    has_post: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.merged = False
        self._host_ref: weakref.ref[nn.Module] | None = None

    # the host is referenced weakly: registering it as a submodule would create a cycle
    @property
    def host(self) -> nn.Module:
        host = self._host_ref() if self._host_ref is not None else None
        if host is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a module")
        return host

    def bind(self, host: nn.Module) -> None:
        self._host_ref = weakref.ref(host)

    def __deepcopy__(self, memo: dict[int, Any]) -> "AdapterModule":
        # a weakref deep-copies to itself: point the copy at the copied host instead
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = None if k == "_host_ref" else copy.deepcopy(v, memo)
        host = self._host_ref() if self._host_ref is not None else None
        if host is not None:
            new._host_ref = weakref.ref(copy.deepcopy(host, memo))
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        host = self._host_ref() if self._host_ref is not None else None
        state["_host_ref"] = host  # pickled by reference within the model
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        host = state.pop("_host_ref", None)
        super().__setstate__(state)
        self._host_ref = weakref.ref(host) if host is not None else None

    # -- math --------------------------------------------------------------------------
    def forward_pre(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The additive change to ``host.weight`` that this piece is equivalent to."""
        raise NotMergeableError(f"{type(self).__name__} has no weight delta: it cannot be merged")

    # -- merge -------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the piece into the host's weights (default: ``W += delta_weight()``)."""
        w = self.host.weight
        with torch.no_grad():
            w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        w = self.host.weight
        with torch.no_grad():
            w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def regularization(self) -> torch.Tensor | None:
        """An extra training loss term this piece asks for (e.g. SORSA's orthonormality
        regularizer); summed by :func:`adapterkit.api.regularization_loss`."""
        return None

    def on_delete(self) -> None:
        """Called before the piece is detached (e.g. PiSSA restores the base weight)."""

    # -- hooks (rows: None = every row, else the batch rows that use this adapter) -----
    def hook_pre(
        self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], rows: torch.Tensor | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs, x, put = _main_input(host, args, kwargs)
        if rows is None:
            x = self.forward_pre(x)
        elif rows.numel():
            x = x.index_copy(0, rows, self.forward_pre(x.index_select(0, rows)))
        return put(x)

    def hook_post(
        self, host: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:
        if rows is None:
            return self.forward_post(x, y)
        if not rows.numel():
            return y
        sub = self.forward_post(x.index_select(0, rows), y.index_select(0, rows))
        return y.index_copy(0, rows, sub.to(y.dtype))


def _main_input(host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """The host's main input tensor and a function that puts a replacement back."""
    if args and isinstance(args[0], torch.Tensor):
        def put(x: torch.Tensor):
            return (x, *args[1:]), kwargs
        return args, kwargs, args[0], put
    for k in ("hidden_states", "input", "x", "inputs_embeds", "input_ids"):
        v = kwargs.get(k)
        if isinstance(v, torch.Tensor):
            def put(x: torch.Tensor, k: str = k):
                return args, {**kwargs, k: x}
            return args, kwargs, v, put
    raise TypeError(f"cannot find the input tensor of {type(host).__name__} (args={len(args)}, kwargs={sorted(kwargs)})")


def main_input(host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return _main_input(host, args, kwargs)[2]
