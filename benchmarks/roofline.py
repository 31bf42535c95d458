"""This machine's roofline, and each serving decode step beside its floor.

Measures the matmul peak (large squares, fp32 and bf16, best of several, the faster of
``torch.mm`` and oneDNN with a prepacked weight) and
the memory bandwidth (a large copy and a large sum, best of several), then for each serving
case (one decode step of B tokens over SmolLM2-135M shapes, base-only and with k distinct
rank-r LoRA adapters on q,k,v,o) prints

    floor = max(FLOPs / peak, bytes / bandwidth)

counting the base weights read once, each distinct adapter's A and B read once, and the KV
cache read by attention, beside the measured engine step and the ratio measured / floor.

    .venv/bin/python benchmarks/roofline.py                  # SmolLM2-135M shapes, fp32 and bf16
    .venv/bin/python benchmarks/roofline.py --dtype bfloat16 --ctx 64
    .venv/bin/python benchmarks/roofline.py --small          # tiny shapes, seconds (smoke test)

The floor is a lower bound: it assumes perfect overlap of compute and memory traffic, every
weight read exactly once per step and activations kept in cache.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_step import build_model, make_adapter, prefill, timed_step  # noqa: E402

from adapterkit.serve.engine import Engine  # noqa: E402
from adapterkit.serve.types import EngineConfig  # noqa: E402

_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _best(fn, reps: int) -> float:
    """Fastest wall time of `reps` calls after one warm-up (the least disturbed run on a shared box)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(dtype: torch.dtype, n: int, reps: int) -> dict[str, float]:
    """FLOP/s of (n, n) @ (n, n) in `dtype` (2 n^3 FLOPs over the best time) through each CPU
    matmul torch offers: ``torch.mm`` (MKL for fp32) and oneDNN with a prepacked weight
    (`ops.linear`, what the serving runner uses). The floor takes the fastest."""
    from adapterkit.ops.linear import linear, prepack

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    got = {"torch.mm": 2 * n**3 / _best(lambda: torch.mm(a, b, out=out), reps)}
    bp = prepack(b.T.contiguous(), n)
    if bp.is_mkldnn:
        got["oneDNN"] = 2 * n**3 / _best(lambda: linear(a, bp), reps)
    return got


