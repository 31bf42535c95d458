"""Combining adapters: composition blocks and the merging algebra."""
from .blocks import Average, Stack
from .merge import merge_adapters

__all__ = ["Average", "Stack", "merge_adapters"]
