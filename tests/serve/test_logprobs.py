"""Log-probs through the REAL server (uvicorn on 127.0.0.1, the official `openai` client):
completions ``logprobs`` + ``echo`` (``max_tokens: 0`` too, lm-eval's request), chat
``logprobs`` + ``top_logprobs``, streaming, and the engine's own prompt log-probs under chunked
prefill. The reference for every number is the library model's own forward: ``model(ids).logits``
with the adapter attached in Python (``ak.load_adapter``), log_softmax in fp32, within 1e-4.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server_utils import Served, char_tokenizer, serve_tree, tiny_llama  # noqa: E402

TOL = 1e-4
PROMPT = "The quick brown fox, 42 times!"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_tree(tmp_path_factory.mktemp("logprobs"), "--max-loras", "2", "--max-lora-rank", "8",
                    "--max-model-len", "128") as served:
        yield served


_REF_CACHE: dict[str | None, torch.nn.Module] = {}


def reference(srv: Served, adapter: str | None) -> torch.nn.Module:
    """The HF model from the served directory, with `adapter` attached by the library."""
    if adapter not in _REF_CACHE:
        import adapterkit as ak
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(srv.model_dir).eval()
        if adapter is not None:
            ak.load_adapter(model, srv.root / adapter)
        _REF_CACHE[adapter] = model
    return _REF_CACHE[adapter]


def ref_logprobs(srv: Served, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): row i is the distribution after ids[:i + 1] (fp32 log_softmax)."""
    with torch.no_grad():
        return reference(srv, adapter)(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def assert_top(top: dict[str, float], ref_row: torch.Tensor, k: int, chosen: tuple[str, float]) -> None:
    """`top` holds the k best log-probs of `ref_row` plus the chosen token (k + 1 entries when
    the chosen one is not among the k best)."""
    assert top[chosen[0]] == pytest.approx(chosen[1], abs=TOL)
    assert len(top) in (k, k + 1)
    assert sorted(top.values(), reverse=True)[:k] == pytest.approx(ref_row.topk(k).values.tolist(), abs=TOL)


# ----------------------------------------------------------------------------- completions + echo
@pytest.mark.parametrize("model", [None, "alpha", "beta"])  # base, native adapter, PEFT adapter
def test_echo_logprobs_equal_the_model_forward(srv: Served, model: str | None) -> None:
    tok = srv.engine.tokenizer
    ids = tok.encode(PROMPT)
    r = srv.client().completions.create(model=model or srv.base, prompt=PROMPT, logprobs=5, echo=True,
                                        max_tokens=0)
    ch = r.choices[0]
    lp = ch.logprobs
    assert ch.text == PROMPT and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    ref = ref_logprobs(srv, model, ids)
    got = torch.tensor(lp.token_logprobs[1:])
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(got, want, atol=TOL), (got - want).abs().max()
    for i in range(1, len(ids)):
        assert_top(lp.top_logprobs[i], ref[i - 1], 5, (lp.tokens[i], lp.token_logprobs[i]))


def test_adapter_changes_the_logprobs(srv: Served) -> None:
    """The adapter is applied: its log-probs differ from the base's (the comparison above would
    pass for both if the server ignored `model`)."""
    c = srv.client()
    base = c.completions.create(model=srv.base, prompt=PROMPT, logprobs=0, echo=True, max_tokens=0)
    alpha = c.completions.create(model="alpha", prompt=PROMPT, logprobs=0, echo=True, max_tokens=0)
    diff = max(abs(a - b) for a, b in zip(base.choices[0].logprobs.token_logprobs[1:],
                                          alpha.choices[0].logprobs.token_logprobs[1:]))
    assert diff > 1e-3
    # logprobs=0: each top_logprobs entry is the token itself only
    assert all(len(t) == 1 for t in alpha.choices[0].logprobs.top_logprobs[1:])


def test_generated_logprobs_equal_the_model_forward(srv: Served) -> None:
    tok = srv.engine.tokenizer
    ids = tok.encode(PROMPT)
    r = srv.client().completions.create(model="beta", prompt=ids, logprobs=3, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == r.choices[0].text
    gen = [tok.convert_tokens_to_ids(t) for t in lp.tokens]
    ref = ref_logprobs(srv, "beta", ids + gen)
    for j, t in enumerate(gen):
        row = ref[len(ids) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(row[t].item(), abs=TOL)
        assert t == int(row.argmax())  # greedy: the chosen token is the best one
        assert sorted(lp.top_logprobs[j].values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(),
                                                                                  abs=TOL)


def test_logprobs_are_of_the_raw_distribution(srv: Served) -> None:
    """Sampling at temperature 1.7 with top_k 3 still reports the untempered, unfiltered log-probs."""
    tok = srv.engine.tokenizer
    ids = tok.encode(PROMPT)
    r = srv.client().completions.create(model="alpha", prompt=PROMPT, logprobs=2, max_tokens=5, temperature=1.7,
                                        seed=7, extra_body={"top_k": 3, "ignore_eos": True})
    lp = r.choices[0].logprobs
    gen = [tok.convert_tokens_to_ids(t) for t in lp.tokens]
    ref = ref_logprobs(srv, "alpha", ids + gen)
    for j, t in enumerate(gen):
        assert lp.token_logprobs[j] == pytest.approx(ref[len(ids) - 1 + j, t].item(), abs=TOL)


def test_echo_with_generation_and_lm_eval_payload(srv: Served) -> None:
    """lm-eval's local-completions log-likelihood request, byte for byte: a batch of one token
    list, echo, logprobs 1, max_tokens 1, temperature 0; it reads token_logprobs[ctxlen:-1]."""
    tok = srv.engine.tokenizer
    ids = tok.encode(PROMPT)
    with srv.http() as h:
        r = h.post("/v1/completions", json={"model": "alpha", "prompt": [ids], "max_tokens": 1, "logprobs": 1,
                                            "echo": True, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and ch["text"].startswith(PROMPT)
    ref = ref_logprobs(srv, "alpha", ids)
    ctxlen = 5  # lm-eval's split: context tokens, then the continuation it scores
    got = sum(lp["token_logprobs"][ctxlen:-1])
    want = sum(ref[i - 1, ids[i]].item() for i in range(ctxlen, len(ids)))
    assert got == pytest.approx(want, abs=1e-3)
    for v, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert v in top.values() and len(top) in (1, 2)


def test_stream_logprobs_equal_the_answer(srv: Served) -> None:
    c = srv.client()
    kw: dict[str, Any] = dict(model="alpha", prompt=PROMPT, logprobs=2, echo=True, max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    whole = c.completions.create(**kw).choices[0]
    text, tokens, lps, offsets = "", [], [], []
    for ev in c.completions.create(stream=True, **kw):
        ch = ev.choices[0]
        text += ch.text
        if ch.logprobs is not None:
            tokens += ch.logprobs.tokens
            lps += ch.logprobs.token_logprobs
            offsets += ch.logprobs.text_offset
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert lps == whole.logprobs.token_logprobs and offsets == whole.logprobs.text_offset


def test_stream_echo_of_a_long_prompt_with_max_tokens_zero(srv: Served) -> None:
    """A streamed score-only request: one event with the whole prompt and its log-probs (long
    enough, 100 tokens, that the server formats it in a worker thread), then usage and [DONE]."""
    prompt = ("abcdefghij" * 10)
    events = list(srv.client().completions.create(model="alpha", prompt=prompt, logprobs=3, echo=True, max_tokens=0,
                                                  stream=True, stream_options={"include_usage": True}))
    assert [e.choices[0].finish_reason for e in events if e.choices] == ["length"]
    first = events[0].choices[0]
    assert first.text == prompt and len(first.logprobs.tokens) == 100 and first.logprobs.token_logprobs[0] is None
    assert events[-1].usage.prompt_tokens == 100 and events[-1].usage.completion_tokens == 0
    whole = srv.client().completions.create(model="alpha", prompt=prompt, logprobs=3, echo=True, max_tokens=0)
    assert first.logprobs.token_logprobs == whole.choices[0].logprobs.token_logprobs


# ----------------------------------------------------------------------------- chat
def test_chat_logprobs_equal_the_model_forward(srv: Served) -> None:
    tok = srv.engine.tokenizer
    msgs = [{"role": "user", "content": "Count: 1 2 3"}]
    r = srv.client().chat.completions.create(model="alpha", messages=msgs, logprobs=True, top_logprobs=4,
                                             max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == r.choices[0].message.content
    ids = list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
    gen = [tok.convert_tokens_to_ids(c.token) for c in content]
    ref = ref_logprobs(srv, "alpha", ids + gen)
    for j, c in enumerate(content):
        row = ref[len(ids) - 1 + j]
        assert c.logprob == pytest.approx(row[gen[j]].item(), abs=TOL)
        assert c.bytes == list(c.token.encode())
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(row.topk(4).values.tolist(), abs=TOL)
        assert c.top_logprobs[0].token == c.token  # greedy


def test_chat_logprobs_stream_and_default_top(srv: Served) -> None:
    c = srv.client()
    msgs = [{"role": "user", "content": "hi"}]
    whole = c.chat.completions.create(model=srv.base, messages=msgs, logprobs=True, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].logprobs.content
    assert len(whole) == 4 and all(t.top_logprobs == [] for t in whole)  # top_logprobs unset: none
    streamed = []
    for ev in c.chat.completions.create(model=srv.base, messages=msgs, logprobs=True, max_tokens=4,
                                        temperature=0, stream=True, extra_body={"ignore_eos": True}):
        if ev.choices and ev.choices[0].logprobs is not None:
            streamed += ev.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole]
    plain = c.chat.completions.create(model=srv.base, messages=msgs, max_tokens=2)
    assert plain.choices[0].logprobs is None


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": 1}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
])
def test_bad_logprob_fields_are_400_naming_the_field(srv: Served, path: str, body: dict[str, Any],
                                                     param: str) -> None:
    with srv.http() as h:
        r = h.post(path, json={"model": srv.base, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "invalid_value"


def test_openai_client_raises_bad_request_for_logprobs_21(srv: Served) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        srv.client().completions.create(model=srv.base, prompt="hi", logprobs=21)
    assert ei.value.body["param"] == "logprobs"  # type: ignore[index]


# ----------------------------------------------------------------------------- engine level
def test_prompt_logprobs_under_chunked_prefill_and_preemption() -> None:
    """Prompt log-probs are computed chunk by chunk (4-token steps) and survive preemption
    (a pool too small for all requests at once); the scheduler asks for log_softmax only for
    the requests that want log-probs."""
    from adapterkit.serve import scheduler as sched
    from adapterkit.serve.engine import Engine
    from adapterkit.serve.types import EngineConfig, SamplingParams

    model, tok = tiny_llama(), char_tokenizer()
    rows_seen: list[int] = []
    real = sched.raw_logprobs

    def counting(logits: torch.Tensor) -> torch.Tensor:
        rows_seen.append(logits.shape[0])
        return real(logits)

    sched.raw_logprobs = counting
    eng = Engine(model, tok, EngineConfig(max_num_batched_tokens=4, block_size=4, num_pages=12, max_model_len=64),
                 start=False)
    try:
        prompts = [tok.encode(f"prompt number {i}: some words") for i in range(3)]
        plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        eng.generate_sync(prompts, params=plain)
        assert rows_seen == []  # nobody asked: no log_softmax at all
        scored = SamplingParams(max_tokens=0, prompt_logprobs=2)
        before = eng.scheduler.preemptions
        outs = eng.generate_sync(prompts, params=[scored, plain, SamplingParams(max_tokens=6, temperature=0,
                                                                                  logprobs=1, ignore_eos=True)])
        assert rows_seen and max(rows_seen) <= 4  # only the asking rows of each 4-token step
        assert eng.scheduler.preemptions > before  # some requests were preempted and recomputed meanwhile
        with torch.no_grad():
            ref = model(torch.tensor([prompts[0]])).logits[0].log_softmax(-1)
        lps = outs[0].prompt_logprobs
        assert lps is not None and len(lps) == len(prompts[0]) and lps[0].logprob is None
        assert outs[0].token_ids == [] and outs[0].finish_reason == "length"
        for i in range(1, len(prompts[0])):
            assert lps[i].token_id == prompts[0][i]
            assert lps[i].logprob == pytest.approx(ref[i - 1, prompts[0][i]].item(), abs=TOL)
            assert [v for _, v in lps[i].top] == pytest.approx(ref[i - 1].topk(2).values.tolist(), abs=TOL)
        assert outs[1].logprobs is None and outs[2].logprobs is not None and len(outs[2].logprobs) == 6
    finally:
        sched.raw_logprobs = real
        eng.shutdown()


def test_prompt_logprobs_of_a_300_token_prompt_in_one_step() -> None:
    """More prompt rows in one step than the 256-row slices the log-softmax runs in."""
    from adapterkit.serve.engine import Engine
    from adapterkit.serve.types import EngineConfig, SamplingParams

    model = tiny_llama()
    ids = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    eng = Engine(model, None, EngineConfig(max_model_len=512), start=False)
    try:
        out = eng.generate_sync([ids], params=SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    finally:
        eng.shutdown()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == 300
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    assert torch.allclose(got, ref[torch.arange(299), torch.tensor(ids[1:])], atol=TOL)
    assert [lp.top[0][0] for lp in out.prompt_logprobs[1:]] == ref[:299].argmax(-1).tolist()


def test_sampling_params_logprob_checks() -> None:
    from adapterkit.errors import ConfigError
    from adapterkit.serve.types import SamplingParams

    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
    for bad in ({"max_tokens": 0}, {"logprobs": 21}, {"prompt_logprobs": -1}, {"logprobs": True}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_openapi_documents_the_logprob_fields(srv: Served) -> None:
    with srv.http() as h:
        spec = h.get("/openapi.json").json()["components"]["schemas"]
    comp, chat = spec["CompletionRequest"]["properties"], spec["ChatCompletionRequest"]["properties"]
    assert json.dumps(comp["logprobs"]).count('"maximum": 20') == 1
    assert comp["echo"]["type"] == "boolean" and "enum" not in comp["echo"]
    assert comp["max_tokens"]["anyOf"][0]["minimum"] == 0
    assert json.dumps(chat["top_logprobs"]).count('"maximum": 20') == 1
