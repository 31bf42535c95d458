"""Greedy output through the REAL HTTP server (uvicorn on 127.0.0.1, the app the CLI builds, the
official `openai` client) equals HF `generate` (+ PEFT for served LoRA adapters) for each
architecture, with concurrent requests for the base model and two adapters; an adapter attached
in Python before ``Engine(...)`` serves what the library's own forward computes; and the real
default model (SmolLM2, marked ``smollm2``) serves HF + PEFT's text through the fused fast path.

The tiny models have no tokenizer: prompts go as token ids (OpenAI's list-of-ids ``prompt``) and
the generated ids come back through ``logprobs`` (a server without a tokenizer names each token
``token_id:<id>``, as vLLM's ``return_tokens_as_token_ids``).

Unlike tests/serve/test_hf_runner.py (which pins every engine to the generic runner), these
engines take the runner `make_runner` picks, as a user's would: the fused one for Llama and
Qwen2, the generic one for the rest.
"""
from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from _engine_utils import hf_greedy

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from test_hf_runner import ARCHS, _build, _with_random_weights, attached_lora_model  # noqa: E402
from test_server_utils import API_KEY, ServerThread  # noqa: E402

from adapterkit.serve.engine import Engine  # noqa: E402
from adapterkit.serve.hf_runner import HFModelRunner  # noqa: E402
from adapterkit.serve.runner import ModelRunner  # noqa: E402
from adapterkit.serve.types import EngineConfig  # noqa: E402

NEW = 6  # tokens generated per request
# varied tokens, well past the sliding window (SW=4 in test_hf_runner; identical keys would hide
# window and soft-cap bugs); every prompt is sent for the base and both adapters, so full KV
# blocks of one model must never be reused for another (prefix caching is on)
PROMPTS = [[1, 5, 9, 2, 7, 12, 30, 4], [3, 17, 45, 3, 99, 8, 21, 60, 2, 5, 77], [8, 6, 4],
           [2, 9, 4, 4, 1, 7, 3, 8, 6, 4, 11, 13]]


@contextmanager
def serve(engine: Engine, *argv: str) -> Iterator[str]:
    """`engine` behind the app of ``adapterkit serve --api-key KEY ARGV`` (the CLI's own parser and
    `build_app`: start-up adapters registered as the CLI does), on uvicorn; yields the base URL."""
    from adapterkit.cli import build_parser
    from adapterkit.serve.cli import build_app

    try:
        app = build_app(build_parser().parse_args(["serve", "--api-key", API_KEY, *argv]), engine=engine)
        with ServerThread(app) as st:
            yield f"http://127.0.0.1:{st.port}"
    finally:
        engine.shutdown()


def token_ids(choice: Any) -> list[int]:
    """The generated ids of a completions choice asked with ``logprobs=0`` on a tokenizer-less server."""
    toks = choice.logprobs.tokens
    assert all(t.startswith("token_id:") for t in toks), toks
    return [int(t.removeprefix("token_id:")) for t in toks]


async def complete(client: openai.AsyncOpenAI, model: str, prompt: list[int], stream: bool) -> list[int]:
    """One greedy completion of `prompt` by `model` over HTTP; its generated token ids."""
    kw: dict[str, Any] = dict(model=model, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=0,
                              extra_body={"ignore_eos": True})
    if not stream:
        r = await client.completions.create(**kw)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == NEW
        return token_ids(r.choices[0])
    ids: list[int] = []
    finish = None
    events = 0
    async for ch in await client.completions.create(**kw, stream=True):
        if ch.choices:
            ids += token_ids(ch.choices[0]) if ch.choices[0].logprobs else []
            events += bool(ch.choices[0].logprobs and ch.choices[0].logprobs.tokens)
            finish = ch.choices[0].finish_reason or finish
    assert finish == "length"
    assert events == NEW  # incremental without a tokenizer too: one event per token, not all at the end
    return ids


def run_concurrently(url: str, jobs: list[tuple[str, list[int], bool]]) -> list[list[int]]:
    """All (model, prompt, stream) jobs at once through one async `openai` client."""
    async def go() -> list[list[int]]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
            return list(await asyncio.gather(*(complete(c, m, p, s) for m, p, s in jobs)))

    return asyncio.run(go())


def small_config(**kw: Any) -> EngineConfig:
    # a small token budget so steps mix decodes with prefill chunks of other requests
    return EngineConfig(**{"max_loras": 2, "max_lora_rank": 8, "block_size": 4, "num_pages": 96,
                           "max_num_batched_tokens": 8, "max_model_len": 64, **kw})


