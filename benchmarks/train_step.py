"""One LoRA training step, adapterkit vs PEFT, measured side by side in one run.

SmolLM2-135M shapes (random weights), batch 8 x seq 256, LoRA r=16 on q,k,v,o, fp32,
2 threads. Prints step-time and memory ratios (adapterkit / PEFT):

* time: median of interleaved steps (A, B, A, B, ...) so machine noise hits both;
* activation memory: bytes the autograd graph saves for backward (unique storages),
  which is what dominates peak training memory and is deterministic;
* peak RSS: each variant's step run in a fresh subprocess (ru_maxrss).

    .venv/bin/python benchmarks/train_step.py [--layers 30] [--steps 5]
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from _common import smol_llama


def build(kind: str, layers: int, seq: int):
    model = smol_llama(layers, seq)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if kind == "adapterkit":
        import adapterkit as ak

        ak.add_adapter(model, "a", ak.LoRAConfig(r=16, alpha=32, targets=targets))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return model, opt, sum(p.numel() for p in params)


def step(model, opt, batch) -> float:
    t = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def saved_bytes(model, batch) -> int:
    """Bytes of distinct storages autograd keeps for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    del loss
    return sum(seen.values())


def child(kind: str, layers: int, batch: int, seq: int) -> None:
    torch.set_num_threads(2)
    model, opt, _ = build(kind, layers, seq)
    x = torch.randint(0, 49152, (batch, seq))
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(model, opt, x)
    step(model, opt, x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": after / 1024, "step_rss_growth_mb": (after - before) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--child", choices=["adapterkit", "peft"])
    a = ap.parse_args()
    if a.child:
        child(a.child, a.layers, a.batch, a.seq)
        return
    torch.set_num_threads(2)
    x = torch.randint(0, 49152, (a.batch, a.seq))
    runs = {k: build(k, a.layers, a.seq) for k in ("adapterkit", "peft")}
    n_ak, n_peft = runs["adapterkit"][2], runs["peft"][2]
    assert n_ak == n_peft, (n_ak, n_peft)
    for k, (m, o, _) in runs.items():  # warm-up
        step(m, o, x)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.steps):
        for k, (m, o, _) in runs.items():
            times[k].append(step(m, o, x))
    act = {k: saved_bytes(m, x) for k, (m, _, _) in runs.items()}
    del runs
    gc.collect()
    rss = {}
    for k in ("adapterkit", "peft"):
        out = subprocess.run([sys.executable, __file__, "--child", k, "--layers", str(a.layers), "--batch",
                              str(a.batch), "--seq", str(a.seq)], capture_output=True, text=True, check=True)
        rss[k] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"LoRA train step, SmolLM2-135M shapes ({a.layers} layers), batch {a.batch} x seq {a.seq}, r=16 q,k,v,o, "
          f"fp32, 2 threads, {a.steps} interleaved steps; trainable params {n_ak:,} (both)")
    print(f"{'':12}{'step s (median)':>18}{'saved act. MB':>16}{'peak RSS MB':>14}")
    for k in ("adapterkit", "peft"):
        print(f"{k:12}{med[k]:>18.3f}{act[k] / 2**20:>16.1f}{rss[k]:>14.0f}")
    print(f"ratio adapterkit/peft: step time {med['adapterkit'] / med['peft']:.3f}x, "
          f"saved activations {act['adapterkit'] / act['peft']:.3f}x, peak RSS {rss['adapterkit'] / rss['peft']:.3f}x")


if __name__ == "__main__":
    main()
