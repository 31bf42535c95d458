"""Co-serving (issue 11): fine-tuning jobs trained inside the engine loop while it serves.

Tiny random Llama and the byte tokenizer; every job is small enough for a few seconds on CPU.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from _engine_utils import hf_greedy

import adapterkit as ak
from adapterkit.formats import read_adapter
from adapterkit.errors import ConfigError, QueueFullError
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


def make_engine(tmp_path: Path, tok, model=None, start: bool = True, **kw) -> Engine:
    cfg = dict(fine_tuning=True, fine_tuning_dir=str(tmp_path / "ft"), max_num_batched_tokens=64, num_pages=256,
               ft_token_share=0.25, ft_time_share=0.5)
    cfg.update(kw)
    return Engine(model if model is not None else toy_llama(seed=0), tok, EngineConfig(**cfg), start=start)


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


def test_sliced_gradient_equals_whole_batch_gradient(tmp_path, tok):
    """One sequence per slice (a budget below any example's length): the gradient accumulated
    over the slices equals the gradient of the whole padded batch in one forward/backward."""
    spec = make_spec(max_steps=1)
    engine = make_engine(tmp_path, tok, start=False, max_num_batched_tokens=8)
    seen: dict[str, torch.Tensor] = {}
    engine.fine_tuning.submit(spec)
    engine.step()  # starts the job (attaches the adapter)
    job = engine.fine_tuning._active
    real = job.trainer.apply_gradients

    def spy(opt, params, loss_sum, n_sup, step):  # records the accumulated grads, then steps for real
        seen.update({n: p.grad.clone() for n, p in job.trainer.trainable()})
        seen["loss"] = torch.tensor(loss_sum / n_sup)
        return real(opt, params, loss_sum, n_sup, step)

    job.trainer.apply_gradients = spy
    slices0 = engine.fine_tuning.slices
    while engine.fine_tuning.status(spec.job_id).status == "running":
        engine.step()
    engine.shutdown()
    assert engine.fine_tuning.slices - slices0 == spec.batch_size  # one sequence per slice
    # the whole batch, the same way Trainer computes it
    model = toy_llama(seed=0)
    seed_everything(spec.seed)
    ak.add_adapter(model, "a", ak.LoRAConfig(**spec.adapter_config))
    tr = Trainer(model, spec.examples, config=TrainConfig(out_dir=tmp_path / "ref", batch_size=spec.batch_size,
                                                          seed=spec.seed, max_length=2048), tokenizer=tok)
    batch, _, _ = next(tr.batch_stream())
    assert batch["input_ids"].shape[1] > 8 and (batch["attention_mask"] == 0).any()  # padded: slicing trims it
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    loss_sum = tr.loss_sum(batch)
    (loss_sum / n_sup).backward()
    grads = {n.replace(".a.", f".{job.adapter}."): p.grad for n, p in tr.trainable()}
    assert sorted(grads) == sorted(k for k in seen if k != "loss")
    torch.testing.assert_close(seen["loss"], loss_sum.detach() / n_sup, atol=1e-6, rtol=0)
    for n, g in grads.items():
        assert g.abs().max() > 0 or "lora_A" in n  # B starts at 0, so A's first gradient is 0
        torch.testing.assert_close(seen[n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, tok):
    spec = make_spec()
    ref = trainer_reference(tmp_path, tok, spec)
    first = make_engine(tmp_path, tok, start=False)
    first.fine_tuning.submit(spec)
    while first.fine_tuning.status(spec.job_id).step < 3:  # checkpoint at 2, killed inside step 4's batch
        first.step()
    first.step()
    first.shutdown()
    assert not ak.list_adapters(first.hf_model)  # the in-training adapter left the model
    # a new process: fresh model, new engine, the job re-submitted with resume=True
    engine = make_engine(tmp_path, tok)
    try:
        events: list[dict] = []
        engine.fine_tuning.submit(spec, on_event=events.append, resume=True)
        st = wait_done(engine, spec.job_id)
        assert st.status == "succeeded", st.error
        # the checkpoint saved before the kill answers again, by name
        ck2 = engine.fine_tuning.model_name(spec.job_id, None, 2)
        assert engine.generate_sync([[5, 6, 7]], adapters=[ck2], params=GREEDY)[0].error is None
    finally:
        engine.shutdown()
    losses = [(e["step"], e["loss"]) for e in events if e["type"] == "metrics"]
    assert [s for s, _ in losses] == [3, 4, 5, 6]  # continued after checkpoint 2
    for (s, got) in losses:
        assert abs(got - ref.losses[s - 1][1]) <= 1e-4, (losses, ref.losses)
    assert [c["step"] for c in st.checkpoints] == [2, 4, 6]
    assert st.trained_tokens == ref.tokens
    assert_same_adapter(tmp_path / "ft" / spec.job_id / "adapter", ref.adapter_dir)
    # after another restart, a finished job's models are served again without retraining
    third = make_engine(tmp_path, tok)
    try:
        names = third.fine_tuning.register_saved(spec)
        assert sorted(names) == sorted([c["model"] for c in st.checkpoints] + [st.fine_tuned_model])
        assert third.generate_sync([[5, 6, 7]], adapters=[st.fine_tuned_model], params=GREEDY)[0].error is None
        assert third.fine_tuning.register_saved(spec) == []  # already registered
    finally:
        third.shutdown()


def test_checkpoints_and_final_model_answer_by_name_at_once(tmp_path, tok):
    spec = make_spec(learning_rate=5e-2)
    engine = make_engine(tmp_path, tok)
    served_when_announced: dict[str, bool] = {}

    def on_event(e: dict) -> None:  # engine thread, right after the save
        if "model" in e:
            served_when_announced[e["model"]] = e["model"] in engine.store

    prompts = [[5, 9, 14, 20], [3, 100, 40]]
    try:
        engine.fine_tuning.submit(spec, on_event=on_event)
        st = wait_done(engine, spec.job_id)
        t0 = time.perf_counter()
        engine.generate_sync(prompts[:1], adapters=[st.fine_tuned_model], params=SamplingParams(max_tokens=1))
        first_answer_s = time.perf_counter() - t0
        assert st.status == "succeeded", st.error
        served = [(c["model"], Path(c["path"])) for c in st.checkpoints]
        served.append((st.fine_tuned_model, tmp_path / "ft" / spec.job_id / "adapter"))
        assert served_when_announced == {name: True for name, _ in served}
        assert first_answer_s <= 1.0
        for name, path in served:
            outs = engine.generate_sync(prompts, adapters=[name] * len(prompts), params=GREEDY)
            ref = toy_llama(seed=0)
            ak.load_adapter(ref, path, name="x")
            ak.set_adapter(ref, "x")
            for p, o in zip(prompts, outs):
                assert o.token_ids == hf_greedy(ref, p, GREEDY.max_tokens), name
        # the final adapter moved the model: the comparison above was not against the base
        ids = torch.tensor([prompts[0]])
        with torch.no_grad():
            tuned = ref(ids).logits
            with ak.disable_adapters(ref):
                base = ref(ids).logits
        assert (tuned - base).abs().max() > 1e-2
    finally:
        engine.shutdown()


def test_inference_during_a_job_equals_inference_without_one(tmp_path, tok):
    prompts = [[3 + (i * 7 + k) % 200, 5 + k, 9] for i in range(4) for k in range(3)]
    plain = Engine(toy_llama(seed=0), tok, EngineConfig(max_num_batched_tokens=64, num_pages=256))
    try:
        want = {tuple(p): o.token_ids for p, o in zip(prompts, plain.generate_sync(prompts, params=GREEDY))}
    finally:
        plain.shutdown()
    engine = make_engine(tmp_path, tok)
    try:
        engine.fine_tuning.submit(make_spec(learning_rate=5e-2, max_steps=4, n_epochs=1))
        got = []
        while engine.fine_tuning.status("ftjob-a").status in ("queued", "running"):
            for p in prompts:  # one at a time: many land between training slices
                got.append((tuple(p), engine.generate_sync([p], params=GREEDY)[0].token_ids))
        assert engine.fine_tuning.status("ftjob-a").status == "succeeded"
    finally:
        engine.shutdown()
    assert len(got) >= len(prompts)
    for p, toks in got:
        assert toks == want[p], p


def test_nan_loss_fails_the_job_and_inference_carries_on(tmp_path, tok):
    engine = make_engine(tmp_path, tok)
    events: list[dict] = []
    try:
        engine.fine_tuning.submit(make_spec(learning_rate=1e30, max_steps=20), on_event=events.append)
        st = wait_done(engine, "ftjob-a")
        assert st.status == "failed"
        assert "loss" in st.error and ("nan" in st.error or "inf" in st.error) and st.error.startswith("step ")
        assert st.fine_tuned_model is None
        assert [e for e in events if e["type"] == "status"][-1]["status"] == "failed"
        out = engine.generate_sync([[5, 6, 7]], params=GREEDY)[0]
        assert out.error is None and len(out.token_ids) == GREEDY.max_tokens
        assert not (tmp_path / "ft" / "ftjob-a" / "adapter").exists()
        assert not ak.list_adapters(engine.hf_model)  # the failed job's adapter left the served model
        # a new job runs after the failed one
        engine.fine_tuning.submit(make_spec("ftjob-b", max_steps=1))
        assert wait_done(engine, "ftjob-b").status == "succeeded"
    finally:
        engine.shutdown()


def _listing(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def test_cancel_leaves_complete_files_only_and_queue_limit(tmp_path, tok):
    engine = make_engine(tmp_path, tok, max_fine_tuning_jobs=1)
    try:
        fts = engine.fine_tuning
        fts.submit(make_spec(max_steps=10_000, checkpoint_every=1))
        with pytest.raises(QueueFullError, match="max_fine_tuning_jobs=1"):
            fts.submit(make_spec("ftjob-b"))
        while fts.status("ftjob-a").step < 2:
            time.sleep(0.01)
        st = fts.cancel("ftjob-a")
        assert st.status == "cancelled"
        jdir = tmp_path / "ft" / "ftjob-a"
        before = _listing(jdir)
        time.sleep(0.3)
        assert _listing(jdir) == before  # nothing written after cancel returned
        assert not (jdir / "adapter").exists()
        assert not [p for p in jdir.rglob("*") if p.name.startswith(".")]  # no temp dir left
        for c in st.checkpoints:  # every saved checkpoint adapter is complete and still answers
            assert read_adapter(c["path"]).tensors
            assert engine.generate_sync([[5, 6]], adapters=[c["model"]], params=GREEDY)[0].error is None
        assert fts.cancel("ftjob-a").status == "cancelled"  # idempotent
        fts.submit(make_spec("ftjob-b", max_steps=1))  # the slot is free again
        assert wait_done(engine, "ftjob-b").status == "succeeded"
        assert not ak.list_adapters(engine.hf_model)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("change, field", [
    (dict(method="dora"), "method"),
    (dict(method="lorra"), "'lora'"),
    (dict(adapter_config={"rank": 4}), "adapter_config.rank"),
    (dict(adapter_config={"r": 128}), "adapter_config.r: rank 128 exceeds max_lora_rank=64"),
    (dict(adapter_config={"targets": ["q_prj"]}), "'q_proj'"),
    (dict(adapter_config={"r": 4, "bias": True}), "adapter_config.bias"),
    (dict(adapter_config={"init": "pissa"}), "adapter_config.init"),
    (dict(adapter_config={"dropout": 2.0}), "dropout"),
    (dict(batch_size=0), "batch_size"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(n_epochs=0), "n_epochs"),
    (dict(max_steps=0), "max_steps"),
    (dict(job_id="../x"), "job_id"),
    (dict(suffix="a:b"), "suffix"),
    (dict(examples=[]), "examples"),
])
def test_bad_config_names_the_field(tmp_path, tok, change, field):
    engine = make_engine(tmp_path, tok, start=False)
    with pytest.raises(ConfigError, match=__import__("re").escape(field)):
        engine.fine_tuning.submit(make_spec(**change))
    assert not engine.fine_tuning.has_work()


def test_engine_config_fine_tuning_fields():
    assert Engine(toy_llama(seed=0), None, EngineConfig(num_pages=8), start=False).fine_tuning is None
    with pytest.raises(ConfigError, match="fine_tuning_dir"):
        EngineConfig(fine_tuning=True)
    for bad in (dict(ft_token_share=0), dict(ft_time_share=1.5), dict(max_fine_tuning_jobs=0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            EngineConfig(**bad)


def test_inference_first_budgets(tmp_path, tok):
    """Busy engine: a slice holds at most ft_token_share of the step budget (one sequence at
    least) and training waits for inference to run d*(1-share)/share seconds after a slice of d.
    Idle engine: the whole budget, back to back."""
    engine = make_engine(tmp_path, tok, start=False, max_num_batched_tokens=200, ft_token_share=0.1,
                         ft_time_share=0.5)
    fts = engine.fine_tuning
    fts.submit(make_spec(max_steps=3))
    fts.work(busy=False, inference_s=0.0)  # starts the job
    fts.work(busy=False, inference_s=0.0)  # idle: the whole batch of 4 in one slice
    assert fts.status("ftjob-a").step == 1
    n = fts.slices
    fts.work(busy=True, inference_s=0.0)  # busy: the idle slice's time is owed to inference first
    owed = fts._owed
    assert owed > 0 and fts.slices == n
    while fts.slices == n:  # no slice until the inference time owed has passed
        fts.work(busy=True, inference_s=owed / 4)
    assert fts._credit == 0.0
    while fts.status("ftjob-a").step < 2:
        fts.work(busy=True, inference_s=1e9)
    n = fts.slices
    while fts.status("ftjob-a").step < 3:
        fts.work(busy=True, inference_s=1e9)
    assert fts.slices - n == 4  # busy: 20 tokens per slice, so one sequence each
    assert fts.status("ftjob-a").status == "succeeded"
    engine.shutdown()
