"""One decode step for 32 sequences over 32 distinct rank-16 LoRA adapters (q, k, v, o), measured
side by side with (a) the base model alone in the same engine and (b) PEFT's mixed-adapter batch
(`adapter_names=`) on the HF model: one forward with past_key_values for the same 32 sequences.

    .venv/bin/python benchmarks/decode_step.py            # SmolLM2-135M shapes, random weights
    .venv/bin/python benchmarks/decode_step.py --small    # tiny shapes, seconds (smoke test)

Targets: LoRA step <= 1.5x the base step; >= 2x faster than PEFT.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adapterkit.serve.engine import Engine  # noqa: E402
from adapterkit.serve.types import EngineConfig, GenerationRequest, SamplingParams  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build_model(small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if small:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256)
    else:  # SmolLM2-135M shapes
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    return m


def make_adapter(model, r: int, seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i, layer in enumerate(model.model.layers):
        for name in TARGETS:
            lin = getattr(layer.self_attn, name)
            t[f"model.layers.{i}.self_attn.{name}.lora_A"] = torch.randn(r, lin.in_features, generator=g) * 0.02
            t[f"model.layers.{i}.self_attn.{name}.lora_B"] = torch.randn(lin.out_features, r, generator=g) * 0.02
    return SimpleNamespace(method="lora", config={"r": r, "alpha": 2.0 * r}, tensors=t)


def adapter_files(model, n: int, root: Path, ranks: tuple[int, ...] = (8, 16, 32)) -> list[Path]:
    """``n`` native LoRA adapter directories ``root/f<i>`` of ranks cycling through ``ranks``."""
    from adapterkit.formats import write_native

    out = []
    for i in range(n):
        ad = make_adapter(model, ranks[i % len(ranks)], seed=i)
        out.append(write_native(root / f"f{i}", "lora", ad.config, ad.tensors, {"architecture": "LlamaForCausalLM"}))
    return out


def prefill(eng: Engine, prompts: list[list[int]], adapters: list[str | None], steps: int) -> None:
    """Submit the sequences and run steps until every one is decoding (1 pending token)."""
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for p, a in zip(prompts, adapters):
        eng.submit(GenerationRequest(prompt_token_ids=p, adapter=a, params=params), lambda c: None)
    while any(s.pending != 1 for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()


def timed_step(eng: Engine, n_seqs: int) -> tuple[float, float]:
    """(wall s, process CPU s) of one engine step that must be a pure decode of n_seqs tokens."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = eng.step()
    dt = (time.perf_counter() - t0, time.process_time() - c0)
    assert n == n_seqs, n
    return dt


def peft_decode_times(model, adapters: dict, prompts: list[list[int]], names: list[str], steps: int) -> list[tuple[float, float]]:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    r = next(iter(adapters.values())).config["r"]
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), lora_dropout=0.0)
    first = next(iter(adapters))
    pm = get_peft_model(model, cfg, adapter_name=first)
    for n, ad in adapters.items():
        if n != first:
            pm.add_adapter(n, cfg)
        sd = {k.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"): v for k, v in ad.tensors.items()}
        set_peft_model_state_dict(pm, {f"base_model.model.{k}": v for k, v in sd.items()}, adapter_name=n)
    pm.eval()
    L = len(prompts[0])
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = pm(input_ids=ids, use_cache=True, adapter_names=names)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for i in range(steps):
            mask = torch.ones(len(prompts), L + i + 1, dtype=torch.long)
            t0, c0 = time.perf_counter(), time.process_time()
            out = pm(input_ids=nxt, past_key_values=past, attention_mask=mask, use_cache=True, adapter_names=names)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    pm.unload()  # give the plain model back
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=16, help="prompt tokens per sequence before the timed steps")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--no-peft", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = build_model(a.small)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (a.ctx,), generator=g).tolist() for _ in range(a.seqs)]
    adapters = {f"lora{i}": make_adapter(model, a.rank, seed=i) for i in range(a.seqs)}
    names = list(adapters)
    cfg = EngineConfig(max_loras=a.seqs, max_num_seqs=a.seqs, max_lora_rank=a.rank,
                       max_num_batched_tokens=a.seqs * a.ctx, block_size=16, pool_bytes=512 << 20)
    # two engines over the same HF weights: base-only and 32 adapters, stepped alternately so
    # both see the same machine noise
    eng_base = Engine(model, config=cfg, start=False)
    eng_lora = Engine(model, config=cfg, start=False)
    for n, ad in adapters.items():
        eng_lora.register_adapter(n, ad)
    prefill(eng_base, prompts, [None] * a.seqs, a.steps)
    prefill(eng_lora, prompts, names, a.steps)
    res = {}
    base_t, lora_t = [], []
    for _ in range(a.steps):
        base_t.append(timed_step(eng_base, a.seqs))
        lora_t.append(timed_step(eng_lora, a.seqs))
    del eng_base, eng_lora
    # min over steps as well: on a shared machine the fastest step is the least disturbed one
    med = lambda ts: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts),  # noqa: E731
                      min(t[0] for t in ts))
    res["engine base"] = med(base_t)
    res["engine 32 LoRA"] = med(lora_t)
    if not a.no_peft:
        res["PEFT adapter_names"] = med(peft_decode_times(model, adapters, prompts, names, a.steps))
    print(f"decode step: {a.seqs} seqs x ctx {a.ctx}, {a.seqs} distinct rank-{a.rank} adapters on {','.join(TARGETS)}, "
          f"{'tiny' if a.small else 'SmolLM2-135M'} shapes, {a.threads} threads")
    print("  (per step: median wall ms / median process CPU ms / min wall ms)")
    for k, (w, c, mn) in res.items():
        print(f"  {k:22s} {w * 1e3:8.1f} wall  {c * 1e3:8.1f} cpu  {mn * 1e3:8.1f} min-wall")
    for i, kind in enumerate(("median wall", "median cpu", "min wall")):
        lo, b = res["engine 32 LoRA"][i], res["engine base"][i]
        print(f"  [{kind}] ratio LoRA / base = {lo / b:.2f}x (target <= 1.5x)", end="")
        if "PEFT adapter_names" in res:
            print(f";  speed-up vs PEFT mixed batch = {res['PEFT adapter_names'][i] / lo:.2f}x (target >= 2x)", end="")
        print()


if __name__ == "__main__":
    main()
