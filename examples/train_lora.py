"""Train a LoRA adapter the plain adapterkit way, then use it.

    .venv/bin/python examples/train_lora.py                       # SmolLM2-135M-Instruct (the default model)
    .venv/bin/python examples/train_lora.py --model tiny --steps 20   # random tiny Llama: a 10-second smoke run
    .venv/bin/python examples/train_lora.py --data my.jsonl --steps 300 --out runs/mine

Data: JSONL, one {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"} per
line; the loss is taken on the assistant/completion tokens only. Without --data a small
built-in chat set (answer in pirate speak) is used. Run it again with --resume after an
interruption: it continues from the last checkpoint with the same loss curve.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.train import TrainConfig, Trainer

PIRATE = [
    ("What is the capital of France?", "Arr, 'tis Paris, matey!"),
    ("How many legs does a spider have?", "Eight legs, me hearty, arr!"),
    ("What color is the sky?", "Blue as the seven seas, arr!"),
    ("Name a fruit.", "A fine mango, plundered fresh, arr!"),
    ("What is 2 + 3?", "Five doubloons, matey!"),
    ("Who wrote Hamlet?", "Old Shakespeare, ye landlubber, arr!"),
    ("What do bees make?", "Sweet honey, me hearty!"),
    ("How many days are in a week?", "Seven days 'til we make port, arr!"),
]


def builtin_data() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PIRATE]


def load(model: str):
    if model == "tiny":
        from adapterkit.train.toy import toy_llama, toy_tokenizer

        return toy_llama(), toy_tokenizer()
    from adapterkit.models import load_model

    return load_model(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default', 'tiny' or a local HF model dir")
    ap.add_argument("--data", help="training JSONL (default: a built-in pirate chat set)")
    ap.add_argument("--out", default="runs/pirate")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    # 1. add an adapter: the base is frozen, only the LoRA matrices train
    ak.add_adapter(model, "pirate", ak.LoRAConfig(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    print(f"trainable parameters: {ak.trainable_parameters(model, 'pirate'):,}")

    # 2. train (checkpoints, metrics.jsonl and loss.png land in --out)
    data = args.data or builtin_data()
    config = TrainConfig(out_dir=Path(args.out), lr=args.lr, steps=args.steps, batch_size=4, warmup_steps=5,
                         save_every=20, log_every=5, max_length=256, progress=args.progress)
    result = Trainer(model, data, eval_data=data, config=config, tokenizer=tokenizer, adapter_name="pirate").train(resume=args.resume)
    print(f"loss {result.losses[0][1] if result.losses else float('nan'):.3f} -> {result.final_loss or float('nan'):.3f}; "
          f"eval {result.eval_loss:.3f}; adapter saved to {result.adapter_dir}; plot: {result.plot_path}")

    # 3. use it: generate with the adapter on, and with the base model only
    model.eval()
    msgs = [{"role": "user", "content": PIRATE[0][0]}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    for name in ("pirate", None):
        ak.set_adapter(model, name)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        print(f"[{name or 'base'}] {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
