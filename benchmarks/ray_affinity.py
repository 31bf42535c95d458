"""Ray Serve, 2 engine replicas on this machine: adapter-affinity routing vs random routing.

    .venv/bin/python benchmarks/ray_affinity.py                      # 1000 adapters, 400 requests
    .venv/bin/python benchmarks/ray_affinity.py --requests 100 --adapters 100   # smoke run

One invocation runs the same trace twice through the real HTTP ingress of
`adapterkit.serve.ray`: once with multiplexed routing (each request carries its adapter as
``multiplexed_model_id``: Ray sends it to a replica that holds it) and once without (any
replica; each loads on demand into its own LRU). Each replica keeps ``--slots`` adapters
(``@serve.multiplexed`` limit = the engine's ``max_loras``); every other one is a cold load
from disk. Trace: ``--adapters`` rank-8 LoRAs on q,k,v,o (one file each), power-law popularity
(P(rank i) ~ 1/i^alpha), ``--concurrency`` closed-loop clients, random prompts of 8-32 tokens,
16 output tokens (ignore_eos). Model: a random Llama (hidden 256, 4 layers, vocab 256). Prints
cold loads and generated tok/s for both, the ratios, and the floor: the distinct adapters in
the trace (the first request of each is a cold load under any routing).
"""
from __future__ import annotations

import argparse
import random
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
    ap.add_argument("--slots", type=int, default=16, help="adapters resident per replica")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray
    from ray import serve

    from adapterkit.cli import build_parser
    from adapterkit.serve.ray import build_ray_app

    tmp = Path(tempfile.mkdtemp(prefix="ray_affinity_"))
    model_dir, root = tmp / "model", tmp / "adapters"
    t0 = time.perf_counter()
    make_model_dir(model_dir)
    make_adapters(model_dir, root, args.adapters)
    trace = make_trace(args.requests, args.adapters, args.alpha, args.seed)
    print(f"{args.adapters} adapters written in {time.perf_counter() - t0:.1f} s; {args.requests} requests, "
          f"{len({a for a, _ in trace})} distinct adapters in the trace (the cold-load floor), "
          f"{args.replicas} replicas x {args.slots} slots, concurrency {args.concurrency}", flush=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cli = build_parser().parse_args(["serve", "--model", str(model_dir), "--adapter-root", str(root), "--api-key",
                                     KEY, "--max-loras", str(args.slots), "--max-lora-rank", "8",
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
            cold = sum(r["cold_loads"] for r in rows)
            results[mode] = (cold, toks / secs)
            print(f"{mode:9s} cold loads {cold:5d} (per replica {[r['cold_loads'] for r in rows]})  "
                  f"{toks / secs:7.1f} tok/s  {secs:6.1f} s  failures {fails}", flush=True)
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    (ca, ta), (cr, tr) = results["affinity"], results["random"]
    print(f"affinity / random: cold loads {ca / max(cr, 1):.2f}x (target <= 0.5x), throughput {ta / tr:.2f}x")


if __name__ == "__main__":
    main()
