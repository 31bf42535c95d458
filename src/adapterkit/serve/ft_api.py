"""OpenAI's fine-tuning API on ``adapterkit serve`` (``--enable-fine-tuning``).

Routes (the shapes of OpenAI's current API, so the official ``openai`` client works):

  * ``POST /v1/files`` (multipart: ``file``, ``purpose="fine-tune"``), ``GET /v1/files``,
    ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``;
  * ``POST /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs`` (``after``, ``limit``),
    ``GET /v1/fine_tuning/jobs/{id}``, ``POST /v1/fine_tuning/jobs/{id}/cancel``,
    ``GET /v1/fine_tuning/jobs/{id}/events``, ``GET /v1/fine_tuning/jobs/{id}/checkpoints``.

Training runs inside the serving engine (`adapterkit.serve.coserve`, ``engine.fine_tuning``);
this module owns the OpenAI objects and their durable records (`adapterkit.serve.ft_store`).
The learning rate is ``BASE_LEARNING_RATE`` x ``learning_rate_multiplier``. The adapter is
chosen by the adapterkit extension field ``adapter`` (``{"method": "lora", "r": 8, ...}``;
``extra_body`` in the openai client). See docs/fine-tuning.md.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from adapterkit.errors import ConfigError, DataError, QueueFullError, did_you_mean
from adapterkit.serve.api import APIError, ErrorBody
from adapterkit.serve.ft_store import FTStore, JSONLError, new_id, validate_jsonl

log = logging.getLogger("adapterkit.serve")

BASE_LEARNING_RATE = 2e-4  # = TrainConfig's default lr; the job's lr is this x learning_rate_multiplier
DEFAULT_N_EPOCHS = 3
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
PURPOSES = ("fine-tune",)
TERMINAL = ("succeeded", "failed", "cancelled")
CREATE_FIELDS = ("model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed",
                 "metadata", "integrations", "adapter")
OPENAI_HYPER = ("n_epochs", "batch_size", "learning_rate_multiplier")
EXTRA_HYPER = ("warmup_steps", "max_steps", "checkpoint_every")  # adapterkit extensions
NOT_ENABLED = ("Fine-tuning is not enabled on this server: start it with `adapterkit serve --enable-fine-tuning` "
               "(see docs/fine-tuning.md).")

_MEANINGS = {400: "invalid request (the field is in `param`), or fine-tuning not enabled (--enable-fine-tuning)",
             401: "missing or wrong API key", 404: "no such file or job", 413: "file over --max-file-bytes",
             429: "--max-fine-tuning-jobs jobs are already queued or running"}


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody, "description": _MEANINGS[s]} for s in statuses}


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as clients see it: keys starting with '_' are the store's bookkeeping."""
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _page(objs: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: the `limit` objects following the one with id `after`."""
    start = 0
    if after is not None:
        ids = [o["id"] for o in objs]
        if after not in ids:
            raise APIError(400, f"after: {after!r} is not the id of an object in this list", param="after",
                           code="invalid_value")
        start = ids.index(after) + 1
    data = [_public(o) for o in objs[start:start + limit]]
    return {"object": "list", "data": data, "has_more": start + limit < len(objs),
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


# ----------------------------------------------------------------------------- request checks
def _bad(field: str, msg: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{field}: {msg}", param=field, code=code)


def _no_unknown(obj: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    for k in obj:
        if k not in allowed:
            name = f"{where}.{k}" if where else k
            raise _bad(name, f"unknown field; valid fields: {list(allowed)}." + did_you_mean(k, allowed),
                       code="unknown_field")


def _int(v: Any, field: str, low: int, high: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise _bad(field, f"must be an int {rng} or \"auto\", got {v!r}")
    return v


def parse_hyperparameters(hp: Any, where: str, n_examples: int) -> dict[str, Any]:
    """OpenAI's ``hyperparameters`` (values or "auto") plus adapterkit's extras, resolved.

    Args:
        hp: the request's object (None: all defaults).
        where: its path in the request, for messages (``hyperparameters`` or
            ``method.supervised.hyperparameters``).
        n_examples: training examples (an "auto" batch size is at most this).

    Returns:
        ``{"n_epochs", "batch_size", "learning_rate_multiplier", "warmup_steps", "max_steps",
        "checkpoint_every"}`` with every value resolved.

    Raises:
        APIError: 400 naming the field (unknown ones with the closest valid name).
    """
    hp = {} if hp is None else hp
    if not isinstance(hp, dict):
        raise _bad(where, f"must be an object, got {type(hp).__name__}")
    _no_unknown(hp, OPENAI_HYPER + EXTRA_HYPER, where)

    def get(k: str) -> Any:
        v = hp.get(k, "auto")
        return None if v == "auto" else v

    n_epochs = get("n_epochs")
    batch = get("batch_size")
    mult = get("learning_rate_multiplier")
    if mult is not None and (isinstance(mult, bool) or not isinstance(mult, (int, float))
                             or not math.isfinite(mult) or not 0 < mult <= 1000):
        raise _bad(f"{where}.learning_rate_multiplier", f"must be a number in (0, 1000] or \"auto\", got {mult!r}")
    out = {
        "n_epochs": DEFAULT_N_EPOCHS if n_epochs is None else _int(n_epochs, f"{where}.n_epochs", 1, 100),
        "batch_size": min(DEFAULT_BATCH_SIZE, n_examples) if batch is None
        else _int(batch, f"{where}.batch_size", 1, 1024),
        "learning_rate_multiplier": 1.0 if mult is None else float(mult),
        "warmup_steps": _int(hp.get("warmup_steps", 0), f"{where}.warmup_steps", 0),
        "max_steps": None if hp.get("max_steps") is None else _int(hp["max_steps"], f"{where}.max_steps", 1),
        "checkpoint_every": None if hp.get("checkpoint_every") is None
        else _int(hp["checkpoint_every"], f"{where}.checkpoint_every", 1),
    }
    return out


def parse_method(body: dict[str, Any]) -> Any:
    """The hyper-parameters object of the request: top level or ``method.supervised``."""
    method = body.get("method")
    if method is None:
        return body.get("hyperparameters"), "hyperparameters"
    if not isinstance(method, dict):
        raise _bad("method", f"must be an object, got {type(method).__name__}")
    _no_unknown(method, ("type", "supervised", "dpo", "reinforcement"), "method")
    if method.get("type", "supervised") != "supervised":
        raise _bad("method.type", f"only \"supervised\" is supported, got {method.get('type')!r}")
    sup = method.get("supervised") or {}
    if not isinstance(sup, dict):
        raise _bad("method.supervised", f"must be an object, got {type(sup).__name__}")
    _no_unknown(sup, ("hyperparameters",), "method.supervised")
    if sup.get("hyperparameters") is not None and body.get("hyperparameters") is not None:
        raise _bad("hyperparameters", "give hyper-parameters either here or in method.supervised.hyperparameters, "
                   "not both")
    if sup.get("hyperparameters") is not None:
        return sup["hyperparameters"], "method.supervised.hyperparameters"
    return body.get("hyperparameters"), "hyperparameters"


def parse_adapter(adapter: Any, max_rank: int) -> tuple[str, dict[str, Any]]:
    """The ``adapter`` extension -> (adapterkit method key, config fields). The engine checks
    the fields themselves (unknown ones named with the closest valid name); the rank is
    checked here against ``--max-lora-rank`` so that error names the flag."""
    adapter = {} if adapter is None else adapter
    if not isinstance(adapter, dict):
        raise _bad("adapter", f"must be an object like {{\"method\": \"lora\", \"r\": 8}}, got {type(adapter).__name__}")
    cfg = dict(adapter)
    method = cfg.pop("method", "lora")
    if not isinstance(method, str):
        raise _bad("adapter.method", f"must be a method name like \"lora\", got {method!r}")
    r = cfg.get("r")
    if r is not None:
        _int(r, "adapter.r", 1)
        if r > max_rank:
            raise _bad("adapter.r", f"rank {r} is above this server's --max-lora-rank {max_rank}", code="rank_too_large")
    return method, cfg


def _engine_param(msg: str) -> str | None:
    """The request field an engine ConfigError (``"adapter_config.r: ..."``) is about, in the
    request's names: the engine's ``adapter_config`` and ``method`` are the ``adapter`` extension."""
    head = msg.split(":", 1)[0].strip()
    if not head or ":" not in msg or not all(c.isalnum() or c in "_." for c in head):
        return None
    if head == "method":
        return "adapter.method"
    if head.split(".")[0] == "adapter_config":
        return "adapter" + head.removeprefix("adapter_config")
    return head


# ----------------------------------------------------------------------------- the service
class FineTuning:
    """The fine-tuning API's state: the store, the engine's `CoServe`, and a thread that turns
    the engine's events into durable records (the engine's callback must not block).

    Args:
        store: the records (None: fine-tuning not enabled; every route answers 400 saying how).
        engine: the serving engine; ``engine.fine_tuning`` runs the jobs.
        base_name: the served base model's name (jobs must name it).
        max_file_bytes: largest upload (413 above).
    """

    def __init__(self, store: FTStore | None, engine: Any, base_name: str,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.store, self.engine, self.base_name = store, engine, base_name
        self.max_file_bytes = max_file_bytes
        self._events: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._refresh_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def coserve(self) -> Any:
        """The engine's `CoServe` (400 when the engine was built without fine-tuning)."""
        cs = getattr(self.engine, "fine_tuning", None)
        if cs is None:
            raise APIError(400, NOT_ENABLED + " (the engine was built without EngineConfig.fine_tuning)",
                           code="fine_tuning_not_enabled")
        return cs

    def require(self) -> FTStore:
        """The store; 400 saying how to enable fine-tuning when it is off."""
        if not self.enabled:
            raise APIError(400, NOT_ENABLED, code="fine_tuning_not_enabled")
        assert self.store is not None
        return self.store

    # ---- lifecycle
    def start(self) -> None:
        """Start the event writer; re-register finished jobs' models and re-submit the jobs a
        previous server left queued or running (``resume=True``: from their last checkpoint)."""
        if not self.enabled or getattr(self.engine, "fine_tuning", None) is None:
            return
        self._thread = threading.Thread(target=self._write_events, name="ft-events", daemon=True)
        self._thread.start()
        assert self.store is not None
        for job in reversed(self.store.list_jobs()):  # oldest first: they were queued first
            if job["status"] == "succeeded":
                self._register_results(job)
            elif job["status"] not in TERMINAL:
                self._resume(job)

    def close(self) -> None:
        """Stop the event writer after it wrote what is queued."""
        if self._thread is not None:
            self._events.put(None)
            self._thread.join(10)
            self._thread = None

    def _resume(self, job: dict[str, Any]) -> None:
        assert self.store is not None
        jid = job["id"]
        try:
            self.coserve().submit(self._spec(jid), self._on_event(jid), resume=True)
        except Exception as exc:  # noqa: BLE001 - any reason: the job fails with it, the server starts
            log.warning("fine-tuning job %s could not be resumed: %s", jid, exc)
            self.store.update_job(jid, status="failed", finished_at=int(time.time()),
                                  error={"code": "resume_failed", "message": f"could not resume after a server "
                                         f"restart: {type(exc).__name__}: {exc}", "param": None})
            return
        self._event(jid, "Server restarted: job resumed from its last complete checkpoint.")
        log.info("resumed fine-tuning job %s", jid)

    def _register_results(self, job: dict[str, Any]) -> None:
        """After a restart the engine no longer knows the models a job produced: register them."""
        try:
            self.coserve().register_saved(self._spec(job["id"]))
        except Exception as exc:  # noqa: BLE001 - one bad directory must not stop the server
            log.warning("could not register the models of fine-tuning job %s: %s", job["id"], exc)

    def _spec(self, jid: str) -> Any:
        from adapterkit.serve.coserve import FineTuneSpec

        assert self.store is not None
        return FineTuneSpec(**self.store.job_spec(jid))

    # ---- events
    def _on_event(self, jid: str) -> Callable[[dict[str, Any]], None]:
        def on_event(ev: dict[str, Any]) -> None:  # engine thread: only a queue put
            self._events.put((jid, ev))

        return on_event

    def _event(self, jid: str, message: str, level: str = "info", data: dict[str, Any] | None = None,
               kind: str = "message", created_at: float | None = None) -> None:
        assert self.store is not None
        self.store.append_event(jid, {"id": new_id("ftevent"), "object": "fine_tuning.job.event",
                                      "created_at": int(created_at or time.time()), "level": level,
                                      "message": message, "data": data, "type": kind})

    def _write_events(self) -> None:
        while (item := self._events.get()) is not None:
            jid, ev = item
            try:
                self._record(jid, ev)
            except Exception:  # noqa: BLE001 - a bad event must not stop the writer
                log.exception("fine-tuning job %s: could not record event %r", jid, ev)

    def _record(self, jid: str, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        data = {k: v for k, v in ev.items() if k not in ("type", "created_at", "message")}
        if kind == "metrics" and "loss" in data:
            data["train_loss"] = data["loss"]
        level = "error" if kind == "status" and ev.get("status") == "failed" else "info"
        self._event(jid, str(ev.get("message", "")), level, data or None,
                    "metrics" if kind == "metrics" else "message", ev.get("created_at"))
        self.refresh(jid)

    # ---- job state
    def refresh(self, jid: str) -> dict[str, Any] | None:
        """Bring the job record up to the engine's view of the job (never back from a final
        state); returns the record."""
        assert self.store is not None
        with self._refresh_lock:
            job = self.store.get_job(jid)
            if job is None or job["status"] in TERMINAL:
                return job
            try:
                st = self.coserve().status(jid)
            except Exception:  # noqa: BLE001 - not (yet) known to the engine: keep the record
                return job
            changes: dict[str, Any] = {"status": st.status, "trained_tokens": st.trained_tokens}
            if st.status == "succeeded":
                changes["fine_tuned_model"] = st.fine_tuned_model
            if st.status in TERMINAL:
                changes["finished_at"] = int(time.time())
            if st.status == "failed":
                changes["error"] = {"code": "training_failed", "message": st.error or "failed", "param": None}
            self._set_checkpoints(jid, st.checkpoints)
            return self.store.update_job(jid, **changes)

    def _set_checkpoints(self, jid: str, ckpts: Sequence[dict[str, Any]]) -> None:
        assert self.store is not None
        old = {c["step_number"]: c for c in self.store.checkpoints(jid)}
        out = []
        for c in ckpts:
            step = int(c["step"])
            metrics = {"step": step, **{("train_loss" if k == "loss" else k): v
                                        for k, v in (c.get("metrics") or {}).items()}}
            out.append({"id": f"ftckpt-{jid.removeprefix('ftjob-')}-{step}",
                        "object": "fine_tuning.job.checkpoint",
                        "created_at": old.get(step, {}).get("created_at", int(time.time())),
                        "fine_tuned_model_checkpoint": c["model"], "fine_tuning_job_id": jid,
                        "metrics": metrics, "step_number": step})
        out.sort(key=lambda c: c["step_number"], reverse=True)
        if out != sorted(old.values(), key=lambda c: c["step_number"], reverse=True):
            self.store.set_checkpoints(jid, out)

    # ---- create / cancel
    def create(self, body: Any) -> dict[str, Any]:
        """Check a ``POST /v1/fine_tuning/jobs`` body, record the job and submit it.

        Raises:
            APIError: 400 naming the field at fault, 429 when --max-fine-tuning-jobs are busy.
        """
        store = self.require()
        self.coserve()
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_value")
        _no_unknown(body, CREATE_FIELDS, "")
        model = body.get("model")
        if model != self.base_name:
            raise _bad("model", f"{model!r} cannot be fine-tuned here: this server fine-tunes its served base "
                       f"model {self.base_name!r}.", code="model_not_available")
        examples = self._examples(body.get("training_file"), "training_file", required=True)
        valid = self._examples(body.get("validation_file"), "validation_file", required=False)
        hp_obj, where = parse_method(body)
        hp = parse_hyperparameters(hp_obj, where, len(examples))
        method, adapter_cfg = parse_adapter(body.get("adapter"), self.engine.config.max_lora_rank)
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not 1 <= len(suffix) <= 64
                                   or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in suffix)):
            raise _bad("suffix", f"must be 1-64 characters from A-Z a-z 0-9 '-' '_' '.', got {suffix!r}")
        seed = body.get("seed")
        seed = random.randrange(2**31) if seed is None else _int(seed, "seed", 0, 2**31 - 1)
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise _bad("metadata", "must be an object of at most 16 string keys and string values")
        if body.get("integrations"):
            raise _bad("integrations", "no integrations are supported (watch the job's events instead)")
        jid = new_id("ftjob")
        spec = {"job_id": jid, "examples": examples, "validation_examples": valid, "method": method,
                "adapter_config": adapter_cfg, "n_epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
                "learning_rate": BASE_LEARNING_RATE * hp["learning_rate_multiplier"],
                "warmup_steps": hp["warmup_steps"], "max_steps": hp["max_steps"], "seed": seed, "suffix": suffix,
                "checkpoint_every": hp["checkpoint_every"]}
        shown = {k: hp[k] for k in OPENAI_HYPER}
        job = {"id": jid, "object": "fine_tuning.job", "created_at": int(time.time()), "_seq": time.time_ns(),
               "error": None, "fine_tuned_model": None, "finished_at": None, "hyperparameters": shown,
               "model": self.base_name, "organization_id": "adapterkit", "result_files": [], "seed": seed,
               "status": "queued", "trained_tokens": None, "training_file": body["training_file"],
               "validation_file": body.get("validation_file"), "estimated_finish": None, "integrations": None,
               "metadata": metadata, "user_provided_suffix": suffix,
               "method": {"type": "supervised", "supervised": {"hyperparameters": shown}},
               "adapter": {"method": method, **adapter_cfg}}
        store.create_job(job, spec)  # recorded first: a kill after the submit still finds it at restart
        try:
            self.coserve().submit(self._spec(jid), self._on_event(jid))
        except QueueFullError as exc:
            store.remove_job(jid)
            raise APIError(429, f"{exc} (at most --max-fine-tuning-jobs jobs are queued or running; retry when "
                           "one finishes)", type="rate_limit_error", code="too_many_fine_tuning_jobs") from None
        except DataError as exc:  # an example the tokenizer cannot turn into a training example
            store.remove_job(jid)
            raise _bad("training_file", str(exc), code="invalid_file_format") from None
        except ConfigError as exc:
            store.remove_job(jid)
            raise APIError(400, str(exc), param=_engine_param(str(exc)), code="invalid_value") from None
        except BaseException:
            store.remove_job(jid)
            raise
        self._event(jid, f"Created fine-tuning job {jid} ({len(examples)} examples).")
        return self.refresh(jid) or job

    def _examples(self, fid: Any, field: str, required: bool) -> list[dict[str, Any]] | None:
        assert self.store is not None
        if fid is None and not required:
            return None
        if not isinstance(fid, str):
            raise _bad(field, f"must be the id of an uploaded file (POST /v1/files), got {fid!r}")
        data = self.store.file_content(fid)
        if data is None:
            names = [f["id"] for f in self.store.list_files()]
            raise _bad(field, f"no uploaded file has the id {fid!r}." + did_you_mean(fid, names),
                       code="file_not_found")
        try:
            return validate_jsonl(data)
        except JSONLError as exc:  # validated at upload: only a file from an older version gets here
            raise _bad(field, f"file {fid}: {exc}", code="invalid_file_format") from None

    def cancel(self, jid: str) -> dict[str, Any]:
        """Cancel a job (400 if it already finished)."""
        store = self.require()
        job = self.job(jid)
        if job["status"] in TERMINAL:
            raise APIError(400, f"job {jid} is already {job['status']}: nothing to cancel", param="job_id",
                           code="job_not_cancellable")
        try:
            self.coserve().cancel(jid)
        except Exception as exc:  # noqa: BLE001 - the engine never saw it (e.g. left over): cancel the record
            log.info("cancel %s: the engine does not know the job (%s); cancelling its record", jid, exc)
            store.update_job(jid, status="cancelled", finished_at=int(time.time()))
        else:
            self._event(jid, "Job cancelled by request.")
        return self.refresh(jid) or job

    def jobs(self) -> list[dict[str, Any]]:
        """Every job record, newest first, brought up to date."""
        store = self.require()
        return [self.refresh(j["id"]) or j for j in store.list_jobs()]

    def job(self, jid: str) -> dict[str, Any]:
        """The current job record (404 if none)."""
        store = self.require()
        job = self.refresh(jid) if store.get_job(jid) is not None else None
        if job is None:
            raise APIError(404, f"No fine-tuning job with the id {jid!r}." +
                           did_you_mean(jid, [j["id"] for j in store.list_jobs()]), param="job_id",
                           code="job_not_found")
        return job


