"""Cost of deterministic mode on CPU (``TrainConfig(deterministic=...)``), side by side in one run.

CPU time of the Trainer's optimizer step (forward + backward + AdamW) for LoRA r=8 on q/k/v/o
(dropout 0.1) of a random Llama, batches of 8 generated 'dates' prompts, one torch thread, with
``torch.use_deterministic_algorithms`` on and off alternating in one process; the minimum over
repetitions of each is compared (CPU time, so another process on the machine matters less).

    .venv/bin/python benchmarks/deterministic_cost.py --hidden 576 --layers 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import adapterkit as ak
from adapterkit.tasks import generate
from adapterkit.train import TrainConfig, Trainer, seed_everything
from adapterkit.train.repro import deterministic_algorithms
from adapterkit.train.toy import toy_llama, toy_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per timed repetition")
    a = ap.parse_args()
    torch.set_num_threads(1)
    seed_everything(0)
    model = toy_llama(hidden_size=a.hidden, num_hidden_layers=a.layers)
    ak.add_adapter(model, "a", ak.LoRAConfig(r=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"], dropout=0.1))
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(model, generate("dates", 64, seed=0), tokenizer=toy_tokenizer(),
                     config=TrainConfig(out_dir=out, batch_size=8))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        stream = tr._batches(0, 0)
        batches = [next(stream)[0] for _ in range(a.steps)]
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(a.reps):
            for det in (True, False):
                with deterministic_algorithms(det):
                    t = time.process_time()
                    for i, b in enumerate(batches):
                        tr._optimizer_step([b], opt, params, i + 1)
                    times[det].append(time.process_time() - t)
    on, off = min(times[True]), min(times[False])
    print(f"hidden={a.hidden} layers={a.layers} steps={a.steps} threads=1, CPU seconds (min of {a.reps}): "
          f"deterministic on {on:.3f}, off {off:.3f}; on/off = {on / off:.3f} "
          f"(medians {statistics.median(times[True]):.3f} / {statistics.median(times[False]):.3f})")


if __name__ == "__main__":
    main()
