"""OpenAI's fine-tuning API on the REAL server (uvicorn on 127.0.0.1, the engine on a tiny random
Llama with the char tokenizer), driven by the official `openai` client: files (upload, list,
retrieve, content, delete, bad JSONL), jobs (lifecycle to ``succeeded`` and a request to the
fine-tuned model, events, checkpoints, cancel, 429, bad fields), fine-tuning not enabled, and a
server process killed mid-job and restarted on the same state directory.
"""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("fastapi")
import python_multipart  # noqa: E402,F401  python-multipart (the serve extra): starlette's form parser; never skip

from test_server_utils import API_KEY, MAX_LORA_RANK, Served, serve_cli, serve_tree  # noqa: E402

CHAT = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ("abc", "hello", "xyz", "ok")]
PROMPTS = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("ft")
    with serve_tree(tmp, "--max-lora-rank", str(MAX_LORA_RANK), "--max-model-len", "128", "--enable-fine-tuning",
                    "--state-dir", str(tmp / "state"), "--max-file-bytes", "4096") as served:
        yield served


def upload(c: openai.OpenAI, data: bytes, name: str = "train.jsonl") -> Any:
    return c.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")


# ----------------------------------------------------------------------------- files
def test_files_upload_list_retrieve_content_delete(srv: Served) -> None:
    c = srv.client()
    data = jsonl(CHAT)
    f = upload(c, data, "chat.jsonl")
    assert f.object == "file" and f.id.startswith("file-") and f.bytes == len(data)
    assert f.filename == "chat.jsonl" and f.purpose == "fine-tune" and f.status == "processed"
    g = upload(c, jsonl(PROMPTS), "pc.jsonl")
    ids = [x.id for x in c.files.list()]
    assert f.id in ids and g.id in ids
    assert [x.id for x in c.files.list(limit=1)][0] in ids  # pagination walks every page
    assert c.files.retrieve(f.id).filename == "chat.jsonl"
    assert c.files.content(f.id).read() == data
    d = c.files.delete(g.id)
    assert d.deleted and d.id == g.id
    assert g.id not in [x.id for x in c.files.list()]
    with pytest.raises(openai.NotFoundError) as ei:
        c.files.retrieve(g.id)
    assert ei.value.body["code"] == "file_not_found"
    with pytest.raises(openai.NotFoundError):
        c.files.delete(g.id)


