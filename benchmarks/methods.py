"""Every registered adapter method on one task, side by side (issue 4).

Each method in ``ak.list_methods()`` is trained for the same number of AdamW steps on the
same batches of one synthetic exact-match task (:mod:`adapterkit.tasks`, default "dates":
``"Convert the date 1987-03-09."`` -> ``"9 March 1987"``), then evaluated on a held-out split.

Base model: a small Llama (byte-level tokenizer of :mod:`adapterkit.train.toy`, hidden 128,
FFN 256, 4 heads, 2 KV heads, 2 layers by default) first *pretrained* (full fine-tuning) on the
other tasks (digit_shift, reverse_words) in the same chat format, so it knows the format and how to
read and copy digits but not the task's rule; the pretrained weights are cached in
``$ADAPTERKIT_CACHE/bench`` (one file per model/pretraining setting). Every method then gets
a deep copy of that base.

Columns (ratios: this method / LoRA, same run; details in docs/benchmarks.md): trainable (exact,
``ak.trainable_parameters``); step time (median of the optimizer steps after the first two; the
methods' steps are INTERLEAVED, order rotated each round, so load changes hit all alike); memory
(saved activations of one forward via ``torch.autograd.graph.saved_tensors_hooks``, unique
storages, parameters/buffers excluded, + 4 x trainable bytes for parameter, gradient and AdamW
m, v, + the adapter's buffers: deterministic); eval loss (per answer token, held out); exact
match (greedy, ``adapterkit.demo.accuracy``); mergeable (the registry's flag).

Methods that need data before ``add_adapter`` get their ``prepare_*`` call on the first
training batches (corda, lora_sb, sft, spt); their preparation time is not in the step time.
Methods that compose other, already trained adapters (fusion, scalearn, ...) have no
single-task row.

    .venv/bin/python benchmarks/methods.py [--methods lora,dora,paca] [--steps 300]
        [--task dates] [--threads 2] [--lr-scale 1] [--no-accuracy]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.demo import answer_budget, accuracy, training_records
from adapterkit.methods.base import AdapterConfig
from adapterkit.registry import get_method
from adapterkit.tasks import TASKS, make_splits
from adapterkit.train.data import IGNORE_INDEX, PadCollator, build_dataset, pad_token_id_for

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TASK = "dates"
Batch = dict[str, torch.Tensor]


# ---- the methods' settings ---------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What the benchmark needs to know about one method.

    make: ``(ctx) -> config`` (may run the method's ``prepare_*`` on ``ctx.batches``), or
        None for a method with no single-task row (``note`` says why).
    lr: AdamW learning rate (a family default: LoRA-like 5e-3, vectors and tiny cores 1e-2,
        prompts 3e-2; not tuned per method).
    """

    make: Callable[["Context"], AdapterConfig] | None
    lr: float = 5e-3
    note: str = ""


@dataclass
class Context:
    """Inputs a config factory may use: the model the adapter goes on (prepare_* functions
    read it), a few training batches, LoRA's trainable count on this model (the budget of
    the sparse methods), the rank and the task loss."""

    model: nn.Module
    batches: list[Batch]
    lora_params: int
    r: int
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor]


def _t(**kw: Any) -> dict[str, Any]:
    return {"targets": list(TARGETS), **kw}


def _prepared(name: str) -> Callable[[Context], AdapterConfig]:
    """Factories for the methods that need data before add_adapter."""
    m = ak.methods

    def make(c: Context) -> AdapterConfig:
        if name == "corda":  # ipm: calibrated on the fine-tuning task's own prompts
            calib = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in c.batches]
            return m.prepare_corda(c.model, m.CorDAConfig(**_t(r=c.r, alpha=2.0 * c.r, mode="ipm")), calib)
        if name == "lora_sb":
            return m.prepare_lora_sb(c.model, m.LoRASBConfig(**_t(r=c.r, init_lr=1e-3)), c.batches, loss_fn=c.loss_fn)
        if name == "sft":  # same budget as LoRA; phase 1 = 10 full fine-tuning steps
            return m.prepare_sft(c.model, m.SFTConfig(budget=c.lora_params), c.batches, loss_fn=c.loss_fn,
                                 steps=10, lr=1e-3, optimizer="sgd")
        if name == "spt":  # same budget as LoRA
            return m.prepare_spt(c.model, m.SPTConfig(budget=c.lora_params, r=c.r, lora_alpha=2.0 * c.r),
                                 c.batches, loss_fn=c.loss_fn)
        raise KeyError(name)

    return make


