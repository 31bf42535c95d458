"""MeteoRA: does a token-level gate over three separately trained LoRAs pick the right one?

1. train one LoRA per task (``S`` steps each) on SmolLM2-135M;
2. embed them with ``ak.compose.moe.meteora(model, [...], top_k=K)`` and train only the gates
   with the Trainer on the shuffled mixture of the tasks' training data (LM loss plus
   ``routing_loss``: a top-1 gate gets no gradient from the LM loss alone);
3. on a MIXED held-out set (inputs never seen in training, no task ids given):
   * routing accuracy: the fraction of (token, layer) gate decisions that pick the row's own
     task's adapter, over the task-specific tokens (the prompt after the chat template's common
     prefix, and the gold answer, fed with teacher forcing); sequence routing accuracy: the
     majority of a row's decisions picks its adapter;
   * task accuracy: greedy exact match (checked teacher-forced: ``forced_exact_match``), with
     the oracle (each adapter on its own task) beside it.

    .venv/bin/python benchmarks/meteora_routing.py                    # SmolLM2 on CPU
    .venv/bin/python benchmarks/meteora_routing.py --tiny --steps 5    # smoke run, random toy model
"""
from __future__ import annotations

import argparse
import random
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


def train(model, name, records, args, out: Path, steps: int, loss_terms=(), ids_fn=None) -> float:
    from adapterkit.train import TrainConfig, Trainer

    moe.freeze_adapters(model, [n for n in ak.list_adapters(model) if n != name])
    cfg = TrainConfig(out_dir=out / name, lr=args.lr, steps=steps, batch_size=args.batch_size,
                      warmup_steps=max(1, steps // 10), schedule="cosine", seed=args.seed, log_every=10**6,
                      progress=False, max_length=128)
    t = time.perf_counter()
    tr = Trainer(model, records, config=cfg, tokenizer=args.tok, loss_terms=loss_terms)
    if ids_fn is not None:
        with routing.task_ids(model, ids_fn):
            tr.train()
    else:
        tr.train()
    return time.perf_counter() - t


@torch.no_grad()
def routing_accuracy(model, mt: MultiTask, args, pos: int, name: str = "moe") -> tuple[float, float, list[float]]:
    """(token-level, sequence-level, per-task token-level) routing accuracy on the held-out splits."""
    from adapterkit.demo import training_records
    from adapterkit.train.data import PadCollator, build_dataset, pad_token_id_for

    model.eval()
    collate = PadCollator(pad_token_id_for(args.tok))
    hits = torch.zeros(len(TASKS))
    total = torch.zeros(len(TASKS))
    seq_hits = seq_total = 0
    for t in range(len(TASKS)):
        ds = build_dataset(training_records(mt.heldout(t)[:args.n_eval], args.tok), args.tok)
        for i in range(0, len(ds), 25):
            b = collate([ds[j] for j in range(i, min(i + 25, len(ds)))])
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            mask = b["attention_mask"].bool().clone()
            mask[:, :pos] = False  # the common template prefix says nothing about the task
            votes = torch.zeros(mask.shape[0], len(TASKS))
            for g in moe.last_gates(model, name).values():  # (B, T, E) per gated layer
                choice = g.argmax(-1)  # (B, T)
                hits[t] += ((choice == t) & mask).sum()
                total[t] += mask.sum()
                for e in range(len(TASKS)):
                    votes[:, e] += ((choice == e) & mask).sum(-1)
            seq_hits += int((votes.argmax(-1) == t).sum())
            seq_total += mask.shape[0]
    per_task = (hits / total).tolist()
    return float(hits.sum() / total.sum()), seq_hits / seq_total, per_task


def mixed_accuracy(model, mt: MultiTask, args) -> list[float]:
    """Exact match per task (teacher-forced greedy check), the tasks' held-out examples
    shuffled into mixed batches."""
    from adapterkit.compose.tasks import forced_exact_match

    items = [(t, e) for t in range(len(TASKS)) for e in mt.heldout(t)[:args.n_eval]]
    random.Random(args.seed).shuffle(items)
    hits = forced_exact_match(model, args.tok, [e for _, e in items], batch_size=30)
    hit = [0] * len(TASKS)
    n = [0] * len(TASKS)
    for (t, _), h in zip(items, hits):
        hit[t] += h
        n[t] += 1
    return [h / max(c, 1) for h, c in zip(hit, n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="training steps of each task's LoRA")
    p.add_argument("--gate-steps", type=int, default=30, help="gate training steps on the mixture")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--routing-loss", type=float, default=1.0, help="weight of routing_loss (0: LM loss only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-eval", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", action="store_true", help="also measure the base model")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_all = time.perf_counter()
    model, args.tok = load(args.tiny)
    mt = MultiTask(TASKS, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
    ids_fn = mt.task_id_fn(args.tok)
    out = Path(tempfile.mkdtemp(prefix="ak-meteora-"))
    names = [f"lora_{t}" for t in TASKS]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.0f} s] {msg}", flush=True)

    base = mixed_accuracy(model, mt, args) if args.base else None
    if base is not None:
        log(f"base model: {base}")
    oracle, secs = [], 0.0
    for t, name in enumerate(names):
        ak.add_adapter(model, name, ak.LoRAConfig(r=args.r, alpha=2.0 * args.r, targets=TARGETS))
        ak.set_adapter(model, name)
        secs += train(model, name, mt.train_records(args.tok, [t])[0], args, out, args.steps)
        oracle.append(mt.accuracy(model, args.tok, t, args.n_eval))
    log(f"oracle (each adapter on its own task): {oracle}, trained in {secs:.0f} s")

    moe.meteora(model, names, top_k=args.top_k, name="moe")
    n_gate = ak.trainable_parameters(model, "moe")
    mix, _ = mt.train_records(args.tok)
    w = args.routing_loss
    terms = [lambda m: w * moe.routing_loss(m, "moe")] if w > 0 else []
    g_secs = train(model, "moe", mix, args, out, args.gate_steps, loss_terms=terms, ids_fn=ids_fn)
    log(f"gates trained ({n_gate:,} params) in {g_secs:.0f} s")
    tok_acc, seq_acc, per_task = routing_accuracy(model, mt, args, ids_fn.position)
    log(f"routing accuracy: tokens {tok_acc:.3f}, sequences {seq_acc:.3f}, per task {per_task}")
    acc = mixed_accuracy(model, mt, args)
    log(f"MeteoRA task accuracy (mixed batches, no task ids): {acc}")

    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"\nmodel: {'toy Llama (random)' if args.tiny else ak.models.DEFAULT_MODEL_NAME}; 3 LoRAs r={args.r} x "
          f"{args.steps} steps; MeteoRA top_k={args.top_k}, gate {args.gate_steps} steps (routing_loss weight {w}); "
          f"held-out n={args.n_eval}/task, mixed; total {time.perf_counter() - t_all:.0f} s\n")
    print("| | " + " | ".join(TASKS) + " | mean |")
    print("|---|" + "---|" * (len(TASKS) + 1))
    print("| routing accuracy, tokens | " + " | ".join(f"{a:.1%}" for a in per_task) + f" | {tok_acc:.1%} |")
    print(f"| routing accuracy, sequences (majority) | | | | {seq_acc:.1%} |")
    for label, v in (("task accuracy: base model", base), ("task accuracy: oracle adapter per task", oracle),
                     ("task accuracy: MeteoRA (no task ids)", acc)):
        if v is None:
            continue
        print(f"| {label} | " + " | ".join(f"{a:.0%}" for a in v) + f" | {mean(v):.0%} |")
    print(f"\ntrainable gate parameters: {n_gate:,}")


if __name__ == "__main__":
    main()
