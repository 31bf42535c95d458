"""Trainer math: loss = masked token mean (vs HF's loss), grad accumulation == bigger batch,
clipping, loss_terms, eval loss, gradient checkpointing, bf16, errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from adapterkit.errors import ConfigError, DataError, TrainingDivergedError
from adapterkit.train import PadCollator, TrainConfig, Trainer, build_dataset


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(out_dir=tmp_path, lr=1e-2, steps=4, batch_size=4, log_every=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class GradSpy:
    """Records the total grad norm (and grads) the optimizer sees at each step."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.grads: list[list[torch.Tensor]] = []

    def __enter__(self) -> "GradSpy":
        def hook(opt, args, kwargs):
            gs = [p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self.grads.append(gs)
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))))

        self._h = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._h.remove()


def test_first_loss_is_hf_masked_token_mean(tmp_path, make_model, tok, qa, chat):
    data = qa[:5] + chat[:3]
    model = make_model()
    # one step over the whole dataset: batch = every example, in the trainer's permuted order
    res = Trainer(model, data, config=cfg(tmp_path, steps=1, batch_size=8, max_grad_norm=None), tokenizer=tok).train()
    ref_model = make_model()
    ds = build_dataset(data, tok)
    batch = PadCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        ref = ref_model(**batch).loss  # HF: shift + mean over labels != -100
    assert res.losses[0][1] == pytest.approx(float(ref), rel=1e-5)


def test_grad_accum_equals_bigger_batch(tmp_path, make_model, tok, qa):
    runs = {}
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        model = make_model()
        res = Trainer(model, qa, config=cfg(tmp_path / f"{bs}x{ga}", batch_size=bs, grad_accum=ga, max_grad_norm=None),
                      tokenizer=tok).train()
        runs[(bs, ga)] = ([l for _, l in res.losses], trainable(model))
    ref_losses, ref_params = runs[(4, 1)]
    assert len(ref_losses) == 4
    for key in [(2, 2), (1, 4)]:
        losses, params = runs[key]
        assert losses == pytest.approx(ref_losses, abs=1e-5)
        for n in ref_params:
            torch.testing.assert_close(params[n], ref_params[n], atol=1e-5, rtol=1e-4)
    # and the run really moved the params (so the comparison above is not vacuous)
    fresh = trainable(make_model())
    assert any((fresh[n] - ref_params[n]).abs().max() > 1e-3 for n in fresh)


