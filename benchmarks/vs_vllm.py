"""adapterkit's server side by side with vLLM's CPU build: same HF model directory, same 100
PEFT LoRA adapters (rank 8/16/32 on q,k,v,o), same client, the two servers alternated in one run.

Cases (all ``/v1/completions``, streamed, ``ignore_eos``):
  * burst-base:     48 concurrent requests on the base model (32 tokens out);
  * burst-distinct: 48 concurrent requests over 48 distinct adapters;
  * trace:          64 requests arriving as a Poisson process, adapters drawn with power-law
                    popularity over all 100, prompt and output lengths U[8, 64] tokens.
For each: output tok/s, TTFT and per-token latency (TPOT = (last - first token) / (n - 1) per
request) p50/p99, and the ratio adapterkit / vLLM. Then greedy text equality on 16 prompts for
a few adapters (meaningful in float32).

    # vLLM's CPU build in its own venv (docs/benchmarks.md has the exact install)
    .venv/bin/python benchmarks/vs_vllm.py --dtype float32          # starts both servers
    .venv/bin/python benchmarks/vs_vllm.py --vllm-url http://127.0.0.1:8001 --adapterkit-url ...
    .venv/bin/python benchmarks/vs_vllm.py --prepare-only            # write the model dir + adapters

Servers it starts are given the same base name (``base``) and adapter names (``a000``..``a099``);
servers given by URL must use those names too.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANKS = (8, 16, 32)
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, salt and cloth. Over the centuries it grew into a market town, then a port, and finally the "
        "capital of a province known for its libraries, its bridges and its long winters. Write a short story "
        "about a clockmaker who discovers that every clock in town has stopped at the same minute. Explain in "
        "simple terms how photosynthesis turns light into chemical energy, and why leaves change colour.")


# ----------------------------------------------------------------------------- inputs
def prepare(work: Path, n_adapters: int) -> tuple[Path, Path]:
    """The default model's HF directory (copied into `work`) and `n_adapters` PEFT LoRA
    adapters ``work/adapters/a000``.. of ranks cycling 8/16/32 on q,k,v,o with seeded random A
    and B (B non-zero, so every adapter changes the output). Reused when already there."""
    from adapterkit.models.default import default_model_path

    model_dir, root = work / "model", work / "adapters"
    if not (model_dir / "config.json").is_file():
        src = default_model_path()
        tmp = work / ".model-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tmp.rename(model_dir)
    names = [f"a{i:03d}" for i in range(n_adapters)]
    if all((root / n / "adapter_model.safetensors").is_file() for n in names):
        return model_dir, root
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for r in RANKS:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))
        for i, n in enumerate(names):
            if RANKS[i % len(RANKS)] != r or (root / n / "adapter_model.safetensors").is_file():
                continue
            g = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for pname, p in pm.named_parameters():
                    if "lora_A" in pname:
                        p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                    elif "lora_B" in pname:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            tmp = root / f".{n}-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            pm.save_pretrained(tmp)
            tmp.rename(root / n)
    return model_dir, root


def prompt_pool(model_dir: Path) -> list[int]:
    """Token ids of a fixed English passage: prompts are slices of it (both servers get ids)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).encode(TEXT)


