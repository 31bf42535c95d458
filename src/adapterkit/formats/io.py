"""Safe file I/O: atomic directory saves and defensive tensor/JSON loading."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError

try:
    import fcntl
except ImportError:  # not POSIX: no flock, so stale temps are left alone
    fcntl = None  # type: ignore[assignment]

# -- atomic directory replacement ------------------------------------------------------
_RENAME_EXCHANGE = 2
_libc = None
# tempfile.mkdtemp's random suffix: 8 characters of [a-z0-9_]
_SUFFIX = r"[a-z0-9_]{8}"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# safetensors (Rust) reports I/O errors as SafetensorError text, without an errno
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


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


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` (save_pretrained may write sub-folders), then the dirs."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


# -- writer liveness: each live save holds an exclusive flock on its temp dir. The kernel
# drops it when the writer dies (even by SIGKILL), so "unlocked" means "abandoned": unlike a
# pid in the name, this survives pid reuse and never mistakes a live writer for a dead one.
def _open_dir(path: str | os.PathLike[str]) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _locked_temp(target: Path) -> tuple[Path, int | None]:
    """A fresh temp dir beside ``target``, with this process holding its lock (the fd)."""
    while True:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        if fcntl is None:
            return tmp, None
        try:
            fd = _open_dir(tmp)
        except FileNotFoundError:  # a concurrent save's cleanup saw it unlocked: take another
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a cleaner is removing it
        except OSError:  # the filesystem has no flock: no cleanup will touch it either
            os.close(fd)
            return tmp, None
        # ... or removed it between open and flock
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def clean_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp dirs that earlier saves of ``target`` left when they were killed.

    Only ``target``'s own temps (``.<name>.tmp-XXXXXXXX``) are considered, and only those
    no live process holds the lock of: a concurrent save's temp is never touched. A
    ``.<name>.old-XXXXXXXX`` backup (the non-renameat2 swap) is removed only while
    ``target`` exists, since after a crash between its two renames it is the only copy.

    Args:
        target: the directory a save writes (its parent is scanned).

    Returns:
        The temp dirs removed.
    """
    target = Path(target)
    if fcntl is None:  # no way to tell a dead writer from a live one: keep everything
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-{_SUFFIX}")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    removed: list[Path] = []
    for e in entries:
        m = pattern.fullmatch(e.name)
        if m is None or not e.is_dir(follow_symlinks=False):
            continue
        if m.group(1) == "old" and not target.is_dir():
            continue
        try:
            fd = _open_dir(e.path)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live writer (or no flock here): leave it
            os.close(fd)
            continue
        try:  # removed while holding the lock, so a writer that just made it retries
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(Path(e.path))
        finally:
            os.close(fd)
    return removed


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, or safetensors' errno-less error) means no space / quota left."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return not isinstance(exc, OSError) and any(t in str(exc) for t in _DISK_FULL_TEXT)


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a directory atomically: yields a temp dir beside ``target``; on success its
    files are fsynced and it replaces ``target`` in one step (the old one stays intact
    until then, and is left untouched if anything fails).

    Temps that killed earlier saves of the same ``target`` left behind are removed first
    (:func:`clean_stale_temps`); live concurrent saves are not disturbed.

    Args:
        target: the directory to create or replace.

    Yields:
        The temp directory to write into.

    Raises:
        AdapterFileError: ``target`` is an existing file, or the disk (or quota) is full;
            the message names the path, and the previous ``target`` is unchanged.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"cannot save to {target}: it exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    existed = target.is_dir()
    tmp: Path | None = None
    fd: int | None = None
    try:
        tmp, fd = _locked_temp(target)
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            if _exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
            else:  # no renameat2: old -> backup, new -> target, drop backup
                backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rmdir(backup)
                os.rename(target, backup)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(backup, target)  # put the previous version back
                    raise
                shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            kept = f"the previous {target.name} is unchanged" if existed else "nothing was written"
            raise AdapterFileError(
                f"cannot save to {target}: the disk is full (no space left on the filesystem of "
                f"{target.parent}: {e}); {kept}. Free some space and save again."
            ) from e
        raise
    finally:
        if fd is not None:
            os.close(fd)


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
