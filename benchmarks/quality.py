"""Adaptation quality on a real pretrained model, with full fine-tuning as the 100% row (issue 13).

Two modes (``--mode``):

* ``table`` -- the LLM-Adapters comparison (Hu et al., 2023) at our scale: Series (bottleneck
  after the MLP), Parallel (bottleneck beside ``down_proj``), LoRA, Prefix and full fine-tuning
  on each task (default ``arithmetic`` and ``commonsense_mc``). Per method a short learning-rate
  sweep (3 values); the lr with the lowest *validation loss* is kept and only it is scored on
  the held-out *test* split. Reports test accuracy, trainable parameters and train time.
* ``methods`` -- every registered method (``adapterkit.list_methods()``) on one task at its
  default setting from ``benchmarks/methods.py`` (rank 8 on every projection, the family lr),
  plus full fine-tuning: test accuracy, its ratio to full fine-tuning's, trainable share, step
  time and training memory (saved activations + 16 bytes per trainable parameter for the fp32
  weight, gradient and AdamW m, v + the adapter's buffers; the frozen base is not counted).

Splits (disjoint, from :func:`adapterkit.tasks.make_splits`): test = the first ``n_test``
inputs of the task's pool (the examples ``adapterkit eval --task T --limit n_test`` scores),
validation = the next ``n_val``, training = the rest. Training runs the library's
:class:`~adapterkit.train.Trainer` (full fine-tuning: :func:`adapterkit.train.full.train_full`,
saved as a model dir and scored from there). Scoring is :mod:`adapterkit.eval`: LoRA adapters
and the fully fine-tuned model on the serving engine (all LoRA adapters of a task in one pass),
every other method with :func:`adapterkit.eval.evaluate_forward` (the engine serves LoRA only).

    nice -n 10 .venv/bin/python benchmarks/quality.py --mode table --out runs/quality
    nice -n 10 .venv/bin/python benchmarks/quality.py --mode methods --task commonsense_mc --time-limit 20
    .venv/bin/python benchmarks/quality.py --tiny --steps 2 --n-train 8 --n-val 4 --n-test 4   # smoke

Budgets are flags (``--steps --batch-size --n-train --n-val --n-test --max-length``); the
defaults are sized for a 2-core CPU, far below the paper's (3 epochs over 10K+ examples).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/methods.py: the method settings

import adapterkit as ak  # noqa: E402
import adapterkit.eval as ev  # noqa: E402
from adapterkit.demo import training_records  # noqa: E402
from adapterkit.tasks import make_splits  # noqa: E402
from adapterkit.train import TrainConfig, Trainer, seed_everything  # noqa: E402
from adapterkit.train.full import train_full  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # LLM-Adapters' LoRA sites on LLaMA


def families(hidden: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """LLM-Adapters' four adapter families as library configs: ``{row: (method, fields)}``.

    The paper's bottleneck is hidden/16 (256 on LLaMA-7B); LoRA r=32 on q,k,v,up,down at 7B is
    r=8 here; Prefix uses 10 virtual tokens.
    """
    size = max(1, hidden // 16)
    return {
        "Series": ("bottleneck", {"mode": "pfeiffer", "bottleneck_size": size}),
        "Parallel": ("bottleneck", {"mode": "parallel", "targets": ["down_proj"], "bottleneck_size": size}),
        "LoRA": ("lora", {"r": 8, "alpha": 16.0, "targets": LORA_TARGETS}),
        "Prefix": ("prefix", {"num_virtual_tokens": 10}),
    }


#: learning-rate grids (3 values each); full fine-tuning needs ~100x less than adapters
LRS: dict[str, tuple[float, ...]] = {
    "Series": (3e-4, 1e-3, 3e-3), "Parallel": (3e-4, 1e-3, 3e-3), "LoRA": (3e-4, 1e-3, 3e-3),
    "Prefix": (1e-3, 3e-3, 1e-2), "Full FT": (1e-5, 3e-5, 1e-4),
}
FULL_LR = 3e-5  # the methods mode's full fine-tuning lr


@dataclass(frozen=True)
class Budget:
    """How much each run trains and how much is scored."""

    steps: int = 6
    batch_size: int = 4
    n_train: int = 200
    n_val: int = 16
    n_test: int = 40
    max_length: int = 256
    seed: int = 0


@dataclass
class Run:
    """One training run: what was trained, how it went, where the result is."""

    row: str
    method: str
    lr: float
    trainable: int
    val_loss: float
    train_s: float
    step_s: float
    model: Any = field(default=None, repr=False)  # the trained model (adapter attached), or None
    adapter_dir: Path | None = None
    model_dir: Path | None = None  # full fine-tuning: the saved model
    memory_bytes: int | None = None
    test: float | None = None

    def record(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()
                if k != "model"}


def splits(task: str, b: Budget, tok: Any) -> tuple[list[dict], list[dict], ev.TaskSpec]:
    """(training records, validation records, test TaskSpec) of a generated task."""
    train, held = make_splits(task, b.n_train, b.n_test + b.n_val, seed=b.seed)
    spec = ev.builtin_task(task, b.n_test + b.n_val, seed=b.seed)
    test = dataclasses.replace(spec, examples=held[:b.n_test])
    return training_records(train, tok), training_records(held[b.n_test:], tok), test


def primary(scores: dict[str, float], spec: ev.TaskSpec) -> float:
    return scores["acc"] if spec.kind == "multiple_choice" else scores[spec.metric]


def _train_cfg(out: Path, lr: float, b: Budget) -> TrainConfig:
    return TrainConfig(out_dir=out, lr=lr, steps=b.steps, batch_size=b.batch_size, max_length=b.max_length,
                       save_every=0, log_every=b.steps, progress=False, seed=b.seed)


def _step_s(out: Path, steps: int) -> float:
    """Seconds per optimizer step from the run's last metrics record (written before the eval)."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if "elapsed_s" in r][-1]["elapsed_s"] / steps