# ----------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server process (own process group, output to `log`), at `nice -n 5`."""
    fh = open(log, "w")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(["nice", "-n", "5", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready:\n{tail}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def adapterkit_cmd(a: argparse.Namespace, model_dir: Path, root: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "adapterkit.cli", "serve", "--model", str(model_dir), "--served-model-name", "base",
            "--adapter-root", str(root), "--max-loras", str(a.max_loras), "--max-lora-rank", "32",
            "--max-num-seqs", "64", "--max-model-len", "2048", "--dtype", a.dtype, "--port", str(port),
            "--pool-gib", a.vllm_kv_gib, "--log-level", "warning"]  # the same memory as vLLM's KV cache


def vllm_cmd(a: argparse.Namespace, model_dir: Path, root: Path, port: int) -> list[str]:
    mods = [f"{p.name}={p}" for p in sorted(root.iterdir()) if p.name.startswith("a")]
    return [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "base", "--enable-lora", "--max-loras", str(a.max_loras),
            "--max-lora-rank", "32", "--max-cpu-loras", str(len(mods)), "--lora-modules", *mods,
            "--max-num-seqs", "64", "--max-model-len", "2048", "--dtype", a.dtype, "--port", str(port),
            "--host", "127.0.0.1", "--uvicorn-log-level", "warning"]


# ----------------------------------------------------------------------------- client
@dataclass
class Result:
    ttft: float = 0.0
    tpot: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None


@dataclass
class Summary:
    tok_s: float
    ttft: tuple[float, float]  # p50, p99 (s)
    tpot: tuple[float, float]
    errors: int
    extra: dict[str, float] = field(default_factory=dict)


async def complete(h, url: str, model: str, prompt: list[int], max_tokens: int, delay: float = 0.0) -> Result:
    """One streamed greedy completion; times from when it is sent (after `delay`)."""
    await asyncio.sleep(delay)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    res = Result()
    try:
        async with h.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Result(error=f"{r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return Result(error=str(ev["error"])[:300])
                for ch in ev.get("choices", []):  # a chunk = tokens out (text may be held back)
                    last = time.perf_counter()
                    first = first or last
                    res.text += ch.get("text") or ""
                if ev.get("usage"):
                    res.tokens = ev["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - reported per request
        return Result(error=f"{type(exc).__name__}: {exc}")
    if first is None:
        return Result(error="no tokens")
    res.ttft = first - t0
    res.tpot = (last - first) / (res.tokens - 1) if res.tokens > 1 else None
    return res


async def run_case(url: str, reqs: list[tuple[float, str, list[int], int]],
                   api_key: str | None = None) -> tuple[Summary, list[Result]]:
    """Send `reqs` (arrival s, model, prompt ids, max tokens) and summarise."""
    import httpx

    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=len(reqs) + 4)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits, headers=headers) as h:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(complete(h, url, m, p, n, d) for d, m, p, n in reqs))
        wall = time.perf_counter() - t0
    ok = [r for r in res if r.error is None]
    pct = lambda xs, q: statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (  # noqa: E731
        xs[0] if xs else float("nan"))
    ttfts = [r.ttft for r in ok]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    return Summary(sum(r.tokens for r in ok) / wall, (pct(ttfts, 50), pct(ttfts, 99)),
                   (pct(tpots, 50), pct(tpots, 99)), len(res) - len(ok), {"wall": wall}), res


def cases(a: argparse.Namespace, pool: list[int]) -> dict[str, list[tuple[float, str, list[int], int]]]:
    """The three workloads, fixed by the seed (the same requests for both servers)."""
    rng = random.Random(a.seed)

    def prompt(n: int) -> list[int]:
        s = rng.randrange(0, len(pool) - n)
        return pool[s:s + n]

    C, names = a.concurrency, [f"a{i:03d}" for i in range(a.adapters)]
    out = {"burst-base": [(0.0, "base", prompt(a.burst_prompt), a.max_tokens) for _ in range(C)],
           "burst-distinct": [(0.0, names[i % len(names)], prompt(a.burst_prompt), a.max_tokens) for i in range(C)]}
    weights = [1.0 / (i + 1) ** a.zipf for i in range(len(names))]
    t, trace = 0.0, []
    for _ in range(a.trace_requests):
        t += rng.expovariate(a.rate)
        trace.append((t, rng.choices(names, weights)[0], prompt(rng.randint(8, 64)), rng.randint(8, 64)))
    out["trace"] = trace
    return out


def fmt(s: Summary) -> str:
    return (f"{s.tok_s:7.1f} tok/s  TTFT p50 {s.ttft[0] * 1e3:7.0f} p99 {s.ttft[1] * 1e3:7.0f} ms  "
            f"TPOT p50 {s.tpot[0] * 1e3:6.1f} p99 {s.tpot[1] * 1e3:6.1f} ms  wall {s.extra['wall']:5.1f} s"
            + (f"  ERRORS {s.errors}" if s.errors else ""))


async def equality(urls: dict[str, str], a: argparse.Namespace, pool: list[int]) -> None:
    """Greedy texts of both servers on `a.eq_prompts` prompts for `a.eq_adapters` adapters."""
    rng = random.Random(a.seed + 1)
    prompts = []
    for _ in range(a.eq_prompts):
        n = rng.randint(8, 32)
        s = rng.randrange(0, len(pool) - n)
        prompts.append(pool[s:s + n])
    models = ["base"] + [f"a{i:03d}" for i in range(0, a.adapters, max(1, a.adapters // a.eq_adapters))][:a.eq_adapters]
    print(f"\ngreedy text equality ({a.dtype}, {a.eq_prompts} prompts x {a.max_tokens} tokens):")
    for m in models:
        reqs = [(0.0, m, p, a.max_tokens) for p in prompts]
        got = {k: (await run_case(u, reqs))[1] for k, u in urls.items()}
        same = sum(x.text == y.text and x.error is None for x, y in zip(*got.values()))
        first_diff = next((i for i, (x, y) in enumerate(zip(*got.values())) if x.text != y.text), None)
        note = "" if first_diff is None else f"  (first difference: prompt {first_diff}: " + " vs ".join(
            repr(g[first_diff].text[:60]) for g in got.values()) + ")"
        print(f"  {m}: {same}/{len(prompts)} equal{note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/adapterkit-vs-vllm"), help="model dir + adapters")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--vllm-url", help="a running vLLM server (else one is started)")
    ap.add_argument("--adapterkit-url", help="a running adapterkit server (else one is started)")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--vllm-kv-gib", default="2", help="GiB of KV memory: VLLM_CPU_KVCACHE_SPACE for the vLLM it starts, --pool-gib for adapterkit")
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--max-loras", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--burst-prompt", type=int, default=16, help="prompt tokens of the burst requests")
    ap.add_argument("--trace-requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2.0, help="trace arrivals per second")
    ap.add_argument("--zipf", type=float, default=1.0, help="power-law exponent of adapter popularity")
    ap.add_argument("--rounds", type=int, default=1, help="each case run this many times per server, alternating")
    ap.add_argument("--only", nargs="*", default=None, help="cases to run (default all)")
    ap.add_argument("--pause", type=float, default=3.0,
                    help="seconds of quiet before each measured run (the previous server's work has drained)")
    ap.add_argument("--eq-adapters", type=int, default=3)
    ap.add_argument("--eq-prompts", type=int, default=16)
    ap.add_argument("--no-equality", action="store_true")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model_dir, root = prepare(a.work, a.adapters)
    print(f"model dir {model_dir}; {a.adapters} PEFT adapters (ranks {RANKS}, {','.join(TARGETS)}) in {root}")
    if a.prepare_only:
        return
    pool = prompt_pool(model_dir)
    with ExitStack() as stack:
        urls: dict[str, str] = {}
        for name, given, cmd, env in (
                ("adapterkit", a.adapterkit_url, adapterkit_cmd, {}),
                # loopback only: vLLM would otherwise bind its engine queues to the host's address
                ("vllm", a.vllm_url, vllm_cmd, {"VLLM_CPU_KVCACHE_SPACE": a.vllm_kv_gib,
                                                 "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_HOST_IP": "127.0.0.1",
                                                 "VLLM_LOOPBACK_IP": "127.0.0.1"})):
            if given:
                urls[name] = given.rstrip("/")
                wait_ready(urls[name], None, None, 60)
                continue
            port = free_port()
            log = a.work / f"{name}-{a.dtype}.log"
            argv = cmd(a, model_dir, root, port)
            print(f"starting {name}: {' '.join(argv[:12])} ... (log {log})", flush=True)
            t0 = time.perf_counter()
            proc = start(argv, log, env)
            stack.callback(stop, proc)
            urls[name] = f"http://127.0.0.1:{port}"
            wait_ready(urls[name], proc, log, a.startup_timeout)
            print(f"  {name} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        work = cases(a, pool)
        # warm-up: one small request per server on the base and on an adapter
        for u in urls.values():
            asyncio.run(run_case(u, [(0.0, "base", pool[:8], 4), (0.0, "a000", pool[:8], 4)]))
        print(f"\n{a.dtype}; burst: {a.concurrency} concurrent x {a.burst_prompt} prompt -> {a.max_tokens} tokens; "
              f"trace: {a.trace_requests} requests, Poisson {a.rate}/s, zipf {a.zipf} over {a.adapters} adapters, "
              f"prompt/output U[8,64]")
        results: dict[str, dict[str, list[Summary]]] = {c: {k: [] for k in urls} for c in work}
        order = list(urls)
        for rnd in range(a.rounds):
            for c, reqs in work.items():
                if a.only and c not in a.only:
                    continue
                for k in order:  # alternate which server goes first, so both see the same drift
                    time.sleep(a.pause)
                    s, res = asyncio.run(run_case(urls[k], reqs))
                    results[c][k].append(s)
                    bad = next((r.error for r in res if r.error), None)
                    print(f"  [{rnd}] {c:15s} {k:10s} {fmt(s)}" + (f"  first error: {bad}" if bad else ""),
                          flush=True)
                order.reverse()
        print("\nbest of rounds (tok/s) and ratios adapterkit / vLLM:")
        for c, by in results.items():
            if not all(by.values()):
                continue
            best = {k: max(by[k], key=lambda s: s.tok_s) for k in by}
            if "adapterkit" in best and "vllm" in best:
                ak, vl = best["adapterkit"], best["vllm"]
                print(f"  {c:15s} adapterkit {ak.tok_s:7.1f}  vLLM {vl.tok_s:7.1f}  tok/s ratio {ak.tok_s / vl.tok_s:5.2f}x"
                      f"  TTFT p50 ratio {vl.ttft[0] / ak.ttft[0]:5.2f}x faster  TPOT p50 ratio "
                      f"{vl.tpot[0] / ak.tpot[0]:5.2f}x faster")
        if not a.no_equality and len(urls) == 2:
            asyncio.run(equality(urls, a, pool))


if __name__ == "__main__":
    main()
