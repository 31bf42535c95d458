"""Scaled-down S-LoRA workload: many registered adapters (ranks 8/16/32 on q,k,v,o), power-law
popularity (alpha=1), Poisson arrivals, prompt and output lengths uniform in [8, 64].

    .venv/bin/python benchmarks/trace.py                              # 1000 adapters, vs base and PEFT
    .venv/bin/python benchmarks/trace.py --adapters 10,100,1000,10000 # scaling mode
    .venv/bin/python benchmarks/trace.py --small                      # tiny model smoke run
    .venv/bin/python benchmarks/trace.py --device cuda                # on a GPU (Triton kernels)

Default model: SmolLM2-135M shapes (30 layers, random weights), `--dtype bfloat16` for both the
engine and the HF baseline (this CPU has AMX bf16 matmul units; `--dtype float32` for fp32). Adapter files: `--files` distinct native adapter dirs on disk; adapter i is
registered from file i % files (each registration reads and validates its file). The engine
keeps `--host-cache` adapters in host memory; others are re-read from disk on use (cold loads).
Reports throughput (generated tok/s), TTFT p50/p99, per-token latency p50/p99, and ratios vs
the same engine with the base model only (target >= 0.7x) and vs HF generate + PEFT
`adapter_names` on static batches of the same requests (target >= 4x); scaling mode reports
throughput relative to the first size (target within 15%), host RSS, cold-load latency.
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from decode_step import TARGETS, adapter_files  # noqa: E402

from adapterkit.serve.engine import Engine  # noqa: E402
from adapterkit.serve.types import EngineConfig, GenerationRequest, SamplingParams  # noqa: E402

RANKS = (8, 16, 32)


def build_model(layers: int, small: bool, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if small:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256)
    else:
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval().to(dtype)
    m.generation_config.eos_token_id = None
    return m



def make_trace(n_req: int, n_adapters: int, rate: float, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(n_adapters)]  # power law, alpha = 1
    t, reqs = 0.0, []
    for _ in range(n_req):
        t += rng.expovariate(rate)
        reqs.append({"t": t, "adapter": rng.choices(range(n_adapters), weights)[0],
                     "prompt": [rng.randrange(vocab) for _ in range(rng.randint(8, 64))], "out": rng.randint(8, 64)})
    return reqs


def run_engine(eng: Engine, trace: list[dict], use_adapters: bool) -> dict:
    """Replay arrivals in real time against the engine's background loop."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    ntok: dict[str, int] = {}
    submit_t: dict[str, float] = {}
    done = threading.Event()
    left = [len(trace)]
    lock = threading.Lock()

    def sink(c):
        now = time.perf_counter()
        with lock:
            if c.token_ids and c.request_id not in first:
                first[c.request_id] = now
            last[c.request_id] = now
            ntok[c.request_id] = ntok.get(c.request_id, 0) + len(c.token_ids)
            if c.finished:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    t0 = time.perf_counter()
    for r in trace:
        delay = t0 + r["t"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        req = GenerationRequest(prompt_token_ids=r["prompt"], adapter=f"ad{r['adapter']}" if use_adapters else None,
                                params=SamplingParams(temperature=0, max_tokens=r["out"], ignore_eos=True))
        submit_t[req.request_id] = time.perf_counter()
        eng.submit(req, sink)
    done.wait()
    span = max(last.values()) - t0
    ttft = [first[k] - submit_t[k] for k in first]
    tpot = [(last[k] - first[k]) / (ntok[k] - 1) for k in first if ntok[k] > 1]
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"tok_s": sum(ntok.values()) / span, "tokens": sum(ntok.values()), "span": span,
            "ttft50": q(ttft, 0.5), "ttft99": q(ttft, 0.99), "tpot50": q(tpot, 0.5), "tpot99": q(tpot, 0.99)}