def train_adapter(base: Any, tok: Any, row: str, method: str, cfg: Any, lr: float, train: list[dict],
                  val: list[dict], b: Budget, out: Path) -> Run:
    """Train one adapter on a deep copy of ``base``; the copy (adapter attached) is kept on the Run."""
    model = copy.deepcopy(base)
    seed_everything(b.seed)
    ak.add_adapter(model, "a", cfg if not isinstance(cfg, dict) else ak.make_config(method, **cfg))
    trainer = Trainer(model, train, eval_data=val, config=_train_cfg(out, lr, b), tokenizer=tok, adapter_name="a",
                      loss_terms=_loss_terms(model))
    t = time.perf_counter()
    res = trainer.train()
    secs = time.perf_counter() - t
    return Run(row, method, lr, ak.trainable_parameters(model, "a"), res.eval_loss, secs, _step_s(out, b.steps),
               model=model.eval(), adapter_dir=res.adapter_dir)


def _loss_terms(model: Any) -> list[Callable[[Any], torch.Tensor]]:
    """The adapter's own regularizer (e.g. SORSA's orthogonality), if it has one."""
    if ak.api.regularization_loss(model) is None:
        return []
    return [lambda m: ak.api.regularization_loss(m)]


def train_full_run(base: Any, tok: Any, lr: float, train: list[dict], val: list[dict], b: Budget, out: Path) -> Run:
    model = copy.deepcopy(base)
    t = time.perf_counter()
    res = train_full(model, train, eval_data=val, config=_train_cfg(out, lr, b), tokenizer=tok)
    secs = time.perf_counter() - t
    return Run("Full FT", "full", lr, res.trainable, res.train.eval_loss, secs, _step_s(out, b.steps),
               model_dir=res.model_dir)


def score_runs(base: Any, tok: Any, runs: Sequence[Run], spec: ev.TaskSpec, log: Callable[[str], None]) -> None:
    """Set ``run.test``: LoRA adapters together in one engine pass, a full fine-tune as the engine's
    base (loaded from its saved dir), anything else by the library forward."""
    from adapterkit.formats import read_adapter
    from adapterkit.models import load_model

    engine = {f"{r.row}@{r.lr:g}": r for r in runs if r.adapter_dir and read_adapter(r.adapter_dir).method == "lora"}
    if engine:
        t = time.perf_counter()
        res = ev.evaluate(base, tok, [spec], {k: r.adapter_dir for k, r in engine.items()}, include_base=False,
                          progress=False)
        for k, r in engine.items():
            r.test = primary(res.scores[k][spec.name], spec)
        log(f"  engine: {len(engine)} LoRA adapter(s) in one pass, {time.perf_counter() - t:.0f} s")
    for r in runs:
        if r.test is not None:
            continue
        t = time.perf_counter()
        if r.model_dir is not None:
            m, _ = load_model(r.model_dir)
            res = ev.evaluate(m, tok, [spec], progress=False)
            r.test = primary(res.scores[ev.BASE][spec.name], spec)
            del m
        else:
            res = ev.evaluate_forward(r.model, tok, [spec], name=r.row, params=r.trainable)
            r.test = primary(res.scores[r.row][spec.name], spec)
        log(f"  {r.row} scored in {time.perf_counter() - t:.0f} s ({'engine' if r.model_dir else 'library forward'})")


