"""Fleet simulator: N replicas of the serving engine behind a router, many adapters, driven by
the cost model measured on the real engine (`fleet_costs.py` -> benchmarks/results/fleet_costs.json).

    .venv/bin/python benchmarks/fleet_sim.py                                  # 8 / 64 / 512 replicas, 100,000 adapters
    .venv/bin/python benchmarks/fleet_sim.py --replicas 8 --requests-per-replica 30   # quick
    .venv/bin/python benchmarks/fleet_sim.py --sensitivity --replicas 64      # +-20% on each cost input

Workload: `--adapters` adapters, power-law popularity (alpha 1), Poisson arrivals at
`--load` x the simulated capacity of one replica, times N, for latency and loads, and at
`--overload` x capacity for throughput (queues never empty, so tokens/s is what the replicas
sustain, not the offered load); prompt and output lengths uniform in [8, 64].
Policies: random, least_loaded, affinity (Ray Serve multiplexing: a replica that already holds
the adapter, least-loaded among those, unless all are at max_ongoing), chash_bounded
(consistent hashing with bounded load, eps 0.25). For each N and policy: generated tokens/s
per replica (from the first to the last arrival) and its ratio to the 1-replica figure (same
per-replica rate, same policy; target within 10% under affinity), TTFT p50 / p99, disk and
slot loads per request.
The simulator core is `benchmarks/_fleet.py`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _fleet import POLICIES, CostModel, SimResult, power_law_trace, simulate  # noqa: E402

SENSITIVE = ("step_base_s", "step_per_token_s", "step_per_row_s", "step_per_adapter_s", "load_disk_s", "load_host_s",
             "slots", "host_cache", "max_num_seqs", "max_batched_tokens")


def load_costs(path: str | Path) -> CostModel:
    """The CostModel in a `fleet_costs.py` JSON.

    Raises:
        FileNotFoundError: no such file (run fleet_costs.py first).
        KeyError: a field is missing.
    """
    d = json.loads(Path(path).read_text())
    return CostModel(d["step_base_s"], d["step_per_token_s"], d["step_per_row_s"], d["step_per_adapter_s"],
                     d["load_disk_s"], d["load_host_s"], d["slots"], d["host_cache"], d["max_num_seqs"],
                     d["max_batched_tokens"])


def capacity(cost: CostModel, n_adapters: int, n_req: int = 400, seed: int = 0) -> float:
    """Requests/s one replica sustains on this workload: everything queued at once."""
    trace = power_law_trace(n_req, n_adapters, 1e6, seed=seed)
    return n_req / simulate(trace, 1, cost, "random", preload=_preload(cost, n_adapters)).makespan


def _preload(cost: CostModel, n_adapters: int) -> range:
    # registering 0..n-1 in order leaves the last host_cache of them in host memory
    return range(max(0, n_adapters - cost.host_cache), n_adapters)


def run(cost: CostModel, n: int, policy: str, n_adapters: int, per_replica: int, rate: float, seed: int) -> SimResult:
    trace = power_law_trace(per_replica * n, n_adapters, rate * n, seed=seed)
    return simulate(trace, n, cost, policy, seed=seed, preload=_preload(cost, n_adapters))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--costs", default=str(HERE / "results" / "fleet_costs.json"))
    ap.add_argument("--replicas", default="8,64,512")
    ap.add_argument("--adapters", type=int, default=100_000)
    ap.add_argument("--requests-per-replica", type=int, default=100)
    ap.add_argument("--load", type=float, default=0.7, help="arrival rate per replica / one replica's capacity")
    ap.add_argument("--overload", type=float, default=1.5, help="arrival rate for the throughput runs, x capacity")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sensitivity", action="store_true", help="perturb each cost input by +-20% (affinity)")
    args = ap.parse_args()
    cost = load_costs(args.costs)
    sizes = [int(x) for x in args.replicas.split(",")]
    policies = args.policies.split(",")
    cap = capacity(cost, args.adapters)
    rate = args.load * cap
    print(f"{args.adapters} adapters, {args.requests_per_replica} requests/replica, Poisson {rate:.1f} req/s per "
          f"replica ({args.load:.0%} of one replica's simulated capacity {cap:.1f} req/s)\n{cost}")
    over = args.overload * cap
    if args.sensitivity:  # arrival rates stay those of the measured model; one input moves at a time
        n = sizes[0]

        def pair(c: CostModel) -> tuple[float, float]:
            tp = run(c, n, "affinity", args.adapters, args.requests_per_replica, over, args.seed)
            lat = run(c, n, "affinity", args.adapters, args.requests_per_replica, rate, args.seed)
            return tp.tok_s_while_arriving() / n, lat.ttft(0.99)

        base = pair(cost)
        print(f"sensitivity at N={n}, affinity: baseline {base[0]:.1f} tok/s/replica (saturated), TTFT p99 "
              f"{base[1]:.3f} s (at {args.load:.0%})")
        rows = []
        for name in SENSITIVE:
            got = [pair(cost.scaled(name, f)) for f in (0.8, 1.2)]
            rel = [(g[0] / base[0] - 1, g[1] / base[1] - 1) for g in got]
            rows.append((max(abs(x) for r in rel for x in r), name, rel))
        for _, name, rel in sorted(rows, reverse=True):
            print(f"  {name:20s} -20%: tok/s {rel[0][0]:+6.1%} TTFT p99 {rel[0][1]:+7.1%} | "
                  f"+20%: tok/s {rel[1][0]:+6.1%} TTFT p99 {rel[1][1]:+7.1%}", flush=True)
        return

    def both(n: int, p: str) -> tuple[SimResult, SimResult]:
        return (run(cost, n, p, args.adapters, args.requests_per_replica, over, args.seed),
                run(cost, n, p, args.adapters, args.requests_per_replica, rate, args.seed))

    one = {p: both(1, p) for p in policies}
    print(f"tok/s/replica: arrivals at {args.overload:.0%} of capacity (saturated: the replicas' own rate), tokens "
          f"generated from the first to the last arrival; the rest at {args.load:.0%}")
    print(f"{'N':>5} {'policy':14s} {'tok/s/replica':>13} {'vs N=1':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'disk loads/req':>14} {'slot loads/req':>14} {'sim s':>6}")
    for n in [1] + sizes:
        for p in policies:
            t = time.perf_counter()
            tp, lat = one[p] if n == 1 else both(n, p)
            tps = tp.tok_s_while_arriving() / n
            print(f"{n:5d} {p:14s} {tps:13.1f} {tps / one[p][0].tok_s_while_arriving():7.2f} {lat.ttft(0.5):9.3f} "
                  f"{lat.ttft(0.99):9.3f} {lat.disk_loads / len(lat.requests):14.2f} "
                  f"{lat.slot_loads / len(lat.requests):14.2f} {time.perf_counter() - t:6.1f}", flush=True)

if __name__ == "__main__":
    main()
