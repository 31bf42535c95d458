"""Co-serving (issue 11): fine-tuning jobs trained inside the engine loop while it serves.

Tiny random Llama and the byte tokenizer; every job is small enough for a few seconds on CPU.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.formats import read_adapter
from adapterkit.serve.coserve import FineTuneSpec
from adapterkit.serve.engine import Engine
from adapterkit.serve.types import EngineConfig, SamplingParams
from adapterkit.train import TrainConfig, Trainer
from adapterkit.train.repro import seed_everything
from adapterkit.train.toy import toy_llama

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def records(n: int = 12) -> list[dict]:
    return [{"prompt": f"Q{i}: {i} + {i % 5} =", "completion": f" {i + i % 5}" + "!" * (i % 3)} for i in range(n)]


def make_spec(job_id: str = "ftjob-a", **kw) -> FineTuneSpec:
    base = dict(job_id=job_id, examples=records(), adapter_config={"r": 4, "alpha": 8, "targets": TARGETS},
                n_epochs=2, batch_size=4, learning_rate=1e-2, warmup_steps=1, seed=3, checkpoint_every=2)
    base.update(kw)
    return FineTuneSpec(**base)


def make_engine(tmp_path: Path, tok, model=None, **kw) -> Engine:
    cfg = dict(fine_tuning=True, fine_tuning_dir=str(tmp_path / "ft"), max_num_batched_tokens=64, num_pages=256,
               ft_token_share=0.25, ft_time_share=0.5)
    cfg.update(kw)
    return Engine(model if model is not None else toy_llama(seed=0), tok, EngineConfig(**cfg))


def wait_done(engine: Engine, job_id: str, timeout: float = 120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = engine.fine_tuning.status(job_id)
        if st.status in ("succeeded", "failed", "cancelled"):
            return st
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {engine.fine_tuning.status(job_id)}")


def trainer_reference(tmp_path: Path, tok, spec: FineTuneSpec, max_length: int = 2048):
    """`adapterkit.train.Trainer` alone on the same data, seed and hyper-parameters."""
    model = toy_llama(seed=0)
    seed_everything(spec.seed)
    ak.add_adapter(model, "a", ak.LoRAConfig(**spec.adapter_config))
    steps = dict(steps=spec.max_steps) if spec.max_steps else dict(epochs=spec.n_epochs)
    cfg = TrainConfig(out_dir=tmp_path / "ref", lr=spec.learning_rate, batch_size=spec.batch_size,
                      warmup_steps=spec.warmup_steps, seed=spec.seed, max_length=max_length, progress=False,
                      log_every=1, **steps)
    return Trainer(model, spec.examples, config=cfg, tokenizer=tok, adapter_name="a").train()


class Traffic:
    """Greedy requests on another thread, back to back, until stopped."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.outputs, self.errors = engine, [], []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            prompts = [[3 + (i * 7 + k) % 200, 5 + k, 9] for k in range(3)]
            try:
                outs = self.engine.generate_sync(prompts, params=GREEDY, timeout=60)
                self.outputs += [(tuple(p), tuple(o.token_ids)) for p, o in zip(prompts, outs)]
                self.errors += [o.error for o in outs if o.error]
            except Exception as e:  # noqa: BLE001
                self.errors.append(repr(e))
            i += 1

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=60)


def assert_same_adapter(path_a: Path, path_b: Path, atol: float = 1e-5) -> None:
    a, b = read_adapter(path_a).tensors, read_adapter(path_b).tensors
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_job_under_inference_load_equals_trainer(tmp_path, tok):
    spec = make_spec()
    ref = trainer_reference(tmp_path, tok, spec)
    engine = make_engine(tmp_path, tok)
    try:
        traffic = Traffic(engine)
        while len(traffic.outputs) < 3:  # requests are flowing before the job starts
            time.sleep(0.01)
        events: list[dict] = []
        engine.fine_tuning.submit(spec, on_event=events.append)
        st = wait_done(engine, spec.job_id)
        served_during = len(traffic.outputs)
        traffic.stop()
    finally:
        engine.shutdown()
    assert st.status == "succeeded", st.error
    assert not traffic.errors
    assert served_during > 6  # inference went on while the job trained
    losses = [(e["step"], e["loss"]) for e in events if e["type"] == "metrics"]
    assert [s for s, _ in losses] == [s for s, _ in ref.losses] == list(range(1, ref.total_steps + 1))
    for (_, got), (_, want) in zip(losses, ref.losses):
        assert abs(got - want) <= 1e-4, (losses, ref.losses)
    assert ref.losses[-1][1] < ref.losses[0][1]  # it learned something: the comparison is not vacuous
    # slices of one or a few sequences: more slices than optimizer steps
    assert engine.fine_tuning.slices > 2 * ref.total_steps
    assert st.fine_tuned_model == f"ft:{engine.model_name}::{spec.job_id}"
    assert_same_adapter(tmp_path / "ft" / spec.job_id / "adapter", ref.adapter_dir)
    assert st.trained_tokens == ref.tokens
    assert [c["step"] for c in st.checkpoints] == [2, 4, 6]
