"""Atomic, resumable training checkpoints.

Layout of one checkpoint, ``<out_dir>/checkpoints/step-000300/``::

    trainable.safetensors   every parameter with requires_grad, by its named_parameters() name
    optimizer.pt            {"optimizer": AdamW state, "scheduler": LR scheduler state}
    rng.pt                  python / torch (CPU + CUDA) / numpy RNG states
    trainer_state.json      step, data position (epoch, batch), config, data fingerprint
    COMPLETE                written last: {"step", "files": {name: size}}

Atomicity: everything is written into ``.tmp-step-...`` in the same directory, each file is
fsynced, ``COMPLETE`` is written and fsynced, then the dir is renamed onto its final name and
the parent dir fsynced. A crash at any point leaves either no ``step-*`` dir or a complete one;
a ``step-*`` dir whose ``COMPLETE`` is missing or disagrees with the file sizes (e.g. a
partial copy) is ignored when resuming. ``.pt`` files hold only tensors and plain Python
containers and are read back with ``torch.load(weights_only=True)``.

Each file is serialized in memory first and written by :func:`_write_file`: the serializers'
own file writers turn a full disk into ``RuntimeError: unexpected pos`` (torch) or a
``SafetensorError``, while a plain ``write`` raises ``OSError(ENOSPC)``, which
:func:`save_checkpoint` reports as a :class:`CheckpointError` naming the dir and the cause.
The extra memory is one copy of the adapter's tensors and optimizer state.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from adapterkit.errors import CheckpointError

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint (see the module docstring for the meaning of each part)."""

    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    optim: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it; a full disk raises ``OSError(ENOSPC)`` as is."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_error(final: Path, root: Path, err: OSError) -> CheckpointError:
    """The error for a failed checkpoint write: the dir, the cause, and what is still there."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"no space left on the device holding {root} ({err.strerror})"
    else:
        why = f"{err.strerror or err} ({err.filename or root})"
    prev = latest_checkpoint(root)
    kept = f"the previous checkpoint {prev} is intact and resumable" if prev else "no earlier checkpoint exists"
    return CheckpointError(f"{final}: cannot write the checkpoint: {why}. Nothing was half-written "
                           f"({kept}); free some space and resume with --resume / train(resume=True)")


def _fsync_dir(path: Path) -> None:
    # directories can be fsynced on POSIX; this makes the rename itself durable
    try:
        _fsync_file(path)
    except OSError:  # e.g. filesystems that refuse O_RDONLY on dirs: best effort
        pass


def capture_rng() -> dict[str, Any]:
    """All RNG states a training step can touch, as weights_only-loadable objects."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # as a tensor + plain numbers: an ndarray would need unsafe unpickling
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def is_step_dir_name(name: str) -> bool:
    return bool(_STEP_RE.match(name))


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` for a training run.

    Two runs writing one dir would interleave checkpoints and metrics (and one would delete
    the other's in-progress temp dirs), so a second run is refused instead of waiting.
    The OS drops the lock when the process dies, so a crash never leaves it stuck.

    Raises:
        CheckpointError: another process is training into ``out_dir``.
    """
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".train.lock", "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"{out_dir}: another training run is using this dir; use another out_dir") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    """True iff ``path`` holds a finished checkpoint (marker present and file sizes match)."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name in ("trainable.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"):
        f = path / name
        if name not in files or not f.is_file() or f.stat().st_size != files[name]:
            return False
    return True


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def remove_stale_temps(root: Path) -> None:
    """Delete ``.tmp-step-*`` dirs left by a crash in the middle of a save."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-step-") or child.name.startswith(".old-step-"):
                shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(
    root: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    optim: dict[str, Any],
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint atomically and prune old ones.

    Args:
        root: the ``checkpoints`` dir (created if missing).
        step: the optimizer step just completed.
        tensors: trainable params by name (copied to CPU, contiguous).
        optim: ``{"optimizer": ..., "scheduler": ...}`` state dicts.
        state: JSON-serializable trainer state (step, data position, config ...).
        keep_last: keep this many newest complete checkpoints (None: keep all).
    Returns:
        The final checkpoint dir.
    Raises:
        CheckpointError: the dir cannot be written (a full disk, no permission ...); the
            temp dir is removed and the earlier checkpoints are untouched.
    """
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise _write_error(final, root, e) from e
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        contents = {
            "trainable.safetensors": safetensors_bytes(cpu),
            "optimizer.pt": _torch_bytes(optim),
            "rng.pt": _torch_bytes(capture_rng()),
            "trainer_state.json": json.dumps(state, indent=1, sort_keys=True).encode(),
        }
        for name, data in contents.items():
            _write_file(tmp / name, data)
        files = {name: len(data) for name, data in contents.items()}
        _write_file(tmp / MARKER, json.dumps({"step": step, "files": files}).encode())
        _fsync_dir(tmp)
        if final.exists():
            # a leftover from an earlier run (or an incomplete copy): move it aside first,
            # because rename() cannot replace a non-empty dir
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointError):
            raise _write_error(final, root, e) from e
        raise
    if keep_last is not None and keep_last > 0:
        for _, old_path in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old_path, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a complete checkpoint dir.

    Raises:
        CheckpointError: the dir is missing, incomplete (no valid ``COMPLETE``) or unreadable.
    """
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint dir")
    if not is_complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no valid {MARKER} marker); it was not fully written")
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        optim = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
        state = json.loads((path / "trainer_state.json").read_text())
    except Exception as e:  # corrupt bytes surface as many exception types
        raise CheckpointError(f"{path}: cannot read checkpoint: {e}") from e
    return Checkpoint(path, int(state["step"]), tensors, optim, rng, state)
