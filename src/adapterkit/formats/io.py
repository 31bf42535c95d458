"""Safe file I/O: atomic directory saves and defensive tensor/JSON loading."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError

# -- atomic directory replacement ------------------------------------------------------
_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False where unsupported."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a directory atomically: yields a temp dir beside ``target``; on success its
    files are fsynced and it replaces ``target`` in one step (the old one stays intact
    until then, and is left untouched if anything fails)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"cannot save to {target}: it exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if target.exists():
            if _exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
            else:  # no renameat2: old -> backup, new -> target, drop backup
                backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rmdir(backup)
                os.rename(target, backup)
                os.rename(tmp, target)
                shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- defensive reading -------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterFileError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tensors(directory: Path, safetensors_name: str, bin_name: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors from ``safetensors_name``; a pickle ``bin_name`` only when that is absent,
    and only with ``weights_only=True`` (never arbitrary unpickling). NaN/Inf refused."""
    st = directory / safetensors_name
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterFileError(f"{st} is corrupt or truncated: {e}") from None
    elif bin_name is not None and (directory / bin_name).is_file():
        b = directory / bin_name
        try:
            obj = torch.load(str(b), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterFileError(
                f"{b} could not be loaded safely (weights_only=True; arbitrary pickles are refused): {e}"
            ) from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise AdapterFileError(f"{b} must hold a dict of tensors")
        tensors = obj
    else:
        names = safetensors_name + (f" or {bin_name}" if bin_name else "")
        raise AdapterFileError(f"missing adapter weights: no {names} in {directory}")
    check_finite(tensors, directory)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    """Refuse NaN/Inf. One fused check per dtype (adapters hold hundreds of small tensors);
    only when it fails are the tensors scanned one by one to name the culprit."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for v in tensors.values():
        if v.is_floating_point() and v.numel():
            groups.setdefault(v.dtype, []).append(v.reshape(-1))
    # min/max propagate NaN and surface +-Inf; ~10x faster than isfinite(x).all() on CPU
    if all(bool(torch.isfinite(torch.stack(torch.aminmax(torch.cat(g)))).all()) for g in groups.values()):
        return
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = "NaN" if torch.isnan(v).any() else "Inf"
            raise AdapterFileError(f"tensor {k!r} in {where} holds {bad} values; refusing to load it")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


Writer = Callable[[Path], None]