# ----------------------------------------------------------------------------- every architecture
@pytest.mark.parametrize("arch", ARCHS)
def test_http_greedy_matches_hf_generate_and_peft(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    base, t1, t2 = _build(arch)
    _with_random_weights(base, arch)
    pristine = copy.deepcopy(base)
    root = tmp_path / "adapters"
    fan = arch == "gpt2"  # GPT-2's Conv1D stores weights transposed
    # p1 sits in the adapter root (registered at start); p2 is nested (loaded at runtime)
    paths = {"p1": root / "p1", "p2": root / "later" / "p2"}
    for name, r, targets in (("p1", 4, t1), ("p2", 8, t2)):
        pm = peft.get_peft_model(copy.deepcopy(pristine), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, fan_in_fan_out=fan))
        pm.save_pretrained(paths[name])
    eng = Engine(base, config=small_config(), model_name=f"tiny-{arch}")
    fused = arch in ("llama", "qwen2")  # the archs make_runner gives the fused fast path
    assert isinstance(eng.runner, ModelRunner if fused else HFModelRunner), type(eng.runner)
    with serve(eng, "--adapter-root", str(root), "--served-model-name", f"tiny-{arch}") as url:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "p2", "lora_path": "later/p2"},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert r.status_code == 200, r.text
        models = [None, "p1", "p2"]
        jobs = [(m or f"tiny-{arch}", p, (i + j) % 2 == 1) for i, p in enumerate(PROMPTS)
                for j, m in enumerate(models)]
        got = run_concurrently(url, jobs)
    refs = {None: pristine}
    for name in ("p1", "p2"):
        refs[name] = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), paths[name]).eval()
    want = {(m, i): hf_greedy(refs[m], p, NEW) for i, p in enumerate(PROMPTS) for m in models}
    k = 0
    for i, p in enumerate(PROMPTS):
        for m in models:
            assert got[k] == want[m, i], (arch, m, p)
            k += 1
    # the adapters change the output: the equalities above can tell the three models apart
    assert all(len({tuple(want[m, i]) for m in models}) == 3 for i in range(len(PROMPTS)))


# ----------------------------------------------------------------------------- adapter attached in Python
@pytest.mark.parametrize("init", ["pissa", "gaussian"])
def test_adapter_attached_in_python_serves_as_the_library_computes(init: str) -> None:
    """An adapterkit LoRA attached (and active) before ``Engine(...)``: the served base model is the
    model with its adapter, token for token what the library's forward gives under HF generate."""
    import adapterkit as ak

    m = attached_lora_model(init)
    want = [hf_greedy(m, p, NEW) for p in PROMPTS]
    with ak.disable_adapters(m):
        without = [hf_greedy(m, p, NEW) for p in PROMPTS]
    assert want != without  # the adapter changes the output: the test can tell them apart
    eng = Engine(m, config=small_config(), model_name="tiny-attached")
    assert isinstance(eng.runner, HFModelRunner)  # an attached adapter takes the generic runner
    with serve(eng, "--served-model-name", "tiny-attached") as url:
        got = run_concurrently(url, [("tiny-attached", p, i % 2 == 1) for i, p in enumerate(PROMPTS)])
    assert got == want


# ----------------------------------------------------------------------------- the real default model
@pytest.mark.smollm2
def test_default_model_http_greedy_matches_hf_and_peft(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct as ``adapterkit serve --model default --adapter lora=DIR`` serves it
    (fp32, the fused fast path): real text prompts, base and a PEFT LoRA (q/k/v/o, rank 8, random
    non-zero), concurrent; the text equals HF generate's (+ PEFT's) decoded."""
    from adapterkit.errors import ModelLoadError
    from adapterkit.models import default as D

    pytest.importorskip("gguf")
    try:
        D.gguf_source()
    except ModelLoadError as e:
        pytest.skip(str(e))
    from adapterkit.cli import build_parser
    from adapterkit.serve.cli import build_app

    ref, tok = D.load_default()  # fp32 (converted into the cache on first use)
    torch.manual_seed(0)  # PEFT's non-zero init; alpha/r = 4 so that it shows within 8 tokens on every prompt
    pm = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(
        r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "lora").eval()
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
    n = 8
    want = {}
    for p in prompts:
        ids = tok.encode(p)  # as the engine encodes a text prompt
        for name, model in (("base", ref), ("lora", pm)):
            want[name, p] = tok.decode(hf_greedy(model, ids, n), skip_special_tokens=True)
    assert all(want["base", p] != want["lora", p] for p in prompts)  # the adapter shows in the text

    app = build_app(build_parser().parse_args(["serve", "--model", "default", "--api-key", API_KEY,
                                               "--adapter", f"lora={tmp_path / 'lora'}", "--max-loras", "1",
                                               "--max-lora-rank", "8", "--max-model-len", "256"]))
    engine = app.state.server.engine
    try:
        assert isinstance(engine.runner, ModelRunner) and not isinstance(engine.runner, HFModelRunner)
        base_name = D.DEFAULT_MODEL_NAME

        async def go() -> list[str]:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=300) as c:
                rs = await asyncio.gather(*(c.completions.create(
                    model=base_name if m == "base" else m, prompt=p, max_tokens=n, temperature=0,
                    extra_body={"ignore_eos": True}) for p in prompts for m in ("base", "lora")))
            assert all(r.usage.completion_tokens == n for r in rs)
            return [r.choices[0].text for r in rs]

        with ServerThread(app) as st:
            url = f"http://127.0.0.1:{st.port}"
            got = asyncio.run(go())
    finally:
        engine.shutdown()
    assert got == [want[m, p] for p in prompts for m in ("base", "lora")]
