"""Server defects of issue 9, each held by a test through the REAL server: the engine on a tiny
random Llama, REAL uvicorn on 127.0.0.1, built by the CLI's own `build_app(args)` (so the
flags are exercised), raw sockets where the test is about what the server reads.

The adapter root here also holds a corrupt adapter ("broken") and a directory whose name is
not a valid adapter name ("bad name"): the server must start anyway and report both.
"""
from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server_utils import API_KEY, MAX_LORA_RANK, MAX_MODEL_LEN, Served, ServerThread, build_tree  # noqa: E402

BODY_LIMIT = 64 * 1024


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, list[str]]]:
    from adapterkit.cli import build_parser
    from adapterkit.serve.cli import build_app

    tmp = tmp_path_factory.mktemp("reliab")
    model_dir, root, outside = build_tree(tmp)
    shutil.copytree(root / "bad" / "truncated", root / "broken")  # corrupt, at the top: discovered
    shutil.copytree(root / "extra" / "delta", root / "bad name")  # valid files, invalid name
    args = build_parser().parse_args([
        "serve", "--model", str(model_dir), "--adapter-root", str(root), "--max-loras", "2",
        "--max-lora-rank", str(MAX_LORA_RANK), "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY,
        "--unload-timeout", "20", "--max-body-bytes", str(BODY_LIMIT),
    ])
    records = _Records()
    logging.getLogger("adapterkit.serve").addHandler(records)
    try:
        app = build_app(args)
    finally:
        logging.getLogger("adapterkit.serve").removeHandler(records)
    engine = app.state.server.engine
    try:
        with ServerThread(app) as st:
            yield Served(f"http://127.0.0.1:{st.port}", engine, root, outside, engine.model_name), records.messages
    finally:
        engine.shutdown()


def post_raw(s: Served, path: str, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(s.url + path, content=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": content_type})


def error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ----------------------------------------------------------------------------- lone surrogates
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b'{"model": "alpha", "prompt": "ab\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "alpha", "prompt": ["\\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"model": "alpha", "prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
    ("/v1/chat/completions", b'{"model": "alpha", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages"),
    ("/v1/load_lora_adapter", b'{"lora_name": "s", "lora_path": "extra/\\ud800"}', "lora_path"),
])
def test_lone_surrogate_is_400_naming_the_field(srv: tuple[Served, list[str]], path: str, body: bytes,
                                                param: str) -> None:
    r = post_raw(srv[0], path, body)
    assert r.status_code == 400, r.text
    err = error(r)
    assert err["param"] == param and err["code"] == "invalid_value" and "surrogate" in err["message"], err


def test_engine_refuses_untokenizable_prompt_with_config_error(srv: tuple[Served, list[str]]) -> None:
    """Defence in depth: the engine itself maps a tokenizer failure to a ConfigError on `prompt`."""
    from adapterkit.errors import ConfigError
    from adapterkit.serve.types import GenerationRequest

    with pytest.raises(ConfigError, match="^prompt: "):
        srv[0].engine.submit(GenerationRequest(prompt="\ud800"), lambda c: None)


# ----------------------------------------------------------------------------- corrupt adapter at start
def test_corrupt_adapter_dir_does_not_stop_the_server(srv: tuple[Served, list[str]]) -> None:
    s, warnings = srv
    with s.http() as h:
        ids = [m["id"] for m in h.get("/v1/models").json()["data"]]
        assert {"alpha", "beta"} <= set(ids) and "broken" not in ids and "bad name" not in ids
        status = {a["name"]: a for a in h.get("/v1/adapters").json()["data"]}
        assert status["alpha"]["status"] == "ready" and status["alpha"]["rank"] == 4
        assert status["broken"]["status"] == "failed" and "truncated" in status["broken"]["error"]
        assert status["broken"]["path"].endswith("broken")
        assert status["bad name"]["status"] == "failed" and "allowed" in status["bad name"]["error"]
        # a request for the failed adapter is a 404 that says why
        r = h.post("/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404 and "failed to load at start" in error(r)["message"]
        # ...and the rest is served
        assert h.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}).status_code == 200
    broken = [m for m in warnings if "broken" in m]
    assert broken and "truncated" in broken[0], warnings


# ----------------------------------------------------------------------------- max_tokens
@pytest.mark.parametrize("field,value", [("max_tokens", True), ("max_tokens", "4"), ("max_tokens", 2.5),
                                         ("top_k", True), ("seed", False), ("n", True), ("stream", 1),
                                         ("temperature", True), ("prompt", [True, 3])])
def test_wrong_json_types_are_not_coerced(srv: tuple[Served, list[str]], field: str, value: Any) -> None:
    body = {"model": "alpha", "prompt": "x", "max_tokens": 2, field: value}
    r = post_raw(srv[0], "/v1/completions", json.dumps(body).encode())
    assert r.status_code == 400, r.text
    assert error(r)["param"] == field


