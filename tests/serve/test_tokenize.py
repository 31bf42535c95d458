"""vLLM's ``/tokenize``, ``/detokenize`` and ``/version`` through the REAL server (uvicorn on
127.0.0.1, httpx: the `openai` client has no API for them)."""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server_utils import API_KEY, Served, ServerThread, build_tree  # noqa: E402

MAX_MODEL_LEN = 96


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from adapterkit.cli import build_parser
    from adapterkit.serve.cli import build_app

    tmp = tmp_path_factory.mktemp("tokenize")
    model_dir, root, outside = build_tree(tmp)
    args = build_parser().parse_args([
        "serve", "--model", str(model_dir), "--adapter-root", str(root), "--max-lora-rank", "8",
        "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY,
    ])
    app = build_app(args)
    engine = app.state.server.engine
    try:
        with ServerThread(app) as st:
            yield Served(f"http://127.0.0.1:{st.port}", engine, root, outside, engine.model_name)
    finally:
        engine.shutdown()


def test_tokenize_prompt_matches_the_tokenizer(srv: Served) -> None:
    tok = srv.engine.tokenizer
    with srv.http() as h:
        for model in (None, srv.base, "alpha"):
            body = {"prompt": "Hello, world!"} | ({} if model is None else {"model": model})
            r = h.post("/tokenize", json=body)
            assert r.status_code == 200, r.text
            ids = tok.encode("Hello, world!")
            assert r.json() == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids, "token_strs": None}
        r = h.post("/tokenize", json={"prompt": "ab", "return_token_strs": True})
        assert r.json()["token_strs"] == ["a", "b"]


def test_tokenize_counts_what_completions_use(srv: Served) -> None:
    """The count equals the prompt_tokens a completion reports, for text and chat."""
    c = srv.client()
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    with srv.http() as h:
        n_text = h.post("/tokenize", json={"prompt": "count me"}).json()["count"]
        chat = h.post("/tokenize", json={"messages": msgs}).json()
    assert n_text == c.completions.create(model=srv.base, prompt="count me", max_tokens=1).usage.prompt_tokens
    r = c.chat.completions.create(model=srv.base, messages=msgs, max_tokens=1)  # type: ignore[arg-type]
    assert chat["count"] == r.usage.prompt_tokens == len(chat["tokens"])
    assert srv.engine.tokenizer.decode(chat["tokens"]).endswith("<assistant>")  # generation prompt appended


def test_detokenize_round_trips(srv: Served) -> None:
    with srv.http() as h:
        ids = h.post("/tokenize", json={"prompt": "round trip!"}).json()["tokens"]
        r = h.post("/detokenize", json={"model": "alpha", "tokens": ids})
        assert r.status_code == 200 and r.json() == {"prompt": "round trip!"}
        assert h.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "x", "model": "alpah"}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
    ("/detokenize", {"tokens": [1, 128]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "model"),
])
def test_bad_requests_name_the_field(srv: Served, path: str, body: dict, status: int, param: str) -> None:
    with srv.http() as h:  # json.dumps escapes the lone surrogate as "\ud800" (httpx would not encode it)
        r = h.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_api_key_guards_tokenize_not_version(srv: Served) -> None:
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [5]})):
            r = h.post(path, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = h.get("/version")
    from adapterkit import __version__

    assert r.status_code == 200 and r.json() == {"version": __version__}
