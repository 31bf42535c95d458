"""The server's limits on a second, deliberately small configuration: queue full -> 429, no
adapter roots -> runtime loads refused, no API key -> open, a served model name alias.

REAL engine (no tokenizer: token-id prompts) on a tiny random Llama, REAL uvicorn on
127.0.0.1, official `openai` client. One server for the module.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server_utils import ServerThread  # noqa: E402

NAME = "tiny-base"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterkit.serve.engine import Engine
    from adapterkit.serve.server import create_app
    from adapterkit.serve.types import EngineConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=4096)).eval()
    # one running sequence and one waiting slot: the third concurrent request is refused
    engine = Engine(model, None, EngineConfig(max_num_seqs=1, max_queue=1, max_model_len=4096))
    app = create_app(engine, served_model_name=NAME)  # no adapter roots, no API key
    try:
        with ServerThread(app) as st:
            yield f"http://127.0.0.1:{st.port}", engine
    finally:
        engine.shutdown()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_queue_full_is_429(served: tuple[str, Any]) -> None:
    url, engine = served
    c = client(url)
    aborted = engine.stats().aborted
    long = c.completions.create(model=NAME, prompt=[3, 4, 5], max_tokens=4000, temperature=0, stream=True,
                                extra_body={"ignore_eos": True})
    # the server sends the response headers once the first token exists: it is running now
    assert engine.stats().running == 1
    waiting: dict[str, Any] = {}
    t = threading.Thread(target=lambda: waiting.update(r=c.completions.create(model=NAME, prompt=[6, 7],
                                                                              max_tokens=3, temperature=0)))
    t.start()
    deadline = time.monotonic() + 10
    while engine.stats().queue_len < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.stats().queue_len == 1 and engine.stats().running == 1
    with pytest.raises(openai.RateLimitError) as ei:
        c.completions.create(model=NAME, prompt=[8], max_tokens=2)
    assert ei.value.status_code == 429 and ei.value.body["code"] == "queue_full"
    long.close()  # disconnect: the long request is aborted, the waiting one runs
    t.join(30)
    assert waiting["r"].usage.completion_tokens == 3
    assert engine.stats().aborted == aborted + 1


def test_no_roots_means_no_runtime_loads(served: tuple[str, Any], tmp_path: Any) -> None:
    url, _ = served
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_adapter_roots"
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"


def test_open_server_and_served_name(served: tuple[str, Any]) -> None:
    url, engine = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == [NAME]
    r = c.completions.create(model=NAME, prompt=[1, 2, 3], max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.model == NAME
    # the engine's own name is accepted too; an unknown one names the closest
    r = c.completions.create(model=engine.model_name, prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError) as ei:
        c.completions.create(model="tiny-bse", prompt=[1], max_tokens=2)
    assert NAME in ei.value.body["message"]


def test_chat_without_template_is_400(served: tuple[str, Any]) -> None:
    url, _ = served
    with pytest.raises(openai.BadRequestError) as ei:
        client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert ei.value.body["code"] == "no_chat_template" and ei.value.body["param"] == "messages"


def test_unknown_route_and_method_use_error_shape(served: tuple[str, Any]) -> None:
    url, _ = served
    for r in (httpx.get(url + "/v1/nope"), httpx.get(url + "/v1/completions")):
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}
