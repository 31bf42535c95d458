"""The public API: add, activate, batch, merge, save, load and delete adapters."""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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
from .methods.base import AdapterConfig, AdapterModule, ModuleCopy
from .registry import get_method
from .state import AdapterRecord, Composition, get_state, install_piece, remove_piece

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


def add_adapter(model: nn.Module, name: str, config: AdapterConfig) -> AdapterRecord:
    """Attach a new adapter named ``name`` to ``model`` in place.

    Freezes the base model's parameters (the adapter's own parameters train). The first
    adapter added becomes active. Returns the adapter's record (its pieces by module path).
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"config must be an adapter config (e.g. ak.LoRAConfig(...)), got {type(config).__name__}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"adapter name {name!r} must be letters, digits, '_' or '-' (it becomes a state-dict key)")
    state = get_state(model, create=True)
    if name in state.adapters:
        raise DuplicateAdapterError(f"an adapter named {name!r} is already attached; delete it first or pick another name")
    spec = get_method(config.method)
    pieces = spec.attach(model, name, config)
    mods = dict(model.named_modules())
    heads: dict[str, ModuleCopy] = {}
    try:
        for h in resolve_modules_to_save(model, config.modules_to_save, pieces):
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
    if not state.active:
        state.active = (name,)
    return rec


def _freeze_base(model: nn.Module) -> None:
    for pname, p in model.named_parameters():
        if f".{CONTAINER}." not in f".{pname}":
            p.requires_grad_(False)


def set_adapter(model: nn.Module, names: str | Sequence[str] | Composition | None) -> None:
    """Activate one adapter, several (all applied, in this order), a composition
    (``ak.Stack``, ``ak.Average``, ...), or ``None`` (base only)."""
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
    """Names of the adapters that run (those of the composition, if one is active)."""
    return get_state(model, create=True).active_names()


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run one adapter (or ``None``: the base model) per batch row inside the block.

    Works in training too: each adapter's parameters get gradients only from its rows.
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


def _is_merged(rec: AdapterRecord) -> bool:
    return any(p.merged for p in rec.all_pieces().values())


def merge(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights (zero inference overhead). Reversible with unmerge."""
    rec = get_state(model).record(name)
    if not get_method(rec.method).mergeable:
        raise NotMergeableError(f"adapter {name!r} ({rec.method}) cannot be merged: its math has no weight delta")
    if _is_merged(rec):
        raise AdapterError(f"adapter {name!r} is already merged")
    done: list[AdapterModule] = []
    try:
        for piece in rec.all_pieces().values():
            piece.merge()
            done.append(piece)
    except BaseException:
        for piece in reversed(done):
            piece.unmerge()
        raise


def unmerge(model: nn.Module, name: str) -> None:
    """Undo :func:`merge`: restore the base weights."""
    rec = get_state(model).record(name)
    if not _is_merged(rec):
        raise AdapterError(f"adapter {name!r} is not merged")
    for piece in rec.all_pieces().values():
        if piece.merged:
            piece.unmerge()


def merge_and_unload(model: nn.Module, name: str) -> None:
    """Merge adapter ``name`` for good: its delta stays in the base weights and the
    adapter is detached (the model is a plain model again, e.g. for ``save_pretrained``)."""
    state = get_state(model)
    rec = state.record(name)
    if not _is_merged(rec):
        merge(model, name)
    mods = dict(model.named_modules())
    for host_name in rec.all_pieces():
        remove_piece(state, host_name, mods[host_name], name)
    del state.adapters[name]
    _deactivate(state, name)


def _deactivate(state, name: str) -> None:
    if isinstance(state.active, Composition):
        if name in state.active.adapter_names():
            state.active = ()
    else:
        state.active = tuple(n for n in state.active if n != name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Detach adapter ``name`` (unmerging it first if merged)."""
    state = get_state(model)
    rec = state.record(name)
    if _is_merged(rec):
        unmerge(model, name)
    mods = dict(model.named_modules())
    for piece in rec.all_pieces().values():
        piece.on_delete()
    for host_name in rec.all_pieces():
        remove_piece(state, host_name, mods[host_name], name)
    del state.adapters[name]
    _deactivate(state, name)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the attached adapters, in the order they were added."""
    st = model.__dict__.get("_adapterkit_state")
    return list(st.adapters) if st is not None else []


def get_adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    return get_state(model).record(name).config


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The adapter's parameters by full model key."""
    rec = get_state(model).record(name)
    out = {}
    for host_name, piece in rec.all_pieces().items():
        prefix = f"{host_name}.{CONTAINER}.{name}." if host_name else f"{CONTAINER}.{name}."
        for k, p in piece.named_parameters():
            out[prefix + k] = p
    return out


def trainable_parameters(model: nn.Module, name: str | None = None) -> int:
    """Exact count of trainable parameters: of adapter ``name``, or of the whole model."""
    if name is None:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in adapter_parameters(model, name).values() if p.requires_grad)