# ----------------------------------------------------------------------------- routes
async def _read_upload(request: Request, limit: int) -> tuple[str, str, bytes]:
    """(filename, purpose, bytes) of a ``POST /v1/files`` multipart body."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise APIError(400, "POST /v1/files takes multipart/form-data with the fields 'file' and 'purpose'",
                       param="file", code="invalid_value")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except AssertionError:  # starlette without python-multipart
        raise APIError(400, "this server cannot read uploads: install python-multipart", code="unsupported") from None
    except Exception as exc:  # noqa: BLE001 - malformed multipart (starlette raises its own errors)
        raise APIError(400, f"the multipart body could not be read: {exc}", param="file", code="invalid_value") \
            from None
    try:
        # expires_after arrives as expires_after[anchor] / [seconds] form fields: accepted, not applied
        _no_unknown({k: v for k, v in form.items() if not k.startswith("expires_after")}, ("file", "purpose"), "")
        purpose = form.get("purpose")
        if not isinstance(purpose, str):
            raise _bad("purpose", "missing: upload training data with purpose=\"fine-tune\"")
        if purpose not in PURPOSES:
            raise _bad("purpose", f"{purpose!r} is not supported here; use \"fine-tune\"." +
                       did_you_mean(purpose, PURPOSES))
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise _bad("file", "missing: send the JSONL file as the multipart field 'file'")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, f"file: larger than this server's limit of {limit} bytes (--max-file-bytes)",
                           param="file", code="file_too_large")
        return upload.filename or "upload.jsonl", purpose, data
    finally:
        await form.close()


def make_router(ft: FineTuning) -> APIRouter:
    """The fine-tuning routes, closures over `ft` (mounted by `adapterkit.serve.server.create_app`)."""
    r = APIRouter()

    def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return anyio.to_thread.run_sync(fn, *args)  # file I/O and fsync: off the event loop

    @r.post("/v1/files", responses=_responses(400, 401, 413))
    async def upload_file(request: Request) -> dict[str, Any]:
        store = ft.require()
        name, purpose, data = await _read_upload(request, ft.max_file_bytes)
        try:
            await off_loop(validate_jsonl, data)
        except JSONLError as exc:
            raise APIError(400, f"file {name!r}: {exc}", param="file", code="invalid_file_format") from None
        return await off_loop(store.add_file, name, purpose, data)

    @r.get("/v1/files", responses=_responses(400, 401))
    async def list_files(purpose: str | None = None, after: str | None = None,
                         limit: int = Query(10000, ge=1, le=10000), order: str = "desc") -> dict[str, Any]:
        store = ft.require()
        if order not in ("asc", "desc"):
            raise _bad("order", f"must be \"asc\" or \"desc\", got {order!r}")
        files = [f for f in await off_loop(store.list_files) if purpose is None or f["purpose"] == purpose]
        return _page(files[::-1] if order == "asc" else files, after, limit)

    async def file_obj(file_id: str) -> dict[str, Any]:
        store = ft.require()
        obj = await off_loop(store.get_file, file_id)
        if obj is None:
            raise APIError(404, f"No file with the id {file_id!r}.", param="file_id", code="file_not_found")
        return obj

    @r.get("/v1/files/{file_id}", responses=_responses(400, 401, 404))
    async def get_file(file_id: str) -> dict[str, Any]:
        return await file_obj(file_id)

    @r.get("/v1/files/{file_id}/content", responses=_responses(400, 401, 404),
           response_class=Response)
    async def file_content(file_id: str) -> Response:
        await file_obj(file_id)
        assert ft.store is not None
        data = await off_loop(ft.store.file_content, file_id)
        if data is None:  # deleted meanwhile
            raise APIError(404, f"No file with the id {file_id!r}.", param="file_id", code="file_not_found")
        return Response(data, media_type="application/octet-stream")

    @r.delete("/v1/files/{file_id}", responses=_responses(400, 401, 404))
    async def delete_file(file_id: str) -> dict[str, Any]:
        await file_obj(file_id)
        assert ft.store is not None
        if not await off_loop(ft.store.delete_file, file_id):
            raise APIError(404, f"No file with the id {file_id!r}.", param="file_id", code="file_not_found")
        return {"id": file_id, "object": "file", "deleted": True}

    @r.post("/v1/fine_tuning/jobs", responses=_responses(400, 401, 429))
    async def create_job(request: Request) -> dict[str, Any]:
        ft.require()
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        return _public(await off_loop(ft.create, body))

    @r.get("/v1/fine_tuning/jobs", responses=_responses(400, 401))
    async def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        ft.require()
        return _page(await off_loop(ft.jobs), after, limit)

    @r.get("/v1/fine_tuning/jobs/{job_id}", responses=_responses(400, 401, 404))
    async def get_job(job_id: str) -> dict[str, Any]:
        return _public(await off_loop(ft.job, job_id))

    @r.post("/v1/fine_tuning/jobs/{job_id}/cancel", responses=_responses(400, 401, 404))
    async def cancel_job(job_id: str) -> dict[str, Any]:
        return _public(await off_loop(ft.cancel, job_id))

    @r.get("/v1/fine_tuning/jobs/{job_id}/events", responses=_responses(400, 401, 404))
    async def job_events(job_id: str, after: str | None = None,
                         limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
        await off_loop(ft.job, job_id)
        assert ft.store is not None
        events = (await off_loop(ft.store.events, job_id))[::-1]  # newest first, as OpenAI lists them
        return _page(events, after, limit)

    @r.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", responses=_responses(400, 401, 404))
    async def job_checkpoints(job_id: str, after: str | None = None,
                              limit: int = Query(10, ge=1, le=100)) -> dict[str, Any]:
        await off_loop(ft.job, job_id)
        assert ft.store is not None
        return _page(await off_loop(ft.store.checkpoints, job_id), after, limit)

    return r


__all__ = ["BASE_LEARNING_RATE", "FineTuning", "make_router", "parse_hyperparameters"]
