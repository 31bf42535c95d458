"""The public API: add, activate, batch, merge, save, load and delete adapters.

Every function takes the user's model itself: adapters live inside it, no wrapper.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import (
    AdapterError,
    ConfigError,
    DuplicateAdapterError,
    IncompatibleBaseError,
    NotMergeableError,
    TargetNotFoundError,
    did_you_mean,
)
from .formats import check_fingerprint, fingerprint, read_adapter, write_native
from .inject import CONTAINER, resolve_modules_to_save
from .methods.base import COPY, AdapterConfig, AdapterModule, ModuleCopy, own_tensors
from .registry import get_method
from .state import AdapterRecord, Composition, get_state, install_piece, remove_piece

M = TypeVar("M", bound=nn.Module)
#: marks a module copy's tensor keys: ``score.modules_to_save.weight``
SAVED = f".{COPY}."
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


def add_adapter(model: nn.Module, name: str, config: AdapterConfig) -> AdapterRecord:
    """Attach a new adapter to ``model`` in place (PEFT: ``get_peft_model`` / ``add_adapter``).

    Freezes every base parameter; the adapter's own parameters and its copies of
    ``config.modules_to_save`` train. The first adapter added becomes active.

    Args:
        model: any ``torch.nn.Module`` (a transformers model, a plain ``nn.Sequential`` ...).
        name: the adapter's name: letters, digits, ``_`` or ``-`` (it becomes a state-dict key).
        config: the method's config, e.g. ``ak.LoRAConfig(r=8, targets=["q_proj", "v_proj"])``.

    Returns:
        The adapter's record: ``pieces`` (host module path -> piece) and ``heads``
        (module path -> trained copy).

    Raises:
        ConfigError: ``config`` is not an adapter config, or ``name`` is not a valid name.
        DuplicateAdapterError: an adapter with this name is already attached.
        TargetNotFoundError: a target or ``modules_to_save`` entry matches no module
            (the message lists the closest module names).
        UnsupportedModuleError: a matched module is of a type the method cannot adapt.
    """
    return _add(model, name, config)


def _add(model: nn.Module, name: str, config: AdapterConfig, saved: list[str] | None = None) -> AdapterRecord:
    """:func:`add_adapter`; ``saved``: the exact module paths to copy (a file's), instead of
    resolving ``config.modules_to_save``."""
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"config must be an adapter config (e.g. ak.LoRAConfig(...)), got {type(config).__name__}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"adapter name {name!r} must be letters, digits, '_' or '-' (it becomes a state-dict key)")
    if hasattr(nn.ModuleDict, name):  # the pieces live in a ModuleDict keyed by the name
        raise ConfigError(f"adapter name {name!r} is an attribute of torch.nn.ModuleDict (which holds the pieces); "
                          f"pick another name")
    state = get_state(model, create=True)
    if name in state.adapters:
        raise DuplicateAdapterError(f"an adapter named {name!r} is already attached; delete it first or pick another name")
    spec = get_method(config.method)
    pieces = spec.attach(model, name, config)
    mods = dict(model.named_modules())
    heads: dict[str, ModuleCopy] = {}
    try:
        names = config.modules_to_save if saved is None else saved
        for h in resolve_modules_to_save(model, names, pieces, exact=saved is not None):
            heads[h] = ModuleCopy(mods[h])
        for host_name, piece in {**pieces, **heads}.items():
            install_piece(state, host_name, mods[host_name], name, piece)
    except BaseException:
        for host_name in {**pieces, **heads}:
            remove_piece(state, host_name, mods[host_name], name)
        for piece in pieces.values():  # e.g. PiSSA already rewrote base weights
            piece.on_delete()
        raise
    _freeze_base(model)  # only once attaching worked: a failed add leaves the model as it was
    rec = AdapterRecord(name=name, method=spec.name, config=config, pieces=pieces, heads=heads)
    state.adapters[name] = rec
    rec.fixed = frozenset(k for k, p in adapter_parameters(model, name).items() if not p.requires_grad)
    if not state.active:
        state.active = (name,)
    return rec


def _freeze_base(model: nn.Module) -> None:
    for pname, p in model.named_parameters():
        if f".{CONTAINER}." not in f".{pname}":
            p.requires_grad_(False)


def set_adapter(model: nn.Module, names: str | Sequence[str] | Composition | None) -> None:
    """Choose which adapters run (PEFT: ``set_adapter``).

    Args:
        model: a model with adapters.
        names: one adapter name; several (all applied, in this order); a composition
            (``ak.Stack``, ``ak.Average``, ...); or ``None`` for the base model only.

    Raises:
        AdapterNotFoundError: a name is not attached (the message names the closest).
        ConfigError: a name is given twice.
        AdapterError: a merged adapter would be deactivated or composed (unmerge it first).
    """
    state = get_state(model, create=True)
    if isinstance(names, Composition):
        wanted = names.adapter_names()
        for n, rec in state.adapters.items():
            if n in wanted and _is_merged(rec):
                raise AdapterError(f"adapter {n!r} is merged into the base weights; unmerge it before composing it")
    else:
        wanted = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    for n in wanted:
        state.record(n)
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"set_adapter got a name twice: {list(wanted)}")
    for n, rec in state.adapters.items():
        if n not in wanted and _is_merged(rec):
            raise AdapterError(f"adapter {n!r} is merged into the base weights; unmerge it before deactivating it")
    state.active = names if isinstance(names, Composition) else wanted
    if isinstance(names, Composition):
        names.activate(model)


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters that run (PEFT: ``model.active_adapters``).

    Args:
        model: any model.

    Returns:
        The active adapters in order (those of the composition, if one is active).
    """
    return get_state(model, create=True).active_names()


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run one adapter per batch row inside the block (PEFT: ``adapter_names=`` in forward).

    Works in training too: each adapter's parameters get gradients only from its rows.
    A module trained in full (``modules_to_save``) uses each row's adapter's copy.

    Args:
        model: a model with adapters.
        names: one entry per batch row: an adapter name, or ``None`` for the base model.

    Raises:
        ConfigError: ``names`` is empty.
        AdapterNotFoundError: a name is not attached.
        AdapterError: an adapter is merged (unmerge it first), or, during the call, a
            module receives a batch whose size differs from ``len(names)``.
    """
    state = get_state(model, create=True)
    names = list(names)
    if not names:
        raise ConfigError("adapter_batch needs one entry per batch row, got an empty list")
    rows: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n is None:
            continue
        state.record(n)
        rows.setdefault(n, []).append(i)
    for n, rec in state.adapters.items():
        if _is_merged(rec):
            raise AdapterError(f"adapter {n!r} is merged into the base weights; unmerge it before a mixed batch")
    prev = (state.rows, state.batch_size, state._rows_on)
    state.rows = {n: torch.tensor(r, dtype=torch.long) for n, r in rows.items()}
    state.batch_size = len(names)
    state._rows_on = {}
    try:
        yield
    finally:
        state.rows, state.batch_size, state._rows_on = prev


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (PEFT: ``with model.disable_adapter():``).

    Merged adapters are unmerged for the block and merged again after it (in floating
    point that round trip can move the base weights by an ulp). The active adapters,
    composition or mixed batch come back on exit, also when the block raises.

    Args:
        model: a model with adapters (a model without any runs unchanged).
    """
    state = get_state(model, create=True)
    merged = [n for n, rec in state.adapters.items() if _is_merged(rec)]
    for n in merged:
        unmerge_from_base(model, n)
    prev = (state.active, state.rows, state.batch_size, state._rows_on)
    state.active, state.rows, state.batch_size, state._rows_on = (), None, 0, {}
    try:
        yield
    finally:
        state.active, state.rows, state.batch_size, state._rows_on = prev
        if isinstance(state.active, Composition):
            state.active.activate(model)  # e.g. Parallel's root hook drops itself once inactive
        for n in merged:
            merge_into_base(model, n)


def _is_merged(rec: AdapterRecord) -> bool:
    return any(p.merged for p in rec.all_pieces().values())


def merge_into_base(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights: no inference overhead, reversible
    with :func:`unmerge_from_base` (PEFT: ``merge_adapter``). Not to be confused with
    :func:`adapterkit.combine_adapters`, which builds a new adapter from several.

    A module trained in full (``modules_to_save``) has its trained weights copied in.

    Args:
        model: a model with adapter ``name``.
        name: the adapter to fold in.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
        NotMergeableError: the method has no weight delta (prompt tuning, bottlenecks ...).
        AdapterError: the adapter is merged already, or it holds a copy of a module whose
            weight is tied to another module's (a tied ``lm_head``).
    """
    rec = get_state(model).record(name)
    if not get_method(rec.method).mergeable:
        raise NotMergeableError(f"adapter {name!r} ({rec.method}) cannot be merged: its math has no weight delta")
    if _is_merged(rec):
        raise AdapterError(f"adapter {name!r} is already merged")
    _check_untied(model, rec)
    done: list[AdapterModule] = []
    try:
        for piece in rec.all_pieces().values():
            piece.merge()
            done.append(piece)
    except BaseException:
        for piece in reversed(done):
            piece.unmerge()
        raise


def _check_untied(model: nn.Module, rec: AdapterRecord) -> None:
    """Refuse to copy a trained module into its host when the host shares a weight with
    another module (a tied ``lm_head``): the other module would change too."""
    for h, copy_ in rec.heads.items():
        own = {id(t): k for k, t in own_tensors(copy_.host).items()}
        for n, p in model.named_parameters(remove_duplicate=False):
            if id(p) in own and not n.startswith(f"{h}.") and f".{CONTAINER}." not in f".{n}":
                raise AdapterError(
                    f"adapter {rec.name!r}: {h}.{own[id(p)]} is the same tensor as {n} (tied weights); merging the "
                    f"trained copy of {h!r} would change {n} too. Untie them first or keep the adapter unmerged"
                )


def unmerge_from_base(model: nn.Module, name: str) -> None:
    """Undo :func:`merge_into_base`: restore the base weights (PEFT: ``unmerge_adapter``).

    Args:
        model: a model with adapter ``name``.
        name: the merged adapter.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
        AdapterError: the adapter is not merged.
    """
    rec = get_state(model).record(name)
    if not _is_merged(rec):
        raise AdapterError(f"adapter {name!r} is not merged")
    for piece in rec.all_pieces().values():
        if piece.merged:
            piece.unmerge()


def combine_adapters(model: nn.Module, weights: Mapping[str, float], method: str = "cat", name: str = "merged",
                     r: int | None = None, density: float = 1.0, seed: int = 0) -> str:
    """Build a new LoRA adapter from a weighted combination of attached ones (PEFT:
    ``add_weighted_adapter``). The base weights are untouched; to fold an adapter into
    them use :func:`merge_into_base`.

    Args:
        model: a model with the LoRA / DoRA (or sparse-diff) adapters to combine.
        weights: adapter name -> weight, e.g. ``{"a": 0.7, "b": 0.3}``.
        method: ``"cat"`` (exact, ranks add up), ``"linear"`` (PEFT's factor average,
            equal ranks), ``"svd"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` or
            ``"magnitude_prune"`` (see :mod:`adapterkit.compose.merge`).
        name: the new adapter's name.
        r: the new rank for the re-factorising methods (default: the largest input rank).
        density: the fraction of each delta kept by ties / dare / magnitude_prune, in (0, 1].
        seed: DARE's random drop.

    Returns:
        ``name``: the new adapter, attached (not activated).

    Raises:
        ConfigError: unknown ``method``, empty ``weights``, a bad ``density`` or ``r``, an
            adapter of a method that cannot be combined, or one with module copies
            (``modules_to_save``), which have no low-rank delta to combine.
        AdapterNotFoundError: a name in ``weights`` is not attached.
    """
    from .compose.merge import merge_adapters as _combine  # compose imports this module

    for n in weights:
        heads = get_record(model, n).heads
        if heads:
            raise ConfigError(
                f"adapter {n!r} trains modules in full ({', '.join(heads)}: modules_to_save); combine_adapters "
                f"combines low-rank deltas only and would drop them. Combine adapters added with modules_to_save=()"
            )
    return _combine(model, weights, method=method, name=name, r=r, density=density, seed=seed)


def merge_adapters(*args: Any, **kwargs: Any) -> str:
    """Deprecated name of :func:`combine_adapters` (it read too much like :func:`merge_into_base`)."""
    _deprecated("merge_adapters", "combine_adapters")
    return combine_adapters(*args, **kwargs)


def merge(model: nn.Module, name: str) -> None:
    """Deprecated name of :func:`merge_into_base` (it read too much like :func:`adapterkit.combine_adapters`)."""
    _deprecated("merge", "merge_into_base")
    merge_into_base(model, name)


def unmerge(model: nn.Module, name: str) -> None:
    """Deprecated name of :func:`unmerge_from_base`."""
    _deprecated("unmerge", "unmerge_from_base")
    unmerge_from_base(model, name)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"ak.{old} is deprecated; use ak.{new} (same arguments)", DeprecationWarning, stacklevel=3)


def merge_and_unload(model: M, name: str | None = None) -> M:
    """Fold adapters into the base for good and return the plain model (PEFT: ``merge_and_unload``).

    Args:
        model: a model with adapters.
        name: the adapter to fold in and detach (other adapters stay attached). ``None``
            (PEFT's behaviour): fold in every active adapter, in order, and detach every
            adapter, active or not, so the model is a plain model again (e.g. for
            ``save_pretrained``).

    Returns:
        ``model`` itself, changed in place.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
        NotMergeableError: an adapter to fold in has no weight delta (nothing is changed then).
        AdapterError: a composition is active (fold its adapters in by name instead), or a
            module copy would be folded into a tied weight (nothing is changed then).
    """
    state = get_state(model)
    if name is not None:
        _merge_and_detach(model, name)
        return model
    if isinstance(state.active, Composition):
        raise AdapterError(f"merge_and_unload cannot fold in a composition ({type(state.active).__name__}); "
                           f"fold adapters in one by one with merge_and_unload(model, name)")
    for n in state.active:  # every check before anything changes
        rec = state.record(n)
        if not get_method(rec.method).mergeable:
            raise NotMergeableError(f"active adapter {n!r} ({rec.method}) cannot be merged: its math has no weight delta")
        _check_untied(model, rec)
    for n in list(state.active):
        _merge_and_detach(model, n)
    for n in list(state.adapters):
        delete_adapter(model, n)
    return model


def _merge_and_detach(model: nn.Module, name: str) -> None:
    state = get_state(model)
    rec = state.record(name)
    if not _is_merged(rec):
        merge_into_base(model, name)
    mods = dict(model.named_modules())
    for host_name in rec.all_pieces():
        remove_piece(state, host_name, mods[host_name], name)
    del state.adapters[name]
    _deactivate(state, name)


def unload(model: M) -> M:
    """Detach every adapter without folding any in and return the plain base model
    (PEFT: ``unload``). Merged adapters are unmerged first.

    Args:
        model: a model with or without adapters.

    Returns:
        ``model`` itself, changed in place.
    """
    for n in list_adapters(model):
        delete_adapter(model, n)
    return model


def _deactivate(state, name: str) -> None:
    if isinstance(state.active, Composition):
        if name in state.active.adapter_names():
            state.active = ()
    else:
        state.active = tuple(n for n in state.active if n != name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Detach adapter ``name``, unmerging it first if merged (PEFT: ``delete_adapter``).

    Args:
        model: a model with adapter ``name``.
        name: the adapter to detach.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
    """
    state = get_state(model)
    rec = state.record(name)
    if _is_merged(rec):
        unmerge_from_base(model, name)
    mods = dict(model.named_modules())
    for piece in rec.all_pieces().values():
        piece.on_delete()
    for host_name in rec.all_pieces():
        remove_piece(state, host_name, mods[host_name], name)
    del state.adapters[name]
    _deactivate(state, name)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in the order they were added (PEFT: ``peft_config.keys()``).

    Args:
        model: any model.

    Returns:
        The names (empty for a model without adapters).
    """
    st = model.__dict__.get("_adapterkit_state")
    return list(st.adapters) if st is not None else []


def get_adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    """The config adapter ``name`` was added with (PEFT: ``model.peft_config[name]``).

    Args:
        model: a model with adapter ``name``.
        name: the adapter.

    Returns:
        Its config (a frozen dataclass; ``config.replace(...)`` makes a changed copy).

    Raises:
        AdapterNotFoundError: no adapter ``name``.
    """
    return get_state(model).record(name).config


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter ``name`` (its module copies included).

    Args:
        model: a model with adapter ``name``.
        name: the adapter.

    Returns:
        Full model key (``...q_proj.adapterkit.<name>.lora_A``) -> parameter.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
    """
    rec = get_state(model).record(name)
    out = {}
    for host_name, piece in rec.all_pieces().items():
        prefix = f"{host_name}.{CONTAINER}.{name}." if host_name else f"{CONTAINER}.{name}."
        for k, p in piece.named_parameters():
            out[prefix + k] = p
    return out


def trainable_parameters(model: nn.Module, name: str | None = None) -> int:
    """Exact count of trainable parameters (for all counts and percentages see
    :func:`parameter_summary`).

    Args:
        model: any model.
        name: count only adapter ``name``'s parameters; ``None``: the whole model.

    Returns:
        The number of parameters with ``requires_grad``.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
    """
    if name is None:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in adapter_parameters(model, name).values() if p.requires_grad)


@dataclass(frozen=True)
class AdapterCount:
    """One adapter's line of a :class:`ParameterSummary`."""

    name: str
    method: str
    #: parameters of the adapter (module copies included), and of those the trainable ones
    params: int
    trainable: int
    active: bool


@dataclass(frozen=True)
class ParameterSummary:
    """Trainable and total parameter counts of a model and of each adapter.

    ``str(summary)`` is PEFT's ``print_trainable_parameters`` line followed by one line per adapter.
    """

    trainable: int
    #: every parameter of the model, adapters included (PEFT counts the same way)
    total: int
    adapters: tuple[AdapterCount, ...]

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of ``total``."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain data (for JSON logs)."""
        return {"trainable": self.trainable, "total": self.total, "percent": self.percent,
                "adapters": [dataclasses.asdict(a) for a in self.adapters]}

    def __str__(self) -> str:
        lines = [f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                 f"trainable%: {self.percent:.4f}"]
        for a in self.adapters:
            share = 100.0 * a.params / self.total if self.total else 0.0
            lines.append(f"  {a.name} ({a.method}{', active' if a.active else ''}): {a.params:,} params "
                         f"({share:.4f}%), {a.trainable:,} trainable")
        return "\n".join(lines)


def parameter_summary(model: nn.Module) -> ParameterSummary:
    """Trainable / total / percent for the model and per adapter (PEFT:
    ``get_nb_trainable_parameters``).

    Args:
        model: any model.

    Returns:
        A :class:`ParameterSummary`: print it, or read its fields / ``to_dict()``.
    """
    st = model.__dict__.get("_adapterkit_state")
    active = set(st.active_names()) if st is not None else set()
    rows = []
    for n in list_adapters(model):
        ps = adapter_parameters(model, n).values()
        rows.append(AdapterCount(name=n, method=get_record(model, n).method, params=sum(p.numel() for p in ps),
                                 trainable=sum(p.numel() for p in ps if p.requires_grad), active=n in active))
    return ParameterSummary(trainable=trainable_parameters(model), total=sum(p.numel() for p in model.parameters()),
                            adapters=tuple(rows))


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`parameter_summary` (PEFT: ``model.print_trainable_parameters()``).

    Args:
        model: any model.
    """
    print(parameter_summary(model))


def set_requires_grad(model: nn.Module, names: str | Sequence[str], requires_grad: bool = True) -> None:
    """Make adapters' parameters (their module copies included) trainable or frozen
    (PEFT: ``model.set_requires_grad``), e.g. to go on training an adapter loaded for inference.
    Parameters the method itself keeps frozen stay frozen.

    Args:
        model: a model with the adapters.
        names: an adapter name or several.
        requires_grad: ``True`` to train them, ``False`` to freeze them.

    Raises:
        AdapterNotFoundError: a name is not attached.
    """
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        get_record(model, n)  # every name checked before anything changes
    for n in names:
        fixed = get_record(model, n).fixed
        for k, p in adapter_parameters(model, n).items():
            p.requires_grad_(requires_grad and k not in fixed)


def regularization_loss(model: nn.Module, name: str | None = None) -> torch.Tensor | None:
    """Sum of the regularizers the pieces of an adapter ask for (e.g. SORSA's); trainers
    add it to the task loss.

    Args:
        model: a model with adapters.
        name: the adapter; ``None``: the active adapters.

    Returns:
        A scalar tensor, or ``None`` if no piece asks for one.
    """
    state = get_state(model)
    names = [name] if name is not None else list(state.active_names())
    terms = [t for n in names for p in state.record(n).pieces.values() if (t := p.regularization()) is not None]
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None


# -- files ---------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors as the native format saves them (PEFT: ``get_peft_model_state_dict``).

    Args:
        model: a model with adapter ``name``.
        name: the adapter.

    Returns:
        Portable key -> tensor: ``<host path>.<param>`` (``model.layers.0.self_attn.q_proj.lora_A``);
        a module copy's ``<module path>.modules_to_save.<param>``.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
    """
    return _piece_tensors(get_state(model).record(name).all_pieces())


def _piece_tensors(pieces: dict[str, AdapterModule]) -> dict[str, torch.Tensor]:
    out = {}
    for host_name, piece in pieces.items():
        for k, v in piece.state_dict().items():
            out[f"{host_name}.{k}" if host_name else k] = v
    return out


def save_adapter(model: nn.Module, name: str, path: str | Path, format: str = "adapterkit") -> Path:
    """Save adapter ``name`` to directory ``path``, atomically (PEFT: ``save_pretrained``).

    The directory is replaced in one step: a failed save leaves any previous one intact.

    Args:
        model: a model with adapter ``name``.
        name: the adapter to save.
        path: the directory to write (created or replaced).
        format: ``"adapterkit"`` (native: ``adapter_config.json`` with a base fingerprint +
            ``adapter.safetensors``) or ``"peft"`` (PEFT's ``adapter_config.json`` +
            ``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained``) or
            ``"adapterhub"`` (AdapterHub ``adapters``' layout, loadable by ``model.load_adapter``;
            the adapter's name inside the file is ``name``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
        ConfigError: unknown ``format``, or a method / config field / architecture that format
            cannot express.
        AdapterFileError: ``path`` exists and is not a directory, or the disk is full.
    """
    rec = get_state(model).record(name)
    spec = get_method(rec.method)
    config, tensors = rec.config, _piece_tensors(rec.pieces)
    if spec.export is not None:
        config, tensors = spec.export(config, tensors, rec.pieces)
    tensors = {**tensors, **_piece_tensors(dict(rec.heads))}
    base = fingerprint(model, [h for h in rec.all_pieces() if h])
    if format in ("adapterkit", "native"):
        return write_native(path, rec.method, config.to_dict(), tensors, base)
    if format == "peft":
        from .formats.peft import write_peft

        return write_peft(path, model, rec.method, config, tensors)
    if format == "adapterhub":
        from .formats.adapterhub import write_adapterhub

        return write_adapterhub(path, model, rec.method, config, tensors, name)
    raise ConfigError(f"unknown format {format!r}; use 'adapterkit', 'peft' or 'adapterhub'")


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, trainable: bool = False
                 ) -> AdapterRecord:
    """Load a native or PEFT adapter directory into ``model`` (PEFT: ``PeftModel.from_pretrained``
    / ``load_adapter``).

    The adapter is attached (and becomes active if it is the first) for inference: its
    parameters are frozen unless ``trainable=True`` (PEFT: ``is_trainable=False``).

    Args:
        model: the base model the adapter was made for.
        path: the adapter directory (native or PEFT, detected from its config).
        name: the adapter's name in the model; default: the directory's name.
        trainable: ``True`` to go on training the loaded adapter.

    Returns:
        The adapter's record.

    Raises:
        AdapterFileError: ``path`` is missing, not an adapter, corrupt, or holds NaN/Inf.
        IncompatibleBaseError: the adapter was made for another base (the first mismatching
            module, tensor or shape is named).
        DuplicateAdapterError: an adapter with this name is attached already.
    """
    saved = read_adapter(path)
    name = name or Path(path).resolve().name
    state = get_state(model, create=True)
    if name in state.adapters:
        raise DuplicateAdapterError(f"an adapter named {name!r} is already attached; pass name=... to load it as another")
    spec = get_method(saved.method)
    config = spec.config_cls.from_dict(saved.config).for_loading()
    check_fingerprint(model, saved.base, str(path))
    # the copies the file holds, whatever the config's default would pick on this model class
    copies = sorted({f".{k}".split(SAVED)[0][1:] for k in saved.tensors if SAVED in f".{k}"})
    try:
        rec = _add(model, name, config, saved=copies)
    except TargetNotFoundError as e:  # the file names modules this model does not have
        raise IncompatibleBaseError(f"adapter {path} does not fit this base model: {e}") from None
    try:
        _fill(model, name, saved.tensors, str(path))
    except BaseException:
        delete_adapter(model, name)
        raise
    if not trainable:
        set_requires_grad(model, name, False)
    return rec


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved tensors into the freshly attached adapter, checking every key and shape."""
    rec = get_state(model).record(name)
    expected = adapter_state_dict(model, name)
    for k, dst in expected.items():
        src = tensors.get(k)
        if src is None:
            raise IncompatibleBaseError(
                f"adapter {where} has no tensor {k!r} that this model needs"
                f"{did_you_mean(k, tensors)}"
            )
        if tuple(src.shape) != tuple(dst.shape):
            raise IncompatibleBaseError(
                f"adapter {where}: tensor {k!r} has shape {tuple(src.shape)} in the file but this model needs "
                f"{tuple(dst.shape)}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise IncompatibleBaseError(
            f"adapter {where} holds tensors this model has no place for, first: {extra[0]!r}"
            f"{did_you_mean(extra[0], expected)}"
        )
    with torch.no_grad():
        for host_name, piece in rec.all_pieces().items():
            prefix = f"{host_name}." if host_name else ""
            own = piece.state_dict()
            piece.load_state_dict({k: tensors[prefix + k].to(own[k].dtype) for k in own})


def get_record(model: nn.Module, name: str) -> AdapterRecord:
    """The record of adapter ``name``.

    Args:
        model: a model with adapter ``name``.
        name: the adapter.

    Returns:
        Its :class:`~adapterkit.state.AdapterRecord`: method, config, pieces and module copies.

    Raises:
        AdapterNotFoundError: no adapter ``name``.
    """
    return get_state(model).record(name)


__all__ = [
    "add_adapter", "set_adapter", "adapter_batch", "disable_adapters", "merge_into_base", "unmerge_from_base",
    "merge", "unmerge", "combine_adapters", "merge_adapters", "delete_adapter", "list_adapters", "get_adapter_config", "trainable_parameters",
    "parameter_summary", "print_trainable_parameters", "ParameterSummary", "AdapterCount", "set_requires_grad",
    "merge_and_unload", "unload", "regularization_loss", "save_adapter", "load_adapter", "adapter_state_dict",
    "adapter_parameters", "active_adapters", "get_record",
]