def test_clipping_caps_the_grad_norm(tmp_path, make_model, tok, qa):
    with GradSpy() as spy:
        Trainer(make_model(), qa, config=cfg(tmp_path / "a", max_grad_norm=None), tokenizer=tok).train()
    unclipped = spy.norms
    with GradSpy() as spy:
        Trainer(make_model(), qa, config=cfg(tmp_path / "b", max_grad_norm=0.01), tokenizer=tok).train()
    logged = [json.loads(l)["grad_norm"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert unclipped[0] > 0.05  # so that a 0.01 cap binds
    assert logged[0] == pytest.approx(unclipped[0], rel=1e-5)  # metrics log the pre-clip norm
    assert all(n == pytest.approx(0.01, rel=1e-4) for n, pre in zip(spy.norms, logged) if pre > 0.01)


def test_loss_terms_add_their_gradient(tmp_path, make_model, tok, qa):
    c = 0.5

    def l2(model):
        return c * sum((p**2).sum() for p in model.parameters() if p.requires_grad)

    with GradSpy() as base:
        Trainer(make_model(), qa, config=cfg(tmp_path / "a", steps=1, max_grad_norm=None), tokenizer=tok).train()
    model = make_model()
    params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with GradSpy() as reg:
        Trainer(model, qa, config=cfg(tmp_path / "b", steps=1, max_grad_norm=None), tokenizer=tok, loss_terms=[l2]).train()
    # AdamW's no-decay group order equals named_parameters order here (all params are 2-D)
    for g0, g1, p in zip(base.grads[0], reg.grads[0], params):
        torch.testing.assert_close(g1, g0 + 2 * c * p, atol=1e-6, rtol=1e-5)
    rec = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["aux_loss"] == pytest.approx(float(c * sum((p**2).sum() for p in params)), rel=1e-5)


def test_eval_loss_is_token_mean_over_eval_set(tmp_path, make_model, tok, qa):
    model = make_model()
    tr = Trainer(model, qa, eval_data=qa[:7], config=cfg(tmp_path, steps=2, batch_size=3, eval_every=1), tokenizer=tok)
    res = tr.train()
    assert [s for s, _ in res.eval_losses] == [1, 2]
    ds = build_dataset(qa[:7], tok)
    with torch.no_grad():
        ref = model(**PadCollator(tok.pad_token_id)([ds[i] for i in range(7)])).loss
    assert res.eval_loss == pytest.approx(float(ref), rel=1e-5)  # eval batches of 3 pool tokens exactly
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert [e["step"] for e in evals] == [1, 2]


def test_gradient_checkpointing_same_losses(tmp_path, make_model, tok, qa):
    a = Trainer(make_model(), qa, config=cfg(tmp_path / "a", steps=3), tokenizer=tok).train()
    model = make_model()
    seen: list[bool] = []

    def spy(m):  # records whether checkpointing is on while training
        seen.append(bool(m.is_activation_checkpointing))
        return torch.zeros(())

    b = Trainer(model, qa, config=cfg(tmp_path / "b", steps=3, gradient_checkpointing=True), tokenizer=tok,
                loss_terms=[spy]).train()
    assert seen == [True] * 3
    assert [l for _, l in b.losses] == pytest.approx([l for _, l in a.losses], abs=1e-6)
    assert not model.is_activation_checkpointing  # restored afterwards
    assert not model.training


def test_bf16_autocast_runs_on_cpu(tmp_path, make_model, tok, qa):
    tr = Trainer(make_model(), qa, config=cfg(tmp_path, steps=2, bf16=True), tokenizer=tok)
    assert tr.use_bf16
    res = tr.train()
    assert all(torch.isfinite(torch.tensor(l)) for _, l in res.losses)
    assert not Trainer(make_model(), qa, config=cfg(tmp_path / "auto"), tokenizer=tok).use_bf16  # auto: off on CPU


def test_epochs_cover_every_example_once_per_epoch(tmp_path, make_model, tok, qa):
    tr = Trainer(make_model(), qa[:10], config=cfg(tmp_path, steps=None, epochs=2, batch_size=4), tokenizer=tok)
    keys = {tuple(ex.input_ids.tolist()): i for i, ex in enumerate(tr.train_ds.examples)}
    assert len(keys) == 10
    seen: list[int] = []
    gen = tr._batches(0, 0)
    for _ in range(6):  # 3 batches per epoch (4 + 4 + 2)
        batch, _, _ = next(gen)
        for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seen.append(keys[tuple(row[mask.bool()].tolist())])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # reshuffled each epoch
    assert tr.train().steps == 6


def test_errors(tmp_path, make_model, tok, qa):
    frozen = make_model(adapter=False)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameters with requires_grad"):
        Trainer(frozen, qa, config=cfg(tmp_path), tokenizer=tok)
    # an adapter loaded for inference is frozen (PEFT's habit): the error says how to train it
    import adapterkit as ak

    donor = make_model(adapter=False)
    ak.add_adapter(donor, "a", ak.LoRAConfig(r=2))
    ak.save_adapter(donor, "a", tmp_path / "saved")
    loaded = make_model(adapter=False)
    ak.load_adapter(loaded, tmp_path / "saved")
    with pytest.raises(ConfigError, match=r"load_adapter\(\.\.\., trainable=True\)"):
        Trainer(loaded, qa, config=cfg(tmp_path), tokenizer=tok)
    with pytest.raises(DataError, match="token id 999 >= the model's vocabulary size"):
        Trainer(make_model(), [{"input_ids": [1, 999, 3]}], config=cfg(tmp_path))
    with pytest.raises(TrainingDivergedError, match="step 1"):
        Trainer(make_model(), qa, config=cfg(tmp_path / "nan"), tokenizer=tok,
                loss_terms=[lambda m: torch.tensor(float("nan"))]).train()
    with pytest.raises(ConfigError, match=r"must return a scalar tensor, got \(2,\)"):
        Trainer(make_model(), qa, config=cfg(tmp_path / "vec"), tokenizer=tok, loss_terms=[lambda m: torch.ones(2)]).train()
    with pytest.raises(ConfigError, match="loss_terms must be callables"):
        Trainer(make_model(), qa, config=cfg(tmp_path), tokenizer=tok, loss_terms=[3])


def test_optimizer_covers_exactly_the_trainable_params(tmp_path, make_model, tok, qa):
    model = make_model()
    scale = torch.nn.Parameter(torch.ones(64))  # a 1-D trainable vector (like IA3 / DoRA magnitude)
    model.model.norm.register_parameter("my_scale", scale)
    tr = Trainer(model, qa, config=cfg(tmp_path, weight_decay=0.1), tokenizer=tok)
    opt = tr._make_optimizer()
    decay, no_decay = opt.param_groups
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and [id(p) for p in no_decay["params"]] == [id(scale)]