def setups(r: int = 8) -> dict[str, Setup]:
    """The configuration of every method this benchmark knows (rank ``r`` where a method has one)."""
    mk = ak.make_config
    compose = "composes frozen, already trained source adapters (two-stage); no single-task row"
    return {
        "lora": Setup(lambda c: mk("lora", **_t(r=r, alpha=2.0 * r))),
        "dora": Setup(lambda c: mk("dora", **_t(r=r, alpha=2.0 * r))),
        "paca": Setup(lambda c: mk("paca", **_t(r=r))),
        "qlora": Setup(lambda c: mk("qlora", **_t(r=r, alpha=2.0 * r, bits=4))),
        "qadapter": Setup(lambda c: mk("qadapter", targets=list(TARGETS), base_method="lora", bits=1,
                                       base_config={"r": r, "alpha": 2.0 * r})),
        "lora_xs": Setup(lambda c: mk("lora_xs", **_t(r=r)), lr=1e-2),
        "lora_sb": Setup(_prepared("lora_sb"), lr=1e-2),
        "corda": Setup(_prepared("corda")),
        "sorsa": Setup(lambda c: mk("sorsa", **_t(r=r))),
        "hydra": Setup(lambda c: mk("hydra", **_t(r=r, alpha=2.0 * r))),
        "bone": Setup(lambda c: mk("bone", **_t(r=2 * r))),
        "dylora": Setup(lambda c: mk("dylora", **_t(r=r, alpha=2.0 * r))),
        "mola": Setup(lambda c: mk("mola", **_t(r=r // 2 or 1, alpha=float(r), num_experts=4, top_k=2))),
        "ia3": Setup(lambda c: mk("ia3"), lr=1e-2),
        "ssf": Setup(lambda c: mk("ssf"), lr=1e-2),
        "bottleneck": Setup(lambda c: mk("bottleneck", mode="pfeiffer", reduction_factor=8)),
        "mosa": Setup(lambda c: mk("mosa", mode="pfeiffer", reduction_factor=8)),
        "compacter": Setup(lambda c: mk("compacter", mode="compacter++", reduction_factor=8)),
        "invertible": Setup(lambda c: mk("invertible")),
        "prompt": Setup(lambda c: mk("prompt", num_virtual_tokens=10), lr=3e-2),
        "prefix": Setup(lambda c: mk("prefix", num_virtual_tokens=10), lr=1e-2),
        "sft": Setup(_prepared("sft")),
        "spt": Setup(_prepared("spt")),
        "s2ft": Setup(lambda c: mk("s2ft", heads=1, channels=16)),
        "fusion": Setup(None, note=compose),
        "scalearn": Setup(None, note=compose),
        "meteora": Setup(None, note=compose),
        "mixda": Setup(None, note=compose),
        # multi-task methods, run with one task (T = 1): their single-task special case
        "poly": Setup(lambda c: mk("poly", **_t(n_tasks=1, n_skills=4, r=r // 2 or 1, alpha=float(r))),
                      note="multi-task; here T=1 task, K=4 skills"),
        "hyperformer": Setup(lambda c: mk("hyperformer", n_tasks=1, mode="pfeiffer", reduction_factor=8),
                             note="multi-task; here T=1 task"),
        "shared_adapter": Setup(lambda c: mk("shared_adapter", n_tasks=1, share="all", mode="pfeiffer",
                                             reduction_factor=8), note="multi-task; T=1 = a bottleneck adapter"),
    }


def variants(r: int = 8) -> dict[str, tuple[str, Setup]]:
    """Extra rows, run whenever their method is: ``{row name: (method, setup)}``."""
    return {
        f"paca r={2 * r}": ("paca", Setup(lambda c: ak.make_config("paca", **_t(r=2 * r)),
                                          note="PaCA at rank 2r: about LoRA's trainable count")),
    }


# ---- model, data, loss -------------------------------------------------------------------


def build_base(hidden: int = 128, layers: int = 2, seed: int = 0) -> tuple[nn.Module, Any]:
    """A random small Llama (hidden, 2*hidden FFN, 4 heads, 2 KV heads) + the byte tokenizer."""
    from adapterkit.train.toy import toy_llama, toy_tokenizer

    return toy_llama(seed=seed, hidden_size=hidden, num_hidden_layers=layers), toy_tokenizer()


def task_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the supervised tokens (as the Trainer computes it), from the
    logits (B, T, V), which every method aligns with ``input_ids``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    return F.cross_entropy(logits[:, :-1][mask].float(), labels[mask])


def make_batches(records: list[dict[str, Any]], tokenizer: Any, batch_size: int, n: int, seed: int) -> list[Batch]:
    """``n`` padded batches (dicts of (B, T) tensors) drawn by a seeded shuffle of ``records``."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n * batch_size:
        order += torch.randperm(len(records), generator=g).tolist()
    order = order[:n * batch_size]
    used = sorted(set(order))  # tokenize only the records the batches use
    ds = build_dataset([records[i] for i in used], tokenizer, 256)
    pos = {i: k for k, i in enumerate(used)}
    col = PadCollator(pad_token_id_for(tokenizer))
    return [col([ds[pos[i]] for i in order[k * batch_size:(k + 1) * batch_size]]) for k in range(n)]


def pretrain_tasks(task: str) -> tuple[str, ...]:
    """The tasks the base is pretrained on: every task of :mod:`adapterkit.tasks` but ``task``."""
    return tuple(t for t in sorted(TASKS) if t != task)


def pretrain(model: nn.Module, tokenizer: Any, steps: int, tasks: Sequence[str], batch_size: int = 16,
             lr: float = 3e-3, seed: int = 0, log: Callable[[str], None] = print) -> float:
    """Full fine-tuning of ``model`` on ``tasks`` (mixed); returns the last loss."""
    recs: list[dict[str, Any]] = []
    for t in tasks:
        recs += training_records(make_splits(t, 2000, 1, seed=seed + 1)[0], tokenizer)
    batches = make_batches(recs, tokenizer, batch_size, steps, seed + 1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    loss = float("nan")
    for i, b in enumerate(batches):
        out = task_loss(model, b)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = out.item()
        if (i + 1) % max(1, steps // 5) == 0:
            log(f"  pretrain step {i + 1}/{steps}: loss {loss:.3f}")
    model.eval()
    return loss


def pretrained_base(hidden: int, layers: int, steps: int, task: str = DEFAULT_TASK, seed: int = 0,
                    cache: bool = True, log: Callable[[str], None] = print) -> tuple[nn.Module, Any]:
    """The benchmark's base: built and pretrained once, then read from the cache dir."""
    from safetensors.torch import load_file, save_file

    model, tok = build_base(hidden, layers, seed)
    if steps <= 0:
        return model, tok
    tasks = pretrain_tasks(task)
    key = hashlib.sha256(f"v1-{hidden}-{layers}-{steps}-{seed}-{tasks}".encode()).hexdigest()[:16]
    path = ak.models.cache_root() / "bench" / f"methods-base-{key}.safetensors"
    if cache and path.is_file():
        model.load_state_dict(load_file(str(path)))
        log(f"base: cached pretrained weights {path}")
        return model.eval(), tok
    t = time.perf_counter()
    log(f"base: pretraining {steps} steps on {', '.join(tasks)} (cached afterwards)")
    pretrain(model, tok, steps, tasks, seed=seed, log=log)
    log(f"base: pretrained in {time.perf_counter() - t:.0f} s")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)  # atomic: a half-written cache file is never read
    return model, tok


# ---- measurements ------------------------------------------------------------------------


def activation_bytes(model: nn.Module, batch: Batch) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward,
    not counting storages of the model's parameters and buffers (they exist anyway)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            return t
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task_loss(model, batch) + _reg(model)
    del loss
    return sum(seen.values())


def adapter_buffer_bytes(model: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".adapterkit." in f".{n}")


def _reg(model: nn.Module) -> torch.Tensor | float:
    if not ak.list_adapters(model):
        return 0.0
    r = ak.api.regularization_loss(model)
    return 0.0 if r is None else r


@torch.no_grad()
def eval_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Token-weighted mean cross-entropy of the supervised tokens of ``batches``."""
    model.eval()
    tot, n = 0.0, 0
    for b in batches:
        k = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        tot += task_loss(model, b).item() * k
        n += k
    return tot / n


@dataclass
class Row:
    """One method's measurements (None where not measured)."""

    method: str
    trainable: int | None = None
    step_s: float | None = None
    act_bytes: int | None = None
    mem_bytes: int | None = None
    eval_loss: float | None = None
    acc: float | None = None
    mergeable: bool | None = None
    lr: float | None = None
    prepare_s: float | None = None
    note: str = ""


@dataclass
class _Run:
    row: Row
    model: nn.Module
    opt: torch.optim.Optimizer
    params: list[nn.Parameter]
    times: list[float]


def run_benchmark(base: nn.Module, tokenizer: Any, methods: Sequence[str] | None = None, *, steps: int = 100,
                  batch_size: int = 16, r: int = 8, task: str = DEFAULT_TASK, n_train: int = 2000, n_eval: int = 64,
                  accuracy_eval: bool = True, lr_scale: float = 1.0, seed: int = 0,
                  log: Callable[[str], None] = print) -> list[Row]:
    """Train every method in ``methods`` (default: all registered) on ``task`` for ``steps``
    interleaved steps from copies of ``base``; returns one :class:`Row` per method, plus a
    first row ``"(base)"`` with the base model's eval loss / accuracy. ``lr_scale`` multiplies
    every method's learning rate."""
    if steps < 1:
        raise ak.errors.ConfigError(f"steps must be >= 1, got {steps}")
    known = setups(r)
    names = list(methods) if methods is not None else ak.list_methods()
    registered = set(ak.list_methods())
    for n in names:
        if n not in registered:
            raise ak.errors.ConfigError(f"unknown method {n!r}.{ak.errors.did_you_mean(n, registered)}")
    names = ["lora", *(n for n in dict.fromkeys(names) if n != "lora")]  # lora first: every ratio's reference
    train, heldout = make_splits(task, n_train, n_eval, seed=seed)
    batches = make_batches(training_records(train, tokenizer), tokenizer, batch_size, steps, seed)
    eval_batches = make_batches(training_records(heldout, tokenizer), tokenizer, min(32, n_eval),
                                -(-n_eval // min(32, n_eval)), seed)
    budget = answer_budget(tokenizer, heldout)
    base = base.eval()
    lora_params = _lora_count(base, r)

    rows = [Row("(base)", trainable=0, note="no adapter")]
    rows[0].eval_loss = eval_loss(base, eval_batches)
    if accuracy_eval:
        rows[0].acc = accuracy(base, tokenizer, heldout, budget)[0]
    runs: list[_Run] = []
    extra = variants(r)
    names += [v for v, (m, _) in extra.items() if m in names]
    for name in names:
        method, setup = extra[name] if name in extra else (name, known.get(name))
        spec = get_method(method)
        if setup is None:  # a method new to this table: its default config
            setup = Setup(lambda c, _n=name: ak.make_config(_n), note="default config (no benchmark setting yet)")
        row = Row(name, mergeable=spec.mergeable, lr=setup.lr * lr_scale, note=setup.note)
        rows.append(row)
        if setup.make is None:
            continue
        model = copy.deepcopy(base)
        t = time.perf_counter()
        try:
            cfg = setup.make(Context(model, batches[:4], lora_params, r, task_loss))
            ak.add_adapter(model, "bench", cfg)
        except ak.errors.AdapterError as e:  # e.g. a method that does not fit a causal LM
            row.note = f"not applicable: {type(e).__name__}: {e}"[:200]
            continue
        except Exception as e:  # noqa: BLE001  (one broken method must not hide the others' rows)
            row.note = f"FAILED to attach: {type(e).__name__}: {e}"[:200]
            continue
        if name in ("corda", "lora_sb", "sft", "spt"):
            row.prepare_s = time.perf_counter() - t
        row.trainable = ak.trainable_parameters(model, "bench")
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        runs.append(_Run(row, model, torch.optim.AdamW(params, lr=row.lr, weight_decay=0.0), params, []))
    log(f"training {len(runs)} methods x {steps} interleaved steps ({batch_size} examples/step, task {task!r})")

    warm = max(1, steps // 10)
    for i, b in enumerate(batches):
        lr_mult = min(1.0, (i + 1) / warm)  # linear warm-up, then constant
        k = i % max(1, len(runs))
        for run in runs[k:] + runs[:k]:  # rotate the order so no method always runs first
            for g in run.opt.param_groups:
                g["lr"] = run.row.lr * lr_mult
            try:
                t = time.perf_counter()
                loss = task_loss(run.model, b) + _reg(run.model)
                loss.backward()
                run.opt.step()
                run.opt.zero_grad(set_to_none=True)
                run.times.append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001  (reported in the row, the others go on)
                run.row.note = f"FAILED in training step {i + 1}: {type(e).__name__}: {e}"[:200]
                runs.remove(run)
                continue
            if not torch.isfinite(loss):
                run.row.note = f"loss became {loss.item()} at step {i + 1}"
        if (i + 1) % max(1, steps // 5) == 0:
            log(f"  step {i + 1}/{steps}")

    for run in runs:
        row, model = run.row, run.model
        row.step_s = statistics.median(run.times[2:] if len(run.times) > 2 else run.times)
        row.act_bytes = activation_bytes(model, batches[0])
        state = 4 * sum(p.numel() * p.element_size() for p in run.params)
        row.mem_bytes = row.act_bytes + state + adapter_buffer_bytes(model)
        row.eval_loss = eval_loss(model, eval_batches)
        if accuracy_eval:
            try:
                row.acc = accuracy(model, tokenizer, heldout, budget)[0]
            except Exception as e:  # noqa: BLE001 (a generate() failure is a finding, not a crash)
                row.note = (row.note + f"; greedy eval failed: {type(e).__name__}: {e}")[:200]
        run.model = run.opt = None  # type: ignore[assignment]  # free memory as we go
    return rows


def _lora_count(model: nn.Module, r: int) -> int:
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            total += r * (mod.in_features + mod.out_features)
    return total


# ---- report ------------------------------------------------------------------------------


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table; ratios are relative to the ``lora`` row."""
    ref = next(r for r in rows if r.method == "lora")
    head = ("method", "trainable", "step time / LoRA", "memory / LoRA", "act. KiB", "eval loss", "exact match",
            "mergeable", "lr", "note")
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}x" if a is not None and b else ""
        cells = (
            r.method,
            f"{r.trainable:,}" if r.trainable is not None else "",
            ratio(r.step_s, ref.step_s),
            ratio(r.mem_bytes, ref.mem_bytes),
            f"{r.act_bytes / 1024:,.0f}" if r.act_bytes is not None else "",
            f"{r.eval_loss:.3f}" if r.eval_loss is not None else "",
            f"{r.acc:.0%}" if r.acc is not None else "",
            "" if r.mergeable is None else ("yes" if r.mergeable else "no"),
            f"{r.lr:g}" if r.lr is not None and r.trainable else "",
            (r.note + (f" (prepare {r.prepare_s:.1f} s)" if r.prepare_s else "")).strip("; "),
        )
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def paca_note(rows: Sequence[Row]) -> str:
    """One line comparing PaCA with LoRA, from the measured rows."""
    by = {r.method: r for r in rows}
    p, lo = by.get("paca"), by["lora"]
    if p is None or p.step_s is None:
        return "PaCA: not in this run."
    return (f"PaCA vs LoRA (same r): step time {p.step_s / lo.step_s:.2f}x, saved activations "
            f"{p.act_bytes / lo.act_bytes:.2f}x, memory {p.mem_bytes / lo.mem_bytes:.2f}x, "
            f"trainable {p.trainable / lo.trainable:.2f}x, eval loss {p.eval_loss:.3f} vs {lo.eval_loss:.3f}.")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=None, help="comma list of registry keys (default: every registered method)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--r", type=int, default=8, help="rank (or its analogue) of every method that has one")
    ap.add_argument("--task", default=DEFAULT_TASK, help=f"one of {sorted(TASKS)}")
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=400, help="0: a random base")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every method's learning rate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-accuracy", action="store_true", help="skip greedy exact-match evaluation")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    t0 = time.perf_counter()
    base, tok = pretrained_base(a.hidden, a.layers, a.pretrain_steps, a.task, a.seed)
    try:
        rows = run_benchmark(base, tok, methods, steps=a.steps, batch_size=a.batch_size, r=a.r, task=a.task,
                             n_eval=a.n_eval, accuracy_eval=not a.no_accuracy, lr_scale=a.lr_scale,
                             seed=a.seed)
    except ak.errors.AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(f"Every method on task {a.task!r}: Llama hidden {a.hidden}, {a.layers} layers, byte vocab, pretrained "
          f"{a.pretrain_steps} steps on {', '.join(pretrain_tasks(a.task))}; {a.steps} AdamW steps x {a.batch_size} examples, "
          f"r={a.r}, fp32, {a.threads} threads. memory = saved activations + 4 x trainable bytes + adapter buffers.")
    print(format_table(rows))
    print()
    print(paca_note(rows))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
