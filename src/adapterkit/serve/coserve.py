"""Co-serving (the FlexLLM idea): LoRA fine-tuning jobs trained inside the serving engine's loop,
interleaved with inference, and served by name as soon as each checkpoint is saved.

    engine = Engine(hf_model, tokenizer, EngineConfig(fine_tuning=True, fine_tuning_dir="ft"))
    st = engine.fine_tuning.submit(FineTuneSpec(job_id="ftjob-1", examples=[{"prompt": ..., "completion": ...}]))
    ...                                   # engine.fine_tuning.status("ftjob-1").fine_tuned_model
    engine.generate_sync(["Hi"], adapters=[engine.fine_tuning.model_name("ftjob-1", None)])

How a job runs. Every engine iteration first runs its inference batch as before; then, on the
same (engine) thread, the running job gets one *slice*: a forward and backward over a few
whole sequences of its current optimizer batch (a micro-batch). Gradients accumulate over the
slices of a batch, each slice's summed token loss divided by the supervised tokens of the whole
batch, and AdamW steps when the batch is done: the same arithmetic as `adapterkit.train.Trainer`
with that batch size, whose pieces (data order, loss, optimizer, schedule, clipping, checkpoint
format) are reused through its public slice methods. Slices are sequence-level: a sequence is
never split (FlexLLM's token-level backward is not attempted).

Inference first (`EngineConfig`): while requests are in the engine a slice holds at most
``ft_token_share * max_num_batched_tokens`` padded tokens (one sequence at least) and training
takes at most ``ft_time_share`` of the engine's time (after a slice of d seconds the next waits
until inference has run ``d * (1 - share) / share`` seconds). An idle engine trains back to back
with the whole token budget.

The job's LoRA is attached to the very base model the engine serves (no copy) under a unique
name and is active only inside its slices: outside them the model's active adapters are
whatever they were. Training never changes base weights (inits that rewrite the base, PiSSA
and OLoRA, are refused). The job's dropout RNG is its own torch RNG state, swapped in for its
slices, so other users of the global RNG neither disturb it nor are disturbed.

Files, under ``EngineConfig.fine_tuning_dir/<job_id>/``::

    checkpoints/step-000004/    the Trainer's atomic checkpoint (resume restores it exactly)
    models/ckpt-000004/         that step's adapter, native format, served as <model>:ckpt-4
    adapter/                    the final adapter, native format, served as <model>

Names: ``ft:<base>:<suffix>:<job_id>`` (empty suffix field when there is none, as OpenAI
does) and ``...:ckpt-<step>``. Servable methods: LoRA (the engine's runner executes LoRA
only; DoRA, LoRA bias and other methods are refused at submit with a ConfigError).
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterkit.errors import (
    AdapterError,
    ConfigError,
    DuplicateAdapterError,
    QueueFullError,
    TrainingDivergedError,
    did_you_mean,
)

log = logging.getLogger(__name__)
SERVABLE_METHODS = ("lora",)
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
_TERMINAL = ("succeeded", "failed", "cancelled")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SUFFIX = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# PEFT's spellings of LoRAConfig fields, accepted in adapter_config
_ALIASES = {"target_modules": "targets", "lora_alpha": "alpha", "lora_dropout": "dropout"}


class JobNotFoundError(AdapterError, KeyError):
    """No fine-tuning job with that id in this engine."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class FineTuneSpec:
    """One fine-tuning job (see the module doc). `examples`: ``{"messages": [...]}`` or
    ``{"prompt", "completion"}`` dicts; `adapter_config`: LoRAConfig fields (r, alpha, targets,
    dropout, use_rslora, init); `checkpoint_every`: optimizer steps (None: once per epoch)."""

    job_id: str
    examples: list[dict]
    validation_examples: list[dict] | None = None
    method: str = "lora"
    adapter_config: dict = field(default_factory=dict)
    n_epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    max_steps: int | None = None
    seed: int = 0
    suffix: str | None = None
    checkpoint_every: int | None = None


