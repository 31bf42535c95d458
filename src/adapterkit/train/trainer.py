"""The adapter trainer: AdamW on the trainable params, warmup + decay, grad accumulation,
clipping, periodic eval, atomic resumable checkpoints, metrics.jsonl and a loss plot.

The loss is the mean cross-entropy over *supervised* tokens (labels != -100) of the whole
optimizer step: each micro-batch contributes ``sum of token losses / supervised tokens of the
step``, so ``grad_accum=k, batch_size=b`` computes the same gradient as ``batch_size=k*b``
(padding aside). ``loss_terms`` (regularizers such as SORSA's orthogonality penalty) are
added once per optimizer step.

Reproducibility (see :mod:`adapterkit.train.repro`): the trainer seeds python/torch/numpy
from ``config.seed``, draws the data order from a generator seeded by ``(seed, epoch)`` and
by default (``deterministic="auto"``) runs CPU training under
``torch.use_deterministic_algorithms``; with the adapter's init seeded too (``adapterkit
train`` does it), two same-seed runs give bit-for-bit equal losses and adapters on CPU.

Resuming restores the trainable tensors, AdamW and scheduler state, every RNG, the data
position and the metrics window (the losses and tokens since the last ``metrics.jsonl``
record), so ``N`` steps straight and ``k`` steps + kill + resume + ``N-k`` steps give the
same losses and the same metrics records, bit for bit on CPU (tested with a ``kill -9``).

Under ``torchrun`` / ``accelerate launch`` (see :mod:`adapterkit.train.distributed`) each rank
trains on its slice of every global batch, ``batch_size`` is per rank, and only rank 0 writes
checkpoints, metrics, the plot and the adapter; ``K`` ranks x batch ``b`` follow the loss
curve of 1 rank x batch ``K*b``.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.errors import (
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    DataError,
    TrainingDivergedError,
    did_you_mean,
)
from adapterkit.train import checkpoint as ckpt
from adapterkit.train import distributed as dist
from adapterkit.train.config import RESUME_SENSITIVE, TrainConfig, make_lr_lambda
from adapterkit.train.data import IGNORE_INDEX, PadCollator, SFTDataset, build_dataset, pad_token_id_for
from adapterkit.train.metrics import MetricsWriter, NullMetricsWriter, plot_losses
from adapterkit.train.repro import deterministic_algorithms, resolve_deterministic, seed_everything

log = logging.getLogger(__name__)
LossTerm = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    """What a :meth:`Trainer.train` call did.

    Attributes:
        steps: the global optimizer step reached (== total steps when finished).
        losses: ``(step, mean token loss)`` for every step run by this call.
        eval_losses: ``(step, mean token eval loss)`` for every eval of this call.
        final_loss / eval_loss: the last of each (None when there was none).
        tokens: non-pad tokens processed by this call.
        resumed_from: the checkpoint this call continued from, if any.
    """

    steps: int
    total_steps: int
    losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    final_loss: float | None
    eval_loss: float | None
    tokens: int
    elapsed_s: float
    out_dir: Path
    metrics_path: Path
    plot_path: Path | None
    adapter_dir: Path | None
    last_checkpoint: Path | None
    resumed_from: Path | None = None


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"the model returned {type(out).__name__}; expected logits (B, T, V) or an object with .logits")


class Trainer:
    """Trains the parameters of ``model`` that have ``requires_grad`` (the adapter's).

    Args:
        model: a causal LM called as ``model(input_ids=(B, T), attention_mask=(B, T))``
            returning logits ``(B, T, V)`` (or an object with ``.logits``), e.g. an HF
            ``*ForCausalLM`` with an adapter added by ``adapterkit.add_adapter``.
        train_data / eval_data: a ``.jsonl`` path, a list of dicts, a torch Dataset or an
            :class:`SFTDataset` (see :mod:`adapterkit.train.data`).
        config: hyper-parameters (default ``TrainConfig()``).
        tokenizer: HF tokenizer for text data (and the pad id).
        adapter_name: if given, the adapter is saved to ``out_dir/adapter`` at the end.
        loss_terms: callables ``model -> scalar tensor`` added to the loss each step.
    Raises:
        ConfigError: no trainable parameters, unknown adapter, bad loss terms.
        DataError: malformed data, or token ids outside the model's vocabulary.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        eval_data: Any = None,
        config: TrainConfig | None = None,
        tokenizer: Any = None,
        adapter_name: str | None = None,
        loss_terms: Sequence[LossTerm] = (),
    ) -> None:
        self.model = model
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        self.tokenizer = tokenizer
        self.adapter_name = adapter_name
        self.loss_terms = tuple(loss_terms)
        for t in self.loss_terms:
            if not callable(t):
                raise ConfigError(f"loss_terms must be callables model -> scalar tensor, got {type(t).__name__}")
        if not self._trainable():
            raise ConfigError(
                "the model has no parameters with requires_grad=True, so there is nothing to train; "
                "add an adapter first (adapterkit.add_adapter), or make a loaded one trainable: "
                "adapterkit.load_adapter(..., trainable=True) (loads are frozen by default)"
            )
        if adapter_name is not None:
            from adapterkit.api import list_adapters  # lazy: the core imports nothing from train/

            names = list_adapters(model)
            if adapter_name not in names:
                raise AdapterNotFoundError(f"adapter {adapter_name!r} is not attached to the model (attached: {names})."
                                           f"{did_you_mean(adapter_name, names)}")
        self.train_ds = build_dataset(train_data, tokenizer, self.config.max_length)
        self.eval_ds = build_dataset(eval_data, tokenizer, self.config.max_length) if eval_data is not None else None
        self._check_vocab(self.train_ds, "train_data")
        if self.eval_ds is not None:
            self._check_vocab(self.eval_ds, "eval_data")
        self.collate = PadCollator(pad_token_id_for(tokenizer))
        self.device = next(model.parameters()).device
        self.use_bf16 = self._resolve_bf16()
        self.dist = dist.setup(self.device)  # world 1 unless launched by torchrun / accelerate
        # with a sharded base every forward/backward is a collective, so the ranks must run
        # the same number of them: a rank without data runs a fully masked one (_idle_batch)
        self._lockstep = self.config.fsdp and self.dist.enabled
        if self._lockstep:
            dist.shard_frozen_base(model, self.device)
        elif self.config.fsdp:
            log.warning("fsdp=True has no effect in a single process (launch with torchrun / accelerate launch)")

    # -- set-up helpers -------------------------------------------------------------------
    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _check_vocab(self, ds: SFTDataset, what: str) -> None:
        get = getattr(self.model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        n = getattr(emb, "num_embeddings", None)
        if n is not None and ds.max_token_id() >= n:
            bad = next(ex for ex in ds.examples if int(ex.input_ids.max()) >= n)
            raise DataError(f"{bad.source} ({what}): token id {int(bad.input_ids.max())} >= the model's vocabulary size {n}; wrong tokenizer?")

    def _resolve_bf16(self) -> bool:
        if self.config.bf16 == "auto":
            # on CPU bf16 autocast is slower than fp32 for small models and changes numerics
            return self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return bool(self.config.bf16)

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    def _data_fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.train_ds.examples:
            h.update(ex.input_ids.numpy().tobytes())
            h.update(ex.labels.numpy().tobytes())
        return h.hexdigest()[:16]

    # -- forward / loss -------------------------------------------------------------------
    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed token cross-entropy of one micro-batch (scalar, float32)."""
        kwargs: dict[str, Any] = {}
        if getattr(getattr(self.model, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False  # no KV cache during training: it only costs memory
        with self._autocast():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        logits = _logits(out)  # (B, T, V)
        labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted from positions < t
        mask = labels != IGNORE_INDEX
        # only the supervised rows are upcast: a float32 copy of all (B, T, V) logits is huge
        sel = logits[:, :-1][mask]  # (N, V)
        return F.cross_entropy(sel.float(), labels[mask], reduction="sum")

    def _idle_batch(self, ds: SFTDataset) -> dict[str, torch.Tensor]:
        """One example with every label masked: a forward/backward that adds exactly 0."""
        b = self._to_device(self.collate([ds[0]]))
        return {**b, "labels": torch.full_like(b["labels"], IGNORE_INDEX)}

    def _loss_terms_value(self) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for term in self.loss_terms:
            v = term(self.model)
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                what = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ConfigError(f"loss term {getattr(term, '__name__', term)!r} must return a scalar tensor, got {what}")
            total = total + v.reshape(()).float()
        return total

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the eval data (supervised tokens only), in eval mode."""
        if self.eval_ds is None:
            raise ConfigError("evaluate() needs eval_data")
        was_training = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        try:
            bs, world, rank, size = self.config.batch_size, self.dist.world_size, self.dist.rank, len(self.eval_ds)
            n_batches = math.ceil(size / bs)
            for k in range(math.ceil(n_batches / world)):  # rank r: batches r, r+K, ...
                i = (k * world + rank) * bs
                if i >= size:
                    if self._lockstep:
                        self._loss_sum(self._idle_batch(self.eval_ds))
                    continue
                batch = self._to_device(self.collate([self.eval_ds[j] for j in range(i, min(i + bs, size))]))
                total += float(self._loss_sum(batch))
                n += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        finally:
            self.model.train(was_training)
            if self._lockstep:
                dist.reshard(self.model)
        if self.dist.enabled:
            total, n = dist.all_reduce_sum(torch.tensor([total, n], dtype=torch.float64, device=self.device)).tolist()
        return total / max(n, 1)

    # -- data order -----------------------------------------------------------------------
    def _batches(self, epoch: int, pos: int) -> Iterator[tuple[dict[str, torch.Tensor] | None, int, int]]:
        """Endless micro-batches of this rank; yields ``(batch, epoch, position after it)``.

        Epoch ``e`` uses the permutation seeded by ``(seed, e)``, so the data position is
        just two ints and resuming never replays or skips an example. With ``K`` ranks the
        position counts global batches of ``K * batch_size`` and rank ``r`` takes the
        ``r``-th slice of each; a rank left without examples by the short last batch of
        an epoch gets ``None``.
        """
        n, bs = len(self.train_ds), self.config.batch_size
        gbs, r = bs * self.dist.world_size, self.dist.rank
        per_epoch = math.ceil(n / gbs)
        while True:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g).tolist()
            while pos < per_epoch:
                idx = perm[pos * gbs : (pos + 1) * gbs][r * bs : (r + 1) * bs]
                pos += 1
                yield (self.collate([self.train_ds[i] for i in idx]) if idx else None), epoch, pos
            epoch, pos = epoch + 1, 0

    # -- resume ---------------------------------------------------------------------------
    def _find_checkpoint(self, resume: bool | str | Path, root: Path) -> Path | None:
        if resume is True:
            return ckpt.latest_checkpoint(root)
        p = Path(resume)
        if (p / ckpt.MARKER).exists() or ckpt.is_step_dir_name(p.name):
            return p  # load_checkpoint refuses it if incomplete
        found = ckpt.latest_checkpoint(p / "checkpoints") or ckpt.latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"{p}: no complete checkpoint found to resume from")
        return found

    def _load_for_resume(self, resume: bool | str | Path, root: Path) -> tuple[Path | None, Any]:
        """``(checkpoint path, Checkpoint)``, ``(None, None)`` for a fresh start, or ``(None, error)``.

        The error is returned rather than raised so that rank 0 can hand it to the other
        ranks, which would otherwise wait for it forever.
        """
        try:
            if not resume:
                if ckpt.list_checkpoints(root):
                    raise CheckpointError(f"{root} already holds checkpoints of an earlier run; pass resume=True "
                                          "to continue it, or use another out_dir")
                return None, None
            path = self._find_checkpoint(resume, root)
            return path, (ckpt.load_checkpoint(path) if path is not None else None)
        except CheckpointError as e:
            return None, e

    def _restore(self, c: ckpt.Checkpoint, opt: torch.optim.Optimizer, sched: Any, fingerprint: str) -> None:
        saved_cfg = c.state.get("config", {})
        mine = self.config.to_dict()
        # the per-rank batch may change with the world size; the global batch may not
        diff = [f"{k}: checkpoint {saved_cfg.get(k)!r} vs now {mine[k]!r}" for k in RESUME_SENSITIVE
                if k != "batch_size" and saved_cfg.get(k) != mine[k]]
        saved_world, world = int(c.state.get("world_size", 1)), self.dist.world_size
        saved_b = saved_cfg.get("batch_size")
        if not isinstance(saved_b, int) or saved_b * saved_world != self.config.batch_size * world:
            diff.append(f"global batch (batch_size x processes): checkpoint {saved_b} x {saved_world} vs now "
                        f"{self.config.batch_size} x {world}; keep the product, e.g. batch_size "
                        f"{(saved_b or 0) * saved_world / world:g} with {world} process(es)")
        if diff:
            raise CheckpointError(f"{c.path}: cannot resume with a different config ({'; '.join(diff)}); use a new out_dir")
        if c.state.get("data_fingerprint") != fingerprint:
            raise CheckpointError(f"{c.path}: the training data differs from the data of the checkpointed run; use a new out_dir")
        params = dict(self._trainable())
        missing = sorted(set(params) - set(c.tensors))
        extra = sorted(set(c.tensors) - set(params))
        if missing or extra:
            raise CheckpointError(f"{c.path}: trainable parameters differ: missing in checkpoint {missing[:5]}, not trainable now {extra[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                t = c.tensors[name]
                if t.shape != p.shape:
                    raise CheckpointError(f"{c.path}: tensor {name!r} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))
        opt.load_state_dict(c.optim["optimizer"])
        sched.load_state_dict(c.optim["scheduler"])
        ckpt.restore_rng(c.rng)

    def _make_optimizer(self) -> torch.optim.AdamW:
        decay = [p for _, p in self._trainable() if p.ndim >= 2]
        no_decay = [p for _, p in self._trainable() if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": self.config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=(0.9, 0.999), eps=1e-8)

    # -- the loop -------------------------------------------------------------------------
    def _optimizer_step(self, micro: list[dict[str, torch.Tensor] | None], opt: torch.optim.Optimizer,
                        params: list[nn.Parameter], step: int) -> tuple[float, float, float, int]:
        """Forward/backward over the micro-batches, clip, one AdamW step.

        Returns:
            (mean token loss, loss_terms value, pre-clip grad norm, non-pad tokens).
        Raises:
            TrainingDivergedError: NaN/Inf loss or gradient (the params are left untouched).
        """
        batches = [self._to_device(b) for b in micro if b is not None]
        n_sup = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
        if self.dist.enabled:  # normalise by the supervised tokens of the whole step, all ranks
            n_sup, n_tok = (int(x) for x in dist.all_reduce_sum(torch.tensor([n_sup, n_tok], device=self.device)).tolist())
        if self._lockstep:
            batches += [self._idle_batch(self.train_ds) for b in micro if b is None]
        step_loss = torch.zeros((), device=self.device)
        for b in batches:
            loss_sum = self._loss_sum(b)
            (loss_sum / n_sup).backward()  # token mean over the whole optimizer step
            step_loss += loss_sum.detach()
        aux = 0.0
        if self.loss_terms:
            reg = self._loss_terms_value()
            if reg.requires_grad and self.dist.is_main:  # a constant term changes the reported loss only
                reg.backward()  # on rank 0 alone: the all-reduce below sums it once, as in 1 process
            aux = float(reg.detach())
        if self.dist.enabled:
            step_loss = dist.all_reduce_grads(params, step_loss)
        loss = float(step_loss) / n_sup
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not (math.isfinite(loss) and math.isfinite(aux) and math.isfinite(grad_norm)):
            raise TrainingDivergedError(f"step {step}: loss {loss}, loss_terms {aux}, grad norm {grad_norm}; "
                                        "lower the lr or check the data")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, aux, grad_norm, n_tok

    def train(self, resume: bool | str | Path = False) -> TrainResult:
        """Run (or continue) training to ``config.total_steps``.

        Args:
            resume: False: start fresh (refused if ``out_dir`` already holds checkpoints);
                True: continue from the newest complete checkpoint in ``out_dir`` (fresh
                start if there is none); a path: that checkpoint dir, or the newest one
                of that run dir.
        Returns:
            A :class:`TrainResult`.
        Raises:
            CheckpointError: resuming with another config/data, or fresh start over old checkpoints.
            TrainingDivergedError: the loss became NaN/Inf.
        """
        cfg = self.config
        out = Path(cfg.out_dir)
        root = out / "checkpoints"
        main = self.dist.is_main  # only rank 0 touches out_dir (and holds its lock)
        if main:
            out.mkdir(parents=True, exist_ok=True)
        with ckpt.run_lock(out) if main else nullcontext(), \
                deterministic_algorithms(resolve_deterministic(cfg.deterministic, self.device)):
            result = self._train(resume, out, root)
        dist.barrier()  # the other ranks return once rank 0 has written the adapter and plot
        return result

    def _train(self, resume: bool | str | Path, out: Path, root: Path) -> TrainResult:
        cfg, main = self.config, self.dist.is_main
        if main:
            ckpt.remove_stale_temps(root)
        total = cfg.total_steps(len(self.train_ds), self.dist.world_size)
        warmup = cfg.resolved_warmup(total)
        fingerprint = self._data_fingerprint()

        seed_everything(cfg.seed)
        opt = self._make_optimizer()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(total, warmup, cfg.schedule))
        step, epoch, pos, resumed_from = 0, 0, 0, None
        prior_s, prior_tokens = 0.0, 0  # wall time and tokens of the run before a resume
        # the metrics window: step losses and tokens since the last metrics record, and its age
        window: list[float] = []
        win_tokens, win_age = 0, 0.0
        # rank 0 reads the disk and ships the checkpoint (or its error) to the others
        path, c = dist.broadcast_object(self._load_for_resume(resume, root) if main else None, self.dist, self.device)
        if isinstance(c, BaseException):
            raise c
        if resume:
            if path is None:
                if main:
                    log.warning("resume=True but %s holds no complete checkpoint: starting from step 0", root)
            else:
                self._restore(c, opt, sched, fingerprint)
                step, epoch, pos, resumed_from = c.step, c.state["epoch"], c.state["batch_in_epoch"], path
                prior_s, prior_tokens = float(c.state.get("elapsed_s", 0.0)), int(c.state.get("tokens", 0))
                win = c.state.get("log_window") or {}  # absent in checkpoints of older versions
                window, win_tokens, win_age = list(win.get("losses", [])), int(win.get("tokens", 0)), float(win.get("seconds", 0.0))
                if main:
                    _warn_if_threads_differ(c)
                    log.info("resumed from %s (step %d)", path, step)

        if main:
            metrics: MetricsWriter | NullMetricsWriter = MetricsWriter(out / "metrics.jsonl", keep_until_step=step if resumed_from else None)
        else:
            metrics = NullMetricsWriter()
        gc_disable = _enable_checkpointing(self.model) if cfg.gradient_checkpointing else None
        was_training = self.model.training
        self.model.train()
        params = [p for _, p in self._trainable()]
        if self.dist.enabled and resumed_from is None:
            dist.broadcast_params(params)  # one starting point even if the adapter init was unseeded
        per_epoch = math.ceil(len(self.train_ds) / (cfg.batch_size * self.dist.world_size))
        stream = self._batches(epoch, pos)
        losses: list[tuple[int, float]] = []
        eval_losses: list[tuple[int, float]] = []
        tokens_run, last_ckpt = 0, resumed_from
        t_start = time.perf_counter()
        win_start = t_start - win_age
        bar = _progress_bar(total, step, cfg.progress and main)
        postfix: dict[str, str] = {}
        try:
            while step < total:
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                epoch, pos = micro[-1][1], micro[-1][2]
                lr = sched.get_last_lr()[0]  # the lr this step uses
                if self.dist.enabled:
                    _seed_rank_step(cfg.seed, step, self.dist.rank)
                loss, aux, grad_norm, n_tok = self._optimizer_step([b for b, _, _ in micro], opt, params, step + 1)
                sched.step()
                step += 1
                tokens_run += n_tok
                win_tokens += n_tok
                losses.append((step, loss))
                window.append(loss)
                now = time.perf_counter()
                bar.update(1)
                postfix["loss"] = f"{loss:.4f}"
                postfix["tok/s"] = f"{tokens_run / max(now - t_start, 1e-9):.0f}"
                bar.set_postfix(postfix)
                if step % cfg.log_every == 0 or step == total:
                    rec: dict[str, Any] = {
                        "step": step, "loss": sum(window) / len(window), "lr": lr, "grad_norm": grad_norm,
                        "tokens_per_s": win_tokens / max(now - win_start, 1e-9),
                        "epoch": round(epoch + pos / per_epoch, 4), "tokens": prior_tokens + tokens_run,
                        "elapsed_s": round(prior_s + now - t_start, 3),
                    }
                    if self.loss_terms:
                        rec["aux_loss"] = aux
                    metrics.write(rec)
                    window, win_tokens, win_start = [], 0, now
                if self.eval_ds is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                    ev = self.evaluate()
                    eval_losses.append((step, ev))
                    metrics.write({"step": step, "eval_loss": ev})
                    postfix["eval"] = f"{ev:.4f}"
                    bar.set_postfix(postfix)
                if main and cfg.save_every and (step % cfg.save_every == 0 or step == total):
                    state = {"step": step, "epoch": epoch, "batch_in_epoch": pos, "total_steps": total,
                             "config": cfg.to_dict(), "data_fingerprint": fingerprint,
                             "num_examples": len(self.train_ds), "tokens": prior_tokens + tokens_run,
                             "elapsed_s": prior_s + time.perf_counter() - t_start,
                             "log_window": {"losses": window, "tokens": win_tokens,
                                            "seconds": time.perf_counter() - win_start},
                             "num_threads": torch.get_num_threads(), "world_size": self.dist.world_size}
                    tensors = {n: p.detach() for n, p in self._trainable()}
                    last_ckpt = ckpt.save_checkpoint(root, step, tensors, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                                                     state, cfg.keep_last)
        finally:
            bar.close()
            metrics.close()
            self.model.train(was_training)
            if gc_disable is not None:
                gc_disable()
        if self.eval_ds is not None and not eval_losses and resumed_from is not None and step == total:
            ev = self.evaluate()  # resumed a finished run: report its eval loss anyway
            eval_losses.append((step, ev))
        plot_path = out / "loss.png"
        if main:
            plot_losses(out / "metrics.jsonl", plot_path, title=f"{self.adapter_name or 'adapter'} training loss")
        adapter_dir = None
        if self.adapter_name is not None:
            adapter_dir = out / "adapter"
            if main:
                from adapterkit.api import save_adapter  # lazy: the core imports nothing from train/

                adapter_dir = Path(save_adapter(self.model, self.adapter_name, adapter_dir))
        return TrainResult(
            steps=step, total_steps=total, losses=losses, eval_losses=eval_losses,
            final_loss=losses[-1][1] if losses else None, eval_loss=eval_losses[-1][1] if eval_losses else None,
            tokens=tokens_run, elapsed_s=time.perf_counter() - t_start, out_dir=out,
            metrics_path=out / "metrics.jsonl", plot_path=plot_path, adapter_dir=adapter_dir,
            last_checkpoint=last_ckpt, resumed_from=resumed_from,
        )

    # -- the same steps in pieces, for a caller that runs them in slices ------------------
    # (adapterkit.serve.coserve trains inside the serving engine's loop, one micro-batch per
    # engine step; these reuse the loop's own data order, loss, optimizer and checks)
    def batch_stream(self, epoch: int = 0, pos: int = 0) -> Iterator[tuple[dict[str, torch.Tensor] | None, int, int]]:
        """The training batches from data position ``(epoch, pos)`` on, as :meth:`train` draws them.

        Returns:
            An endless iterator of ``(collated batch, epoch, position after it)``.
        """
        return self._batches(epoch, pos)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed token cross-entropy of one (collated) micro-batch, on the model's device.

        Args:
            batch: ``{"input_ids", "attention_mask", "labels"}`` as :class:`PadCollator` makes.
        Returns:
            A float32 scalar with a graph to the trainable parameters.
        """
        return self._loss_sum(self._to_device(batch))

    def make_optimizer(self, total: int) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW and the lr schedule of a ``total``-step run, as :meth:`train` builds them.

        Returns:
            ``(optimizer, LambdaLR scheduler)``.
        """
        opt = self._make_optimizer()
        warmup = self.config.resolved_warmup(total)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(total, warmup, self.config.schedule))

    def restore(self, c: ckpt.Checkpoint, opt: torch.optim.Optimizer, sched: Any) -> None:
        """Load a checkpoint's trainable tensors, optimizer, schedule and RNG states.

        Raises:
            CheckpointError: the checkpoint was written with another config, data or adapter.
        """
        self._restore(c, opt, sched, self._data_fingerprint())

    def data_fingerprint(self) -> str:
        """Hash of the tokenized training data (stored in checkpoints, checked on resume)."""
        return self._data_fingerprint()

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter that trains."""
        return self._trainable()

    def apply_gradients(self, opt: torch.optim.Optimizer, params: list[nn.Parameter], loss_sum: float, n_sup: int,
                        step: int) -> tuple[float, float]:
        """Finish an optimizer step whose gradients were accumulated as ``sum(loss_sum_i / n_sup)``:
        clip, check, AdamW step, zero the gradients (the tail of one step of :meth:`train`).

        Args:
            loss_sum: summed token loss over the whole step's micro-batches.
            n_sup: supervised tokens of the whole step.
            step: the 1-based step number, for the error message.
        Returns:
            ``(mean token loss, pre-clip grad norm)``.
        Raises:
            TrainingDivergedError: NaN/Inf loss or gradient (the params are left untouched,
                the gradients are zeroed).
        """
        loss = loss_sum / max(n_sup, 1)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            raise TrainingDivergedError(f"step {step}: loss {loss}, grad norm {grad_norm}; lower the lr or check the data")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, grad_norm


def _seed_rank_step(seed: int, step: int, rank: int) -> None:
    """Seed the global torch RNG (dropout's) from ``(seed, step, rank)`` before a step.

    Multi-process only: the ranks draw different dropout masks, and the masks of a step
    depend on nothing saved, so a resume continues them exactly whatever the world size.
    """
    torch.manual_seed((seed * 1_000_003 + step) * 65_537 + rank)


def _warn_if_threads_differ(c: ckpt.Checkpoint) -> None:
    saved = c.state.get("num_threads")
    if saved is not None and saved != torch.get_num_threads():
        log.warning("%s was written with %d torch threads, this run has %d: CPU reductions may round "
                    "differently, so the losses can drift from the uninterrupted run in the last bits; "
                    "torch.set_num_threads(%d) reproduces it exactly", c.path, saved, torch.get_num_threads(), saved)


def _enable_checkpointing(model: nn.Module) -> Callable[[], None] | None:
    """Turn on HF activation (gradient) checkpointing; returns how to undo it (None: was on).

    ``use_reentrant=False``: the reentrant variant needs inputs that require grad, which a
    frozen base's embeddings do not produce, and would silently drop the adapter's grads.
    """
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        if getattr(model, "is_activation_checkpointing", False):
            return None
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        return model.activation_checkpointing_disable
    if hasattr(model, "gradient_checkpointing_enable"):
        if getattr(model, "is_gradient_checkpointing", False):
            return None
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        return model.gradient_checkpointing_disable
    raise ConfigError(f"gradient_checkpointing=True needs an HF model; {type(model).__name__} has no "
                      "activation_checkpointing_enable() / gradient_checkpointing_enable()")


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # tqdm computes the ETA from the rate of this run's steps (initial ones excluded)
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc="train")
