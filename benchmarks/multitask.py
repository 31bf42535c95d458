"""Multi-task adapters side by side: separate LoRAs, one shared LoRA, Poly, MHR, MHR-mu,
ScaLearn and merges of the separate LoRAs, on synthetic exact-match tasks.

Every method sees the same examples: the separate LoRAs ``S`` steps on their own task each,
the multi-task methods ``3 S`` steps on the shuffled mixture (batch 8). Accuracy is greedy
exact match on each task's held-out split (inputs never seen in training), checked
teacher-forced (``adapterkit.compose.tasks.forced_exact_match``: greedy decoding reproduces the
gold answer tokens through the stop token; one forward per batch instead of a decode loop).

    .venv/bin/python benchmarks/multitask.py                  # SmolLM2-135M on CPU (~10 min)
    .venv/bin/python benchmarks/multitask.py --tiny --steps 5 # a smoke run on a random toy model

Methods (all adapters on q,k,v,o,gate,up,down, rank r):

* separate: one LoRA per task, each evaluated on its own task (the per-task upper bound);
* shared: one LoRA trained on the mixture;
* poly: PolyConfig(n_tasks=3, n_skills=K, n_heads=1): per-task routing over K LoRA skills;
* mhr: the same with n_heads=H (multi-head routing);
* mhr-mu: the MHR inventory averaged into one LoRA (uniform routing), then fine-tuned on
  each task for --mu-steps (one copy per task);
* scalearn: per task, ScaLearn coefficients over the three frozen separate LoRAs, trained
  --mu-steps on that task (adapterkit.compose.scalearn);
* merge-linear / merge-ties: ak.merge_adapters of the separate LoRAs into one LoRA (no training).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.compose import moe, routing
from adapterkit.compose.tasks import MultiTask

TASKS = ("dates", "reverse_words", "digit_shift")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(tiny: bool):
    if tiny:
        from adapterkit.train.toy import toy_llama, toy_tokenizer

        return toy_llama(hidden_size=64, num_hidden_layers=2), toy_tokenizer()
    return ak.models.load_default()


def only_trainable(model, name: str) -> None:
    """Freeze every adapter but ``name`` (the Trainer trains whatever requires grad)."""
    moe.freeze_adapters(model, [n for n in ak.list_adapters(model) if n != name])


def train(model, name: str, records, args, out: Path, steps: int, ids_fn=None) -> float:
    from adapterkit.train import TrainConfig, Trainer

    only_trainable(model, name)
    cfg = TrainConfig(out_dir=out / name, lr=args.lr, steps=steps, batch_size=args.batch_size,
                      warmup_steps=max(1, steps // 10), schedule="cosine", seed=args.seed, log_every=10**6,
                      progress=False, max_length=128)
    t = time.perf_counter()
    if ids_fn is not None:
        with routing.task_ids(model, ids_fn):
            Trainer(model, records, config=cfg, tokenizer=args.tok).train()
    else:
        Trainer(model, records, config=cfg, tokenizer=args.tok).train()
    return time.perf_counter() - t


def evaluate(model, mt: MultiTask, args, task: int, poly: bool = False) -> float:
    if poly:
        with routing.task_ids(model, task):
            return mt.accuracy(model, args.tok, task, args.n_eval)
    return mt.accuracy(model, args.tok, task, args.n_eval)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="training steps per task (S)")
    p.add_argument("--mu-steps", type=int, default=15, help="MHR-mu fine-tuning steps per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--skills", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-eval", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help="random toy Llama + byte tokenizer (smoke test)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    model, args.tok = load(args.tiny)
    mt = MultiTask(TASKS, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    mix, _ = mt.train_records(args.tok)
    ids_fn = mt.task_id_fn(args.tok)
    T, S = len(TASKS), args.steps
    out = Path(tempfile.mkdtemp(prefix="ak-multitask-"))
    lora = ak.LoRAConfig(r=args.r, alpha=2.0 * args.r, targets=TARGETS)
    rows: list[tuple[str, list[float], int, float]] = []

    class Rows(list):  # print each row as it is measured (long runs show progress)
        def append(self, row) -> None:
            super().append(row)
            print(f"[{time.perf_counter() - t_all:6.0f} s] {row[0]}: {[round(a, 3) for a in row[1]]}", flush=True)

    rows = Rows()

    ak.add_adapter(model, "_probe", lora)  # count one LoRA's parameters
    n_lora = ak.trainable_parameters(model, "_probe")
    ak.delete_adapter(model, "_probe")
    ak.set_adapter(model, None)
    base = [mt.accuracy(model, args.tok, t, args.n_eval) for t in range(T)]
    rows.append(("base model", base, 0, 0.0))

    # separate LoRAs
    sep, secs = [], 0.0
    for t in range(T):
        name = f"sep_{TASKS[t]}"
        ak.add_adapter(model, name, lora)
        ak.set_adapter(model, name)
        secs += train(model, name, mt.train_records(args.tok, [t])[0], args, out, S)
        sep.append(evaluate(model, mt, args, t))
    rows.append(("separate LoRAs (one per task)", sep, T * n_lora, secs))

    # one shared LoRA
    ak.add_adapter(model, "shared", lora)
    ak.set_adapter(model, "shared")
    secs = train(model, "shared", mix, args, out, T * S)
    rows.append(("shared LoRA", [evaluate(model, mt, args, t) for t in range(T)], n_lora, secs))

    # Poly and MHR
    for name, heads in (("poly", 1), ("mhr", args.heads)):
        cfg = routing.PolyConfig(n_tasks=T, n_skills=args.skills, n_heads=heads, r=args.r, alpha=2.0 * args.r,
                                 targets=TARGETS)
        ak.add_adapter(model, name, cfg)
        ak.set_adapter(model, name)
        secs = train(model, name, mix, args, out, T * S, ids_fn)
        label = f"Poly (K={args.skills})" if heads == 1 else f"MHR (K={args.skills}, h={heads})"
        rows.append((label, [evaluate(model, mt, args, t, poly=True) for t in range(T)],
                     ak.trainable_parameters(model, name), secs))
    mhr_params, mhr_secs = rows[-1][2], rows[-1][3]

    # MHR-mu: average the MHR inventory into a LoRA, fine-tune one copy per task
    accs, secs = [], mhr_secs
    for t in range(T):
        name = f"mu_{TASKS[t]}"
        routing.new_task_adapter(model, "mhr", name, mode="mu")
        ak.set_adapter(model, name)
        secs += train(model, name, mt.train_records(args.tok, [t])[0], args, out, args.mu_steps)
        accs.append(evaluate(model, mt, args, t))
    rows.append((f"MHR-mu (+{args.mu_steps} steps/task)", accs, mhr_params + T * n_lora, secs))

    # ScaLearn over the separate LoRAs (another engineer's module): per task, coefficients
    # (a d-vector per host per source) over all three frozen task LoRAs, trained on that task
    names = [f"sep_{t}" for t in TASKS]
    try:
        from adapterkit.compose.scalearn import ScaLearn, add_scalearn
    except ImportError:
        rows.append(("ScaLearn: n/a (adapterkit.compose.scalearn not available)", [float("nan")] * T, 0, 0.0))
    else:
        accs, secs, n_sl = [], 0.0, 0
        for t in range(T):
            name = f"sl_{TASKS[t]}"
            add_scalearn(model, name, names)
            ak.set_adapter(model, ScaLearn(*names, name=name))
            n_sl += ak.trainable_parameters(model, name)
            secs += train(model, name, mt.train_records(args.tok, [t])[0], args, out, args.mu_steps)
            accs.append(evaluate(model, mt, args, t))
        rows.append((f"ScaLearn over the separate LoRAs (+{args.mu_steps} steps/task)", accs, n_sl, secs))

    # merges of the separate LoRAs
    for label, kw in (("merge linear (w=1/3 each)", dict(method="linear", weights={n: 1 / T for n in names})),
                      ("merge TIES (w=1, density 0.5)", dict(method="ties", weights={n: 1.0 for n in names},
                                                              density=0.5))):
        name = ak.merge_adapters(model, kw["weights"], method=kw["method"], name=label.split()[1],
                                 density=kw.get("density", 1.0))
        ak.set_adapter(model, name)
        rows.append((label, [evaluate(model, mt, args, t) for t in range(T)], 0, 0.0))

    print(f"\nmodel: {'toy Llama (random)' if args.tiny else ak.models.DEFAULT_MODEL_NAME}, tasks {', '.join(TASKS)}; "
          f"{S} steps/task x batch {args.batch_size}, lr {args.lr}, r {args.r}; held-out n={args.n_eval}/task; "
          f"{torch.get_num_threads()} threads; total {time.perf_counter() - t_all:.0f} s\n")
    head = "| method | " + " | ".join(TASKS) + " | mean | trainable params | train s |"
    print(head)
    print("|" + "---|" * (len(TASKS) + 4))
    for label, accs, n, secs in rows:
        cells = " | ".join("n/a" if a != a else f"{a:.0%}" for a in accs)
        mean = "n/a" if any(a != a for a in accs) else f"{sum(accs) / len(accs):.0%}"
        print(f"| {label} | {cells} | {mean} | {n:,} | {secs:.0f} |")


if __name__ == "__main__":
    main()
