"""Ray Serve scale-out (`adapterkit.serve.ray`): a REAL local Ray cluster started in this process
(no external services), 2 engine replicas of a tiny random Llama, the REAL ingress over HTTP
and the official `openai` client.

Checked: greedy answers equal a single engine's token for token, adapter affinity (a second
request for an adapter lands on the replica that loaded it: no second cold load), the host
tier (an adapter pushed out of the device slots comes back from RAM: a warm load, no disk
read, on the replica that holds it), runtime load/unload through the ingress, the error
shapes, and a replica killed mid-traffic being replaced while the other requests succeed.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from test_server_utils import API_KEY, MAX_LORA_RANK, MAX_MODEL_LEN, build_tree, greedy  # noqa: E402

pytestmark = pytest.mark.slow
APP = "adapterkit"
# How long the cluster may take to start (and a killed replica to be replaced). Generous: on a
# quiet machine set-up takes ~10 s and the wait returns as soon as everything answers; on 2
# cores saturated by other processes starting three Python processes that import torch took
# minutes, and Ray's own start-up timeouts (below) failed the set-up.
SETUP_S = float(os.environ.get("ADAPTERKIT_TEST_RAY_SETUP_S", "420"))
RAY_ENV = {
    # Replicas push the adapters they hold to the routers every 0.1 s; a router that has heard
    # nothing for an adapter it already sent elsewhere waits this long for a matching replica
    # before it falls back to any (Ray's default 1 s is too short on a loaded 2-core machine for
    # the affinity tests to be deterministic).
    "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "10",
    # The HTTP proxy's first ready check (default 5 s) and health checks (10 s): missed on a
    # saturated machine, after which Serve restarts the proxy, again and again.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}


class RayServed:
    def __init__(self, url: str, engine: Any, root: Path, base: str) -> None:
        self.url, self.engine, self.root, self.base = url, engine, root, base

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)

    def replicas(self) -> list[dict[str, Any]]:
        with self.http() as h:
            return h.get("/v1/replicas").json()["data"]

    def cold_loads(self) -> int:
        return sum(r["cold_loads"] for r in self.replicas())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running_replicas() -> int:
    dep = serve.status().applications[APP].deployments["EngineReplica"]
    return dep.replica_states.get("RUNNING", 0)


def _not_ready(url: str) -> str | None:
    """What the cluster still lacks before the tests can start (None: ready)."""
    app = serve.status().applications.get(APP)
    if app is None:
        return "the application is not created yet"
    if app.status == "DEPLOY_FAILED":  # a str enum
        raise RuntimeError(f"Ray Serve could not deploy the test application: {app.message}")
    dep = app.deployments.get("EngineReplica")
    running = dep.replica_states.get("RUNNING", 0) if dep is not None else 0
    if running < 2:
        return f"{running} of 2 engine replicas RUNNING (application {app.status})"
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as h:
            r = h.get("/v1/replicas")
    except httpx.HTTPError as exc:
        return f"the HTTP proxy does not answer yet ({type(exc).__name__})"
    if r.status_code != 200:
        return f"GET /v1/replicas answers {r.status_code}"
    if len(r.json()["data"]) < 2:
        return f"{len(r.json()['data'])} of 2 replicas have reported to the board"
    return None


def _wait_ready(url: str, deadline: float, note: str = "") -> None:
    """Poll (every 0.5 s) until both engine replicas run and report and the proxy answers; at
    the deadline raise an error that says what was missing and what Serve reports."""
    while (missing := _not_ready(url)) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the Ray Serve test cluster was not ready after {SETUP_S:.0f} s (ADAPTERKIT_TEST_RAY_SETUP_S): "
                f"{missing}; load average {os.getloadavg()}; {note}serve.status(): {serve.status()}")
        time.sleep(0.5)


def _start_cluster(port: int) -> None:
    """`ray.init` with `RAY_ENV` set for every process it starts (the raylet's children inherit
    its environment; the job's runtime_env too), then restore this process's environment."""
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": RAY_ENV})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def _deploy(app: Any, url: str) -> None:
    """Deploy without Ray's waits (serve.run waits for RUNNING without limit and for the proxy
    60 s, a constant), then wait on our own deadline."""
    deadline = time.monotonic() + SETUP_S
    note = ""
    try:
        serve.run_many([serve.RunTarget(app, name=APP, route_prefix="/")], wait_for_applications_running=False)
    except TimeoutError as exc:  # Ray's fixed 60 s wait for the proxy: ours goes on to the deadline
        note = f"Ray said: {exc}; "
    _wait_ready(url, deadline, note)


@pytest.fixture(scope="module")
def rs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServed]:
    from adapterkit.cli import build_parser
    from adapterkit.models import load_model
    from adapterkit.serve.engine import Engine
    from adapterkit.serve.ray import build_ray_app
    from adapterkit.serve.types import EngineConfig

    model_dir, root, _ = build_tree(tmp_path_factory.mktemp("ray"))
    args = build_parser().parse_args([
        "serve", "--model", str(model_dir), "--adapter-root", str(root), "--api-key", API_KEY, "--max-loras", "2",
        "--max-cpu-loras", "16", "--max-lora-rank", str(MAX_LORA_RANK), "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", "16"])
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        _start_cluster(port)
        _deploy(build_ray_app(args, replicas=2, replica_cpus=0.5, app_name=APP), url)
        hf, tok = load_model(str(model_dir))
        ref = Engine(hf, tok, EngineConfig(max_loras=2, max_lora_rank=MAX_LORA_RANK, max_model_len=MAX_MODEL_LEN),
                     model_name=str(model_dir))
        for name in ("alpha", "beta"):
            ref.register_adapter(name, str(root / name))
        ref.register_adapter("delta", str(root / "extra" / "delta"))
        try:
            yield RayServed(url, ref, root, str(model_dir))
        finally:
            ref.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.parametrize("model", ["alpha", "beta", None])
def test_answers_equal_single_engine(rs: RayServed, model: str | None) -> None:
    for prompt in ("Hello there, ", "abc"):
        r = rs.client().completions.create(model=model or rs.base, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == greedy(rs.engine, prompt, model)


def test_adapters_differ_and_stream_equals_single_engine(rs: RayServed) -> None:
    outs = {m: greedy(rs.engine, "abc", m, 16) for m in ("alpha", "beta", None)}
    assert len(set(outs.values())) == 3  # otherwise the equality above proves nothing
    chunks = list(rs.client().completions.create(model="alpha", prompt="abc", max_tokens=16, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == outs["alpha"]


def test_chat_equals_single_engine(rs: RayServed) -> None:
    from adapterkit.serve.types import SamplingParams

    msgs = [{"role": "user", "content": "hi"}]
    ids = rs.engine.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = rs.engine.generate_sync([ids], ["beta"], SamplingParams(max_tokens=8, temperature=0))[0].text
    r = rs.client().chat.completions.create(model="beta", messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want


def test_unknown_model_is_404_with_the_closest_name(rs: RayServed) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        rs.client().completions.create(model="alpah", prompt="x", max_tokens=2)
    err = ei.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model" and "alpha" in err["message"]


def test_bad_request_keeps_the_error_shape(rs: RayServed) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        rs.client().completions.create(model="alpha", prompt="x", max_tokens=2, temperature=-1)
    assert ei.value.body["param"] == "temperature"


def test_affinity_second_request_hits_the_loading_replica(rs: RayServed) -> None:
    with rs.http() as h:
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "aff", "lora_path": str(rs.root / "extra" / "delta")})
        assert r.status_code == 200, r.text
    before = rs.cold_loads()
    c = rs.client()
    first = c.completions.create(model="aff", prompt="abc", max_tokens=6, temperature=0).choices[0].text
    assert first == greedy(rs.engine, "abc", "delta", 6)
    holders = [r["replica"] for r in rs.replicas() if "aff" in r["resident"]]
    assert len(holders) == 1 and rs.cold_loads() == before + 1
    time.sleep(1.0)  # ten of the replicas' 0.1 s pushes of what they hold
    for _ in range(4):  # each one would cost a cold load on the other replica
        assert c.completions.create(model="aff", prompt="abc", max_tokens=6, temperature=0).choices[0].text == first
    assert rs.cold_loads() == before + 1
    assert [r["replica"] for r in rs.replicas() if "aff" in r["resident"]] == holders


def _load_counts(rs: RayServed) -> tuple[int, int, int]:
    """(cold loads, warm loads, slot hits) summed over the replicas, after their next report."""
    time.sleep(1.2)  # replicas report every second (a cold load at once; slot loads and hits on the tick)
    rows = rs.replicas()
    return tuple(sum(r[k] for r in rows) for k in ("cold_loads", "warm_loads", "slot_hits"))  # type: ignore[return-value]


def test_host_tier_keeps_evicted_adapters_and_requests_return_to_them(rs: RayServed) -> None:
    """6 adapters over 2 replicas x 2 device slots (host tier 16): in a second round each is
    still in its replica's RAM, its request goes back there (no disk read), and on the replica
    that holds 3 or more of them each one re-enters a slot from RAM (a warm load)."""
    names = [f"host{i}" for i in range(6)]
    sources = ["alpha", "beta", "delta"] * 2
    paths = {"alpha": rs.root / "alpha", "beta": rs.root / "beta", "delta": rs.root / "extra" / "delta"}
    with rs.http() as h:
        for n, src in zip(names, sources):
            r = h.post("/v1/load_lora_adapter", json={"lora_name": n, "lora_path": str(paths[src])})
            assert r.status_code == 200, r.text
    c = rs.client()

    def round_() -> list[str]:
        return [c.completions.create(model=n, prompt="abc", max_tokens=6, temperature=0).choices[0].text
                for n in names]

    cold0, warm0, hits0 = _load_counts(rs)
    first = round_()
    assert first == [greedy(rs.engine, "abc", s, 6) for s in sources]
    cold1, warm1, hits1 = _load_counts(rs)
    assert cold1 == cold0 + 6  # each read from disk once, on one replica
    rows = rs.replicas()
    held = {n: [r["replica"] for r in rows if n in r["resident"]] for n in names}
    assert all(len(v) == 1 for v in held.values()), held
    assert max(sum(n in r["resident"] for n in names) for r in rows) >= 3
    assert all(len(r["in_slots"]) <= 2 for r in rows)
    # (_load_counts waited 1.2 s: Ray's 0.1 s pushes of the host-tier residents reached the router)
    assert round_() == first  # restored from RAM into a slot: the same weights
    cold2, warm2, hits2 = _load_counts(rs)
    assert cold2 == cold1, "a request went to a replica without its adapter in RAM (a second disk read)"
    # the replica holding k >= 3 of them cycles k adapters through 2 slots: k warm loads
    assert warm2 - warm1 >= 3 and warm2 - warm1 + hits2 - hits1 >= 6, (warm1, warm2, hits1, hits2)
    assert [[r["replica"] for r in rs.replicas() if n in r["resident"]] for n in names] == [held[n] for n in names]


def test_runtime_unload_and_reload(rs: RayServed) -> None:
    with rs.http() as h:
        assert h.post("/v1/load_lora_adapter",
                      json={"lora_name": "tmp", "lora_path": str(rs.root / "alpha")}).status_code == 200
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "tmp", "lora_path": str(rs.root / "alpha")})
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_already_loaded"
        assert "tmp" in [a["name"] for a in h.get("/v1/adapters").json()["data"]]
        assert rs.client().completions.create(model="tmp", prompt="abc", max_tokens=6,
                                              temperature=0).choices[0].text == greedy(rs.engine, "abc", "alpha", 6)
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "tmp"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            rs.client().completions.create(model="tmp", prompt="abc", max_tokens=2)
        # loaded again from another directory: a new key, so no replica serves the old weights
        assert h.post("/v1/load_lora_adapter",
                      json={"lora_name": "tmp", "lora_path": str(rs.root / "beta")}).status_code == 200
        assert rs.client().completions.create(model="tmp", prompt="abc", max_tokens=6,
                                              temperature=0).choices[0].text == greedy(rs.engine, "abc", "beta", 6)
        bad = h.post("/v1/load_lora_adapter", json={"lora_name": "nan", "lora_path": str(rs.root / "bad" / "nan")})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"


def test_metrics_sum_the_replicas(rs: RayServed) -> None:
    time.sleep(1.5)  # one report period: every replica has pushed its counters
    with rs.http() as h:
        text = h.get("/metrics").text
    rows = rs.replicas()
    assert len(rows) == 2
    finished = sum(r["stats"]["finished"] for r in rows)
    line = next(x for x in text.splitlines() if x.startswith("adapterkit_") and "finished" in x and " " in x
                and not x.startswith("#"))
    assert finished > 0 and float(line.split()[-1]) >= finished - 2  # requests may finish in between


def test_killed_replica_is_replaced_and_survivors_answer(rs: RayServed) -> None:
    """Kill one replica while 8 clients send 40 requests; report and bound the failures."""
    results: list[str] = []
    messages: list[str] = []
    before = {r["replica"] for r in rs.replicas()}
    lock = threading.Lock()

    def client(i: int) -> None:
        c = rs.client()
        for j in range(5):
            try:
                c.completions.create(model=("alpha", "beta", rs.base)[(i + j) % 3], prompt="abc", max_tokens=16,
                                     temperature=0)
                out = "ok"
            except openai.APIStatusError as e:
                out = f"{e.status_code}:{(e.body or {}).get('type')}"
                with lock:
                    messages.append(str((e.body or {}).get("message"))[:300])
            except openai.APIError as e:
                out = type(e).__name__
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    serve.get_deployment_handle("EngineReplica", app_name=APP).crash.remote()  # one replica exits
    for t in threads:
        t.join(180)
    counts = Counter(results)
    print(f"\nreplica kill: {dict(counts)}; messages: {sorted(set(messages))}")
    assert len(results) == 40 and counts["ok"] >= 20, counts
    assert set(counts) <= {"ok", "503:server_error"}, counts  # OpenAI's shape, retryable
    assert all(m.startswith("The engine replica serving this request stopped") for m in messages), messages
    deadline = time.monotonic() + SETUP_S
    while True:  # a NEW replica reports, the dead one has left the board, Serve counts 2 running
        ids = {r["replica"] for r in rs.replicas()}
        if ids - before and len(ids) == 2 and _running_replicas() == 2:
            break
        assert time.monotonic() < deadline, (ids, before, serve.status())
        time.sleep(1)
    c = rs.client()
    for m in ("alpha", None):
        assert c.completions.create(model=m or rs.base, prompt="abc", max_tokens=8,
                                    temperature=0).choices[0].text == greedy(rs.engine, "abc", m, 8)


def test_bad_replica_count_is_a_config_error(tmp_path: Path) -> None:
    from adapterkit.errors import ConfigError
    from adapterkit.serve.ray import app_builder

    with pytest.raises(ConfigError, match="--replicas"):
        app_builder({"model": str(tmp_path), "adapter_root": f"{tmp_path},{tmp_path}", "max_loras": "4",
                     "replicas": "0"})


def test_host_tier_smaller_than_the_slots_is_a_config_error(tmp_path: Path) -> None:
    from adapterkit.errors import ConfigError
    from adapterkit.serve.ray import app_builder

    with pytest.raises(ConfigError, match="--max-cpu-loras.*4 device slots"):
        app_builder({"model": str(tmp_path), "adapter_root": str(tmp_path), "max_loras": "4", "max_cpu_loras": "2"})


def test_cli_has_the_ray_flags() -> None:
    from adapterkit.cli import build_parser

    args = build_parser().parse_args(["serve", "--ray", "--replicas", "3", "--replica-cpus", "0.5"])
    assert (args.ray, args.replicas, args.replica_cpus) == (True, 3, 0.5)
    assert build_parser().parse_args(["serve"]).ray is False
