"""`adapterkit files ...` and `adapterkit jobs ...`: the fine-tuning API of a running
``adapterkit serve --enable-fine-tuning`` from the command line (plain HTTP, standard library only).

    adapterkit files upload train.jsonl                  # -> file-...
    adapterkit jobs create --training-file file-... --n-epochs 2 --adapter '{"r": 8}'
    adapterkit jobs events ftjob-... --follow            # until the job finishes
    adapterkit jobs get ftjob-...                        # fine_tuned_model, once succeeded
    adapterkit jobs list | cancel ftjob-...
    adapterkit files list | delete file-...

Every verb takes ``--url`` (default $ADAPTERKIT_URL or http://127.0.0.1:8000), ``--api-key``
(default $ADAPTERKIT_API_KEY) and ``--json`` (print the server's JSON objects).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from adapterkit.errors import AdapterError, DataError

TERMINAL = ("succeeded", "failed", "cancelled")


class ServerError(AdapterError):
    """The server answered with an error, or could not be reached (the message says which)."""


class Client:
    """A minimal HTTP client of the fine-tuning API.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer``; None: no header.
        timeout: seconds per request.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> Any:
        """Send one request; returns the decoded JSON answer.

        Raises:
            ServerError: an error status (its OpenAI error message, status and param) or no connection.
        """
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if ctype:
            req.add_header("Content-Type", ctype)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)["error"]
                where = f", param {err['param']}" if err.get("param") else ""
                msg = f"{err['message']} (HTTP {e.code}{where})"
            except (ValueError, KeyError, TypeError):
                msg = f"HTTP {e.code}: {raw[:500]!r}"
            raise ServerError(msg) from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"cannot reach {self.url}: {getattr(e, 'reason', e)} (is `adapterkit serve "
                              "--enable-fine-tuning` running there? --url sets the address)") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, obj: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json.dumps(obj or {}).encode(), "application/json")

    def upload(self, path: Path, purpose: str = "fine-tune") -> Any:
        """``POST /v1/files`` as multipart/form-data."""
        boundary = uuid.uuid4().hex
        name = path.name.replace('"', "%22").replace("\r", "").replace("\n", "")  # a header value
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                "Content-Type: application/jsonl\r\n\r\n").encode()
        body = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        return self.request("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Every event of a job, oldest first."""
        out: list[dict[str, Any]] = []
        after = ""
        while True:
            page = self.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000{after}")
            out += page["data"]
            if not page.get("has_more") or not page["data"]:
                return out[::-1]
            after = f"&after={page['data'][-1]['id']}"


# ----------------------------------------------------------------------------- verbs
def _print(a: argparse.Namespace, obj: Any, line: str) -> None:
    print(json.dumps(obj, indent=2) if a.json else line)


def _job_line(j: dict[str, Any]) -> str:
    extra = f" -> {j['fine_tuned_model']}" if j.get("fine_tuned_model") else ""
    err = f" ({j['error']['message']})" if j.get("error") else ""
    return f"{j['id']}  {j['status']:<9}  {j['model']}  {j['training_file']}{extra}{err}"


def _event_line(e: dict[str, Any]) -> str:
    return f"{time.strftime('%H:%M:%S', time.localtime(e['created_at']))}  {e['level']:<5}  {e['message']}"


def cmd_files(a: argparse.Namespace) -> int:
    c = _client(a)
    if a.verb == "upload":
        if not Path(a.path).is_file():
            raise DataError(f"{a.path}: no such file")
        f = c.upload(Path(a.path))
        _print(a, f, f["id"])
    elif a.verb == "list":
        files = c.get("/v1/files")["data"]
        _print(a, files, "\n".join(f"{f['id']}  {f['bytes']:>9}  {f['filename']}" for f in files))
    else:
        _print(a, c.request("DELETE", f"/v1/files/{a.file_id}"), f"deleted {a.file_id}")
    return 0


def cmd_jobs(a: argparse.Namespace) -> int:
    c = _client(a)
    if a.verb == "create":
        j = c.post("/v1/fine_tuning/jobs", _create_body(a, c))
        _print(a, j, j["id"])
    elif a.verb == "list":
        jobs = c.get(f"/v1/fine_tuning/jobs?limit={a.limit}")["data"]
        _print(a, jobs, "\n".join(_job_line(j) for j in jobs))
    elif a.verb == "get":
        j = c.get(f"/v1/fine_tuning/jobs/{a.job_id}")
        _print(a, j, _job_line(j))
    elif a.verb == "cancel":
        j = c.post(f"/v1/fine_tuning/jobs/{a.job_id}/cancel")
        _print(a, j, _job_line(j))
    else:
        return _events(a, c)
    return 0


def _events(a: argparse.Namespace, c: Client) -> int:
    """Print the job's events; with --follow keep printing new ones until the job finishes.
    Exit status 1 when a followed job did not succeed."""
    seen: set[str] = set()
    while True:
        status = c.get(f"/v1/fine_tuning/jobs/{a.job_id}")["status"] if a.follow else None
        for e in c.events(a.job_id):
            if e["id"] not in seen:
                seen.add(e["id"])
                print(json.dumps(e) if a.json else _event_line(e), flush=True)
        if not a.follow:
            return 0
        if status in TERMINAL:
            return 0 if status == "succeeded" else 1
        time.sleep(a.interval)


def _create_body(a: argparse.Namespace, c: Client) -> dict[str, Any]:
    model = a.model or c.get("/v1/models")["data"][0]["id"]  # the server lists its base model first
    hp: dict[str, Any] = {k: v for k, v in (("n_epochs", a.n_epochs), ("batch_size", a.batch_size),
                                            ("learning_rate_multiplier", a.learning_rate_multiplier),
                                            ("warmup_steps", a.warmup_steps), ("max_steps", a.max_steps),
                                            ("checkpoint_every", a.checkpoint_every)) if v is not None}
    body: dict[str, Any] = {"model": model, "training_file": a.training_file,
                            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
    for k in ("validation_file", "suffix", "seed"):
        if getattr(a, k) is not None:
            body[k] = getattr(a, k)
    if a.adapter:
        try:
            body["adapter"] = json.loads(a.adapter)
        except ValueError as e:
            raise ServerError(f"--adapter: not JSON ({e}); e.g. --adapter '{{\"r\": 8, \"alpha\": 16}}'") from None
    return body


def _client(a: argparse.Namespace) -> Client:
    return Client(a.url, a.api_key)


def add_ft_parsers(subparsers: Any) -> None:
    """Add the ``files`` and ``jobs`` sub-commands to an argparse ``subparsers`` object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("ADAPTERKIT_URL", "http://127.0.0.1:8000"),
                        help="the server (default $ADAPTERKIT_URL or %(default)s)")
    common.add_argument("--api-key", default=os.environ.get("ADAPTERKIT_API_KEY"),
                        help="its API key (default $ADAPTERKIT_API_KEY)")
    common.add_argument("--json", action="store_true", help="print the server's JSON objects")

    f = subparsers.add_parser("files", help="upload / list / delete training files on a fine-tuning server")
    fs = f.add_subparsers(dest="verb", required=True)
    fs.add_parser("upload", parents=[common], help="upload a JSONL training file").add_argument("path")
    fs.add_parser("list", parents=[common], help="list uploaded files")
    fs.add_parser("delete", parents=[common], help="delete an uploaded file").add_argument("file_id")
    f.set_defaults(fn=cmd_files)

    j = subparsers.add_parser("jobs", help="create / watch / cancel fine-tuning jobs on a running server")
    js = j.add_subparsers(dest="verb", required=True)
    cr = js.add_parser("create", parents=[common], help="start a fine-tuning job; prints its id")
    cr.add_argument("--training-file", required=True, help="a file id from `adapterkit files upload`")
    cr.add_argument("--validation-file")
    cr.add_argument("--model", help="the base model (default: the server's)")
    cr.add_argument("--n-epochs", type=int)
    cr.add_argument("--batch-size", type=int)
    cr.add_argument("--learning-rate-multiplier", type=float, help="x the base learning rate 2e-4")
    cr.add_argument("--warmup-steps", type=int)
    cr.add_argument("--max-steps", type=int)
    cr.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints (default: per epoch)")
    cr.add_argument("--suffix")
    cr.add_argument("--seed", type=int)
    cr.add_argument("--adapter", help='the adapter config as JSON, e.g. \'{"method": "lora", "r": 8, "alpha": 16}\'')
    ls = js.add_parser("list", parents=[common], help="list jobs, newest first")
    ls.add_argument("--limit", type=int, default=20)
    js.add_parser("get", parents=[common], help="one job's state").add_argument("job_id")
    js.add_parser("cancel", parents=[common], help="cancel a queued or running job").add_argument("job_id")
    ev = js.add_parser("events", parents=[common], help="a job's events (loss, learning rate, tokens/s)")
    ev.add_argument("job_id")
    ev.add_argument("--follow", action="store_true", help="keep printing until the job finishes")
    ev.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow")
    j.set_defaults(fn=cmd_jobs)


__all__ = ["Client", "ServerError", "add_ft_parsers"]
