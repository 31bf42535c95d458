"""Composition blocks: how several adapters combine on every host module.

``ak.set_adapter(model, ak.Stack("lang_de", "ner"))``. Blocks nest:
``ak.Stack("lang_de", ak.Average("ner_a", "ner_b", weights=[0.7, 0.3]))``.

For a host with input ``x`` and base output ``y``, an adapter ``f`` maps ``y -> f(x, y)``
(LoRA: ``y + s B A x``; a series bottleneck: ``y + up(act(down(y)))``):

* ``Stack(f, g)``: ``g(x, f(x, y))``: the output of one feeds the next (MAD-X's language
  adapter then task adapter). For additive methods such as LoRA this is the sum of their
  deltas.
* ``Average(f, g, weights=w)``: ``sum_i w_i f_i(x, y)`` (weights normalised to sum to 1
  unless ``normalize=False``).
* ``Parallel(f, g)``: the batch is repeated once per child at the model's input; child ``i``
  runs on copy ``i`` and the outputs come back stacked along the batch dim (AdapterHub's).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import nn

from ..errors import AdapterError, ConfigError
from ..methods.base import main_input
from ..methods.prompt import get_cache
from ..state import Composition, get_state

Child = Union[str, Composition]


def _names(children: Sequence[Child]) -> tuple[str, ...]:
    out: list[str] = []
    for c in children:
        out.extend(c.adapter_names() if isinstance(c, Composition) else (c,))
    return tuple(out)


def apply_child(child: Child, host: nn.Module, container: nn.ModuleDict, x: torch.Tensor | None,
                y: torch.Tensor) -> torch.Tensor:
    """One child's output on this host (identity if the adapter has no piece here)."""
    if isinstance(child, Composition):
        return child.post(host, container, x, y)
    piece = container[child] if child in container else None
    if piece is None or piece.merged or not piece.has_post:
        return y
    return piece.hook_post(host, x, y, None)


class _Block(Composition):
    def __init__(self, *children: Child) -> None:
        if not children:
            raise ConfigError(f"{type(self).__name__} needs at least one adapter")
        for c in children:
            if not isinstance(c, (str, Composition)):
                raise ConfigError(f"{type(self).__name__} takes adapter names or blocks, got {type(c).__name__}")
        self.children = tuple(children)

    def adapter_names(self) -> tuple[str, ...]:
        return _names(self.children)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"


class Stack(_Block):
    """Apply the children one after the other; each sees the previous one's output."""

    def post(self, host: nn.Module, container: nn.ModuleDict, x: torch.Tensor | None, y: torch.Tensor
             ) -> torch.Tensor:
        for c in self.children:
            y = apply_child(c, host, container, x, y)
        return y


class Average(_Block):
    """Weighted average of the children's outputs."""

    def __init__(self, *children: Child, weights: Sequence[float] | None = None, normalize: bool = True) -> None:
        super().__init__(*children)
        w = [1.0] * len(children) if weights is None else [float(v) for v in weights]
        if len(w) != len(children):
            raise ConfigError(f"Average got {len(children)} adapters but {len(w)} weights")
        if normalize:
            total = sum(w)
            if total == 0:
                raise ConfigError("Average weights sum to 0; pass normalize=False to use them as they are")
            w = [v / total for v in w]
        self.weights = tuple(w)

    def post(self, host: nn.Module, container: nn.ModuleDict, x: torch.Tensor | None, y: torch.Tensor
             ) -> torch.Tensor:
        if not any(n in container for n in self.adapter_names()):
            return y
        out = torch.zeros_like(y)
        for w, c in zip(self.weights, self.children):
            out = out + w * apply_child(c, host, container, x, y)
        return out

    def __repr__(self) -> str:
        return f"Average({', '.join(map(repr, self.children))}, weights={list(self.weights)})"


