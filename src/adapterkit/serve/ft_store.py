"""Durable records of the fine-tuning API: uploaded files, jobs, their events and checkpoints.

Layout under the server's ``--state-dir``::

    files/<file-id>.jsonl           the uploaded bytes (written first)
    files/<file-id>.json            the OpenAI ``file`` object (its presence = the file exists)
    jobs/<job-id>/spec.json         what the engine needs to (re)start the job, examples included
    jobs/<job-id>/job.json          the OpenAI ``fine_tuning.job`` object (presence = job exists)
    jobs/<job-id>/checkpoints.json  the OpenAI ``fine_tuning.job.checkpoint`` objects
    jobs/<job-id>/events.jsonl      the OpenAI ``fine_tuning.job.event`` objects, appended
    training/                       the engine's job directories (`EngineConfig.fine_tuning_dir`)

Why this shape: every record is one file replaced atomically (temp file, fsync, rename, fsync of
the directory), so a process killed at any instant leaves each record either old or new, never
half-written; and the record that makes an object visible is written last. Events are appended
(one fsynced line each); a line torn by a kill is dropped when read.

Also here: `validate_jsonl`, the line-by-line check of an uploaded training file.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapterkit.errors import DataError, did_you_mean

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
_MESSAGE_KEYS = ("role", "content", "name", "weight")
_CHAT_KEYS = ("messages",)
_PC_KEYS = ("prompt", "completion")


class JSONLError(DataError):
    """An uploaded training file is not valid fine-tuning JSONL.

    Attributes:
        line: the 1-based line at fault (None: the file as a whole, e.g. empty).
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


# ----------------------------------------------------------------------------- validation
def validate_jsonl(data: bytes) -> list[dict[str, Any]]:
    """Check an uploaded training file line by line and return its examples.

    Accepted lines (blank lines are skipped): OpenAI's chat format
    ``{"messages": [{"role", "content"}, ...]}`` with at least one assistant message, or
    ``{"prompt": str, "completion": str}``.

    Args:
        data: the file's bytes.

    Returns:
        One dict per example, in file order.

    Raises:
        JSONLError: the first problem, naming its line (``"line 3: ..."``); or an empty file.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise JSONLError(f"line {line}: not UTF-8 text (byte {e.start} of the file)", line) from None
    examples: list[dict[str, Any]] = []
    # split on "\n" only: str.splitlines would also split inside a JSON string holding U+2028
    for lineno, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        examples.append(_check_line(raw, lineno))
    if not examples:
        raise JSONLError("the file holds no examples (it is empty or only blank lines)")
    return examples


def _check_line(raw: str, lineno: int) -> dict[str, Any]:
    def bad(msg: str) -> JSONLError:
        return JSONLError(f"line {lineno}: {msg}", lineno)

    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise bad(f"expected a JSON object, got {type(rec).__name__}")
    keys = _CHAT_KEYS if "messages" in rec else _PC_KEYS
    for k in rec:
        if k not in keys:
            raise bad(f"unknown key {k!r}: a line is {{\"messages\": [...]}} or {{\"prompt\", \"completion\"}}."
                      + did_you_mean(k, _CHAT_KEYS + _PC_KEYS))
    if keys is _CHAT_KEYS:
        _check_messages(rec["messages"], bad)
        return rec
    for k in _PC_KEYS:
        if k not in rec:
            raise bad(f"missing key {k!r}: a line is {{\"messages\": [...]}} or {{\"prompt\", \"completion\"}}")
        if not isinstance(rec[k], str):
            raise bad(f"{k!r} must be a string, got {type(rec[k]).__name__}")
    if not rec["completion"]:
        raise bad("'completion' is empty, so there is nothing to learn")
    return rec


def _check_messages(msgs: Any, bad: Any) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{j}] must be an object, got {type(m).__name__}")
        for k in m:
            if k not in _MESSAGE_KEYS:
                raise bad(f"messages[{j}]: unknown key {k!r}." + did_you_mean(k, _MESSAGE_KEYS))
        for k in ("role", "content"):
            if k not in m:
                raise bad(f"messages[{j}] is missing {k!r}")
            if not isinstance(m[k], str):
                raise bad(f"messages[{j}].{k} must be a string, got {type(m[k]).__name__}")
        if m["role"] not in CHAT_ROLES:
            raise bad(f"messages[{j}].role {m['role']!r} is not one of {list(CHAT_ROLES)}."
                      + did_you_mean(m["role"], CHAT_ROLES))
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise bad("no assistant message with content, so there is nothing to learn")


# ----------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory: the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` in one step: a kill leaves the old content or the new, never part.

    Args:
        path: the file to write (its directory must exist).
        data: the new content.
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def new_id(prefix: str) -> str:
    """An OpenAI-style object id, e.g. ``file-1f3a...`` (24 hex digits)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ----------------------------------------------------------------------------- the store
