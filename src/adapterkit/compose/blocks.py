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
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..state import Composition

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


__all__: list[Any] = ["Stack", "Average", "apply_child"]