@dataclass
class JobStatus:
    """A snapshot of a job. `checkpoints`: ``{"step", "model", "path", "metrics": {"loss", ...}}``."""

    job_id: str
    status: str
    step: int
    total_steps: int
    trained_tokens: int
    error: str | None = None
    fine_tuned_model: str | None = None
    checkpoints: list[dict] = field(default_factory=list)


@dataclass(eq=False)
class _Job:
    spec: FineTuneSpec
    on_event: Callable[[dict], None] | None
    resume: bool
    dataset: Any  # SFTDataset
    eval_dataset: Any
    lora: Any  # LoRAConfig
    train_config: Any  # TrainConfig
    dir: Path
    total_steps: int
    status: str = "queued"
    step: int = 0
    trained_tokens: int = 0
    error: str | None = None
    fine_tuned_model: str | None = None
    checkpoints: list[dict] = field(default_factory=list)
    cancel_requested: bool = False
    # engine-thread state, set when the job starts
    adapter: str | None = None  # the LoRA's name inside the served model
    trainer: Any = None
    opt: Any = None
    sched: Any = None
    params: list = field(default_factory=list)
    stream: Any = None
    epoch: int = 0
    pos: int = 0
    batch: dict | None = None  # the optimizer batch being sliced
    lens: list[int] = field(default_factory=list)
    row: int = 0
    n_sup: int = 0
    n_tok: int = 0
    acc: torch.Tensor | None = None  # summed token loss of the batch so far
    rng: torch.Tensor | None = None  # the job's torch RNG state (dropout)
    t_window: float = 0.0  # wall time of the last metrics event
    elapsed_s: float = 0.0  # training time before this run (from a checkpoint) + this run's