class FTStore:
    """Files, jobs, events and checkpoints under one state directory (thread-safe).

    Args:
        root: the state directory (created if missing).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.jobs_dir = self.root / "jobs"
        self.training_dir = self.root / "training"
        for d in (self.files_dir, self.jobs_dir, self.training_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._clean()

    def _clean(self) -> None:
        """Drop what a killed process left: temp files, uploads whose record never got written."""
        for d in (self.files_dir, *self.jobs_dir.iterdir()):
            if d.is_dir():
                for p in d.glob(".*.tmp-*"):
                    p.unlink(missing_ok=True)
        for p in self.files_dir.glob("*.jsonl"):
            if not p.with_suffix(".json").exists():
                p.unlink(missing_ok=True)
        for d in self.jobs_dir.iterdir():
            if d.is_dir() and not (d / "job.json").exists():  # killed between spec and job record
                for p in d.iterdir():
                    p.unlink(missing_ok=True)
                d.rmdir()

    # ---- files
    def add_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        """Store an upload; returns its OpenAI ``file`` object."""
        fid = new_id("file")
        obj = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
               "expires_at": None}
        with self._lock:
            write_atomic(self.files_dir / f"{fid}.jsonl", data)
            _write_json(self.files_dir / f"{fid}.json", obj)
        return obj

    def get_file(self, fid: str) -> dict[str, Any] | None:
        """The ``file`` object, or None if there is no such file."""
        if not _safe_id(fid):
            return None
        return _read_json(self.files_dir / f"{fid}.json")

    def file_content(self, fid: str) -> bytes | None:
        """The uploaded bytes, or None if there is no such file."""
        if self.get_file(fid) is None:
            return None
        return (self.files_dir / f"{fid}.jsonl").read_bytes()

    def list_files(self) -> list[dict[str, Any]]:
        """Every file object, newest first."""
        objs = [o for p in self.files_dir.glob("*.json") if (o := _read_json(p)) is not None]
        return sorted(objs, key=lambda o: (o["created_at"], o["id"]), reverse=True)

    def delete_file(self, fid: str) -> bool:
        """Remove a file (record first, so no reader sees a record without content). False if absent."""
        with self._lock:
            if self.get_file(fid) is None:
                return False
            (self.files_dir / f"{fid}.json").unlink()
            _fsync_dir(self.files_dir)
            (self.files_dir / f"{fid}.jsonl").unlink(missing_ok=True)
        return True

    # ---- jobs
    def _job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def create_job(self, job: dict[str, Any], spec: dict[str, Any]) -> None:
        """Record a new job: its spec (for restarts) first, then the job object that makes it visible."""
        with self._lock:
            d = self._job_dir(job["id"])
            d.mkdir()
            _write_json(d / "spec.json", spec)
            _write_json(d / "job.json", job)

    def remove_job(self, job_id: str) -> None:
        """Forget a job whose submission failed (job record first: it is what makes it visible)."""
        with self._lock:
            d = self._job_dir(job_id)
            (d / "job.json").unlink(missing_ok=True)
            _fsync_dir(d)
            for p in d.iterdir():
                p.unlink(missing_ok=True)
            d.rmdir()

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """The job object, or None if there is no such job."""
        if not _safe_id(job_id):
            return None
        return _read_json(self._job_dir(job_id) / "job.json")

    def job_spec(self, job_id: str) -> dict[str, Any]:
        """The spec recorded when the job was created."""
        return json.loads((self._job_dir(job_id) / "spec.json").read_text())

    def update_job(self, job_id: str, **changes: Any) -> dict[str, Any] | None:
        """Apply `changes` to the job object and write it back; returns it (None if absent)."""
        with self._lock:
            job = self.get_job(job_id)
            if job is None:
                return None
            if any(job.get(k) != v for k, v in changes.items()):
                job.update(changes)
                _write_json(self._job_dir(job_id) / "job.json", job)
            return job

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job object, newest first."""
        objs = [o for p in self.jobs_dir.glob("*/job.json") if (o := _read_json(p)) is not None]
        return sorted(objs, key=lambda o: (o["created_at"], o.get("_seq", 0)), reverse=True)

    # ---- checkpoints
    def set_checkpoints(self, job_id: str, checkpoints: list[dict[str, Any]]) -> None:
        """Replace the job's checkpoint objects."""
        with self._lock:
            if self._job_dir(job_id).is_dir():
                _write_json(self._job_dir(job_id) / "checkpoints.json", checkpoints)

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """The job's checkpoint objects, newest first."""
        return _read_json(self._job_dir(job_id) / "checkpoints.json") or []

    # ---- events
    def append_event(self, job_id: str, event: dict[str, Any]) -> None:
        """Append one event (a single fsynced line; a torn last line is dropped by `events`)."""
        with self._lock:
            d = self._job_dir(job_id)
            if not d.is_dir():
                return
            with open(d / "events.jsonl", "ab+") as f:
                line = (json.dumps(event, sort_keys=True) + "\n").encode()
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a line torn by a kill: end it, so this one stands alone
                        line = b"\n" + line
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events, oldest first."""
        return list(_read_lines(self._job_dir(job_id) / "events.jsonl"))


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:  # the last line, torn by a kill while it was written
            continue


def _safe_id(oid: str) -> bool:
    """Ids become file names: letters, digits, '-' and '_' only (no path tricks)."""
    return bool(oid) and len(oid) <= 64 and all(c.isalnum() or c in "-_" for c in oid) and oid.isascii()


__all__ = ["CHAT_ROLES", "FTStore", "JSONLError", "new_id", "validate_jsonl", "write_atomic"]