class Parallel(_Block):
    """AdapterHub's Parallel: each child runs on its own copy of the batch.

    ``ak.set_adapter(model, ak.Parallel("a", "b"))`` then ``model(input_ids)`` (B rows) returns
    ``n * B`` rows: rows ``[i*B, (i+1)*B)`` are the input under child ``i`` alone (children:
    adapter names or blocks). A forward pre-hook on the root model (installed by
    :meth:`activate`, removed once another adapter or composition is active) repeats along
    dim 0, ``n`` times (``torch.cat([t] * n)``), the first positional tensor and the keyword
    tensors in :data:`REPEATED_INPUTS`; every other argument passes unchanged. On each host,
    child ``i`` then sees rows ``[i*B, (i+1)*B)`` only. For training the labels are
    repeated too, so the loss averages over the copies. Must be the top-level composition.
    Generation (a call given a KV cache, as ``generate()`` makes) is refused with AdapterError.
    """

    #: keyword arguments of the root call whose tensors are repeated along the batch dim
    REPEATED_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", "pixel_values", "labels",
                       "token_type_ids", "position_ids")

    def __init__(self, *children: Child) -> None:
        super().__init__(*children)
        if len(self.children) < 2:
            raise ConfigError("Parallel needs at least two children")
        self._batch: int | None = None  # B of the current call (set by the root hook)
        self._handles: list[Any] = []

    # -- activation: the input-repeating root hook ---------------------------------------
    def activate(self, model: nn.Module) -> None:
        """Install the root pre-hook that repeats the batch (idempotent; called on activation)."""
        if self._handles:
            return
        state = get_state(model, create=True)
        n = len(self.children)

        def on() -> bool:
            if state.active is not self:
                self.deactivate()  # another adapter/composition took over: drop the hook lazily
                return False
            return state.rows is None  # inside ak.adapter_batch the mixed batch rules, unrepeated

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
            if not on():
                return None
            if get_cache(kwargs) is not None:  # generate(): its own bookkeeping has B rows
                raise AdapterError("Parallel does not support generation or a passed KV cache: run plain forward "
                                   "passes, or generate per adapter / with ak.adapter_batch")
            ref = args[0] if args and isinstance(args[0], torch.Tensor) else next(
                (kwargs[k] for k in self.REPEATED_INPUTS if isinstance(kwargs.get(k), torch.Tensor)), None)
            if ref is None or ref.dim() == 0:
                raise ConfigError(f"Parallel: cannot find the batch in the model's inputs (looked at the first "
                                  f"positional tensor and {', '.join(self.REPEATED_INPUTS)})")
            self._batch = ref.shape[0]
            args = tuple(torch.cat([a] * n) if i == 0 and isinstance(a, torch.Tensor) else a
                         for i, a in enumerate(args))
            kwargs = {k: torch.cat([v] * n) if k in self.REPEATED_INPUTS and isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
            return args, kwargs

        def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            self._batch = None

        self._handles = [model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
                         model.register_forward_hook(post, with_kwargs=True, always_call=True)]

    def deactivate(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._batch = None

    # -- per-host dispatch ---------------------------------------------------------------
    def _slices(self, total: int) -> list[slice]:
        B = self._batch
        n = len(self.children)
        if B is None:
            raise AdapterError("Parallel runs only as the top-level composition, activated with "
                               "ak.set_adapter(model, ak.Parallel(...)), during a call of that model")
        if total != n * B:
            raise AdapterError(f"Parallel: a module received a batch of {total} rows; expected {n} copies of "
                               f"the model's batch of {B} rows ({n * B})")
        return [slice(i * B, (i + 1) * B) for i in range(n)]

    def pre(self, host: nn.Module, container: nn.ModuleDict, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        todo = [(i, n) for i, c in enumerate(self.children) for n in _names((c,))
                if n in container and container[n].has_pre and not container[n].merged]
        if not todo:
            return args, kwargs
        x = main_input(host, args, kwargs)
        sl = self._slices(x.shape[0])
        for i, n in todo:  # a nested block's pre-side pieces run in name order on its rows
            rows = torch.arange(sl[i].start, sl[i].stop, device=x.device)
            args, kwargs = container[n].hook_pre(host, args, kwargs, rows)
        return args, kwargs

    def post(self, host: nn.Module, container: nn.ModuleDict, x: torch.Tensor | None, y: torch.Tensor
             ) -> torch.Tensor:
        if not any(n in container and container[n].has_post for n in self.adapter_names()):
            return y  # e.g. only a hook-less piece on the root (whose main output may be the loss)
        outs = [apply_child(c, host, container, None if x is None else x[s], y[s])
                for c, s in zip(self.children, self._slices(y.shape[0]))]
        return torch.cat(outs)  # (n * B, ...)


__all__: list[Any] = ["Stack", "Average", "Parallel", "apply_child"]
