"""Co-serving (issue 11): inference traffic with and without a LoRA fine-tuning job running in
the same engine, on the real default model (SmolLM2-135M-Instruct, fp32).

    .venv/bin/python benchmarks/coserve.py                  # 2 threads, 48 requests per run
    .venv/bin/python benchmarks/coserve.py --requests 24    # shorter
    .venv/bin/python benchmarks/coserve.py --tiny           # random toy model smoke run
    .venv/bin/python benchmarks/coserve.py --ft-time-share 0.1 --ft-token-share 0.1   # the knobs

Trace: 100 registered adapters (ranks 8/16/32 on q,k,v,o), power-law popularity, Poisson
arrivals, prompt and output lengths U[8, 64] (benchmarks/trace.py's generator). The engine's
saturation rate is measured first (every request queued at t=0: requests finished per second);
the trace then runs at 50% and 90% of it, each with and without one fine-tuning job (LoRA r=8
on q,v, batch 4, chat data) started before the trace. Reports inference tok/s, TTFT and
per-token latency p50/p99 and their ratios; the job's trained tokens/s under load vs the same
job on the idle engine vs the standalone Trainer; the delay from the job's "succeeded" event
to the first token of a request for the new model; and the training activation memory (bytes
the autograd graph saves, parameters excluded) per token and per micro-batch, Trainer vs engine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from decode_step import adapter_files  # noqa: E402
from trace import build_model, fmt, make_trace, run_engine  # noqa: E402

from adapterkit.serve.coserve import FineTuneSpec  # noqa: E402
from adapterkit.serve.engine import Engine  # noqa: E402
from adapterkit.serve.types import EngineConfig, GenerationRequest, SamplingParams  # noqa: E402

RANKS = (8, 16, 32)


def chat_data(n: int) -> list[dict]:
    """Short arithmetic chats (the kind of data a user would upload)."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {3 * i % 17}?"},
                          {"role": "assistant", "content": f"{i} plus {3 * i % 17} is {i + 3 * i % 17}."}]}
            for i in range(n)]