def run_peft(model, files: list[Path], trace: list[dict], batch: int, device: str = "cpu") -> dict:
    """HF generate + PEFT adapter_names over static batches (arrival order), all queued at t=0."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from adapterkit.formats import read_adapter

    used = sorted({r["adapter"] for r in trace})
    pm = None
    for a in used:
        saved = read_adapter(files[a % len(files)])
        cfg = LoraConfig(r=saved.config["r"], lora_alpha=saved.config["alpha"], target_modules=list(TARGETS))
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name=f"ad{a}")
        else:
            pm.add_adapter(f"ad{a}", cfg)
        sd = {f"base_model.model.{k}.weight": v for k, v in saved.tensors.items()}
        set_peft_model_state_dict(pm, sd, adapter_name=f"ad{a}")
    pm.eval().to(device)
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(trace), batch):
            rs = trace[i:i + batch]
            L = max(len(r["prompt"]) for r in rs)
            ids = torch.tensor([[0] * (L - len(r["prompt"])) + r["prompt"] for r in rs])  # left padding
            mask = torch.tensor([[0] * (L - len(r["prompt"])) + [1] * len(r["prompt"]) for r in rs])
            pm.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                        max_new_tokens=max(r["out"] for r in rs), do_sample=False, pad_token_id=0, eos_token_id=None, adapter_names=[f"ad{r['adapter']}" for r in rs])
            tokens += sum(r["out"] for r in rs)  # only each request's own tokens count
    span = time.perf_counter() - t0
    pm.unload()
    return {"tok_s": tokens / span, "tokens": tokens, "span": span}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def new_engine(model, args, n_adapters: int, files: list[Path]) -> tuple[Engine, float]:
    eng = Engine(model, config=EngineConfig(max_loras=args.max_loras, max_num_seqs=args.max_num_seqs,
                                            max_lora_rank=32, max_cpu_loras=args.host_cache,
                                            max_num_batched_tokens=512, pool_bytes=args.pool_mib << 20,
                                            dtype=str(args.dtype).removeprefix("torch."), device=args.device))
    t = time.perf_counter()
    for i in range(n_adapters):
        eng.register_adapter(f"ad{i}", str(files[i % len(files)]))
    return eng, time.perf_counter() - t


def fmt(r: dict) -> str:
    s = f"{r['tok_s']:7.1f} tok/s ({r['tokens']} tok in {r['span']:.1f} s)"
    if "ttft50" in r:
        s += (f"  TTFT p50 {r['ttft50'] * 1e3:.0f} ms p99 {r['ttft99'] * 1e3:.0f} ms"
              f"  per-token p50 {r['tpot50'] * 1e3:.0f} ms p99 {r['tpot99'] * 1e3:.0f} ms")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default="1000", help="one count, or a comma list for scaling mode")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=32.0, help="Poisson arrival rate, requests / s")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--files", type=int, default=24, help="distinct adapter files on disk")
    ap.add_argument("--host-cache", type=int, default=64, help="adapters kept in host memory (max_cpu_loras)")
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--pool-mib", type=int, default=1024, help="unified KV + adapter page pool")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--peft-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="engine (and PEFT baseline) device: cpu, cuda, cuda:1, ...")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.adapters.split(",")]
    args.dtype = getattr(torch, args.dtype)
    model = build_model(args.layers, args.small, args.dtype)
    V = model.config.vocab_size
    tmp = Path(tempfile.mkdtemp(prefix="adapterkit-trace-"))
    files = adapter_files(model, args.files, tmp, RANKS)
    shape = "tiny" if args.small else f"SmolLM2-135M widths, {args.layers} layers, {args.dtype}"
    print(f"trace: {args.requests} requests, Poisson {args.rate}/s, prompt/output U[8,64], ranks {RANKS} on "
          f"{','.join(TARGETS)}, {shape}, {args.threads} threads, {args.device}, max_loras {args.max_loras}, "
          f"files {args.files}")

    if len(sizes) == 1:
        n = sizes[0]
        trace = make_trace(args.requests, n, args.rate, V, seed=0)
        eng, reg = new_engine(model, args, n, files)
        print(f"  registered {n} adapters in {reg:.1f} s; {len({r['adapter'] for r in trace})} distinct in the trace")
        run_engine(eng, trace[:4], False)  # warm-up (first-call allocations), not measured
        base = run_engine(eng, trace, False)
        lora = run_engine(eng, trace, True)
        st = eng.stats()
        eng.shutdown()
        print(f"  engine, {n} adapters : {fmt(lora)}")
        print(f"  engine, base only    : {fmt(base)}")
        print(f"  cache: hits {st.cache_hits} misses {st.cache_misses} evictions {st.cache_evictions}")
        print(f"  ratio adapters / base-only = {lora['tok_s'] / base['tok_s']:.2f}x (target >= 0.7x)")
        if not args.no_peft:
            peft = run_peft(model, files, trace, args.peft_batch, args.device)
            print(f"  HF generate + PEFT adapter_names, static batches of {args.peft_batch}: {fmt(peft)}")
            print(f"  speed-up vs PEFT = {lora['tok_s'] / peft['tok_s']:.2f}x (target >= 4x)")
        return

    ref = None
    eng, _ = new_engine(model, args, 1, files)  # warm-up (first-call allocations), not measured
    run_engine(eng, make_trace(4, 1, args.rate, V, seed=1), True)
    eng.shutdown()
    del eng
    gc.collect()
    for n in sizes:
        trace = make_trace(args.requests, n, args.rate, V, seed=0)
        eng, reg = new_engine(model, args, n, files)
        r = run_engine(eng, trace, True)
        cold = eng.cache.cold_load_times
        warm = eng.cache.load_times
        eng.shutdown()
        del eng
        gc.collect()  # drop the previous engine's pool before measuring RSS
        ref = ref or r["tok_s"]
        q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1e3 if xs else float("nan")  # noqa: E731
        print(f"  {n:6d} adapters: {r['tok_s']:7.1f} tok/s = {r['tok_s'] / ref:.2f}x of {sizes[0]} | register "
              f"{reg:6.1f} s | RSS {rss_mib():7.0f} MiB | disk->slot loads {len(cold)} p50 {q(cold, .5):.1f} ms "
              f"p99 {q(cold, .99):.1f} ms | host->slot p50 {q(warm, .5):.1f} ms | TTFT p50 {r['ttft50'] * 1e3:.0f} ms")
    print("  target: throughput within 15% of the smallest size")


if __name__ == "__main__":
    main()
