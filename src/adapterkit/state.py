"""Per-model adapter state and the host hooks that dispatch to adapter pieces.

The state lives on the root module as ``model._adapterkit_state`` (a plain attribute,
not a submodule, so it never reaches a state dict). Each host module gets one forward
pre-hook and one forward hook, installed with its first adapter piece and removed with
its last; they ask the state which adapters run for this call:

* normal mode: the active adapters (``set_adapter``), in activation order;
* mixed-batch mode (``adapter_batch``): each adapter on its own batch rows only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import AdapterError, AdapterNotFoundError, did_you_mean
from .inject import CONTAINER
from .methods.base import AdapterConfig, AdapterModule, ModuleCopy, main_input


@dataclass
class AdapterRecord:
    name: str
    method: str
    config: AdapterConfig
    #: host module path ("" for the root) -> piece
    pieces: dict[str, AdapterModule]
    #: module path -> its trained copy (``config.modules_to_save``), kept apart from the
    #: method's pieces so code over ``pieces`` only ever sees the method's own math
    heads: dict[str, ModuleCopy] = field(default_factory=dict)
    #: adapter parameter keys the method itself keeps frozen (``set_requires_grad`` leaves them so)
    fixed: frozenset[str] = frozenset()

    def all_pieces(self) -> dict[str, AdapterModule]:
        """The method's pieces and the module copies, by host module path."""
        return {**self.pieces, **self.heads}


