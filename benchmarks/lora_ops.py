"""Batched multi-adapter LoRA on CPU: the kernels side by side on one module (SmolLM2 q_proj,
576 -> 576), 32 slots of rank 32, tokens spread over k adapters.

    .venv/bin/python benchmarks/lora_ops.py                 # fp32 and bf16, T in 32/128/512
    .venv/bin/python benchmarks/lora_ops.py --threads 1

Prints microseconds per call for `bgmv` (per-token fused gathers), `grouped` (two matmuls per
adapter present), the engine's CPU path (`cpu`: long runs as matmuls, the rest bgmv) and the
base matmul of the same module for scale, plus each kernel's max error against the reference.
Two layouts of tokens: `decode` (k adapters interleaved, one token per sequence) and `prefill`
(k contiguous chunks, as a prefill step lays them out).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adapterkit.ops.lora import add_lora_bgmv, add_lora_cpu, add_lora_grouped, add_lora_ref, make_plan  # noqa: E402


def bench(fn, n: int = 50) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    S, R, din, dout = 32, 32, 576, 576
    g = torch.Generator().manual_seed(0)
    print(f"LoRA kernels, one module {din}->{dout}, {S} slots of rank {R}, {args.threads} threads (us per call)")
    for dtype in (torch.float32, torch.bfloat16):
        # the engine's CPU slot layout: A^T (S, in, R) and B^T (S, R, out) storage, transposed views
        A = (torch.randn(S, din, R, generator=g) * 0.05).to(dtype).transpose(1, 2)
        B = (torch.randn(S, R, dout, generator=g) * 0.05).to(dtype).transpose(1, 2)
        scale = torch.ones(S)
        W = torch.randn(dout, din, generator=g).to(dtype)
        for layout in ("decode", "prefill"):
            for T in (32, 128, 512):
                for k in (1, 4, 16, 32):
                    if layout == "decode":
                        slots = torch.arange(T) % k
                    else:
                        slots = torch.repeat_interleave(torch.arange(k), T // k)
                    x = torch.randn(T, din, generator=g).to(dtype)
                    y = torch.zeros(T, dout, dtype=dtype)
                    plan = make_plan(slots)
                    ref = add_lora_ref(torch.zeros(T, dout), x.float(), A.float(), B.float(), scale, slots)
                    res, err = {}, {}
                    for name, fn in (("bgmv", add_lora_bgmv), ("grouped", add_lora_grouped), ("cpu", add_lora_cpu)):
                        err[name] = (fn(torch.zeros(T, dout, dtype=dtype), x, A, B, scale, plan).float() - ref).abs().max()
                        res[name] = bench(lambda fn=fn: fn(y, x, A, B, scale, plan))
                    res["base mm"] = bench(lambda: x @ W.T)
                    print(f"  {str(dtype)[6:]:8s} {layout:7s} T={T:3d} adapters={k:2d}: "
                          + "  ".join(f"{n} {v:6.0f}" for n, v in res.items())
                          + f"   max err {max(float(e) for e in err.values()):.1e}")


if __name__ == "__main__":
    main()