def test_max_tokens_beyond_the_context_is_400(srv: tuple[Served, list[str]]) -> None:
    s = srv[0]
    with s.http() as h:
        r = h.post("/v1/completions", json={"model": "alpha", "prompt": "abcd", "max_tokens": MAX_MODEL_LEN})
        assert r.status_code == 400, r.text
        err = error(r)
        assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
        assert f"at most {MAX_MODEL_LEN - 4}" in err["message"]
        msgs = [{"role": "user", "content": "hi"}]
        r = h.post("/v1/chat/completions", json={"model": "alpha", "messages": msgs,
                                                 "max_completion_tokens": MAX_MODEL_LEN})
        assert r.status_code == 400 and error(r)["param"] == "max_completion_tokens", r.text
        # exactly what fits is accepted
        r = h.post("/v1/completions", json={"model": "alpha", "prompt": "abcd", "max_tokens": MAX_MODEL_LEN - 4,
                                            "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - 4
        # the completions default (16) is capped to the room left, and finish_reason says so
        r = h.post("/v1/completions", json={"model": "alpha", "prompt": "y" * (MAX_MODEL_LEN - 3),
                                            "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"


def test_negative_token_id_is_400(srv: tuple[Served, list[str]]) -> None:
    r = post_raw(srv[0], "/v1/completions", b'{"model": "alpha", "prompt": [5, -1], "max_tokens": 2}')
    assert r.status_code == 400 and error(r)["param"] == "prompt", r.text


# ----------------------------------------------------------------------------- error bodies
@pytest.mark.parametrize("body,content_type", [
    (b"{not json", "application/json"),
    (b'{"model": "\xff\xfe", "prompt": "x"}', "application/json"),  # not UTF-8
    (b"[" * 20_000 + b"]" * 20_000, "application/json"),  # nesting too deep for the parser
    (b'{"model": "alpha", "prompt": "x"}', "text/plain"),
])
def test_unparseable_bodies_are_invalid_json(srv: tuple[Served, list[str]], body: bytes, content_type: str) -> None:
    r = post_raw(srv[0], "/v1/completions", body, content_type)
    assert r.status_code == 400, r.text
    assert error(r)["code"] == "invalid_json", r.text


@pytest.mark.parametrize("field,literal", [("temperature", "NaN"), ("temperature", "Infinity"),
                                           ("top_p", "NaN"), ("presence_penalty", "-Infinity")])
def test_non_finite_numbers_say_finite(srv: tuple[Served, list[str]], field: str, literal: str) -> None:
    r = post_raw(srv[0], "/v1/completions", f'{{"model": "alpha", "prompt": "x", "{field}": {literal}}}'.encode())
    assert r.status_code == 400
    err = error(r)
    assert err["param"] == field and "finite" in err["message"] and "less than" not in err["message"], err


# ----------------------------------------------------------------------------- body size limit
def raw_exchange(s: Served, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request head and some body bytes WITHOUT finishing the body; return the reply."""
    host, port = s.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def test_content_length_over_the_limit_is_413_before_reading(srv: tuple[Served, list[str]]) -> None:
    s = srv[0]
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10 * 2**20}\r\n\r\n").encode()
    reply = raw_exchange(s, head, [b'{"model": "alpha", "prompt": "'])  # 10 MB announced, 30 B sent
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "request_too_large" and str(BODY_LIMIT) in err["message"]


def test_chunked_body_over_the_limit_is_413_while_streaming(srv: tuple[Served, list[str]]) -> None:
    s = srv[0]
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    part = b"y" * 16384
    chunk = f"{len(part):x}\r\n".encode() + part + b"\r\n"
    # 5 x 16 KiB > 64 KiB, and the terminating 0-chunk is never sent: the server must answer anyway
    reply = raw_exchange(s, head, [b'1e\r\n{"model": "alpha", "prompt": "\r\n'] + [chunk] * 5)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_bodies_under_the_limit_still_work(srv: tuple[Served, list[str]]) -> None:
    s = srv[0]
    r = post_raw(s, "/v1/completions", json.dumps({"model": "alpha", "prompt": "x" * 40_000, "max_tokens": 2,
                                                   "pad": "p" * 20_000}).encode())
    assert r.status_code == 400 and error(r)["param"] == "prompt"  # too long for the context, not for the body
    ok = httpx.post(s.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}",
                                                        "Content-Type": "application/json"},
                    content=iter([b'{"model": "alpha", ', b'"prompt": "x", "max_tokens": 2}']))  # chunked
    assert ok.status_code == 200, ok.text


# ----------------------------------------------------------------------------- lora_name
@pytest.mark.parametrize("name", ["a/b", "a b", ".hidden", "-x", "x\ty", "é"])
def test_lora_name_outside_the_allowed_set_is_400(srv: tuple[Served, list[str]], name: str) -> None:
    with srv[0].http() as h:
        r = h.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "extra/delta"})
        assert r.status_code == 400, r.text
        err = error(r)
        assert err["param"] == "lora_name" and err["code"] == "invalid_value"
        assert "A-Z a-z 0-9" in err["message"], err


def test_lora_name_in_the_allowed_set_loads(srv: tuple[Served, list[str]]) -> None:
    with srv[0].http() as h:
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "v1.2_math-x:q", "lora_path": "extra/delta"})
        assert r.status_code == 200, r.text
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "v1.2_math-x:q"}).status_code == 200


# ----------------------------------------------------------------------------- unload race
def test_request_racing_an_unload_is_404_and_the_unload_does_not_wait_for_it(
        srv: tuple[Served, list[str]]) -> None:
    """The race: a request passes the engine's unlocked adapter check, then an unload marks the
    adapter closing, then the request takes the engine lock. It used to be admitted (200 while
    the unload was pending) and the unload then waited for it too (503 after the timeout while
    the stream it was waiting for had finished). Driven by events, not timing."""
    s = srv[0]
    engine = s.engine
    made, go, closing = threading.Event(), threading.Event(), threading.Event()
    real_make_seq = engine._make_seq

    def make_seq(req: Any, sink: Any) -> Any:
        seq = real_make_seq(req, sink)  # checks passed here, outside the engine lock
        if req.adapter == "racy" and req.prompt == "sneak":
            made.set()
            assert go.wait(20)
        return seq

    class ClosingSet(set):  # tells the test when the unload has marked the adapter closing
        def add(self, name: Any) -> None:
            super().add(name)
            closing.set()

    with s.http() as h:
        assert h.post("/v1/load_lora_adapter", json={"lora_name": "racy", "lora_path": "extra/delta"}
                      ).status_code == 200
        for j in range(5):  # the burst of failed loads seen before the race
            assert h.post("/v1/load_lora_adapter", json={"lora_name": f"f{j}", "lora_path": "bad/truncated"}
                          ).status_code == 400
        engine._make_seq, engine._closing = make_seq, ClosingSet(engine._closing)
        results: dict[str, Any] = {}
        try:
            with httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as h2, \
                    h2.stream("POST", "/v1/completions", json={"model": "racy", "prompt": "long", "max_tokens": 60,
                                                               "ignore_eos": True, "stream": True}) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data: "))  # the stream is running
                sneak = threading.Thread(target=lambda: results.update(new=httpx.post(
                    s.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                    json={"model": "racy", "prompt": "sneak", "max_tokens": 200, "ignore_eos": True})))
                sneak.start()
                assert made.wait(20)
                unloader = threading.Thread(target=lambda: results.update(unload=httpx.post(
                    s.url + "/v1/unload_lora_adapter", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                    json={"lora_name": "racy"})))
                unloader.start()
                assert closing.wait(20)
                go.set()
                sneak.join(30)
                assert not sneak.is_alive()
                assert results["new"].status_code == 404, results["new"].text  # docs: 404 while unloading
                rest = [line for line in lines if line.startswith("data: ")]
                assert rest[-1] == "data: [DONE]"  # the running stream was not cut short
            unloader.join(30)
        finally:
            go.set()
            engine.__dict__.pop("_make_seq", None)
            engine._closing = set(engine._closing)
    assert results["unload"].status_code == 200, results["unload"].text
    with s.http() as h:
        assert "racy" not in [m["id"] for m in h.get("/v1/models").json()["data"]]


# ----------------------------------------------------------------------------- found by schema fuzzing
def test_top_k_beyond_int64_is_served_not_500(srv: tuple[Served, list[str]]) -> None:
    """test_fuzz_schema found it: top_k >= 2**63 overflowed building the sampler's int64 tensor
    inside the engine step, failing the request with 500 -- and every other request in that step."""
    s = srv[0]
    with s.http() as h:
        for top_k in (2**63, 10**30):
            r = h.post("/v1/completions", json={"model": "alpha", "prompt": "k", "max_tokens": 3, "top_k": top_k,
                                                "seed": 1, "ignore_eos": True})
            assert r.status_code == 200, r.text
            # larger than the vocabulary means "off": the same sample as top_k=-1 with the same seed
            off = h.post("/v1/completions", json={"model": "alpha", "prompt": "k", "max_tokens": 3, "top_k": -1,
                                                  "seed": 1, "ignore_eos": True})
            assert r.json()["choices"][0]["text"] == off.json()["choices"][0]["text"]
