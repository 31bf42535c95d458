"""Typed errors. Every error names the offending thing (module, tensor, shape, file)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdapterError(Exception):
    """Base class of every error adapterkit raises on purpose."""


class ConfigError(AdapterError, ValueError):
    """A config field has an invalid value."""


class TargetNotFoundError(AdapterError, ValueError):
    """A target module name or pattern matches nothing in the model."""


class AdapterNotFoundError(AdapterError, KeyError):
    """An adapter name is not attached to the model (or not registered)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateAdapterError(AdapterError, ValueError):
    """An adapter with this name is already attached."""


class IncompatibleBaseError(AdapterError, ValueError):
    """A saved adapter was made for a different base model."""


class AdapterFileError(AdapterError, ValueError):
    """A saved adapter is missing, truncated, corrupt, unsafe or holds NaN/Inf."""


class NotMergeableError(AdapterError, TypeError):
    """The method's math does not allow folding the adapter into the base weights."""


class UnsupportedModuleError(AdapterError, TypeError):
    """The method cannot attach to this kind of module."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates closest to `name`, best first (for 'did you mean' messages)."""
    cands = list(dict.fromkeys(candidates))
    hits = difflib.get_close_matches(name, cands, n=n, cutoff=0.3)
    if len(hits) < n:
        # also offer candidates that share the last dotted component's prefix
        leaf = name.rsplit(".", 1)[-1]
        hits += [c for c in cands if c.rsplit(".", 1)[-1].startswith(leaf[:2]) and c not in hits][: n - len(hits)]
    return hits


def did_you_mean(name: str, candidates: Iterable[str], n: int = 5) -> str:
    hits = closest(name, candidates, n)
    return f" Closest: {', '.join(repr(h) for h in hits)}." if hits else ""


class ModelLoadError(AdapterError, OSError):
    """A base model cannot be found or loaded (missing path/config.json, missing package)."""


class QueueFullError(AdapterError, RuntimeError):
    """The serving engine's request queue is full (max_queue); retry later (HTTP 429)."""


class DataError(AdapterError, ValueError):
    """Training data is malformed (names the file:line or example index and the problem)."""


class CheckpointError(AdapterError, OSError):
    """A training checkpoint is missing, incomplete, corrupt or made with another config."""


class TrainingDivergedError(AdapterError, FloatingPointError):
    """The training loss or gradient became NaN/Inf (names the step); lower the lr or check the data."""