def base_score(base: Any, tok: Any, spec: ev.TaskSpec) -> float:
    res = ev.evaluate(base, tok, [spec], progress=False)
    return primary(res.scores[ev.BASE][spec.name], spec)


# ---- mode: the LLM-Adapters table ------------------------------------------------------------


def run_table(base: Any, tok: Any, tasks: Sequence[str], b: Budget, rows: Sequence[str], root: Path,
              log: Callable[[str], None], done: Callable[[dict[str, Any]], None] = lambda res: None) -> dict[str, Any]:
    """LR sweep per (task, row) chosen on validation loss, then the test score of the chosen run;
    ``done(partial result)`` after each task, so a long run keeps what it finished."""
    fam = families(base.config.hidden_size)
    out: dict[str, Any] = {"tasks": {}}
    for task in tasks:
        train, val, spec = splits(task, b, tok)
        chosen: list[Run] = []
        sweeps: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            best: Run | None = None
            sweeps[row] = []
            for lr in LRS[row]:
                d = root / task / f"{row.replace(' ', '_')}-{lr:g}"
                r = (train_full_run(base, tok, lr, train, val, b, d) if row == "Full FT" else
                     train_adapter(base, tok, row, fam[row][0], fam[row][1], lr, train, val, b, d))
                sweeps[row].append({"lr": lr, "val_loss": r.val_loss, "train_s": round(r.train_s, 1)})
                log(f"{task} {row} lr={lr:g}: val loss {r.val_loss:.4f}, {r.train_s:.0f} s")
                if best is None or r.val_loss < best.val_loss:
                    if best is not None and best.model_dir is not None:
                        shutil.rmtree(best.model_dir, ignore_errors=True)
                    best = r
                elif r.model_dir is not None:
                    shutil.rmtree(r.model_dir, ignore_errors=True)
            chosen.append(best)
        score_runs(base, tok, chosen, spec, log)
        b0 = base_score(base, tok, spec)
        full = next((r.test for r in chosen if r.row == "Full FT"), None)
        out["tasks"][task] = {
            "metric": "acc" if spec.kind == "multiple_choice" else spec.metric, "n_test": len(spec.examples),
            "base": b0, "sweeps": sweeps,
            "rows": [{**r.record(), "ratio_to_full": (r.test / full if full else None)} for r in chosen],
        }
        for r in chosen:
            r.model = None
        done(out)
    return out


# ---- mode: every registered method -----------------------------------------------------------


