"""Combining adapters: merging algebra (and, later, composition blocks and routing)."""
from .merge import merge_adapters

__all__ = ["merge_adapters"]
