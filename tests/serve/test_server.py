"""End-to-end tests of the OpenAI-compatible server: the REAL engine on a tiny random Llama
saved as a HF model dir, real LoRA adapters on disk, a REAL uvicorn server on 127.0.0.1
(random free port), and the official `openai` client (httpx where the client has no API).

One server per module (fixture `srv`), built through the CLI's own `build_app(args)`, so
adapter-root discovery and the argument handling are exercised too.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server_utils import (  # noqa: E402
    API_KEY,
    MAX_LORA_RANK,
    MAX_MODEL_LEN,
    Served,
    greedy,
    serve_tree,
    sse_stream,
    wait_idle,
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    with serve_tree(tmp, "--max-loras", "2", "--max-lora-rank", str(MAX_LORA_RANK), "--max-model-len",
                    str(MAX_MODEL_LEN), "--max-num-seqs", "32", "--adapter",
                    f"zeta={tmp / 'adapters' / 'extra' / 'epsilon'}", "--unload-timeout", "30") as served:
        yield served


# ----------------------------------------------------------------------------- happy paths
def test_models_lists_base_first_then_adapters(srv: Served) -> None:
    ids = [m.id for m in srv.client().models.list().data]
    assert ids[0] == srv.base
    assert set(ids[1:]) >= {"alpha", "beta", "zeta"}
    assert "evil" not in ids  # symlink escaping its root is not registered at start
    assert "delta" not in ids  # nested dirs are not discovered


@pytest.mark.parametrize("model", ["alpha", "beta", None])
def test_completion_greedy_equals_engine(srv: Served, model: str | None) -> None:
    prompt = "Hello there, "
    want = greedy(srv.engine, prompt, model)
    r = srv.client().completions.create(model=model or srv.base, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_adapters_change_the_output(srv: Served) -> None:
    outs = {m: greedy(srv.engine, "abc", m, 16) for m in ("alpha", "beta", None)}
    assert len(set(outs.values())) == 3, outs  # otherwise the equality tests above prove nothing


def test_completion_stream_equals_non_stream(srv: Served) -> None:
    c = srv.client()
    full = c.completions.create(model="alpha", prompt="stream me", max_tokens=10, temperature=0)
    chunks = list(c.completions.create(model="alpha", prompt="stream me", max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text == greedy(srv.engine, "stream me", "alpha", 10)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_token_id_prompt(srv: Served) -> None:
    r = srv.client().completions.create(model="beta", prompt=[5, 6, 7, 8], max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy(srv.engine, [5, 6, 7, 8], "beta", 6)
    assert r.usage.prompt_tokens == 4


def test_chat_greedy_equals_engine_stream_and_not(srv: Served) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}]
    ids = srv.engine.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    want = greedy(srv.engine, list(ids), "beta", 10)
    c = srv.client()
    r = c.chat.completions.create(model="beta", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model="beta", messages=msgs, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_raw_sse_format_ends_with_done(srv: Served) -> None:
    with srv.http() as h:
        r = h.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": 4, "stream": True, "temperature": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_stop_seed_min_tokens_ignore_eos(srv: Served) -> None:
    c = srv.client()
    base = greedy(srv.engine, "stop test", "alpha", 16)
    stop = next(ch for ch in base[3:] if ch.strip())  # a visible char that occurs after position 3
    r = c.completions.create(model="alpha", prompt="stop test", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == base[: base.index(stop)] and r.choices[0].finish_reason == "stop"
    kw: dict[str, Any] = {"model": "alpha", "prompt": "seeded", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text
    r = c.completions.create(model="beta", prompt="eos", max_tokens=9, temperature=0,
                             extra_body={"ignore_eos": True, "min_tokens": 9, "top_k": 5})
    assert r.usage.completion_tokens == 9 and r.choices[0].finish_reason == "length"


# ----------------------------------------------------------------------------- bad inputs
def test_unknown_adapter_is_404_with_closest_names(srv: Served) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        srv.client().completions.create(model="alpah", prompt="x", max_tokens=2)
    err = ei.value.body
    assert ei.value.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert "'alpha'" in err["message"]


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("temperature", 2.5), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -2), ("max_tokens", 0), ("n", 0),
                                         ("min_tokens", 50), ("stop", [""])])
def test_invalid_sampling_param_is_400_naming_it(srv: Served, field: str, value: Any) -> None:
    body = {"model": "alpha", "prompt": "x", "max_tokens": 4, field: value}
    with pytest.raises(openai.BadRequestError) as ei:
        srv.client().completions.create(**{k: body[k] for k in ("model", "prompt", "max_tokens")},
                                        extra_body={field: value})
    assert ei.value.status_code == 400 and ei.value.body["param"] == field, ei.value.body


def test_chat_invalid_sampling_param_is_400(srv: Served) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        srv.client().chat.completions.create(model="beta", messages=[{"role": "user", "content": "x"}], n=65)
    assert ei.value.body["param"] == "n"


def test_prompt_too_long_is_400(srv: Served) -> None:
    c = srv.client()
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model="alpha", prompt="y" * (MAX_MODEL_LEN + 5), max_tokens=2)
    assert ei.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "y" * MAX_MODEL_LEN}])
    assert ei.value.body["param"] == "messages"


def test_malformed_bodies_are_400(srv: Served) -> None:
    with srv.http() as h:
        for body in (b"{not json", b"[1, 2]", json.dumps({"prompt": "x"}).encode(),
                     json.dumps({"model": "alpha", "prompt": ["a", "b"]}).encode()):
            r = h.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_api_key_required(srv: Served) -> None:
    with pytest.raises(openai.AuthenticationError) as ei:
        srv.client(api_key="wrong").models.list()
    assert ei.value.status_code == 401 and ei.value.body["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Basic dGVzdC1rZXk="}, {"Authorization": f"Bearer {API_KEY}x"}):
        r = httpx.get(srv.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "extra/delta"})
    assert r.status_code == 401
    assert httpx.get(srv.url + "/health").status_code == 200  # stays open


# ----------------------------------------------------------------------------- load / unload
def load(h: httpx.Client, name: str, path: str | Path) -> httpx.Response:
    return h.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(h: httpx.Client, name: str) -> httpx.Response:
    return h.post("/v1/unload_lora_adapter", json={"lora_name": name})


@pytest.mark.parametrize("path,code", [
    ("../outside/gamma", "path_outside_adapter_roots"),  # '..'
    ("extra/../../outside/gamma", "path_outside_adapter_roots"),
    ("evil", "path_outside_adapter_roots"),  # symlink in the root pointing outside
    ("extra/escape/gamma", "path_outside_adapter_roots"),  # symlinked parent dir
    ("OUTSIDE_ABS", "path_outside_adapter_roots"),  # absolute path elsewhere
    ("no/such/dir", "adapter_not_found"),
])
def test_load_path_escapes_are_refused(srv: Served, path: str, code: str) -> None:
    if path == "OUTSIDE_ABS":
        path = str(srv.outside / "gamma")
    with srv.http() as h:
        r = load(h, "escapee", path)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == "lora_path"
        assert "escapee" not in [m["id"] for m in h.get("/v1/models").json()["data"]]


@pytest.mark.parametrize("bad,code,words", [
    ("rank16", "invalid_value", ["r=16", f"max_lora_rank={MAX_LORA_RANK}"]),
    ("otherbase", "incompatible_base", ["q_proj", "(4, 32)"]),
    ("nan", "invalid_adapter_file", ["NaN"]),
    ("truncated", "invalid_adapter_file", ["truncated"]),
])
def test_load_bad_adapter_is_400(srv: Served, bad: str, code: str, words: list[str]) -> None:
    with srv.http() as h:
        r = load(h, f"bad-{bad}", f"bad/{bad}")
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "lora_path" and err["code"] == code, err
        assert all(w in err["message"] for w in words), err["message"]
        assert f"bad-{bad}" not in [m["id"] for m in h.get("/v1/models").json()["data"]]


def test_load_use_unload_roundtrip_and_absolute_path_inside_root(srv: Served) -> None:
    c = srv.client()
    with srv.http() as h:
        assert load(h, "delta", srv.root / "extra" / "delta").status_code == 200
        assert load(h, "delta", "extra/delta").status_code == 409  # already loaded
        assert "delta" in [m.id for m in c.models.list().data]
        r = c.completions.create(model="delta", prompt="q", max_tokens=5, temperature=0)
        assert r.choices[0].text == greedy(srv.engine, "q", "delta", 5)
        assert unload(h, "delta").status_code == 200
        assert unload(h, "delta").status_code == 404
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="delta", prompt="q", max_tokens=5)


def test_concurrent_loads_of_one_name_are_serialised(srv: Served) -> None:
    async def go() -> list[int]:
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {API_KEY}"}) as h:
            rs = await asyncio.gather(*[h.post("/v1/load_lora_adapter",
                                               json={"lora_name": "same", "lora_path": "extra/delta"})
                                        for _ in range(6)])
            codes = [r.status_code for r in rs]
            un = await asyncio.gather(*[h.post("/v1/unload_lora_adapter", json={"lora_name": "same"})
                                        for _ in range(3)])
            return codes + [r.status_code for r in un]

    codes = asyncio.run(go())
    assert sorted(codes[:6]) == [200] + [409] * 5 and sorted(codes[6:]) == [200, 404, 404]


def test_unload_waits_for_running_requests(srv: Served) -> None:
    c = srv.client()
    with srv.http() as h:
        assert load(h, "busy", "extra/delta").status_code == 200
        want = greedy(srv.engine, "long", "busy", 240, ignore_eos=True)
        stream = c.completions.create(model="busy", prompt="long", max_tokens=240, temperature=0, stream=True,
                                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        it = iter(stream)
        chunks = [next(it)]
        running_when_unloading = srv.engine.stats().running
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(r=unload(h, "busy"), t=time.monotonic()))
        t.start()
        refused_while_draining = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # new requests for a draining adapter get 404
            try:
                c.completions.create(model="busy", prompt="new", max_tokens=1)
            except openai.NotFoundError:
                refused_while_draining = t.is_alive()
                break
            time.sleep(0.005)
        chunks += list(it)
        done = time.monotonic()
        t.join(30)
    assert running_when_unloading >= 1  # the unload really overlapped the request
    assert refused_while_draining
    assert result["r"].status_code == 200 and result["t"] >= done - 0.05  # ...and returned after it
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want  # not cut short
    assert chunks[-1].usage.completion_tokens == 240
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="busy", prompt="q", max_tokens=2)


# ----------------------------------------------------------------------------- concurrency
def test_disconnect_mid_stream_aborts_and_frees_kv(srv: Served) -> None:
    before = wait_idle(srv.engine)

    async def go() -> None:
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {API_KEY}"}) as h:
            body = {"model": "alpha", "prompt": "disconnect", "max_tokens": 110, "ignore_eos": True}
            await sse_stream(h, body, cancel_after=2)

    asyncio.run(go())
    after = wait_idle(srv.engine)
    assert after.running == 0 and after.pool_pages_kv == 0
    assert after.aborted == before.aborted + 1 and after.finished == before.finished


def test_disconnect_during_non_streamed_request_aborts(srv: Served) -> None:
    before = wait_idle(srv.engine)
    body = {"model": "beta", "prompt": "gone", "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(60, read=0.05))
    after = wait_idle(srv.engine)
    assert after.running == 0 and after.pool_pages_kv == 0
    assert after.aborted == before.aborted + 1 and after.finished == before.finished


def test_100_concurrent_streams_some_cancelled(srv: Served) -> None:
    models = ["alpha", "beta", srv.base, "zeta"]
    prompts = [f"p{i}:" for i in range(100)]
    want = {i: greedy(srv.engine, prompts[i], models[i % 4] if i % 4 != 2 else None, 6)
            for i in range(100) if i % 5 != 0}
    before = wait_idle(srv.engine)

    async def go() -> list[tuple[str, str | None]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     limits=limits, timeout=60) as h:
            jobs = []
            for i in range(100):
                cancel = i % 5 == 0  # 20 of them disconnect after their first event
                body = {"model": models[i % 4], "prompt": prompts[i], "temperature": 0,
                        "max_tokens": 40 if cancel else 6, "ignore_eos": cancel}
                jobs.append(sse_stream(h, body, cancel_after=1 if cancel else None))
            return await asyncio.gather(*jobs)

    t0 = time.monotonic()
    results = asyncio.run(go())
    elapsed = time.monotonic() - t0
    for i, (text, finish) in enumerate(results):
        if i % 5 != 0:
            assert text == want[i] and finish in ("length", "stop"), (i, text, want[i])
    after = wait_idle(srv.engine)
    assert after.running == 0 and after.queue_len == 0 and after.pool_pages_kv == 0
    assert after.finished - before.finished >= 80
    assert elapsed < 60


def test_bad_load_during_live_traffic_does_not_disturb(srv: Served) -> None:
    prompts = [f"live {i}" for i in range(8)]
    want = [greedy(srv.engine, p, "alpha", 30, ignore_eos=True) for p in prompts]

    async def go() -> tuple[list[tuple[str, str | None]], list[int]]:
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=60) as h:
            streams = [asyncio.ensure_future(sse_stream(h, {"model": "alpha", "prompt": p, "max_tokens": 30,
                                                            "temperature": 0, "ignore_eos": True}, None))
                       for p in prompts]
            await asyncio.sleep(0.05)
            bad = [h.post("/v1/load_lora_adapter", json={"lora_name": f"b{j}", "lora_path": path})
                   for j, path in enumerate(["bad/nan", "bad/truncated", "bad/rank16", "bad/otherbase", "../x"])]
            codes = [r.status_code for r in await asyncio.gather(*bad)]
            return await asyncio.gather(*streams), codes

    results, codes = asyncio.run(go())
    assert codes == [400] * 5
    assert [t for t, _ in results] == want and all(f == "length" for _, f in results)


# ----------------------------------------------------------------------------- metrics
def scrape(srv: Served) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(srv.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def test_metrics_parse_and_move(srv: Served) -> None:
    m0 = scrape(srv)
    for name in ("adapterkit_queue_length", "adapterkit_running_requests", "adapterkit_tokens_per_second",
                 "adapterkit_pool_pages_kv", "adapterkit_pool_pages_adapter", "adapterkit_adapter_cache_hits_total",
                 "adapterkit_adapter_cache_misses_total", "adapterkit_adapter_cache_evictions_total",
                 "adapterkit_pool_pages_cached", "adapterkit_prefix_cache_queries_total",
                 "adapterkit_prefix_cache_hits_total",
                 "adapterkit_time_to_first_token_seconds_count", "adapterkit_time_per_output_token_seconds_count"):
        assert name in m0, name
    c = srv.client()
    for model in ("alpha", "beta", "zeta"):  # 3 adapters through 2 slots: a miss at least
        c.completions.create(model=model, prompt="metrics", max_tokens=5, temperature=0)
    m1 = scrape(srv)
    ok = "adapterkit_http_requests_total{endpoint=/v1/completions,status=200}"
    assert m1[ok] == m0.get(ok, 0) + 3
    assert m1["adapterkit_time_to_first_token_seconds_count"] == m0["adapterkit_time_to_first_token_seconds_count"] + 3
    assert m1["adapterkit_completion_tokens_total"] >= m0["adapterkit_completion_tokens_total"] + 3
    assert m1["adapterkit_engine_generated_tokens_total"] >= m0["adapterkit_engine_generated_tokens_total"] + 3
    assert m1["adapterkit_adapter_cache_misses_total"] + m1["adapterkit_adapter_cache_hits_total"] >= \
        m0["adapterkit_adapter_cache_misses_total"] + m0["adapterkit_adapter_cache_hits_total"] + 3
    assert m1["adapterkit_pool_pages_total"] > 0
