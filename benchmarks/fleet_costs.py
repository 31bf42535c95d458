"""Measure the fleet simulator's cost model on the real engine, and validate the simulator.

    .venv/bin/python benchmarks/fleet_costs.py                  # measure -> benchmarks/results/fleet_costs.json
    .venv/bin/python benchmarks/fleet_costs.py --validate 1,2   # real engines vs the simulator on one trace

Model: SmolLM2-135M widths (hidden 576, 9 heads, vocab 49152, random weights, `_common.smol_llama`)
with `--layers` decoder layers (default 4, bf16), one torch thread per engine: one replica = one
core. The whole 30-layer model makes a validation run of a few hundred requests take many
minutes on this shared 2-core machine; what the simulator needs is the *shape* of the cost
(fixed per step, per token, per distinct adapter, per load) on the engine it predicts, and
the validation runs that same engine.

Measured: step time of `Engine.step()` (engine built with start=False, so the timer sees the
step alone) over a grid of (tokens in the batch, distinct adapters in the batch), fitted by
least squares to base + per_token * tokens + per_row * sampled rows + per_adapter * adapters
(prefill tokens skip the LM head, decode tokens do not: one per-token term mispredicts both); the load time of an
adapter into a slot from host memory and from disk (`SlotCache.load_times` /
`cold_load_times`, the engine's own timers).

Validation (`--validate`): N engines, one process each (spawned: no shared GIL; one torch
thread each), behind `_fleet.Router` -- the simulator's router code -- in this process, fed
the view Ray's multiplexing has: requests outstanding per replica (counted here from
submit/finish) and the adapters each replica holds resident in a slot or host memory (reported
by the replica with every finished request), replay a power-law trace in real time.
The same trace goes through `_fleet.simulate` with the measured costs; throughput and cold
loads are compared (target: within 15%).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from _common import smol_llama  # noqa: E402
from _fleet import Request, Router, power_law_trace, simulate  # noqa: E402
from decode_step import adapter_files  # noqa: E402
from fleet_sim import load_costs  # noqa: E402

from adapterkit.serve.engine import Engine  # noqa: E402
from adapterkit.serve.types import EngineConfig, GenerationRequest, SamplingParams  # noqa: E402

RESULTS = HERE / "results" / "fleet_costs.json"
RANKS = (8, 16, 32)


def build(layers: int, dtype: str):
    m = smol_llama(layers).eval().to(getattr(torch, dtype))
    m.generation_config.eos_token_id = None
    return m



def engine_config(args, slots: int | None = None, host: int | None = None) -> EngineConfig:
    return EngineConfig(max_loras=slots or args.slots, max_cpu_loras=host or args.host_cache,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                        max_lora_rank=32, pool_bytes=256 << 20, dtype=args.dtype)


def _req(prompt_len: int, out: int, adapter: str | None, seed: int) -> GenerationRequest:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (prompt_len,), generator=g).tolist()
    return GenerationRequest(prompt_token_ids=ids, adapter=adapter,
                             params=SamplingParams(temperature=0, max_tokens=out, ignore_eos=True))


def measure(args, model, files) -> dict:
    """Step-time grid and load times on one engine driven step by step."""
    eng = Engine(model, config=engine_config(args, host=len(files) * 4), start=False)
    for i in range(len(files)):
        eng.register_adapter(f"ad{i}", str(files[i]))
    sink = lambda c: None  # noqa: E731
    for plen in (16, 256):  # warm-up: first-call allocations are not part of the cost
        eng.generate_sync([[1] * plen], adapters=["ad0"], params=SamplingParams(temperature=0, max_tokens=4))
    rows = []  # (tokens, sampled rows, adapters, seconds)
    seed = 0
    for batch in (1, 4, 8, 16):
        for distinct in (1, 4, 8):
            if distinct > batch or distinct > args.slots:
                continue
            for plen in (16, 64 // batch, 256 // batch):  # prefill sizes; every run also gives decode steps
                for i in range(batch):
                    seed += 1
                    eng.submit(_req(plen, 6, f"ad{i % distinct}", seed), sink)
                eng.cache.prefetch([f"ad{i}" for i in range(distinct)])
                t = time.perf_counter()
                n = eng.step()  # prefill (may chunk): timed only if it loaded nothing and ran all prompts
                dt = time.perf_counter() - t
                if n == batch and plen * batch <= args.max_batched_tokens:
                    rows.append((plen * batch, batch, distinct, dt))
                while eng.scheduler.has_work():
                    t = time.perf_counter()
                    n = eng.step()
                    dt = time.perf_counter() - t
                    if n == batch:
                        rows.append((batch, batch, distinct, dt))
    import numpy as np

    cells: dict[tuple[int, int, int], list[float]] = {}
    for r in rows:  # fit the per-cell medians: robust to the other jobs on this machine
        cells.setdefault(r[:3], []).append(r[3])
    X = np.array([[1.0, *k] for k in cells])
    y = np.array([statistics.median(v) for v in cells.values()])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    # loads: cycle requests over more adapters than slots (host loads), then over more than the host cache (disk)
    eng.shutdown()
    loads = {}
    for kind, host in (("host", 64), ("disk", 1)):
        eng = Engine(model, config=engine_config(args, slots=2, host=host), start=False)
        for i in range(len(files)):
            eng.register_adapter(f"ad{i}", str(files[i]))
        for k in range(24):
            eng.generate_sync([_req(8, 1, None, 0).prompt_token_ids], adapters=[f"ad{k % len(files)}"],
                              params=SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        loads[kind] = eng.cache.cold_load_times if kind == "disk" else eng.cache.load_times
        eng.shutdown()
    base, per_tok, per_row, per_ad = (max(0.0, float(c)) for c in coef)
    return {"model": f"SmolLM2-135M widths, {args.layers} layers, random weights, {args.dtype}, 1 thread",
            "step_base_s": base, "step_per_token_s": per_tok, "step_per_row_s": per_row, "step_per_adapter_s": per_ad,
            "fit_rel_rmse": float(np.sqrt(np.mean(resid ** 2)) / np.mean(y)), "grid_points": len(rows),
            "grid": [list(r) for r in rows],
            "load_host_s": statistics.median(loads["host"]), "load_disk_s": statistics.median(loads["disk"]),
            "loads_measured": {k: len(v) for k, v in loads.items()},
            "slots": args.slots, "host_cache": args.host_cache, "max_num_seqs": args.max_num_seqs,
            "max_batched_tokens": args.max_batched_tokens}


def _measure_proc(args, files, q) -> None:
    torch.set_num_threads(1)
    q.put(measure(args, build(args.layers, args.dtype), files))


def _replica(idx: int, args, files: list[str], n_adapters: int, inbox, outbox) -> None:
    """One replica process: an engine serving what the router sends; reports back on `outbox`
    the first token and the finish of each request, with the adapters it now holds resident
    (slot or host memory) -- the view Ray's multiplexing gets from its replicas."""
    torch.set_num_threads(1)
    eng = Engine(build(args.layers, args.dtype), config=engine_config(args))
    for a in range(n_adapters):
        eng.register_adapter(f"ad{a}", files[a % len(files)])
    eng.generate_sync([[1] * 8], adapters=["ad0"], params=SamplingParams(temperature=0, max_tokens=2))  # warm-up
    disk0, slot0 = len(eng.cache.cold_load_times), eng.cache.misses
    timing = {"busy": 0.0, "steps": 0}
    step = eng.scheduler.step

    def timed_step() -> int:  # wall time inside steps, to compare with the cost model's
        t = time.perf_counter()
        n = step()
        timing["busy"] += time.perf_counter() - t
        timing["steps"] += 1
        return n

    eng.scheduler.step = timed_step  # type: ignore[method-assign]

    def resident() -> list[int]:
        names = set(eng.cache.slot_of) | {n for n, ad in eng.store._adapters.items() if ad.weights is not None}
        return [int(n[2:]) for n in names]

    outbox.put(("ready", idx, resident()))
    while True:
        msg = inbox.get()
        if msg is None:
            break
        rid, adapter, prompt, out = msg
        state = {"first": False}

        def sink(c, rid=rid, state=state):
            now = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
            if c.token_ids and not state["first"]:
                state["first"] = True
                outbox.put(("first", rid, now))
            if c.finished:
                outbox.put(("done", idx, rid, now, c.usage.completion_tokens, resident()))

        eng.submit(GenerationRequest(prompt_token_ids=[(rid * 7919 + k) % 49152 for k in range(prompt)],
                                     adapter=f"ad{adapter}",
                                     params=SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)), sink)
    outbox.put(("counts", idx, len(eng.cache.cold_load_times) - disk0, eng.cache.misses - slot0, timing["busy"],
                timing["steps"]))
    eng.shutdown()


