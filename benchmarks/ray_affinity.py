"""Ray Serve, 2 engine replicas on this machine: adapter-affinity routing vs random routing.

    nice -n 10 .venv/bin/python benchmarks/ray_affinity.py                  # 1000 adapters, 400 requests
    nice -n 10 .venv/bin/python benchmarks/ray_affinity.py --requests 4000  # a longer trace
    nice -n 10 .venv/bin/python benchmarks/ray_affinity.py --host-loras 16  # no host tier (slots only)
    .venv/bin/python benchmarks/ray_affinity.py --requests 100 --adapters 100   # smoke run

One invocation runs the same trace twice through the real HTTP ingress of
`adapterkit.serve.ray`: once with multiplexed routing (each request carries its adapter as
``multiplexed_model_id``: Ray sends it to a replica that holds it in host memory) and once
without (any replica; each loads on demand into its own tiers). Each replica has ``--slots``
device slots (the engine's ``max_loras``) over a host tier of ``--host-loras`` adapters
(``--max-cpu-loras``, the ``@serve.multiplexed`` limit). Per policy it counts cold loads
(disk -> host), warm loads (host -> slot) and slot hits, summed over the replicas.

Trace: ``--adapters`` rank-8 LoRAs on q,k,v,o (one file each), power-law popularity
(P(rank i) ~ 1/i^alpha), ``--concurrency`` closed-loop clients, random prompts of 8-32 tokens,
16 output tokens (ignore_eos). Model: a random Llama (hidden 256, 4 layers, vocab 256).

Also printed, from the trace alone: the floor (distinct adapters: the first request of each is
a cold load under any routing), the cold loads random routing is expected to make with a host
tier that never evicts (an adapter requested k times is read by each of N replicas that gets
one of its requests: N (1 - (1 - 1/N)^k) expected), their ratio (the best affinity can do
against random when nothing is evicted; >= 1/N), and an LRU replay of both policies (the
holder, else the replica holding fewest adapters; uniform random) with the same tier sizes.
"""
from __future__ import annotations

import argparse
import random
from collections import Counter, OrderedDict
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_step import make_adapter  # noqa: E402

from adapterkit.formats import write_native  # noqa: E402

KEY = "bench"


