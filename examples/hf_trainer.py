"""HF ``transformers.Trainer`` trains an adapterkit adapter too: adapter params are plain
``nn.Parameter``s with ``requires_grad=True`` and the base is frozen, so any PyTorch training
loop (HF Trainer, Lightning, your own) works unchanged. Runs in seconds on a tiny model:

    .venv/bin/python examples/hf_trainer.py                  # random tiny Llama + byte tokenizer
    .venv/bin/python examples/hf_trainer.py --model default  # SmolLM2-135M-Instruct

The dataset and collator come from adapterkit.train (loss on completions only; labels are
-100 elsewhere, the convention HF models use to compute the loss).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import adapterkit as ak
from adapterkit.train import PadCollator, build_dataset, pad_token_id_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny', 'default' or a local HF model dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/hf-adapter", help="where the adapter is saved")
    args = ap.parse_args()

    if args.model == "tiny":
        from adapterkit.train.toy import toy_llama, toy_tokenizer

        model, tokenizer = toy_llama(), toy_tokenizer()
    else:
        from adapterkit.models import load_model

        model, tokenizer = load_model(args.model)
    # lm_head as well: on a random tiny model the attention projections alone learn slowly
    ak.add_adapter(model, "hf", ak.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "lm_head"]))

    data = build_dataset([{"prompt": f"{a} + {b} =", "completion": f" {a + b}"} for a in range(4) for b in range(4)],
                         tokenizer, max_length=64)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=2e-2,
            lr_scheduler_type="cosine", warmup_steps=2, logging_steps=5, save_strategy="no", report_to=[],
            remove_unused_columns=False,  # our items are plain dicts of tensors
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=PadCollator(pad_token_id_for(tokenizer)))
        out = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"HF Trainer: {out.global_step} steps, logged losses {[round(l, 3) for l in losses]}")
    # the HF optimizer only saw the adapter's parameters
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt == ak.trainable_parameters(model, "hf"), (n_opt, ak.trainable_parameters(model, "hf"))
    out_dir = Path(args.out)
    ak.save_adapter(model, "hf", out_dir)
    print(f"optimizer params {n_opt:,} == adapter params; adapter saved to {out_dir}")
    if losses[-1] >= losses[0]:
        raise SystemExit(f"loss did not decrease: {losses}")


if __name__ == "__main__":
    main()