def regularization_loss(model: nn.Module, name: str | None = None) -> torch.Tensor | None:
    """Sum of the regularizers the pieces of adapter ``name`` (default: the active
    adapters) ask for, or ``None`` if none does. Trainers add it to the task loss."""
    state = get_state(model)
    names = [name] if name is not None else list(state.active_names())
    terms = [t for n in names for p in state.record(n).pieces.values() if (t := p.regularization()) is not None]
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None


# -- files ---------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under portable keys ``<host path>.<param>`` (a module copy's:
    ``<module path>.modules_to_save.<param>``)."""
    return _piece_tensors(get_state(model).record(name).all_pieces())


def _piece_tensors(pieces: dict[str, AdapterModule]) -> dict[str, torch.Tensor]:
    out = {}
    for host_name, piece in pieces.items():
        for k, v in piece.state_dict().items():
            out[f"{host_name}.{k}" if host_name else k] = v
    return out


def save_adapter(model: nn.Module, name: str, path: str | Path, format: str = "adapterkit") -> Path:
    """Save adapter ``name`` atomically to directory ``path``.

    ``format``: ``"adapterkit"`` (native: adapter_config.json + adapter.safetensors) or
    ``"peft"`` (PEFT's adapter_config.json + adapter_model.safetensors).
    """
    rec = get_state(model).record(name)
    spec = get_method(rec.method)
    config, tensors = rec.config, _piece_tensors(rec.pieces)
    if spec.export is not None:
        config, tensors = spec.export(config, tensors, rec.pieces)
    # the file names the modules it holds copies of: it loads the same on any model class
    config = config.replace(modules_to_save=tuple(rec.heads))
    tensors = {**tensors, **_piece_tensors(dict(rec.heads))}
    base = fingerprint(model, [h for h in rec.all_pieces() if h])
    if format in ("adapterkit", "native"):
        return write_native(path, rec.method, config.to_dict(), tensors, base)
    if format == "peft":
        from .formats.peft import write_peft

        return write_peft(path, model, rec.method, config, tensors)
    raise ConfigError(f"unknown format {format!r}; use 'adapterkit' or 'peft'")


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None) -> AdapterRecord:
    """Load a native or PEFT adapter directory into ``model`` as ``name`` (default: the
    directory's name). Refuses a base it was not made for, naming the first mismatch."""
    saved = read_adapter(path)
    name = name or Path(path).resolve().name
    state = get_state(model, create=True)
    if name in state.adapters:
        raise DuplicateAdapterError(f"an adapter named {name!r} is already attached; pass name=... to load it as another")
    spec = get_method(saved.method)
    fields = dict(saved.config)
    fields.setdefault("modules_to_save", ())  # files from before the field never hold copies
    config = spec.config_cls.from_dict(fields).for_loading()
    check_fingerprint(model, saved.base, str(path))
    try:
        rec = add_adapter(model, name, config)
    except TargetNotFoundError as e:  # the file names modules this model does not have
        raise IncompatibleBaseError(f"adapter {path} does not fit this base model: {e}") from None
    try:
        _fill(model, name, saved.tensors, str(path))
    except BaseException:
        delete_adapter(model, name)
        raise
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
    return get_state(model).record(name)


__all__ = [
    "add_adapter", "set_adapter", "adapter_batch", "merge", "unmerge", "delete_adapter", "list_adapters",
    "get_adapter_config", "trainable_parameters", "merge_and_unload", "regularization_loss", "save_adapter", "load_adapter", "adapter_state_dict",
    "adapter_parameters", "active_adapters", "get_record",
]