class CoServe:
    """Fine-tuning jobs of one engine (``engine.fine_tuning``). Thread-safe; the training
    itself runs on the engine thread, called by its loop through :meth:`work`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.config = engine.config
        self.root = Path(self.config.fine_tuning_dir)
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[_Job] = deque()
        self._active: _Job | None = None
        self._lock = threading.RLock()  # job fields and the queue (short holds)
        self._work = threading.RLock()  # held for a whole slice: cancel waits for it
        self._credit = 0.0  # inference seconds since the last slice
        self._owed = 0.0  # inference seconds due before the next slice (ft_time_share)
        self.slice_seconds = 0.0  # training time so far (all jobs), for benchmarks
        self.slices = 0  # slices run so far (all jobs)

    # ------------------------------------------------------------------ public API
    def model_name(self, job_id: str, suffix: str | None, step: int | None = None) -> str:
        """The served name of a job's final adapter, or of its checkpoint at `step`."""
        name = f"ft:{self.engine.model_name}:{suffix or ''}:{job_id}"
        return name if step is None else f"{name}:ckpt-{step}"

    def submit(self, spec: FineTuneSpec, on_event: Callable[[dict], None] | None = None,
               resume: bool = False) -> JobStatus:
        """Validate and queue a job; it starts on the engine thread when no other job runs.

        Args:
            spec: the job.
            on_event: called with every event, from the engine thread (the "queued" and
                "cancelled" ones from the caller's); it must not block.
            resume: continue from the newest complete checkpoint in the job dir (a fresh
                start if there is none; a job whose last step is checkpointed just saves
                and serves its final adapter).
        Returns:
            The job's status ("queued": it starts on the engine thread).
        Raises:
            ConfigError: a bad field (named, with the closest valid name), an unservable
                method, rank above max_lora_rank, a job id in use, or an existing job dir
                with checkpoints and resume=False.
            DataError: an example the tokenizer cannot turn into a training example.
            QueueFullError: max_fine_tuning_jobs jobs are queued or running.
        """
        job = self._prepare(spec, on_event, resume)
        with self._lock:
            old = self._jobs.get(spec.job_id)
            if old is not None and old.status not in _TERMINAL:
                raise ConfigError(f"job_id: {spec.job_id!r} is already {old.status}")
            live = sum(1 for j in self._jobs.values() if j.status in ("queued", "running"))
            if live >= self.config.max_fine_tuning_jobs:
                raise QueueFullError(f"{live} fine-tuning job(s) already queued or running "
                                     f"(max_fine_tuning_jobs={self.config.max_fine_tuning_jobs}); retry later")
            self._jobs[spec.job_id] = job
            self._queue.append(job)
        self._emit(job, "status", f"job {spec.job_id} queued", status="queued")
        self._wake()
        return self.status(spec.job_id)

    def status(self, job_id: str) -> JobStatus:
        """A snapshot of job `job_id`. Raises JobNotFoundError."""
        with self._lock:
            j = self._get(job_id)
            return JobStatus(j.spec.job_id, j.status, j.step, j.total_steps, j.trained_tokens, j.error,
                             j.fine_tuned_model, [dict(c) for c in j.checkpoints])

    def list_jobs(self) -> list[JobStatus]:
        with self._lock:
            ids = list(self._jobs)
        return [self.status(i) for i in ids]

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued or running job (a finished one is returned as is). Waits for the
        slice in progress, so no file of the job is written after this returns; the adapter
        files already saved are complete (every save is atomic)."""
        with self._work:
            with self._lock:
                j = self._get(job_id)
                if j.status in _TERMINAL:
                    return self.status(job_id)
                if j in self._queue:
                    self._queue.remove(j)
                j.cancel_requested = True
                j.status = "cancelled"
        self._emit(j, "status", f"job {job_id} cancelled", status="cancelled")
        self._wake()  # the engine thread detaches the adapter
        return self.status(job_id)

    def register_saved(self, spec: FineTuneSpec) -> list[str]:
        """Register the adapters a job saved earlier (its checkpoints and final adapter) with
        the engine, e.g. after a restart. Returns the names registered now."""
        return self._register_saved(self.root / spec.job_id, spec.job_id, spec.suffix, None)

    def has_work(self) -> bool:
        return self._active is not None or bool(self._queue)

    def close(self) -> None:
        """Detach the in-training adapter from the model (engine shutdown; the job can resume
        on a new engine from its last checkpoint)."""
        with self._work:
            j, self._active = self._active, None
            if j is not None:
                self._detach(j)

    # ------------------------------------------------------------------ engine thread
    def work(self, busy: bool, inference_s: float) -> None:
        """One training slice if the priority rules allow it (called by the engine loop after
        each iteration, outside the engine lock). busy: requests are in the engine;
        inference_s: how long this iteration's inference step took."""
        if not self.has_work():
            return
        cfg = self.config
        if busy:
            self._credit += inference_s
            if self._credit < self._owed:
                return
            budget = max(1, int(cfg.ft_token_share * cfg.max_num_batched_tokens))
        else:
            budget = cfg.max_num_batched_tokens
        t0 = time.perf_counter()
        try:
            self._slice(budget)
        except Exception:  # noqa: BLE001 - _guard fails the job; this only keeps the engine loop alive
            log.exception("fine-tuning slice failed outside a job")
        d = time.perf_counter() - t0
        self.slice_seconds += d
        self.slices += 1
        self._credit, self._owed = 0.0, d * (1 - cfg.ft_time_share) / cfg.ft_time_share

    def _slice(self, budget: int) -> None:
        with self._work:
            j = self._active
            if j is None:
                with self._lock:
                    j = self._queue.popleft() if self._queue else None
                    if j is None:
                        return
                    j.status = "running"
                    self._active = j
                self._emit(j, "status", f"job {j.spec.job_id} started", status="running")
                self._guard(j, self._start, j)
                return
            if j.cancel_requested:
                self._active = None
                self._detach(j)
                return
            self._guard(j, self._train_slice, j, budget)

    def _guard(self, j: _Job, fn: Callable, *args: Any) -> None:
        """Run a piece of the job; any error fails the job (never the engine or its requests)."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - the job fails, inference carries on
            msg = str(e) if isinstance(e, (TrainingDivergedError, AdapterError)) else f"{type(e).__name__}: {e}"
            with self._lock:
                j.status, j.error = "failed", msg
                if self._active is j:
                    self._active = None
            self._detach(j)
            self._emit(j, "status", f"job {j.spec.job_id} failed: {msg}", status="failed")

    # ------------------------------------------------------------------ job steps
    def _start(self, j: _Job) -> None:
        """Attach the LoRA (seeded as `Trainer` users seed it), build the trainer pieces, and
        restore the newest checkpoint when resuming."""
        import adapterkit as ak
        from adapterkit.state import get_state
        from adapterkit.train import checkpoint as ckpt
        from adapterkit.train.repro import seed_everything
        from adapterkit.train.trainer import Trainer

        model, spec = self.engine.hf_model, j.spec
        server_rng = ckpt.capture_rng()
        try:
            seed_everything(spec.seed)  # the adapter's init draws from it, as in `adapterkit train`
            prev = get_state(model, create=True).active
            # a name fixed by the job id: the checkpoint's tensor names contain it
            name = f"ft-{spec.job_id.replace('.', '_')}"
            ak.add_adapter(model, name, j.lora)  # DuplicateAdapterError: the job trains in this model already
            j.adapter = name  # only now: a failed start must not delete another adapter of that name
            ak.set_adapter(model, prev)  # the first adapter added becomes active: not for inference
            others = [n for n, p in model.named_parameters() if p.requires_grad and f".{j.adapter}." not in n]
            if others:
                raise ConfigError(f"the served model has trainable parameters outside the job's adapter "
                                  f"(first: {others[0]!r}); freeze them before serving with fine-tuning")
            seed_everything(spec.seed)  # as Trainer.train does before its first step
            j.trainer = tr = Trainer(model, j.dataset, eval_data=j.eval_dataset, config=j.train_config,
                                     tokenizer=self.engine.tokenizer, adapter_name=j.adapter)
            j.opt, j.sched = tr.make_optimizer(j.total_steps)
            j.params = [p for _, p in tr.trainable()]
            root = j.dir / "checkpoints"
            ckpt.remove_stale_temps(root)
            last = ckpt.latest_checkpoint(root) if j.resume else None
            if last is not None:
                c = ckpt.load_checkpoint(last)
                tr.restore(c, j.opt, j.sched)  # sets the global RNG to the job's: captured below
                j.step, j.epoch, j.pos = c.step, int(c.state["epoch"]), int(c.state["batch_in_epoch"])
                j.trained_tokens, j.elapsed_s = int(c.state.get("tokens", 0)), float(c.state.get("elapsed_s", 0.0))
                j.checkpoints = list(c.state.get("served_checkpoints", []))
            j.rng = torch.random.get_rng_state()
        finally:
            ckpt.restore_rng(server_rng)
        j.stream = tr.batch_stream(j.epoch, j.pos)
        j.t_window = time.perf_counter()
        self._register_saved(j.dir, spec.job_id, spec.suffix, j.step)
        if j.step >= j.total_steps:  # killed after its last checkpoint
            self._finish(j)

    def _train_slice(self, j: _Job, budget: int) -> None:
        """Forward/backward over the next rows of the current batch; an optimizer step when
        the batch is done."""
        from adapterkit.train.data import IGNORE_INDEX

        if j.batch is None:
            batch, j.epoch, j.pos = next(j.stream)
            j.batch, j.row = batch, 0
            j.n_sup = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            j.n_tok = int(batch["attention_mask"].sum())
            j.lens = batch["attention_mask"].sum(1).tolist()
            j.acc = torch.zeros(())
        # the rows of this slice: as many as fit the budget once padded (one at least)
        B, lo = len(j.lens), j.row
        hi, T = lo + 1, j.lens[lo]
        while hi < B and (hi - lo + 1) * max(T, j.lens[hi]) <= budget:
            T = max(T, j.lens[hi])
            hi += 1
        part = {k: v[lo:hi, :T] for k, v in j.batch.items()}  # = the collate of these rows alone
        with self._training(j):
            loss_sum = j.trainer.loss_sum(part)
            (loss_sum / j.n_sup).backward()  # token mean over the whole optimizer batch
        assert j.acc is not None
        j.acc += loss_sum.detach().cpu()
        j.row = hi
        if hi == B:
            self._optimizer_step(j)

    def _optimizer_step(self, j: _Job) -> None:
        assert j.acc is not None
        lr = j.sched.get_last_lr()[0]
        with self._training(j):
            loss, _ = j.trainer.apply_gradients(j.opt, j.params, float(j.acc), j.n_sup, j.step + 1)
        j.sched.step()
        now = time.perf_counter()
        with self._lock:
            j.step += 1
            j.trained_tokens += j.n_tok
        j.batch = None
        dt = max(now - j.t_window, 1e-9)
        j.elapsed_s += dt
        j.t_window = now
        self._emit(j, "metrics", f"step {j.step}/{j.total_steps}: training loss={loss:.4f}", step=j.step,
                   total_steps=j.total_steps, loss=loss, learning_rate=lr, tokens=j.n_tok,
                   tokens_per_s=j.n_tok / dt)
        every = j.train_config.save_every
        if every and (j.step % every == 0 or j.step == j.total_steps):
            self._checkpoint(j, loss)
        if j.step >= j.total_steps:
            self._finish(j)

    def _checkpoint(self, j: _Job, loss: float) -> None:
        """Save the step's adapter (native, atomic) and the Trainer checkpoint, and serve the
        adapter by name at once."""
        import adapterkit as ak
        from adapterkit.train import checkpoint as ckpt

        metrics: dict[str, float] = {"loss": loss}
        if j.eval_dataset is not None:
            with self._training(j):
                metrics["valid_loss"] = j.trainer.evaluate()
        name = self.model_name(j.spec.job_id, j.spec.suffix, j.step)
        path = ak.save_adapter(self.engine.hf_model, j.adapter, j.dir / "models" / f"ckpt-{j.step:06d}")
        entry = {"step": j.step, "model": name, "path": str(path), "metrics": metrics}
        tc = j.train_config
        state = {"step": j.step, "epoch": j.epoch, "batch_in_epoch": j.pos, "total_steps": j.total_steps,
                 "config": tc.to_dict(), "data_fingerprint": j.trainer.data_fingerprint(),
                 "num_examples": len(j.dataset), "tokens": j.trained_tokens, "elapsed_s": j.elapsed_s,
                 "log_window": {"losses": [], "tokens": 0, "seconds": 0.0},
                 "num_threads": torch.get_num_threads(), "world_size": 1,
                 "served_checkpoints": j.checkpoints + [entry]}
        tensors = {n: p.detach() for n, p in j.trainer.trainable()}
        with self._job_rng(j):  # the checkpoint's RNG is the job's (capture_rng reads the global one)
            ckpt.save_checkpoint(j.dir / "checkpoints", j.step, tensors,
                                 {"optimizer": j.opt.state_dict(), "scheduler": j.sched.state_dict()}, state, tc.keep_last)
        self._register(name, path)
        with self._lock:
            j.checkpoints.append(entry)
        self._emit(j, "checkpoint", f"checkpoint at step {j.step}: {name}", step=j.step, model=name, metrics=metrics)

    def _finish(self, j: _Job) -> None:
        import adapterkit as ak

        name = self.model_name(j.spec.job_id, j.spec.suffix)
        path = ak.save_adapter(self.engine.hf_model, j.adapter, j.dir / "adapter")
        self._register(name, path)
        with self._lock:
            j.status, j.fine_tuned_model = "succeeded", name
            if self._active is j:
                self._active = None
        self._detach(j)
        self._emit(j, "status", f"job {j.spec.job_id} succeeded: {name}", status="succeeded", model=name)

    # ------------------------------------------------------------------ helpers
    def _training(self, j: _Job) -> Any:
        """Context: the job's adapter alone active, train mode, the job's RNG, the trainer's
        deterministic-algorithms setting; all undone on exit."""
        import contextlib

        import adapterkit as ak
        from adapterkit.state import get_state
        from adapterkit.train.repro import deterministic_algorithms, resolve_deterministic

        @contextlib.contextmanager
        def ctx():
            model = self.engine.hf_model
            state = get_state(model, create=True)
            prev, was_training = state.active, model.training
            ak.set_adapter(model, j.adapter)
            model.train()
            try:
                with self._job_rng(j), deterministic_algorithms(
                        resolve_deterministic(j.train_config.deterministic, j.trainer.device)):
                    yield
            finally:
                model.train(was_training)
                ak.set_adapter(model, prev)

        return ctx()

    def _job_rng(self, j: _Job) -> Any:
        import contextlib

        @contextlib.contextmanager
        def ctx():
            outer = torch.random.get_rng_state()
            if j.rng is not None:
                torch.random.set_rng_state(j.rng)
            try:
                yield
            finally:
                j.rng = torch.random.get_rng_state()
                torch.random.set_rng_state(outer)

        return ctx()

    def _detach(self, j: _Job) -> None:
        """Remove the job's adapter from the served model and drop its training state."""
        import adapterkit as ak

        if j.adapter is not None:
            try:
                ak.delete_adapter(self.engine.hf_model, j.adapter)
            except AdapterError:
                pass  # never attached (failed before add_adapter finished)
        j.trainer = j.opt = j.sched = j.stream = j.batch = None
        j.params = []

    def _register(self, name: str, path: Path) -> None:
        try:
            self.engine.register_adapter(name, path)  # on the engine thread: runs directly
        except DuplicateAdapterError:  # a resumed job re-saving a step: same weights, same name
            self.engine.unregister_adapter(name, wait=False)
            self.engine.register_adapter(name, path)

    def _register_saved(self, jdir: Path, job_id: str, suffix: str | None, upto: int | None) -> list[str]:
        """Register checkpoint models up to step `upto` (all if None) and the final adapter."""
        done = []
        models = sorted((jdir / "models").glob("ckpt-*")) if (jdir / "models").is_dir() else []
        for p in models:
            step = int(p.name.split("-")[1])
            if (upto is None or step <= upto) and (p / "adapter_config.json").is_file():
                done += self._register_new(self.model_name(job_id, suffix, step), p)
        if upto is None and (jdir / "adapter" / "adapter_config.json").is_file():
            done += self._register_new(self.model_name(job_id, suffix), jdir / "adapter")
        return done

    def _register_new(self, name: str, path: Path) -> list[str]:
        if name in self.engine.store:
            return []
        self.engine.register_adapter(name, path)
        return [name]

    def _get(self, job_id: str) -> _Job:
        j = self._jobs.get(job_id)
        if j is None:
            raise JobNotFoundError(f"no fine-tuning job {job_id!r}.{did_you_mean(job_id, self._jobs)}")
        return j

    def _emit(self, j: _Job, kind: str, message: str, **extra: Any) -> None:
        if j.on_event is None:
            return
        try:
            j.on_event({"type": kind, "created_at": int(time.time()), "message": message, **extra})
        except Exception:  # noqa: BLE001 - a failing listener must not fail the job
            pass

    def _wake(self) -> None:
        cv = getattr(self.engine, "_cv", None)
        if cv is not None:
            with cv:
                cv.notify_all()

    # ------------------------------------------------------------------ validation
    def _prepare(self, spec: FineTuneSpec, on_event: Callable[[dict], None] | None, resume: bool) -> _Job:
        """Check every field and tokenize the data (on the caller's thread)."""
        from adapterkit.methods.lora import LoRAConfig
        from adapterkit.registry import list_methods
        from adapterkit.train import checkpoint as ckpt
        from adapterkit.train.config import TrainConfig
        from adapterkit.train.data import build_dataset

        if not isinstance(spec, FineTuneSpec):
            raise ConfigError(f"spec must be a FineTuneSpec, got {type(spec).__name__}")
        if not (isinstance(spec.job_id, str) and _ID.match(spec.job_id)):
            raise ConfigError(f"job_id: must be 1-128 letters, digits, '_', '-' or '.', got {spec.job_id!r}")
        if spec.suffix is not None and not (isinstance(spec.suffix, str) and _SUFFIX.match(spec.suffix)):
            raise ConfigError(f"suffix: must be 1-64 letters, digits, '_', '-' or '.', got {spec.suffix!r}")
        if spec.method not in SERVABLE_METHODS:
            known = list_methods()
            why = ("the engine serves only " + ", ".join(SERVABLE_METHODS) if spec.method in known
                   else f"unknown method.{did_you_mean(str(spec.method), known)}")
            raise ConfigError(f"method: {spec.method!r} cannot be fine-tuned here: {why}")

        def is_int(v: Any, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        for name, low in (("n_epochs", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0)):
            if not is_int(getattr(spec, name), low):
                raise ConfigError(f"{name}: must be an int >= {low}, got {getattr(spec, name)!r}")
        for name in ("max_steps", "checkpoint_every"):
            v = getattr(spec, name)
            if v is not None and not is_int(v, 1):
                raise ConfigError(f"{name}: must be None or an int >= 1, got {v!r}")
        lr = spec.learning_rate
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"learning_rate: must be a finite number > 0, got {lr!r}")
        lora = self._lora_config(spec.adapter_config, LoRAConfig)

        tok, max_len = self.engine.tokenizer, self.config.max_model_len
        if not isinstance(spec.examples, list) or not spec.examples:
            raise ConfigError("examples: must be a non-empty list of examples")
        ds = build_dataset(spec.examples, tok, max_len)
        eval_ds = build_dataset(spec.validation_examples, tok, max_len) if spec.validation_examples else None
        vocab = self.engine.runner.vocab_size
        for what, d in (("examples", ds), ("validation_examples", eval_ds)):
            if d is not None and d.max_token_id() >= vocab:
                raise ConfigError(f"{what}: token id {d.max_token_id()} is outside the model's vocabulary ({vocab})")
        per_epoch = math.ceil(len(ds) / spec.batch_size)
        tc = TrainConfig(out_dir=self.root / spec.job_id, lr=float(lr), steps=spec.max_steps,
                         epochs=None if spec.max_steps else spec.n_epochs, batch_size=spec.batch_size,
                         warmup_steps=spec.warmup_steps, seed=spec.seed, max_length=max_len,
                         save_every=spec.checkpoint_every or per_epoch, keep_last=2, progress=False)
        jdir = self.root / spec.job_id
        if not resume and ckpt.list_checkpoints(jdir / "checkpoints"):
            raise ConfigError(f"job_id: {jdir} already holds checkpoints of an earlier run; resume=True continues it")
        return _Job(spec=spec, on_event=on_event, resume=resume, dataset=ds, eval_dataset=eval_ds, lora=lora,
                    train_config=tc, dir=jdir, total_steps=tc.total_steps(len(ds)))

    def _lora_config(self, given: Any, cls: Any) -> Any:
        """The LoRAConfig of `adapter_config`, refused where the engine could not serve it."""
        if not isinstance(given, dict):
            raise ConfigError(f"adapter_config: must be an object of LoRA fields, got {type(given).__name__}")
        fields = {_ALIASES.get(k, k): v for k, v in given.items()}
        allowed = [f for f in cls.field_names() if f != "modules_to_save"]
        for k in fields:
            if k not in allowed:
                raise ConfigError(f"adapter_config.{k}: not a LoRA field.{did_you_mean(k, allowed + list(_ALIASES))}")
        shapes = self.engine.runner.module_shapes()
        targets = fields.get("targets")
        if targets is None:
            fields["targets"] = [m for m in ("q_proj", "v_proj") if m in shapes] or sorted(shapes)
        elif isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise ConfigError(f"adapter_config.targets: must be a non-empty list of module names, got {targets!r}")
        else:
            for t in targets:
                if t not in shapes:
                    raise ConfigError(f"adapter_config.targets: the engine cannot serve a LoRA on {t!r}."
                                      f"{did_you_mean(str(t), shapes)} Servable: {', '.join(shapes)}")
        if fields.get("bias"):
            raise ConfigError("adapter_config.bias: the engine cannot serve a LoRA bias; leave it false")
        if fields.get("init") in ("pissa", "olora"):
            raise ConfigError(f"adapter_config.init: {fields['init']!r} rewrites the base weights the engine "
                              "serves; use 'kaiming' or 'gaussian'")
        try:
            lora = cls(**fields, modules_to_save=())
        except ConfigError as e:
            raise ConfigError(f"adapter_config: {e}") from None
        if lora.r > self.config.max_lora_rank:
            raise ConfigError(f"adapter_config.r: rank {lora.r} exceeds max_lora_rank={self.config.max_lora_rank}")
        return lora