@pytest.mark.parametrize("data,line,words", [
    (b"", None, "no examples"),
    (b"\n  \n", None, "no examples"),
    (jsonl(CHAT[:2]) + b"{not json\n", 3, "invalid JSON"),
    (b'[1, 2]\n', 1, "expected a JSON object"),
    (jsonl([CHAT[0], {"mesages": CHAT[0]["messages"]}]), 2, "'messages'"),
    (jsonl([{"messages": [{"role": "user", "content": "hi"}]}]), 1, "no assistant message"),
    (jsonl([{"messages": [{"role": "robot", "content": "hi"}]}]), 1, "'assistant'"),
    (jsonl([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}]), 1,
     "messages[0].content must be a string"),
    (jsonl([{"messages": []}]), 1, "non-empty list"),
    (jsonl([PROMPTS[0], {"prompt": "x"}]), 2, "missing key 'completion'"),
    (jsonl([{"prompt": "x", "completion": ""}]), 1, "'completion' is empty"),
    (b'{"prompt": "a", "completion": "\xff"}\n', 1, "not UTF-8"),
])
def test_bad_jsonl_is_400_naming_the_line(srv: Served, data: bytes, line: int | None, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        upload(srv.client(), data)
    err = ei.value.body
    assert err["code"] == "invalid_file_format" and err["param"] == "file", err
    assert words in err["message"], err["message"]
    if line is not None:
        assert f"line {line}:" in err["message"], err["message"]


def test_file_too_large_is_413_and_bad_purpose_400(srv: Served) -> None:
    c = srv.client()
    big = jsonl([{"prompt": "p" * 100, "completion": "c"}] * 50)  # > --max-file-bytes 4096
    with pytest.raises(openai.APIStatusError) as ei:
        upload(c, big)
    assert ei.value.status_code == 413 and "--max-file-bytes" in ei.value.body["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        c.files.create(file=("x.jsonl", io.BytesIO(jsonl(PROMPTS))), purpose="fine-tuned")  # type: ignore[arg-type]
    assert ei.value.body["param"] == "purpose" and "'fine-tune'" in ei.value.body["message"]
    with srv.http() as h:
        r = h.post("/v1/files", json={"purpose": "fine-tune"})
        assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
        r = h.post("/v1/files", data={"purpose": "fine-tune"}, files={"nofile": ("a", b"x")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "nofile"


# ----------------------------------------------------------------------------- jobs
def wait_job(c: openai.OpenAI, jid: str, until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = c.fine_tuning.jobs.retrieve(jid)
        if job.status in until:
            return job
        assert time.monotonic() < deadline, f"job {jid} still {job.status} after {timeout} s"
        time.sleep(0.1)


def test_job_lifecycle_events_checkpoints_and_the_model_answers(srv: Served) -> None:
    c = srv.client()
    f = upload(c, jsonl(CHAT))
    v = upload(c, jsonl(PROMPTS), "valid.jsonl")
    job = c.fine_tuning.jobs.create(
        model=srv.base, training_file=f.id, validation_file=v.id, suffix="demo", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 0.5}}},
        extra_body={"adapter": {"method": "lora", "r": 4, "alpha": 8}})
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-") and job.status in ("queued", "running")
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 2
    assert job.model == srv.base and job.training_file == f.id and job.seed == 3
    done = wait_job(c, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{srv.base}:demo:{job.id}"
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at is not None
    r = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "say abc"}],
                                  max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None and r.model == done.fine_tuned_model

    events = list(c.fine_tuning.jobs.list_events(job.id, limit=2))  # pagination walks every page
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [4, 3, 2, 1]  # newest first; 4 examples / 2 x 2 epochs
    for e in metrics:
        assert e.object == "fine_tuning.job.event" and e.data["total_steps"] == 4
        assert isinstance(e.data["train_loss"], float) and e.data["tokens"] > 0 and e.data["tokens_per_s"] > 0
    # the job's learning rate is the documented base (2e-4) x learning_rate_multiplier, peak at step 1
    assert metrics[-1].data["learning_rate"] == pytest.approx(2e-4 * 0.5)
    assert any("succeeded" in e.message for e in events)

    ckpts = list(c.fine_tuning.jobs.checkpoints.list(job.id))
    assert [k.step_number for k in ckpts] == [4, 2]  # once per epoch, newest first
    for k in ckpts:
        assert k.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-{k.step_number}"
        assert k.fine_tuning_job_id == job.id and k.metrics.train_loss is not None
        assert k.metrics.valid_loss is not None and k.metrics.valid_loss > 0  # on the validation file
        out = c.completions.create(model=k.fine_tuned_model_checkpoint, prompt="x", max_tokens=2, temperature=0)
        assert out.model == k.fine_tuned_model_checkpoint
    listed = [j.id for j in c.fine_tuning.jobs.list(limit=1)]
    assert job.id in listed


def test_cancel_and_429_when_max_jobs_are_busy(srv: Served) -> None:
    c = srv.client()
    f = upload(c, jsonl(CHAT * 10))
    long = {"model": srv.base, "training_file": f.id, "hyperparameters": {"n_epochs": 50, "batch_size": 1}}
    a = c.fine_tuning.jobs.create(**long)
    with pytest.raises(openai.RateLimitError) as ei:  # --max-fine-tuning-jobs 1
        c.fine_tuning.jobs.create(**long)
    assert ei.value.status_code == 429 and ei.value.body["code"] == "too_many_fine_tuning_jobs"
    assert "--max-fine-tuning-jobs" in ei.value.body["message"]
    assert len([j for j in c.fine_tuning.jobs.list() if j.status in ("queued", "running")]) == 1  # no record left
    wait_job(c, a.id, until=("running",))
    out = c.fine_tuning.jobs.cancel(a.id)
    assert out.status == "cancelled" and out.fine_tuned_model is None
    assert c.fine_tuning.jobs.retrieve(a.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as ei:
        c.fine_tuning.jobs.cancel(a.id)
    assert ei.value.body["code"] == "job_not_cancellable"
    b = c.fine_tuning.jobs.create(**{**long, "hyperparameters": {"n_epochs": 1, "batch_size": 4}})  # slot free again
    assert wait_job(c, b.id).status == "succeeded"
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.retrieve("ftjob-nosuchjob")


@pytest.mark.parametrize("change,param,words", [
    ({"model": "gpt-4o-mini"}, "model", "served base model"),
    ({"training_file": "file-nosuch"}, "training_file", "no uploaded file"),
    ({"hyperparameters": {"n_epoch": 2}}, "hyperparameters.n_epoch", "'n_epochs'"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size", "int in [1"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier", "(0, 1000]"),
    ({"method": {"type": "dpo"}}, "method.type", "supervised"),
    ({"hyperparameter": {}}, "hyperparameter", "'hyperparameters'"),
    ({"adapter": {"r": 16}}, "adapter.r", "--max-lora-rank"),
    ({"adapter": {"rank": 4}}, "adapter.rank", "not a LoRA field"),
    ({"adapter": {"method": "dora"}}, "adapter.method", "serves only"),
    ({"adapter": {"method": "lroa"}}, "adapter.method", "'lora'"),
    ({"suffix": "has space"}, "suffix", "1-64"),
])
def test_bad_job_fields_are_400_naming_the_field(srv: Served, change: dict[str, Any], param: str,
                                                 words: str) -> None:
    c = srv.client()
    f = upload(c, jsonl(PROMPTS))
    body = {"model": srv.base, "training_file": f.id, **change}
    with srv.http() as h:
        r = h.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert not [j for j in c.fine_tuning.jobs.list() if j.training_file == f.id]  # nothing recorded


def test_not_enabled_is_400_saying_how(srv: Served) -> None:
    assert srv.model_dir is not None
    with serve_cli("--model", str(srv.model_dir), "--api-key", API_KEY) as (_, st):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{st.port}/v1", api_key=API_KEY, max_retries=0)
        for call in (lambda: upload(c, jsonl(PROMPTS)), lambda: c.files.list(),
                     lambda: c.fine_tuning.jobs.create(model=srv.base, training_file="file-x"),
                     lambda: c.fine_tuning.jobs.list()):
            with pytest.raises(openai.BadRequestError) as ei:
                call()
            assert ei.value.body["code"] == "fine_tuning_not_enabled"
            assert "--enable-fine-tuning" in ei.value.body["message"]


# ----------------------------------------------------------------------------- restart
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """`adapterkit serve` as a real process; returns once /health answers."""
    p = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        assert p.poll() is None, f"the server exited with {p.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


@pytest.mark.slow
def test_server_killed_mid_job_resumes_with_the_uninterrupted_loss_curve(srv: Served, tmp_path: Path) -> None:
    """A job on a server process that is SIGKILLed after the job's first checkpoint and started
    again on the same state dir resumes there and logs the loss curve of an uninterrupted run."""
    assert srv.model_dir is not None
    base = str(srv.model_dir)  # the model's name on both servers: --model as given
    body: dict[str, Any] = {"model": base, "seed": 5,
                            "hyperparameters": {"n_epochs": 3, "batch_size": 1, "checkpoint_every": 4}}
    total = 3 * len(CHAT) * 4
    ref_c = srv.client()
    ref = ref_c.fine_tuning.jobs.create(training_file=upload(ref_c, jsonl(CHAT * 4)).id, **body)
    assert wait_job(ref_c, ref.id).status == "succeeded"
    want = {e.data["step"]: e.data["train_loss"] for e in ref_c.fine_tuning.jobs.list_events(ref.id, limit=1000)
            if e.type == "metrics"}
    assert sorted(want) == list(range(1, total + 1))

    port, state, log = _free_port(), tmp_path / "state", tmp_path / "server.log"
    cmd = [sys.executable, "-m", "adapterkit.cli", "serve", "--model", base, "--port", str(port),
           "--api-key", API_KEY, "--enable-fine-tuning", "--state-dir", str(state), "--max-model-len", "128",
           "--log-level", "warning"]
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    p = _start(cmd, port, log)
    try:
        job = c.fine_tuning.jobs.create(training_file=upload(c, jsonl(CHAT * 4)).id, **body)
        deadline = time.monotonic() + 60
        while not list(c.fine_tuning.jobs.checkpoints.list(job.id)):
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        p.kill()  # SIGKILL: no shutdown code runs
        p.wait(30)
        record = json.loads((state / "jobs" / job.id / "job.json").read_text())
        assert record["status"] == "running"  # killed mid-job

        p = _start(cmd, port, log)  # same state dir: the job is re-submitted with resume=True
        done = wait_job(c, job.id, timeout=120)
        assert done.status == "succeeded", done.error
        events = list(c.fine_tuning.jobs.list_events(job.id, limit=1000))[::-1]  # oldest first
        resumed = next(i for i, e in enumerate(events) if "resumed" in e.message)
        after = [e.data for e in events[resumed:] if e.type == "metrics"]
        assert after[0]["step"] % 4 == 1 and after[0]["step"] < total  # from a checkpoint, not from step 1
        assert [d["step"] for d in after] == list(range(after[0]["step"], total + 1))
        for e in events:  # before and after the kill, every logged step has the uninterrupted loss
            if e.type == "metrics":
                assert e.data["train_loss"] == pytest.approx(want[e.data["step"]], abs=1e-4), e.data["step"]
        r = c.completions.create(model=done.fine_tuned_model, prompt="say ok", max_tokens=3, temperature=0)
        assert r.model == done.fine_tuned_model

        p.kill()  # once more, after success: a new server serves what the job produced
        p.wait(30)
        p = _start(cmd, port, log)
        assert c.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
        ckpt = next(iter(c.fine_tuning.jobs.checkpoints.list(job.id))).fine_tuned_model_checkpoint
        for model in (done.fine_tuned_model, ckpt):
            again = c.completions.create(model=model, prompt="say ok", max_tokens=3, temperature=0)
            assert again.model == model
        assert again.choices[0].text == r.choices[0].text  # the newest checkpoint is the final adapter
    finally:
        p.kill()
        p.wait(30)


# ----------------------------------------------------------------------------- CLI
def cli(srv: Served, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from adapterkit.cli import main

    capsys.readouterr()
    rc = main([*argv, "--url", srv.url, "--api-key", API_KEY])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_upload_create_follow_get_list_cancel(srv: Served, capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(CHAT))
    rc, fid, _ = cli(srv, capsys, "files", "upload", str(data))
    fid = fid.strip()
    assert rc == 0 and fid.startswith("file-") and srv.client().files.content(fid).read() == data.read_bytes()
    rc, jid, _ = cli(srv, capsys, "jobs", "create", "--training-file", fid, "--n-epochs", "1", "--batch-size", "2",
                     "--suffix", "cli", "--adapter", '{"r": 2}')
    jid = jid.strip()
    assert rc == 0 and jid.startswith("ftjob-")
    rc, out, _ = cli(srv, capsys, "jobs", "events", jid, "--follow", "--interval", "0.1")
    assert rc == 0 and "step 2/2" in out and "succeeded" in out.splitlines()[-1], out
    rc, out, _ = cli(srv, capsys, "jobs", "get", jid, "--json")
    assert rc == 0 and json.loads(out)["fine_tuned_model"] == f"ft:{srv.base}:cli:{jid}"
    rc, out, _ = cli(srv, capsys, "jobs", "list")
    assert rc == 0 and any(line.startswith(jid) and "succeeded" in line for line in out.splitlines())
    rc, _, err = cli(srv, capsys, "jobs", "cancel", jid)  # finished: the server's 400, named
    assert rc == 2 and "already succeeded" in err and "HTTP 400" in err
    data.write_bytes(jsonl(CHAT) + b"{oops\n")
    rc, _, err = cli(srv, capsys, "files", "upload", str(data))
    assert rc == 2 and "line 5: invalid JSON" in err
    rc, out, _ = cli(srv, capsys, "files", "delete", fid)
    assert rc == 0 and fid not in cli(srv, capsys, "files", "list")[1]


def test_cli_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from adapterkit.cli import main

    rc = main(["jobs", "list", "--url", f"http://127.0.0.1:{_free_port()}"])
    assert rc == 2 and "cannot reach" in capsys.readouterr().err
