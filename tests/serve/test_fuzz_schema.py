"""Schema fuzzing: schemathesis generates requests from the server's own OpenAPI schema
(``/openapi.json``) and sends them to the REAL server (uvicorn on 127.0.0.1, the engine on a
tiny random Llama with the char tokenizer, real adapters). Bounded and reproducible: a fixed
Hypothesis seed and a fixed number of examples per operation and generation mode (valid data,
and data that breaks the schema).

What must hold for every generated request: no 5xx; every error is OpenAI's error shape; every
answer conforms to the schema's response definitions (documented status, content type, body
schema; SSE streams are checked for status and content type only).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from test_server_utils import API_KEY, Served, serve_tree  # noqa: E402

SEED = 20261202
EXAMPLES = 30  # per POST operation and mode (GET ones have no inputs: 5): about 280 requests
MAX_MODEL_LEN = 32  # every generation is short, whatever max_tokens the fuzzer picks


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_tree(tmp_path_factory.mktemp("fuzz"), "--max-loras", "2", "--max-lora-rank", "8",
                    "--max-model-len", str(MAX_MODEL_LEN), "--unload-timeout", "5",
                    "--max-body-bytes", str(256 * 1024)) as served:
        yield served


def _is_error_shape(text: str) -> bool:
    try:
        err = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


def test_schema_fuzz_no_5xx(srv: Served, record_property: Any) -> None:
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    auth = {"Authorization": f"Bearer {API_KEY}"}
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", config=schemathesis.Config(), headers=auth)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 7, [op.label for op in ops]
    statuses: Counter[tuple[str, int]] = Counter()
    five_xx: list[str] = []
    bad_errors: list[str] = []
    nonconforming: list[str] = []

    for op in ops:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @seed(SEED)
            @settings(max_examples=EXAMPLES if op.method.upper() == "POST" else 5, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), names=st.fixed_dictionaries(
                # real values first: Hypothesis leans to the first choice; None keeps the generated one
                {"model": st.sampled_from(["alpha", "beta", srv.base, None]),
                 "prompt": st.sampled_from(["hi", [5, 6, 7], None]),
                 "max_tokens": st.sampled_from([4, 1, None]), "min_tokens": st.sampled_from([0, None]),
                 "lora_name": st.sampled_from(["fuzzed", "alpha", None]),
                 "lora_path": st.sampled_from(["extra/delta", "bad/nan", "bad/rank16", "extra/escape/gamma", None])}))
            def one(case: Any, names: dict[str, str | None]) -> None:
                # Random values would almost never reach the engine: often swap in real ones.
                if isinstance(case.body, dict):
                    for key, value in names.items():
                        if value is not None and key in case.body:
                            case.body[key] = value
                r = case.call(base_url=srv.url, headers=auth, timeout=60)
                statuses[(op.label, r.status_code)] += 1
                what = f"{op.label} [{mode.value}] {r.status_code}: body={case.body!r:.300} -> {r.text[:300]}"
                if r.status_code >= 500:
                    five_xx.append(what)
                if r.status_code >= 400 and not _is_error_shape(r.text):
                    bad_errors.append(what)
                # documented status and content type; body schema unless it is an SSE stream
                checks = [status_code_conformance, content_type_conformance]
                if not (r.headers.get("content-type") or [""])[0].startswith("text/event-stream"):
                    checks.append(response_schema_conformance)
                try:
                    case.validate_response(r, checks=checks)
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected, reported below
                    nonconforming.append(f"{what}: {str(exc)[:300]}")

            try:
                one()
            except Unsatisfiable:  # nothing to break in an operation without inputs (GET /health)
                assert mode == schemathesis.GenerationMode.NEGATIVE, op.label

    total = sum(statuses.values())
    print(f"\nschemathesis {schemathesis.__version__}: {total} generated requests over {len(ops)} operations "
          f"(seed {SEED}, {EXAMPLES} examples per operation and mode); 5xx: {len(five_xx)}")
    for (label, status), n in sorted(statuses.items()):
        print(f"  {label:40s} {status}: {n}")
    record_property("generated_requests", total)  # in the JUnit XML, for the lead's tables
    record_property("responses_5xx", len(five_xx))
    assert total >= len(ops) * 2  # the fuzzer really ran
    assert not five_xx, "\n".join(five_xx)
    assert not bad_errors, "\n".join(bad_errors)
    assert not nonconforming, "\n".join(nonconforming)
