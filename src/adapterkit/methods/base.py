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
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, NotMergeableError, did_you_mean


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every method's config: a small frozen dataclass validated on creation.

    ``targets``: module-name suffixes (``["q_proj", "v_proj"]`` matches every module
    whose dotted path ends in ``.q_proj`` or ``.v_proj``), a regex string matched
    against full module paths, or ``None`` for the method's default targets, resolved
    by module names when the adapter is added.

    ``modules_to_save``: modules trained in full beside the adapter (PEFT's field of the
    same name), e.g. a freshly initialised classification head. Module-name suffixes like
    ``targets``; ``None`` (the default) picks the task's head as PEFT does (``classifier``
    / ``score`` for ``*ForSequenceClassification`` and ``*ForTokenClassification``,
    ``qa_outputs`` for ``*ForQuestionAnswering``, nothing otherwise); ``()`` saves none.
    Each adapter holds its own copy (:class:`ModuleCopy`), saved in its file.
    """

    method: ClassVar[str] = ""
    targets: tuple[str, ...] | str | None = None
    # keyword-only: every method's own fields keep their positions
    modules_to_save: tuple[str, ...] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        m = self.modules_to_save
        if m is not None:
            if isinstance(m, str) or not isinstance(m, (list, tuple)) or not all(isinstance(x, str) and x for x in m):
                raise ConfigError(f"{type(self).__name__}.modules_to_save must be a list of module names "
                                  f"(e.g. ['classifier']), () for none or None for the task's default, got {m!r}")
            object.__setattr__(self, "modules_to_save", tuple(m))
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


#: the child of a :class:`ModuleCopy` holding the copy; native tensor keys of a saved
#: module are ``<module path>.modules_to_save.<param>`` (``score.modules_to_save.weight``)
COPY = "modules_to_save"


class ModuleCopy(AdapterModule):
    """A module trained in full for one adapter (``AdapterConfig.modules_to_save``).

    Holds a trainable copy of its host (without any adapter pieces or hooks); while the
    adapter runs, the host's output is replaced by the copy's output on the same call, so
    adapters with different heads coexist. In a mixed batch only the adapter's rows use
    its copy; rows of other adapters keep theirs, base rows the original module.
    """

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        self.add_module(COPY, plain_copy(host))
        getattr(self, COPY).requires_grad_(True)
        self._stash: dict[str, torch.Tensor] | None = None

    @property
    def module(self) -> nn.Module:
        return getattr(self, COPY)

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # compositions call this with the main input only (heads take one tensor)
        return main_output(self.module(x))

    def hook_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], y: torch.Tensor,
                  rows: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The copy's main output for the host's call ``(args, kwargs)``; with ``rows``,
        only those batch rows of ``y`` are replaced."""
        if rows is None:
            return main_output(self.module(*args, **kwargs))
        if not rows.numel():
            return y

        def pick(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch_size:
                return v.index_select(0, rows)
            return v

        sub = main_output(self.module(*[pick(a) for a in args], **{k: pick(v) for k, v in kwargs.items()}))
        return y.index_copy(0, rows, sub.to(y.dtype))

    def merge(self) -> None:
        """Copy the trained weights into the host (the originals are kept for unmerge)."""
        for sib in getattr(self.host, "adapterkit", {}).values():  # type: ignore[union-attr]
            if sib is not self and isinstance(sib, ModuleCopy) and sib.merged:
                raise AdapterError("another adapter's copy of this module is merged into it already; "
                                   "unmerge that adapter first")
        own = own_tensors(self.host)
        src = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        with torch.no_grad():
            self._stash = {k: t.detach().clone() for k, t in own.items()}
            for k, t in own.items():
                t.copy_(src[k].to(t.dtype))
        self.merged = True

    def unmerge(self) -> None:
        own = own_tensors(self.host)
        with torch.no_grad():
            for k, t in (self._stash or {}).items():
                own[k].copy_(t)
        self._stash = None
        self.merged = False


def own_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by name, those of adapter pieces excluded."""
    from ..inject import CONTAINER

    out = dict(m.named_parameters()) | dict(m.named_buffers())
    return {k: t for k, t in out.items() if f".{CONTAINER}." not in f".{k}"}


def plain_copy(m: nn.Module) -> nn.Module:
    """A deep copy of ``m`` without adapter pieces or hooks (they would loop back to the
    model's adapter state), made by hiding them during the copy."""
    from ..inject import CONTAINER

    hidden = []
    for sub in list(m.modules()):
        c = sub._modules.pop(CONTAINER, None)
        hooks = (sub._forward_hooks, sub._forward_pre_hooks, sub._forward_hooks_with_kwargs,
                 sub._forward_hooks_always_called, sub._forward_pre_hooks_with_kwargs)
        hidden.append((sub, c, hooks))
        sub._forward_hooks, sub._forward_pre_hooks = type(hooks[0])(), type(hooks[1])()
        sub._forward_hooks_with_kwargs, sub._forward_hooks_always_called = {}, {}
        sub._forward_pre_hooks_with_kwargs = {}
    try:
        return copy.deepcopy(m)
    finally:
        for sub, c, hooks in hidden:
            (sub._forward_hooks, sub._forward_pre_hooks, sub._forward_hooks_with_kwargs,
             sub._forward_hooks_always_called, sub._forward_pre_hooks_with_kwargs) = hooks
            if c is not None:
                sub._modules[CONTAINER] = c


def main_output(out: Any) -> torch.Tensor:
    """The main tensor of a module's output (the first of a tuple / ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and out:
        return next(iter(out.values()))
    raise TypeError(f"cannot find the main output tensor in a {type(out).__name__}")


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 if it is half precision (bf16/fp16), else unchanged (fp64 stays fp64).

    For merge math whose result is a small difference of large terms (W' - W, B A - B0 A0):
    computed in bf16 the difference keeps only a few bits; callers cast the result back to
    the weight's dtype explicitly."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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