def make_model_dir(path: Path) -> None:
    """A random 4-layer Llama and a byte-level word tokenizer (no downloads)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c for c in range(3, 256)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def make_adapters(model_dir: Path, root: Path, n: int) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    for i in range(n):
        ad = make_adapter(model, 8, seed=i)
        write_native(root / f"ad{i:04d}", "lora", ad.config, ad.tensors, {"architecture": "LlamaForCausalLM"})


def make_trace(n_req: int, n_adapters: int, alpha: float, seed: int) -> list[tuple[str, list[int]]]:
    rnd = random.Random(seed)
    weights = [1.0 / (i + 1) ** alpha for i in range(n_adapters)]
    names = rnd.choices([f"ad{i:04d}" for i in range(n_adapters)], weights=weights, k=n_req)
    return [(a, [rnd.randrange(3, 256) for _ in range(rnd.randint(8, 32))]) for a in names]


def expected_random_cold(names: list[str], replicas: int) -> float:
    """Cold loads uniform random routing makes in expectation when no host tier evicts."""
    return sum(replicas * (1 - (1 - 1 / replicas) ** k) for k in Counter(names).values())


def lru_replay(names: list[str], replicas: int, host: int, affinity: bool, seed: int = 1) -> int:
    """Cold loads of an LRU host tier of `host` adapters per replica under each policy."""
    rnd = random.Random(seed)
    tiers: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(replicas)]
    cold = 0
    for a in names:
        if affinity:  # Ray: a replica that holds it, else the one holding fewest models
            held = [i for i, t in enumerate(tiers) if a in t]
            i = held[0] if held else min(range(replicas), key=lambda j: len(tiers[j]))
        else:
            i = rnd.randrange(replicas)
        tier = tiers[i]
        if a in tier:
            tier.move_to_end(a)
            continue
        cold += 1
        tier[a] = None
        if len(tier) > host:
            tier.popitem(last=False)
    return cold


def run_trace(url: str, trace: list[tuple[str, list[int]]], concurrency: int) -> tuple[float, int, int]:
    """Closed loop: `concurrency` clients take requests in order. Returns (seconds, tokens, failures)."""
    it = iter(trace)
    lock = threading.Lock()
    tokens = [0]
    failures = [0]

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as h:
            while True:
                with lock:
                    item = next(it, None)
                if item is None:
                    return
                r = h.post("/v1/completions", json={"model": item[0], "prompt": item[1], "max_tokens": 16,
                                                    "temperature": 0, "ignore_eos": True})
                with lock:
                    if r.status_code == 200:
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        failures[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, tokens[0], failures[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    ap.add_argument("--slots", type=int, default=16, help="device adapter slots per replica (--max-loras)")
    ap.add_argument("--host-loras", type=int, default=None,
                    help="host-memory tier per replica (--max-cpu-loras; default: the server's, 1024)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray
    from ray import serve

    from adapterkit.cli import build_parser
    from adapterkit.serve.ray import DEFAULT_HOST_LORAS, build_ray_app

    tmp = Path(tempfile.mkdtemp(prefix="ray_affinity_"))
    model_dir, root = tmp / "model", tmp / "adapters"
    t0 = time.perf_counter()
    make_model_dir(model_dir)
    make_adapters(model_dir, root, args.adapters)
    trace = make_trace(args.requests, args.adapters, args.alpha, args.seed)
    host = DEFAULT_HOST_LORAS if args.host_loras is None else args.host_loras
    names = [a for a, _ in trace]
    distinct, exp_rand = len(set(names)), expected_random_cold(names, args.replicas)
    print(f"{args.adapters} adapters written in {time.perf_counter() - t0:.1f} s; {args.requests} requests, "
          f"{distinct} distinct adapters in the trace (the cold-load floor), {args.replicas} replicas x "
          f"{args.slots} slots x {host} in host memory, concurrency {args.concurrency}", flush=True)
    replay = {m: lru_replay(names, args.replicas, host, m == "affinity") for m in ("affinity", "random")}
    print(f"from the trace: random routing, nothing evicted: {exp_rand:.0f} cold loads expected; floor / that = "
          f"{distinct / exp_rand:.2f} (the lowest ratio when nothing is evicted); LRU replay: affinity "
          f"{replay['affinity']}, random {replay['random']} cold loads, "
          f"{replay['affinity'] / max(replay['random'], 1):.2f}x", flush=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cli = build_parser().parse_args(["serve", "--model", str(model_dir), "--adapter-root", str(root), "--api-key",
                                     KEY, "--max-loras", str(args.slots), "--max-cpu-loras", str(host),
                                     "--max-lora-rank", "8",
                                     "--max-model-len", "128", "--max-num-seqs", "32"])
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        for mode, mux in (("affinity", True), ("random", False)):
            name = f"bench-{mode}"
            serve.run(build_ray_app(cli, replicas=args.replicas, replica_cpus=args.cpus / args.replicas,
                                    multiplex=mux, app_name=name), name=name, route_prefix="/")
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as h:
                for _ in range(2 * args.replicas):  # warm-up on the base model (first-call allocations)
                    h.post("/v1/completions", json={"model": str(model_dir), "prompt": [5, 6, 7], "max_tokens": 4})
                secs, toks, fails = run_trace(url, trace, args.concurrency)
                time.sleep(1.5)  # one report period
                rows = h.get("/v1/replicas").json()["data"]
            cold, warm, hits = (sum(r[k] for r in rows) for k in ("cold_loads", "warm_loads", "slot_hits"))
            results[mode] = (cold, toks / secs)
            print(f"{mode:9s} cold (disk) {cold:5d} {[r['cold_loads'] for r in rows]}  warm (host->slot) {warm:5d}  "
                  f"slot hits {hits:5d}  host evictions {sum(r['evictions'] for r in rows):4d}  "
                  f"{toks / secs:6.1f} tok/s  {secs:6.1f} s  failures {fails}", flush=True)
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    (ca, ta), (cr, tr) = results["affinity"], results["random"]
    print(f"affinity / random: cold loads {ca / max(cr, 1):.2f}x (target <= 0.5x; {distinct / exp_rand:.2f}x is the "
          f"lowest possible with nothing evicted), throughput {ta / tr:.2f}x")


if __name__ == "__main__":
    main()