def run_methods(base: Any, tok: Any, task: str, b: Budget, methods: Sequence[str], root: Path,
                time_limit_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Every method at its benchmarks/methods.py default (+ full fine-tuning), scored on the test split."""
    import methods as mb  # benchmarks/methods.py

    setups = mb.setups(r=8)
    train, val, spec = splits(task, b, tok)
    total = sum(p.numel() for p in base.parameters())
    batches = mb.make_batches(train, tok, b.batch_size, 2, b.seed)
    ctx = mb.Context(model=base, batches=batches, lora_params=mb._lora_count(base, 8), r=8, loss_fn=mb.task_loss)
    t_start = time.perf_counter()
    runs: list[Run] = []
    skipped: dict[str, str] = {}
    for name in ["full", *methods]:
        if time.perf_counter() - t_start > time_limit_s:
            skipped[name] = "not run: --time-limit reached"
            continue
        d = root / task / name
        try:
            if name == "full":
                r = train_full_run(base, tok, FULL_LR, train, val, b, d)
            else:
                s = setups.get(name)
                if s is None or s.make is None:
                    skipped[name] = s.note if s else "no setting in benchmarks/methods.py"
                    continue
                ctx.model = copy.deepcopy(base)
                cfg = s.make(ctx)
                r = train_adapter(ctx.model, tok, name, name, cfg, s.lr, train, val, b, d)
                ctx.model = base
                r.memory_bytes = mb.activation_bytes(r.model, batches[0]) + 16 * r.trainable \
                    + mb.adapter_buffer_bytes(r.model)
                r.model.eval()
        except Exception as e:  # one method's failure must not lose the others' rows
            skipped[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            log(f"{name}: {skipped[name]}")
            continue
        if name == "full":
            m = copy.deepcopy(base).train()
            m.requires_grad_(True)
            r.memory_bytes = mb.activation_bytes(m, batches[0]) + 16 * r.trainable
            del m
        log(f"{name}: val loss {r.val_loss:.4f}, {r.step_s:.2f} s/step, {r.trainable:,} params")
        score_runs(base, tok, [r], spec, log)
        r.model = None
        runs.append(r)
    full = next((r.test for r in runs if r.method == "full"), None)
    rows = [{**r.record(), "share": r.trainable / total, "ratio_to_full": (r.test / full if full else None)}
            for r in runs]
    return {"task": task, "metric": "acc" if spec.kind == "multiple_choice" else spec.metric,
            "n_test": len(spec.examples), "base": base_score(base, tok, spec), "rows": rows, "skipped": skipped}


# ---- output ----------------------------------------------------------------------------------


def format_table(res: dict[str, Any]) -> str:
    lines = []
    for task, t in res.get("tasks", {}).items():
        lines += [f"\n{task} (test {t['metric']}, n={t['n_test']}; base model {t['base']:.3f})",
                  "| method | lr (val) | test | / full FT | trainable | train s |", "|---|---|---|---|---|---|"]
        for r in t["rows"]:
            ratio = f"{r['ratio_to_full']:.2f}" if r["ratio_to_full"] is not None else "-"
            lines.append(f"| {r['row']} | {r['lr']:g} | {r['test']:.3f} | {ratio} | {r['trainable']:,} | {r['train_s']:.0f} |")
    if "methods" in res:
        m = res["methods"]
        lines += [f"\nevery method on {m['task']} (test {m['metric']}, n={m['n_test']}; base model {m['base']:.3f})",
                  "| method | lr | test | / full FT | trainable share | s/step | train memory MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            ratio = f"{r['ratio_to_full']:.2f}" if r["ratio_to_full"] is not None else "-"
            mem = f"{r['memory_bytes'] / 2**20:.0f}" if r["memory_bytes"] else "-"
            lines.append(f"| {r['row']} | {r['lr']:g} | {r['test']:.3f} | {ratio} | {100 * r['share']:.3f}% | "
                         f"{r['step_s']:.2f} | {mem} |")
        for k, why in m["skipped"].items():
            lines.append(f"- {k}: {why}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["table", "methods", "both"], default="table")
    ap.add_argument("--tasks", default="commonsense_mc,arithmetic", help="table mode: comma-separated tasks")
    ap.add_argument("--task", default="commonsense_mc", help="methods mode: the one task")
    ap.add_argument("--rows", default="Series,Parallel,LoRA,Prefix,Full FT", help="table mode: rows to run")
    ap.add_argument("--methods", default=None, help="methods mode: comma-separated (default: every registered one)")
    ap.add_argument("--time-limit", type=float, default=1e9, help="methods mode: start no new method after N minutes")
    for f, d in dataclasses.asdict(Budget()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=d)
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Llama + byte tokenizer (smoke runs)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write quality.json and quality.md here (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    b = Budget(**{f: getattr(a, f) for f in dataclasses.asdict(Budget())})
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in LRS]
    if bad:
        ap.error(f"--rows: unknown {bad}; choose from {list(LRS)}")
    if a.tiny:
        from adapterkit.train.toy import toy_llama, toy_tokenizer

        base, tok = toy_llama(seed=0, hidden_size=64).requires_grad_(False), toy_tokenizer()
    else:
        from adapterkit.models import load_model

        base, tok = load_model("default")
    methods = a.methods.split(",") if a.methods else ak.list_methods()
    unknown = [m for m in methods if m not in ak.list_methods()]
    if unknown:
        ap.error(f"--methods: unknown {unknown}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def write(res: dict[str, Any]) -> None:
        if a.out:
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "quality.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
            (out / "quality.md").write_text(format_table(res) + "\n")

    log(f"budget {b}; torch threads {torch.get_num_threads()}; model {'tiny' if a.tiny else 'SmolLM2-135M-Instruct'}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        root = Path(tmp)
        res: dict[str, Any] = {"budget": dataclasses.asdict(b), "model": "tiny" if a.tiny else "SmolLM2-135M-Instruct",
                               "argv": list(argv) if argv is not None else sys.argv[1:]}
        if a.mode in ("table", "both"):
            res.update(run_table(base, tok, [t.strip() for t in a.tasks.split(",") if t.strip()], b, rows, root, log,
                                 done=lambda part: write({**res, **part})))
        if a.mode in ("methods", "both"):
            res["methods"] = run_methods(base, tok, a.task, b, methods, root, a.time_limit * 60, log)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    table = format_table(res)
    print(table)
    write(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
