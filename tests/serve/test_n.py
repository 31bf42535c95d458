"""``n`` > 1 (several independent choices per request) and the penalties, through the REAL
server (uvicorn on 127.0.0.1) with the official `openai` client: choice i with a seed equals a
one-choice request with seed + i (vLLM's rule), usage counts the prompt once and sums the
completions, streams carry each choice's index and finish once, and a client that leaves
mid-stream aborts every choice."""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server_utils import API_KEY, Served, serve_tree, wait_idle  # noqa: E402

from adapterkit.serve.types import SamplingParams  # noqa: E402

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_tree(tmp_path_factory.mktemp("n"), "--max-loras", "2", "--max-lora-rank", "8",
                    "--max-model-len", "128", "--max-num-seqs", "16") as served:
        yield served


def _one(srv: Served, seed: int, **kw) -> openai.types.Completion:
    return srv.client().completions.create(model="alpha", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed,
                                           extra_body={"ignore_eos": True}, **kw)


def test_completion_choices_equal_single_requests_with_seed_plus_i(srv: Served) -> None:
    many = _one(srv, 5, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [_one(srv, 5 + i) for i in range(3)]
    assert [c.text for c in many.choices] == [s.choices[0].text for s in singles]
    assert len({c.text for c in many.choices}) > 1  # independent samples, not one copied
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles) == 30
    assert many.usage.total_tokens == many.usage.prompt_tokens + 30


def test_chat_n_greedy_choices_are_equal_and_seeded_ones_reproduce(srv: Served) -> None:
    c = srv.client()
    msgs = [{"role": "user", "content": "hello"}]
    greedy = c.chat.completions.create(model="beta", messages=msgs, max_tokens=6, temperature=0, n=2)
    assert [ch.index for ch in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    sampled = c.chat.completions.create(model="beta", messages=msgs, max_tokens=6, seed=11, n=2,
                                        extra_body={"ignore_eos": True})
    second = c.chat.completions.create(model="beta", messages=msgs, max_tokens=6, seed=12,
                                       extra_body={"ignore_eos": True})
    assert sampled.choices[1].message.content == second.choices[0].message.content
    assert sampled.usage.completion_tokens == 12


def test_streamed_choices_carry_their_index_and_finish_once(srv: Served) -> None:
    stream = _one(srv, 21, n=3, stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = ["", "", ""], [[], [], []], None
    for ev in stream:
        if not ev.choices:
            usage = ev.usage
            continue
        (ch,) = ev.choices
        texts[ch.index] += ch.text
        if ch.finish_reason:
            finishes[ch.index].append(ch.finish_reason)
    assert finishes == [["length"]] * 3
    assert texts == [ch.text for ch in _one(srv, 21, n=3).choices]
    assert usage is not None and usage.completion_tokens == 30


def test_chat_stream_starts_each_choice_with_the_role(srv: Served) -> None:
    stream = srv.client().chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, n=2, seed=3, stream=True,
                                                  extra_body={"ignore_eos": True})
    roles, content = {}, ["", ""]
    for ev in stream:
        for ch in ev.choices:
            if ch.delta.role:
                roles[ch.index] = ch.delta.role
            content[ch.index] += ch.delta.content or ""
    assert roles == {0: "assistant", 1: "assistant"} and all(content)


def test_each_choice_has_its_logprobs(srv: Served) -> None:
    r = _one(srv, 8, n=2, logprobs=2)
    for ch in r.choices:
        assert len(ch.logprobs.tokens) == 10 and all(len(t) >= 1 for t in ch.logprobs.top_logprobs)
        assert "".join(ch.logprobs.tokens) == ch.text


def test_unknown_model_with_n_is_404_and_leaves_nothing_running(srv: Served) -> None:
    with pytest.raises(openai.NotFoundError):
        srv.client().completions.create(model="nope", prompt=PROMPT, max_tokens=4, n=4)
    assert wait_idle(srv.engine).running == 0


def test_disconnect_mid_stream_aborts_every_choice(srv: Served) -> None:
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 100, "n": 3, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:]).get("choices"):
                    seen += 1
                if seen >= 3:
                    break  # leave with all three choices still generating
    s = wait_idle(srv.engine)
    assert s.running == 0 and s.pool_pages_kv == 0


@pytest.mark.parametrize("extra", [{"repetition_penalty": 1.6}, {"presence_penalty": 1.5, "frequency_penalty": 0.7}])
def test_penalties_through_http_equal_the_engine(srv: Served, extra: dict[str, float]) -> None:
    r = srv.client().completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True, **extra})
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, **extra)
    want = srv.engine.generate_sync([PROMPT], ["alpha"], params)[0].text
    plain = srv.engine.generate_sync([PROMPT], ["alpha"], SamplingParams(max_tokens=12, temperature=0,
                                                                        ignore_eos=True))[0].text
    assert r.choices[0].text == want and want != plain