def run_real(args, files: list[Path], trace: list[Request], n: int, n_adapters: int) -> dict:
    """Replay `trace` in real time through n engine processes behind the simulator's router."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter per replica: no shared GIL, no forked torch threads
    outbox = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(n)]
    procs = [ctx.Process(target=_replica, args=(i, args, [str(f) for f in files], n_adapters, inboxes[i], outbox))
             for i in range(n)]
    for p in procs:
        p.start()
    holders: list[set[int]] = [set() for _ in range(n)]
    for _ in range(n):
        _, i, res = outbox.get()
        holders[i] = set(res)
    router = Router(args.policy, n, seed=0, max_ongoing=args.max_num_seqs)
    loads = [0] * n
    lock = threading.Lock()
    submitted: dict[int, float] = {}
    first: dict[int, float] = {}
    got = {"tokens": 0, "last": 0.0, "left": len(trace)}
    done = threading.Event()

    def collect() -> None:  # the router's view, updated from the replicas' reports
        while got["left"]:
            m = outbox.get()
            with lock:
                if m[0] == "first":
                    first[m[1]] = m[2]
                else:
                    _, i, rid, now, ntok, res = m
                    loads[i] -= 1
                    holders[i] = set(res)
                    got["tokens"] += ntok
                    got["last"] = max(got["last"], now)
                    got["left"] -= 1
        done.set()

    threading.Thread(target=collect, daemon=True).start()
    t0 = time.perf_counter()
    for r in trace:
        delay = t0 + r.t - trace[0].t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with lock:
            i = router.choose(r.adapter, loads, [j for j in range(n) if r.adapter in holders[j]])
            loads[i] += 1
            submitted[r.rid] = time.perf_counter()
        inboxes[i].put((r.rid, r.adapter, r.prompt, r.out))
    done.wait()
    for q in inboxes:
        q.put(None)
    disk = slot = steps = 0
    busy = 0.0
    for _ in range(n):
        _, _, d, s_, b, k = outbox.get()
        disk, slot, busy, steps = disk + d, slot + s_, busy + b, steps + k
    for p in procs:
        p.join()
    ttft = sorted(first[k] - submitted[k] for k in first)
    span = got["last"] - t0
    return {"tok_s": got["tokens"] / span, "disk_loads": disk, "slot_loads": slot, "span": span,
            "step_ms": 1e3 * busy / max(1, steps), "tok_per_step": got["tokens"] / max(1, steps),
            "ttft99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--host-cache", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-batched-tokens", type=int, default=256)
    ap.add_argument("--validate", default="", help="comma list of replica counts, e.g. 1,2")
    ap.add_argument("--adapters", type=int, default=200, help="validation: registered adapters")
    ap.add_argument("--requests", type=int, default=120, help="validation: requests per replica")
    ap.add_argument("--rate", type=float, default=0.0, help="validation: arrivals/s per replica (0: 1.5x the "
                    "simulated 1-replica capacity, so queues form and throughput is the engine's)")
    ap.add_argument("--policy", default="affinity")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--costs", default=str(RESULTS), help="cost-model JSON to write (measure) or read (validate)")
    ap.add_argument("--procs", type=int, default=1, help="measure: this many engine processes at once")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = build(args.layers, args.dtype)
    files = adapter_files(model, args.files, Path(tempfile.mkdtemp(prefix="adapterkit-fleet-")), RANKS)
    if not args.validate:
        if args.procs == 1:
            d = measure(args, model, files)
        else:  # K measuring processes at once: the cost of one replica when K share this machine
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            ps = [ctx.Process(target=_measure_proc, args=(args, files, q)) for _ in range(args.procs)]
            for p in ps:
                p.start()
            ds = [q.get() for _ in ps]
            for p in ps:
                p.join()
            d = dict(ds[0])
            for k in ("step_base_s", "step_per_token_s", "step_per_row_s", "step_per_adapter_s", "load_host_s",
                      "load_disk_s", "fit_rel_rmse"):
                d[k] = statistics.mean(x[k] for x in ds)
            d["model"] += f", {args.procs} measuring processes at once (mean of their fits)"
            d["grid"] = [g for x in ds for g in x["grid"]]
        out = Path(args.costs)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(d, indent=1) + "\n")
        print(json.dumps({k: v for k, v in d.items() if k != "grid"}, indent=1))
        return
    cost = load_costs(args.costs)
    rate = args.rate
    if rate <= 0:  # capacity of one simulated replica: everything arrives at once
        burst = power_law_trace(args.requests, args.adapters, 1e6, seed=7)
        rate = 1.5 * len(burst) / simulate(burst, 1, cost, "random", preload=range(args.adapters)).makespan
    print(f"validation: {args.adapters} adapters, {args.requests} requests/replica, Poisson {rate:.1f}/s per "
          f"replica, policy {args.policy}, {cost}")
    for n in (int(x) for x in args.validate.split(",")):
        trace = power_law_trace(args.requests * n, args.adapters, rate * n, seed=n)
        sim = simulate(trace, n, cost, args.policy, preload=range(args.adapters))
        sim_step = 1e3 * sum(r.busy_s for r in sim.replicas) / max(1, sum(r.steps for r in sim.replicas))
        for rep in range(args.repeats):
            real = run_real(args, files, trace, n, args.adapters)
            print(f"  N={n} run {rep}: real {real['tok_s']:.1f} tok/s, disk loads {real['disk_loads']}, slot loads "
                  f"{real['slot_loads']}, TTFT p99 {real['ttft99']:.2f} s | sim {sim.tok_s:.1f} tok/s, disk loads "
                  f"{sim.disk_loads}, slot loads {sim.slot_loads}, TTFT p99 {sim.ttft(0.99):.2f} s | sim/real "
                  f"throughput {sim.tok_s / real['tok_s']:.2f}, disk loads "
                  f"{sim.disk_loads / max(1, real['disk_loads']):.2f}, slot loads "
                  f"{sim.slot_loads / max(1, real['slot_loads']):.2f} | mean step real {real['step_ms']:.1f} ms, "
                  f"sim {sim_step:.1f} ms | tokens/step real {real['tok_per_step']:.2f}, sim "
                  f"{sim.tokens / max(1, sum(r.steps for r in sim.replicas)):.2f}", flush=True)
            # the same model with every time cost scaled by the slowdown the replicas saw in this run
            # (other jobs on the machine): separates the scheduling / routing model from the numbers
            k = real["step_ms"] / sim_step
            slow = cost
            for name in ("step_base_s", "step_per_token_s", "step_per_row_s", "step_per_adapter_s", "load_disk_s",
                         "load_host_s"):
                slow = slow.scaled(name, k)
            cal = simulate(trace, n, slow, args.policy, preload=range(args.adapters))
            print(f"    costs x {k:.2f} (this run's slowdown): sim {cal.tok_s:.1f} tok/s = "
                  f"{cal.tok_s / real['tok_s']:.2f}x real, TTFT p99 {cal.ttft(0.99):.2f} s", flush=True)


if __name__ == "__main__":
    main()
