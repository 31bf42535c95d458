"""Speed of `adapterkit eval` against the usual loop: one HF ``generate`` + PEFT model per adapter.

N random LoRA adapters (saved in PEFT format, so both sides read the same files) are scored
on the same M held-out examples of a generated task, greedy:

* adapterkit: ``adapterkit.eval.evaluate`` -- every (adapter, example) request in one serving
  engine, N adapters sharing each forward step (heterogeneous batching);
* baseline: per adapter, ``peft.PeftModel.from_pretrained(base, dir)``, batched left-padded
  ``model.generate(do_sample=False)`` over the M examples, then ``unload()``.

Both get the same prompt token ids; the answers are compared text for text (after the task's
stop strings) and every mismatch is counted.

    .venv/bin/python benchmarks/eval_speed.py                          # default model, 30 x 200
    .venv/bin/python benchmarks/eval_speed.py --adapters 4 --examples 8  # a quick look
    .venv/bin/python benchmarks/eval_speed.py --tiny --adapters 3 --examples 4   # random toy model
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import adapterkit as ak
import adapterkit.eval as ev
from adapterkit.eval.runner import _context  # the exact prompt ids eval uses, for the baseline too

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(model: torch.nn.Module, n: int, root: Path, rank: int = 8, std: float = 0.02,
                  seed: int = 0) -> dict[str, Path]:
    """`n` LoRA adapters with random A and B (so each changes the outputs), saved as PEFT dirs."""
    out = {}
    for i in range(n):
        ak.add_adapter(model, "tmp", ak.LoRAConfig(r=rank, alpha=2 * rank, targets=TARGETS))
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapterkit.tmp." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        out[f"a{i:02d}"] = ak.save_adapter(model, "tmp", root / f"a{i:02d}", format="peft")
        ak.delete_adapter(model, "tmp")
    return out


def _cut(text: str, stop: tuple[str, ...]) -> str:
    for s in stop:
        j = text.find(s)
        if j >= 0:
            text = text[:j]
    return text


def hf_peft_answers(model: torch.nn.Module, tok: Any, adapters: dict[str, Path], spec: ev.TaskSpec,
                    batch_size: int) -> dict[str, list[str]]:
    """The baseline: one PeftModel and batched greedy ``generate`` per adapter."""
    from peft import PeftModel

    prompts = [_context(tok, spec, rec) for rec in spec.examples]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: dict[str, list[str]] = {}
    for name, path in adapters.items():
        pm = PeftModel.from_pretrained(model, str(path)).eval()
        texts = []
        for lo in range(0, len(prompts), batch_size):
            batch = prompts[lo:lo + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.no_grad():
                gen = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec.max_tokens,
                                  do_sample=False, pad_token_id=pad)
            texts += [_cut(tok.decode(row[width:], skip_special_tokens=True), spec.stop) for row in gen]
        out[name] = texts
        model = pm.unload()  # the base model without the LoRA layers, for the next adapter
    return out


def run(model: torch.nn.Module, tok: Any, adapters: dict[str, Path], spec: ev.TaskSpec,
        hf_batch_size: int = 16, log=print) -> dict[str, Any]:
    """Time both sides on the same examples and compare their answers.

    Returns:
        ``{"adapters", "examples", "eval_s", "hf_peft_s", "speedup", "mismatches", "batching",
        "distinct_answer_lists", ...}``.
    """
    t = time.perf_counter()
    res = ev.evaluate(model, tok, [spec], adapters, include_base=False, progress=False)
    t_eval = time.perf_counter() - t
    log(f"adapterkit eval: {t_eval:.1f} s ({res.batching.mixed_steps}/{res.batching.steps} steps mixed adapters, "
        f"up to {res.batching.max_models_per_step} in one)")
    t = time.perf_counter()
    ref = hf_peft_answers(model, tok, adapters, spec, hf_batch_size)
    t_hf = time.perf_counter() - t
    log(f"HF generate + PEFT, one adapter at a time (batch {hf_batch_size}): {t_hf:.1f} s")
    bad = [(n, i, got, want) for n in adapters
           for i, (got, want) in enumerate(zip(res.predictions[n][spec.name], ref[n])) if got != want]
    for n, i, got, want in bad[:5]:
        log(f"  mismatch {n} example {i}: eval {got!r} vs HF {want!r}")
    summary = {"adapters": len(adapters), "examples": len(spec.examples), "task": spec.name,
               "max_tokens": spec.max_tokens, "eval_s": round(t_eval, 2), "hf_peft_s": round(t_hf, 2),
               "speedup": round(t_hf / t_eval, 2), "mismatches": len(bad),
               "answers": len(adapters) * len(spec.examples), "batching": vars(res.batching),
               # a sanity check on the adapters themselves: they do not all answer alike
               "distinct_answer_lists": len({tuple(res.predictions[n][spec.name]) for n in adapters})}
    log(f"speedup {summary['speedup']}x; {len(bad)} of {summary['answers']} answers differ")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=30)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--task", default="sentiment", help="a generate task of adapterkit.tasks")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama + char tokenizer (smoke run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
        from test_server_utils import char_tokenizer, tiny_llama

        model, tok = tiny_llama(), char_tokenizer()
    else:
        from adapterkit.models import load_default

        model, tok = load_default()
    model.eval()
    spec = ev.load_task(a.task, n=a.examples, max_tokens=a.max_tokens)
    print(f"{a.adapters} adapters x {a.examples} examples of {a.task!r}, max_tokens {a.max_tokens}, "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as d:
        adapters = make_adapters(model, a.adapters, Path(d), rank=a.rank)
        summary = run(model, tok, adapters, spec, a.hf_batch_size)
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