def ids_data(n: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, vocab, (int(torch.randint(24, 48, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]


def spec(job_id: str, data: list[dict], steps: int) -> FineTuneSpec:
    return FineTuneSpec(job_id=job_id, examples=data, adapter_config={"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
                        batch_size=4, learning_rate=1e-4, max_steps=steps, checkpoint_every=10_000, seed=0)


def trained(eng: Engine, job_id: str) -> int:
    return eng.fine_tuning.status(job_id).trained_tokens


def wait_running(eng: Engine, job_id: str, steps: int = 1) -> None:
    while eng.fine_tuning.status(job_id).step < steps:
        assert eng.fine_tuning.status(job_id).status in ("queued", "running"), eng.fine_tuning.status(job_id)
        time.sleep(0.01)


def with_job(eng: Engine, trace: list[dict], data: list[dict], job_id: str) -> tuple[dict, float]:
    """Replay the trace while a (long) job trains; returns (inference result, job tokens/s)."""
    eng.fine_tuning.submit(spec(job_id, data, 100_000))
    wait_running(eng, job_id)  # the job is attached and has done one step before traffic starts
    tok0, t0 = trained(eng, job_id), time.perf_counter()
    r = run_engine(eng, trace, True)
    tok1, t1 = trained(eng, job_id), time.perf_counter()
    eng.fine_tuning.cancel(job_id)
    while eng.fine_tuning.has_work():
        time.sleep(0.01)
    return r, (tok1 - tok0) / (t1 - t0)


def idle_job(eng: Engine, data: list[dict], job_id: str, seconds: float) -> float:
    """Trained tokens/s of the job on an engine with no inference traffic."""
    eng.fine_tuning.submit(spec(job_id, data, 100_000))
    wait_running(eng, job_id)
    tok0, t0 = trained(eng, job_id), time.perf_counter()
    time.sleep(seconds)
    tok1, t1 = trained(eng, job_id), time.perf_counter()
    eng.fine_tuning.cancel(job_id)
    while eng.fine_tuning.has_work():
        time.sleep(0.01)
    return (tok1 - tok0) / (t1 - t0)


def first_answer_delay(eng: Engine, data: list[dict]) -> float:
    """Seconds from the job's "succeeded" event to the first token for the new model."""
    done = threading.Event()
    at: list[float] = []

    def on_event(e: dict) -> None:
        if e["type"] == "status" and e.get("status") == "succeeded":
            at.append(time.perf_counter())
            done.set()

    eng.fine_tuning.submit(spec("ftjob-first", data, 2), on_event=on_event)
    done.wait()
    name = eng.fine_tuning.status("ftjob-first").fine_tuned_model
    got = threading.Event()
    first: list[float] = []

    def sink(c) -> None:
        if c.token_ids and not first:
            first.append(time.perf_counter())
        if c.finished:
            got.set()

    eng.submit(GenerationRequest(prompt_token_ids=[1, 2, 3, 4], adapter=name,
                                 params=SamplingParams(max_tokens=2, temperature=0)), sink)
    got.wait()
    return first[0] - at[0]


def trainer_tokens_per_s(model, tok, data: list[dict], steps: int, out: Path) -> float:
    """The standalone Trainer, same adapter and hyper-parameters, on the same (idle) machine."""
    import adapterkit as ak
    from adapterkit.train import TrainConfig, Trainer

    ak.add_adapter(model, "solo", ak.LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    try:
        cfg = TrainConfig(out_dir=out, lr=1e-4, steps=steps, batch_size=4, progress=False, max_length=2048, log_every=1)
        Trainer(model, data, config=cfg, tokenizer=tok).train()
        # steps 2..N from metrics.jsonl: the first step (warm-up) and the end-of-run plot excluded
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "tokens" in r]
        return (recs[-1]["tokens"] - recs[0]["tokens"]) / (recs[-1]["elapsed_s"] - recs[0]["elapsed_s"])
    finally:
        ak.delete_adapter(model, "solo")


def activation_bytes(model, tok, data: list[dict], rows: int) -> tuple[int, int]:
    """(bytes the autograd graph saves, tokens) for one forward of `rows` examples through the
    model with a LoRA, parameters and shared views excluded."""
    import adapterkit as ak
    from adapterkit.train import TrainConfig, Trainer

    ak.add_adapter(model, "mem", ak.LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    try:
        tr = Trainer(model, data, config=TrainConfig(out_dir=tempfile.mkdtemp(), batch_size=rows, max_length=2048),
                     tokenizer=tok)
        batch, _, _ = next(tr.batch_stream())
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = tr.loss_sum(batch)
        loss.backward()
        model.eval()
        return sum(seen.values()), int(batch["attention_mask"].sum())
    finally:
        ak.delete_adapter(model, "mem")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48, help="requests per trace run")
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--idle-seconds", type=float, default=20.0, help="how long the idle-engine job is timed")
    ap.add_argument("--trainer-steps", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="random toy model (smoke run)")
    ap.add_argument("--ft-token-share", type=float, default=None, help="EngineConfig.ft_token_share (default: its)")
    ap.add_argument("--ft-time-share", type=float, default=None, help="EngineConfig.ft_time_share (default: its)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tiny:
        model, tok = build_model(2, True), None
        name = "tiny"
        data = ids_data(64, model.config.vocab_size)
    else:
        from adapterkit.models import load_default

        model, tok = load_default()
        name = "SmolLM2-135M-Instruct"
        data = chat_data(64)
    model.generation_config.eos_token_id = None
    V = model.config.vocab_size
    tmp = Path(tempfile.mkdtemp(prefix="adapterkit-coserve-"))
    files = adapter_files(model, 24, tmp / "adapters", RANKS)
    shares = {k: v for k, v in (("ft_token_share", args.ft_token_share), ("ft_time_share", args.ft_time_share))
              if v is not None}
    cfg = EngineConfig(max_loras=32, max_num_seqs=32, max_lora_rank=32, max_num_batched_tokens=512,
                       pool_bytes=512 << 20, fine_tuning=True, fine_tuning_dir=str(tmp / "ft"), **shares)
    eng = Engine(model, tok, cfg, model_name=name)
    for i in range(args.adapters):
        eng.register_adapter(f"ad{i}", str(files[i % len(files)]))
    print(f"co-serving: {name} fp32, {args.threads} threads, {args.adapters} adapters (ranks {RANKS} on q,k,v,o), "
          f"{args.requests} requests per run, prompt/output U[8,64]; job: LoRA r=8 q,v, batch 4, "
          f"ft_token_share {cfg.ft_token_share}, ft_time_share {cfg.ft_time_share}, max_num_batched_tokens "
          f"{cfg.max_num_batched_tokens}")

    run_engine(eng, make_trace(4, args.adapters, 100.0, V, seed=9), True)  # warm-up
    burst = make_trace(args.requests, args.adapters, 1e6, V, seed=1)  # all at t=0: saturation
    sat = run_engine(eng, burst, True)
    sat_rate = args.requests / sat["span"]
    print(f"  saturation: {sat_rate:.2f} req/s ({fmt(sat)})")

    rows = []
    for frac in (0.5, 0.9):
        trace = make_trace(args.requests, args.adapters, frac * sat_rate, V, seed=2)
        alone = run_engine(eng, trace, True)
        co, ft_tps = with_job(eng, trace, data, f"ftjob-{int(frac * 100)}")
        rows.append((frac, alone, co, ft_tps))
        print(f"  {int(frac * 100)}% load, inference alone : {fmt(alone)}")
        print(f"  {int(frac * 100)}% load, with the job    : {fmt(co)}")
        print(f"      ratios with/alone: tok/s {co['tok_s'] / alone['tok_s']:.2f}x (target >= 0.9x), per-token p99 "
              f"{co['tpot99'] / alone['tpot99']:.2f}x (target <= 1.25x), TTFT p99 {co['ttft99'] / alone['ttft99']:.2f}x;"
              f" job {ft_tps:.0f} trained tok/s")
    idle = idle_job(eng, data, "ftjob-idle", args.idle_seconds)
    delay = first_answer_delay(eng, data)
    slice_s = eng.fine_tuning.slice_seconds
    eng.shutdown()
    solo = trainer_tokens_per_s(model, tok, data, args.trainer_steps, tmp / "solo")
    print(f"  job on the idle engine: {idle:.0f} trained tok/s; standalone Trainer: {solo:.0f} tok/s "
          f"(engine idle / Trainer = {idle / solo:.2f}x)")
    for frac, _, _, ft_tps in rows:
        print(f"  job under {int(frac * 100)}% load: {ft_tps:.0f} tok/s = {ft_tps / idle:.2f}x of idle-engine "
              f"(target >= 0.5x at 50%)")
    print(f"  first token for the new model {delay * 1e3:.0f} ms after the job reported success (target <= 1 s)")
    budget = int(cfg.ft_token_share * cfg.max_num_batched_tokens)
    b4, t4 = activation_bytes(model, tok, data, 4)
    b1, t1 = activation_bytes(model, tok, data, 1)
    print(f"  activation memory: {b4 / t4 / 1024:.0f} KiB/token for the Trainer's batch of 4 ({b4 / 2**20:.1f} MiB), "
          f"{b1 / t1 / 1024:.0f} KiB/token for a one-sequence slice ({b1 / 2**20:.1f} MiB); a busy engine's slice "
          f"holds <= {budget} tokens (one sequence at least), so its peak is the slice's, not the batch's")
    print(f"  (training slices took {slice_s:.1f} s of engine time in all)")


if __name__ == "__main__":
    main()
