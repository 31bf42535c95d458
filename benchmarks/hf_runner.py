"""The generic runner (the model's own transformers modules, `serve/hf_runner.py`) against the fused
Llama runner (`serve/runner.py`), side by side on the same steps in one run, alternating.

Steps: a decode step of 48 sequences (context 64 each) on the base model, the same with 48
distinct rank-16 LoRA adapters (q, k, v, o), and a prefill step of 4 x 64 tokens.

    .venv/bin/python benchmarks/hf_runner.py            # SmolLM2-135M shapes, random weights
    .venv/bin/python benchmarks/hf_runner.py --small    # tiny shapes, seconds (smoke test)

Prints the median ms per step of each runner and the ratio generic / fused.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_step import build_model, make_adapter  # noqa: E402

from adapterkit.serve.adapters import AdapterStore, LoraSlots  # noqa: E402
from adapterkit.serve.hf_runner import HFModelRunner  # noqa: E402
from adapterkit.serve.pool import UnifiedPool  # noqa: E402
from adapterkit.serve.runner import ModelRunner, StepInput  # noqa: E402


def make_step(q_lens: list[int], ctx: list[int], bs: int, slots: list[int]) -> StepInput:
    """Sequence i owns pages [i * P, (i + 1) * P) and gets q_lens[i] new tokens at the end of ctx[i]."""
    P = -(-max(ctx) // bs)
    ids, pos, rows, sl, sample = [], [], [], [], []
    for i, (q, c) in enumerate(zip(q_lens, ctx)):
        pos += range(c - q, c)
        rows += [i * P * bs + p for p in range(c - q, c)]
        ids += [(7 * p + i) % 200 + 1 for p in range(c - q, c)]
        sl += [slots[i]] * q
        sample.append(len(ids) - 1)
    pages = torch.arange(len(q_lens) * P).view(len(q_lens), P)
    return StepInput(torch.tensor(ids), torch.tensor(pos), torch.tensor(rows), torch.tensor(q_lens), pages,
                     torch.tensor(ctx), torch.tensor(sl), torch.tensor(sample))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.small).to(dtype)
    fused, generic = ModelRunner(model, dtype=dtype), HFModelRunner(model, dtype=dtype)
    bs, n = 16, 48
    pool = UnifiedPool(fused.num_layers, fused.num_kv_heads, fused.head_dim, bs, n * 5 + 8, dtype)
    store = AdapterStore(fused.module_shapes(), fused.num_layers, 32)
    slots = LoraSlots(n, fused.module_shapes(), dtype, "cpu")
    for i in range(n):
        ad = store.register(f"a{i}", make_adapter(model, 16, seed=i))
        slots.set(i, ad, store.weights(f"a{i}"))
    cases = {
        "decode 48 x ctx 64, base": (make_step([1] * n, [64] * n, bs, [-1] * n), None),
        "decode 48 x ctx 64, 48 adapters": (make_step([1] * n, [64] * n, bs, list(range(n))), slots),
        "prefill 4 x 64, base": (make_step([64] * 4, [64] * 4, bs, [-1] * 4), None),
    }
    print(f"{'case':34s} {'fused ms':>9s} {'generic ms':>11s} {'generic/fused':>14s}   ({args.dtype}, "
          f"{'tiny' if args.small else 'SmolLM2-135M'} shapes, median of {args.reps})")
    for name, (step, lora) in cases.items():
        diff = (fused.forward(step, pool, lora) - generic.forward(step, pool, lora)).abs().max().item()
        times: dict[str, list[float]] = {"fused": [], "generic": []}
        for _ in range(args.reps):
            for label, r in (("fused", fused), ("generic", generic)):
                t0 = time.perf_counter()
                r.forward(step, pool, lora)
                times[label].append(time.perf_counter() - t0)
        f, g = statistics.median(times["fused"]) * 1e3, statistics.median(times["generic"]) * 1e3
        print(f"{name:34s} {f:9.1f} {g:11.1f} {g / f:14.2f}   max |logit diff| {diff:.1e}")


if __name__ == "__main__":
    main()