class Composition:
    """A rule combining several adapters on every host (``adapterkit.compose``: Stack,
    Average, ...). Activated with ``ak.set_adapter(model, ak.Stack("lang", "task"))``."""

    def adapter_names(self) -> tuple[str, ...]:
        """Every adapter the composition uses (validated when it is activated)."""
        raise NotImplementedError

    def activate(self, model: nn.Module) -> None:
        """Called by ``set_adapter`` when the composition becomes active (e.g. Parallel
        installs its batch-repeating root hook)."""

    def pre(self, host: nn.Module, container: nn.ModuleDict, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Input side: by default each adapter's ``forward_pre`` in order."""
        for n in self.adapter_names():
            piece = container[n] if n in container else None
            if piece is not None and piece.has_pre and not piece.merged:
                args, kwargs = piece.hook_pre(host, args, kwargs, None)
        return args, kwargs

    def post(self, host: nn.Module, container: nn.ModuleDict, x: torch.Tensor | None, y: torch.Tensor
             ) -> torch.Tensor:
        """Output side: the combined output of the host."""
        raise NotImplementedError


@dataclass
class AdapterState:
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    #: the active adapters, applied in order, or a Composition
    active: tuple[str, ...] | Composition = ()
    #: mixed-batch mode: adapter name -> row indices (CPU), and the batch size
    rows: dict[str, torch.Tensor] | None = None
    batch_size: int = 0
    _rows_on: dict[tuple[str, torch.device], torch.Tensor] = field(default_factory=dict)
    _handles: dict[str, list[RemovableHandle]] = field(default_factory=dict)

    def record(self, name: str) -> AdapterRecord:
        try:
            return self.adapters[name]
        except KeyError:
            raise AdapterNotFoundError(
                f"no adapter named {name!r} on this model.{did_you_mean(name, self.adapters)}"
                f" Attached: {sorted(self.adapters) or 'none'}"
            ) from None

    # -- which adapters run on a host for this call ------------------------------------
    def running(self, container: nn.ModuleDict) -> list[tuple[str, AdapterModule, torch.Tensor | None]]:
        """(name, piece, rows) of the adapters that run on this host for the current call."""
        if self.rows is None:
            assert not isinstance(self.active, Composition)
            return [(n, container[n], None) for n in self.active if n in container]  # type: ignore[misc]
        return [(n, container[n], r) for n, r in self.rows.items() if n in container]  # type: ignore[misc]

    def active_names(self) -> tuple[str, ...]:
        a = self.active
        return a.adapter_names() if isinstance(a, Composition) else a

    def rows_on(self, name: str, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (name, device)
        t = self._rows_on.get(key)
        if t is None:
            t = self._rows_on[key] = rows.to(device)
        return t


def get_state(model: nn.Module, create: bool = False) -> AdapterState:
    st = model.__dict__.get("_adapterkit_state")
    if st is None:
        if not create:
            raise AdapterNotFoundError(f"{type(model).__name__} has no adapters (use ak.add_adapter first)")
        st = AdapterState()
        model.__dict__["_adapterkit_state"] = st
    return st


def container_of(host: nn.Module, create: bool = False) -> nn.ModuleDict | None:
    c = host._modules.get(CONTAINER)
    if c is None and create:
        if hasattr(host, CONTAINER):
            raise AdapterError(f"{type(host).__name__} already has an attribute {CONTAINER!r}; cannot attach adapters")
        c = nn.ModuleDict()
        host.add_module(CONTAINER, c)
    return c  # type: ignore[return-value]


def install_piece(state: AdapterState, host_name: str, host: nn.Module, name: str, piece: AdapterModule) -> None:
    c = container_of(host, create=True)
    assert c is not None
    piece.bind(host)
    piece.train(host.training)  # a piece added to a model in eval mode must not run dropout
    c[name] = piece
    if host_name not in state._handles:
        state._handles[host_name] = [
            host.register_forward_pre_hook(_PreHook(state), with_kwargs=True),
            host.register_forward_hook(_PostHook(state), with_kwargs=True),
        ]


def remove_piece(state: AdapterState, host_name: str, host: nn.Module, name: str) -> None:
    c = container_of(host)
    if c is not None and name in c:
        del c[name]
        if not len(c):
            del host._modules[CONTAINER]
            for h in state._handles.pop(host_name, []):
                h.remove()


# -- hooks ---------------------------------------------------------------------------
def _rows(state: AdapterState, name: str, rows: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if ref.shape[0] != state.batch_size:
        raise AdapterError(
            f"adapter_batch was given {state.batch_size} rows but a module received a batch of {ref.shape[0]} "
            f"(shape {tuple(ref.shape)}); the batch dimension must come first and match"
        )
    return state.rows_on(name, rows, ref.device)


class _PreHook:
    """The host's forward pre-hook (a class, not a closure, so models deep-copy and pickle)."""

    def __init__(self, state: AdapterState) -> None:
        self.state = state

    def __call__(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        state = self.state
        c = container_of(host)
        if c is None:
            return None
        if state.rows is None and isinstance(state.active, Composition):
            return state.active.pre(host, c, args, kwargs)
        changed = False
        for name, piece, rows in state.running(c):
            if piece.merged or not piece.has_pre:
                continue
            if rows is not None:
                rows = _rows(state, name, rows, main_input(host, args, kwargs))
            args, kwargs = piece.hook_pre(host, args, kwargs, rows)
            changed = True
        return (args, kwargs) if changed else None


class _PostHook:
    """The host's forward hook."""

    def __init__(self, state: AdapterState) -> None:
        self.state = state

    def __call__(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any):
        state = self.state
        c = container_of(host)
        if c is None:
            return None
        comp = state.active if state.rows is None and isinstance(state.active, Composition) else None
        todo = [] if comp else [t for t in state.running(c) if not t[1].merged and t[1].has_post]
        if not todo and (comp is None or not any(n in c for n in comp.adapter_names())):
            return None
        try:
            x = main_input(host, args, kwargs)
        except TypeError:  # e.g. a root model called with input_ids only: pieces there don't need x
            x = None
        y, rebuild = split_output(output)
        if comp is not None:
            return rebuild(comp.post(host, c, x, y))
        for name, piece, rows in todo:
            if rows is not None:
                rows = _rows(state, name, rows, y)
            if isinstance(piece, ModuleCopy):
                y = piece.hook_call(args, kwargs, y, rows, state.batch_size)
            else:
                y = piece.hook_post(host, x, y, rows)
        return rebuild(y)


def split_output(output: Any):
    """The main tensor of a module's output and a function that rebuilds the output."""
    if isinstance(output, torch.Tensor):
        return output, lambda y: y
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda y: (y, *output[1:])
    if isinstance(output, list) and output and isinstance(output[0], torch.Tensor):
        return output[0], lambda y: [y, *output[1:]]
    if isinstance(output, dict):  # transformers ModelOutput
        k = next(iter(output.keys()))

        def rebuild(y: torch.Tensor):
            output[k] = y
            return output

        return output[k], rebuild
    raise TypeError(f"cannot find the main output tensor in a {type(output).__name__}")