def bandwidth(nbytes: int, reps: int) -> dict[str, float]:
    """Bytes/s of a copy (read + write counted) and of a sum (read only) over `nbytes` of fp32."""
    x = torch.rand(nbytes // 4)
    y = torch.empty_like(x)
    return {"copy": 2 * nbytes / _best(lambda: y.copy_(x), reps),
            "sum": nbytes / _best(lambda: x.sum(), reps)}


@dataclass(frozen=True)
class Shapes:
    """What the cost model needs of a Llama-style decoder."""

    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def targets(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o: the LoRA targets of every case."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return [(h, h), (h, kv), (h, kv), (h, h)]

    def linear_params(self) -> int:
        """Weights every token multiplies: attention + MLP per layer, and the LM head (the tied
        embedding: its rows are gathered, not multiplied, so it is counted once, here)."""
        per_layer = sum(i * o for i, o in self.targets()) + 3 * self.hidden * self.inter
        return self.layers * per_layer + self.vocab * self.hidden


def shapes_of(model) -> Shapes:
    c = model.config
    return Shapes(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                  c.num_key_value_heads, c.vocab_size)


def step_cost(s: Shapes, tokens: int, ctx: int, ranks: list[int], elem: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode step: `tokens` sequences, each attending to `ctx` positions,
    over the distinct adapters of `ranks` (one entry per distinct adapter in the batch; each
    token uses one of them). `elem`: bytes per weight / cache element.

    FLOPs: 2 per multiply-add of every linear, the LoRA shrink + expand of each token's adapter
    (the average rank over tokens), and attention's QK^T and PV. Bytes: base weights, each
    distinct adapter's A and B, and the K and V pages read.
    """
    flops = 2.0 * tokens * s.linear_params()
    if ranks:
        mean_r = sum(ranks) / len(ranks)
        flops += 2.0 * tokens * s.layers * mean_r * sum(i + o for i, o in s.targets())
    flops += 2 * 2.0 * tokens * ctx * s.heads * s.head_dim * s.layers
    nbytes = float(s.linear_params() * elem)
    nbytes += sum(r * sum(i + o for i, o in s.targets()) * s.layers for r in ranks) * elem
    nbytes += 2.0 * tokens * ctx * s.kv_heads * s.head_dim * s.layers * elem
    return flops, nbytes


@dataclass(frozen=True)
class Case:
    tokens: int  # sequences decoding (one token each)
    adapters: int  # distinct adapters, 0 = base only
    rank: int

    def label(self) -> str:
        return f"B={self.tokens} base" if not self.adapters else f"B={self.tokens} {self.adapters}x r{self.rank}"


def measure_step(model, case: Case, ctx: int, dtype: str, steps: int) -> float:
    """Fastest wall time of `steps` pure-decode engine steps of `case` (sequences hold `ctx`
    tokens of context when timing starts)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (ctx,), generator=g).tolist() for _ in range(case.tokens)]
    slots = max(case.adapters, 1)
    # the unified pool holds KV pages and the adapters' weights: room for all of them, twice
    per_adapter = 4 * case.rank * sum(i + o for i, o in shapes_of(model).targets()) * model.config.num_hidden_layers
    cfg = EngineConfig(max_loras=slots, max_num_seqs=case.tokens, max_lora_rank=max(case.rank, 8),
                       max_num_batched_tokens=max(case.tokens * ctx, 64), block_size=16,
                       pool_bytes=(256 << 20) + 2 * case.adapters * per_adapter, dtype=dtype)
    eng = Engine(model, config=cfg, start=False)
    names: list[str | None] = [None] * case.tokens
    if case.adapters:
        for i in range(case.adapters):
            eng.register_adapter(f"a{i}", make_adapter(model, case.rank, seed=i))
        names = [f"a{i % case.adapters}" for i in range(case.tokens)]
    prefill(eng, prompts, names, steps + 1)
    timed_step(eng, case.tokens)  # warm-up
    times = [timed_step(eng, case.tokens)[0] for _ in range(steps)]
    del eng
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=[*_DT, "both"], default="both")
    ap.add_argument("--ctx", type=int, default=32, help="context tokens per sequence when the step is timed")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case (the fastest is reported)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each peak measurement")
    ap.add_argument("--mm", type=int, default=2048, help="side of the square matmuls")
    ap.add_argument("--mb", type=int, default=512, help="MiB moved by the bandwidth measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny model and sizes (smoke test)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.small:
        a.mm, a.mb, a.ctx, a.steps, a.reps = 128, 8, 8, 2, 3
    dtypes = list(_DT) if a.dtype == "both" else [a.dtype]
    bw = bandwidth(a.mb << 20, a.reps)
    mem = max(bw.values())  # the floor is a lower bound: take the faster measurement
    print(f"machine: {torch.get_num_threads()} threads; memory bandwidth copy {bw['copy'] / 1e9:.1f} GB/s, "
          f"sum {bw['sum'] / 1e9:.1f} GB/s (floor uses {mem / 1e9:.1f})")
    peaks = {}
    for d in dtypes:
        got = matmul_peak(_DT[d], a.mm, a.reps)
        peaks[d] = max(got.values())
        each = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in got.items())
        print(f"matmul peak {d}: {peaks[d] / 1e9:.1f} GFLOP/s ({each}; {a.mm}x{a.mm}, best of {a.reps})")
    model = build_model(a.small)
    s = shapes_of(model)
    B, few = (4, 2) if a.small else (48, 4)
    cases = [Case(1, 0, 0), Case(B, 0, 0), Case(B, B, 16), Case(B, few, 16)]
    print(f"\ndecode step, {'tiny' if a.small else 'SmolLM2-135M'} shapes, ctx {a.ctx}; LoRA on q,k,v,o")
    print(f"  {'dtype':9s} {'case':16s} {'GFLOP':>7s} {'MB':>7s} {'floor ms':>9s} {'bound':>6s} "
          f"{'step ms':>8s} {'step/floor':>10s} {'GFLOP/s':>8s}")
    for d in dtypes:
        elem = torch.tensor([], dtype=_DT[d]).element_size()
        for c in cases:
            flops, nbytes = step_cost(s, c.tokens, a.ctx, [c.rank] * c.adapters, elem)
            t_c, t_m = flops / peaks[d], nbytes / mem
            floor = max(t_c, t_m)
            step = measure_step(model, c, a.ctx, d, a.steps)
            print(f"  {d:9s} {c.label():16s} {flops / 1e9:7.2f} {nbytes / 1e6:7.1f} {floor * 1e3:9.4g} "
                  f"{'flops' if t_c >= t_m else 'memory':>6s} {step * 1e3:8.4g} {step / floor:9.2f}x "
                  f"{flops / step / 1e9:8.1f}")


if __name__ == "__main__":
    main()
