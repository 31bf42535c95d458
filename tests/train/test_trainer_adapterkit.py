"""The trainer on real adapterkit adapters: only adapter params move, it learns, and the
saved adapter reloads into a fresh model with identical outputs."""
from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.errors import AdapterNotFoundError
from adapterkit.train import TrainConfig, Trainer
from adapterkit.train.toy import toy_llama


def lora_model(seed: int = 0, targets=("q_proj", "v_proj")):
    m = toy_llama(seed=seed)
    ak.add_adapter(m, "a", ak.LoRAConfig(r=4, targets=list(targets)))
    return m


def test_lora_learns_and_roundtrips(tmp_path, tok, qa):
    # lm_head too: in a random tiny Llama, q/v alone barely move the (random) output head
    model = lora_model(targets=("q_proj", "v_proj", "lm_head"))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapterkit.a." in n for n in trainable)
    cfg = TrainConfig(out_dir=tmp_path, lr=2e-2, steps=15, batch_size=4, warmup_steps=2, log_every=5, progress=False)
    res = Trainer(model, qa[:4], eval_data=qa[:4], config=cfg, tokenizer=tok, adapter_name="a").train()
    first, last = res.losses[0][1], res.losses[-1][1]
    assert last < 0.5 * first, (first, last)  # memorizing 4 short answers: the loss must fall a lot
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"frozen base param {n} changed"
    assert res.adapter_dir == tmp_path / "adapter" and (res.adapter_dir / "adapter.safetensors").is_file()
    fresh = toy_llama(seed=0)
    ak.load_adapter(fresh, res.adapter_dir, name="a")
    ak.set_adapter(fresh, "a")
    ids = torch.tensor([tok("Q3: what is 3 + 3?")["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert res.eval_loss < 0.5 * first


def test_unknown_adapter_name_fails_before_training(tmp_path, tok, qa):
    with pytest.raises(AdapterNotFoundError, match=r"'b' is not attached to the model \(attached: \['a'\]\)"):
        Trainer(lora_model(), qa, config=TrainConfig(out_dir=tmp_path, steps=1), tokenizer=tok, adapter_name="b")
