"""Training adapters: ``Trainer`` + ``TrainConfig`` and the SFT data pipeline.

    import adapterkit as ak
    from adapterkit.train import Trainer, TrainConfig, seed_everything

    seed_everything(0)  # before add_adapter: the adapter's init is random too
    ak.add_adapter(model, "math", ak.LoRAConfig(r=8, targets=["q_proj", "v_proj"]))
    result = Trainer(model, "train.jsonl", config=TrainConfig(out_dir="runs/math", steps=200),
                     tokenizer=tokenizer, adapter_name="math").train()
"""
from adapterkit.train.config import SCHEDULES, TrainConfig, lr_factor
from adapterkit.train.data import (
    IGNORE_INDEX,
    Example,
    PadCollator,
    SFTDataset,
    build_dataset,
    chat_segments,
    load_jsonl,
    pad_token_id_for,
    tokenize_example,
)
from adapterkit.train.repro import seed_everything
from adapterkit.train.trainer import Trainer, TrainResult

__all__ = [
    "IGNORE_INDEX",
    "SCHEDULES",
    "Example",
    "PadCollator",
    "SFTDataset",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_dataset",
    "chat_segments",
    "load_jsonl",
    "lr_factor",
    "pad_token_id_for",
    "seed_everything",
    "tokenize_example",
]
