"""PaCA vs LoRA (same r), one training step, measured side by side in one run.

SmolLM2-135M shapes with fewer layers (LlamaConfig hidden 576, inter 1536, heads 9, kv 3,
vocab 49152; 4 layers by default), random weights, fp32, batch 4 x seq 256, 2 threads,
adapters on every projection (q, k, v, o, gate, up, down), as in the PaCA paper.

* step time: median of interleaved steps (LoRA, PaCA, PaCA-autograd, LoRA, ...) so machine
  noise hits all variants alike;
* saved activations: bytes of the distinct storages autograd keeps for backward during one
  forward (``torch.autograd.graph.saved_tensors_hooks``), deterministic;
* "paca-autograd" is PaCA with its branch written in plain autograd ops instead of the
  custom :class:`PartialColumnsFn` (the fast path vs the slow path).

    .venv/bin/python benchmarks/paca_vs_lora.py [--layers 4] [--r 16] [--steps 7] [--body-only]
"""
from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

from _common import smol_llama

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.methods.paca import PaCAConfig, partial_columns

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(kind: str, layers: int, r: int, seq: int):
    model = smol_llama(layers, seq)
    if kind == "lora":
        ak.add_adapter(model, "a", ak.LoRAConfig(r=r, alpha=2 * r, targets=TARGETS))
    else:
        ak.add_adapter(model, "a", PaCAConfig(r=r, targets=TARGETS))
        if kind == "paca-autograd":  # the slow reference path, for comparison
            for piece in get_record(model, "a").pieces.values():
                def fwd(self, x, y):
                    return partial_columns(y, x, self.paca_cols, self.paca_delta)
                piece.forward_post = types.MethodType(fwd, piece)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return model, opt, sum(p.numel() for p in params)


BODY_ONLY = False  # --body-only: leave out the 49152-way head and loss (identical in every variant)


def loss_of(model, batch) -> torch.Tensor:
    if BODY_ONLY:
        return model.model(input_ids=batch).last_hidden_state.pow(2).mean()
    return model(input_ids=batch, labels=batch).loss


def step(model, opt, batch) -> float:
    t = time.perf_counter()
    loss = loss_of(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def saved_bytes(model, batch) -> tuple[int, int]:
    """Bytes of distinct storages autograd keeps for backward in one forward: in all, and
    those first saved inside the decoder layers (where the adapters are; the rest is the
    embedding, the 49152-way head and the loss, identical for every variant)."""
    seen: dict[int, int] = {}
    in_layers: set[int] = set()
    inside = [False]

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
            key = s.data_ptr()
            if key not in seen and inside[0]:
                in_layers.add(key)
            seen[key] = max(seen.get(key, 0), s.nbytes())
        except RuntimeError:
            pass
        return t

    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)))
        handles.append(layer.register_forward_hook(lambda *_: inside.__setitem__(0, False)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_of(model, batch)
    finally:
        for h in handles:
            h.remove()
    del loss
    return sum(seen.values()), sum(seen[k] for k in in_layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--body-only", action="store_true",
                    help="loss on the last hidden state: time the decoder layers without the LM head")
    a = ap.parse_args()
    global BODY_ONLY
    BODY_ONLY = a.body_only
    torch.set_num_threads(a.threads)
    x = torch.randint(0, 49152, (a.batch, a.seq))
    kinds = ("lora", "paca", "paca-autograd")
    runs = {k: build(k, a.layers, a.r, a.seq) for k in kinds}
    for m, o, _ in runs.values():  # warm-up
        step(m, o, x)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(a.steps):
        for k, (m, o, _) in runs.items():
            times[k].append(step(m, o, x))
    act = {k: saved_bytes(m, x) for k, (m, _, _) in runs.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = 2**20
    print(f"PaCA vs LoRA train step, SmolLM2 shapes ({a.layers} layers), batch {a.batch} x seq {a.seq}, r={a.r} on "
          f"q,k,v,o,gate,up,down, fp32, {a.threads} threads, {a.steps} interleaved steps (median)"
          f"{'; body only (no LM head)' if a.body_only else ''}")
    print(f"{'':15}{'trainable':>12}{'step s':>10}{'saved act. MB':>16}{'in layers MB':>15}")
    for k in kinds:
        print(f"{k:15}{runs[k][2]:>12,}{med[k]:>10.3f}{act[k][0] / mb:>16.1f}{act[k][1] / mb:>15.1f}")
    print(f"ratio paca/lora: step time {med['paca'] / med['lora']:.3f}x, saved activations {act['paca'][0] / act['lora'][0]:.3f}x "
          f"(decoder layers only: {act['paca'][1] / act['lora'][1]:.3f}x)")
    print(f"ratio paca/paca-autograd: step time {med['paca'] / med['paca-autograd']:.3f}x, "
          f"saved activations {act['paca'][0] / act['paca-autograd'][0]:.3f}x")
    print(f"step-time spread (max/min over steps): " + ", ".join(f"{k} {max(v) / min(v):.2f}" for k, v in times.items()))

if __name__ == "__main__":
    main()
