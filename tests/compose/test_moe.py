"""MeteoRA and MixDA gates against naive per-token loops."""
from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.compose import moe, routing
from adapterkit.errors import AdapterNotFoundError, ConfigError, UnsupportedModuleError
from conftest import randomize_adapters, tiny_llama

HOST = "model.layers.1.self_attn.v_proj"


def _lora_model(targets=("q_proj", "v_proj")):
    m = tiny_llama()
    for i, n in enumerate(["a", "b", "c"]):
        ak.add_adapter(m, n, ak.LoRAConfig(r=2 + i, targets=list(targets)))
    randomize_adapters(m, std=0.3)
    return m


def _naive_meteora(p: moe.GatePiece, experts, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Token by token: top-k of G x, softmax over the chosen logits, sum of their LoRA deltas."""
    G = p.gate.weight.detach()
    xf, yf = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]).clone()
    for n in range(xf.shape[0]):
        logits = [float(G[e] @ xf[n]) for e in range(len(experts))]
        chosen = sorted(range(len(experts)), key=lambda e: -logits[e])[:k]
        z = sum(torch.exp(torch.tensor(logits[e])) for e in chosen)
        for e in chosen:
            q = experts[e]
            delta = q.scaling * (q.lora_B.detach() @ (q.lora_A.detach() @ xf[n]))
            yf[n] += torch.exp(torch.tensor(logits[e])) / z * delta
    return yf.reshape(y.shape)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_meteora_matches_naive_loop(k):
    m = _lora_model()
    moe.meteora(m, ["a", "b", "c"], top_k=k)
    p = ak.api.get_record(m, "moe").pieces[HOST]
    experts = [ak.api.get_record(m, n).pieces[HOST] for n in "abc"]
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    torch.testing.assert_close(p.forward_post(x, y), _naive_meteora(p, experts, x, y, k), rtol=1e-5, atol=1e-5)
    g = moe.last_gates(m, "moe")[HOST]
    assert g.shape == (2, 5, 3) and ((g > 0).sum(-1) == k).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 5))


def test_meteora_one_hot_gate_is_that_adapter_and_grads_only_on_gates(monkeypatch):
    m = _lora_model()
    x = torch.randint(0, 128, (2, 6))
    ak.set_adapter(m, "b")
    ref = m(x).logits
    moe.meteora(m, ["a", "b", "c"], top_k=1)
    orig = moe.GatePiece.gates

    def pinned(self, xf):  # logits that always pick expert 1 ("b")
        logits = torch.full((xf.shape[0], 3), -1e4)
        logits[:, 1] = 0.0
        top_v, top_i = logits.topk(1, dim=-1)
        return torch.zeros_like(logits).scatter(1, top_i, torch.softmax(top_v, -1)), top_i

    monkeypatch.setattr(moe.GatePiece, "gates", pinned)
    torch.testing.assert_close(m(x).logits, ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(moe.GatePiece, "gates", orig)


def test_meteora_grads_only_on_gates_and_top1_routing_loss():
    m = _lora_model()
    x = torch.randint(0, 128, (2, 6))
    moe.meteora(m, ["a", "b", "c"], top_k=2)
    # training: only the gates get gradients, the experts and the base none
    m.train()
    out = m(x).logits
    out.square().mean().backward()
    trainable = {n for n, q in m.named_parameters() if q.requires_grad}
    assert trainable and all(".adapterkit.moe.gate." in n for n in trainable)
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for n, q in m.named_parameters() if q.requires_grad)
    assert all(q.grad is None for n, q in m.named_parameters() if not q.requires_grad)
    # top-1: the LM loss gives the gate no gradient (weight always 1); routing_loss does
    ak.delete_adapter(m, "moe")
    moe.meteora(m, ["a", "b", "c"], top_k=1)
    m.train()
    m(x).logits.square().mean().backward()
    assert all(q.grad is None or q.grad.abs().sum() == 0 for q in m.parameters() if q.requires_grad)
    with routing.task_ids(m, [2, 0]):
        m(x)
        loss = moe.routing_loss(m, "moe")
    pieces = ak.api.get_record(m, "moe").pieces.values()
    naive = []
    for p in pieces:  # reference: the gate's logits on the host's input, written out
        xs, shape = p.train_inputs
        logits = xs @ p.gate.weight.detach().T
        for n in range(logits.shape[0]):
            t = [2, 0][n // shape[1]]
            naive.append(torch.logsumexp(logits[n], 0) - logits[n, t])
    torch.testing.assert_close(loss, torch.stack(naive).reshape(len(pieces), -1).mean(1).mean())
    assert xs.shape == (12, 64)  # 2 rows x 6 tokens
    loss.backward()
    assert all(p.gate.weight.grad.abs().sum() > 0 for p in pieces)


def test_meteora_save_load_needs_experts(tmp_path):
    m = _lora_model()
    moe.meteora(m, ["a", "b", "c"], top_k=2)
    assert ak.api.get_record(m, "moe").method == "meteora" and ak.api.active_adapters(m) == ("moe",)
    randomize_adapters(m, std=0.3, seed=5)
    x = torch.randint(0, 128, (2, 6))
    ref = m(x).logits
    for n in ("a", "b", "c", "moe"):
        ak.save_adapter(m, n, tmp_path / n)
    m2 = tiny_llama()
    with pytest.raises(AdapterNotFoundError, match="'a'"):
        ak.load_adapter(m2, tmp_path / "moe")
    for n in ("a", "b", "c", "moe"):
        ak.load_adapter(m2, tmp_path / n)
    ak.set_adapter(m2, "moe")
    torch.testing.assert_close(m2(x).logits, ref)
    assert ak.trainable_parameters(m, "moe") == 4 * 3 * 64  # 4 hosts, E=3, in=64, no bias


def _bottleneck_model():
    m = tiny_llama()
    for n in ("med", "law"):
        ak.add_adapter(m, n, ak.BottleneckConfig(mode="parallel", bottleneck_size=8))
    ak.add_adapter(m, "task", ak.BottleneckConfig(mode="pfeiffer", bottleneck_size=4))
    randomize_adapters(m, std=0.3)
    return m


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_mixda_matches_naive_loop(gate):
    m = _bottleneck_model()
    moe.mixda(m, ["med", "law"], gate=gate)
    host = "model.layers.0.mlp"
    p = ak.api.get_record(m, "mixda").pieces[host]
    with torch.no_grad():
        p.gate.weight.normal_()
        p.gate.bias.normal_()
    doms = [ak.api.get_record(m, n).pieces[host] for n in ("med", "law")]
    x, y = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    want = y.clone().reshape(-1, 64)
    for n, xt in enumerate(x.reshape(-1, 64)):
        logits = p.gate.weight.detach() @ xt + p.gate.bias.detach()
        w = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, 0)
        for e, d in enumerate(doms):  # a(x) = W_up relu(W_down x + b) + b_up, times the scaling
            a = d.adapter_up.weight @ torch.relu(d.adapter_down.weight @ xt + d.adapter_down.bias) + d.adapter_up.bias
            want[n] += w[e] * a.detach() * d.scaling
    torch.testing.assert_close(p.forward_post(x, y), want.reshape(y.shape), rtol=1e-5, atol=1e-5)


def test_mixda_stage_two_with_task_adapter():
    m = _bottleneck_model()
    moe.mixda(m, ["med", "law"], task_adapter="task")
    x = torch.randint(0, 128, (2, 5))
    m.train()
    m(x).logits.square().mean().backward()
    names = {n for n, q in m.named_parameters() if q.requires_grad and q.grad is not None and q.grad.abs().sum() > 0}
    assert any(".adapterkit.mixda.gate." in n for n in names)
    assert any(".adapterkit.task." in n for n in names)
    assert not any(".adapterkit.med." in n or ".adapterkit.law." in n for n in names)
    # the stack equals gate-then-task on the mlp's output
    m.eval()
    host = "model.layers.1.mlp"
    g, t = (ak.api.get_record(m, n).pieces[host] for n in ("mixda", "task"))
    xx, yy = torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    comp = ak.api.get_state(m).active
    torch.testing.assert_close(comp.post(g.host, g.host.adapterkit, xx, yy), t.forward_post(xx, g.forward_post(xx, yy)))


def test_bad_input():
    with pytest.raises(ConfigError, match="top_k=4 exceeds"):
        moe.MeteoRAConfig(adapters=("a", "b"), top_k=4)
    with pytest.raises(ConfigError, match="twice"):
        moe.MeteoRAConfig(adapters=("a", "a"))
    with pytest.raises(ConfigError, match="non-empty"):
        moe.MixDAConfig(adapters=())
    with pytest.raises(ConfigError, match="gate"):
        moe.MixDAConfig(adapters=("a",), gate="relu")
    m = _lora_model()
    with pytest.raises(AdapterNotFoundError, match="no adapter named 'bb'.*Closest: 'b'"):
        moe.meteora(m, ["a", "bb"])
    m = tiny_llama()
    ak.add_adapter(m, "ia3", ak.IA3Config())
    with pytest.raises(UnsupportedModuleError, match="input"):
        moe.meteora(m, ["ia3"])
    m = _lora_model()
    moe.meteora(m, ["a", "b"])
    ak.merge(m, "a")
    with pytest.raises(ak.AdapterError, match="merged"):
        m(torch.randint(0, 128, (1, 3)))


def test_trainer_learns_top1_routing_with_routing_loss(tmp_path):
    """End to end with the Trainer: task t's rows use tokens from their own range [10 t, 10 t + 10);
    the gates learn to send their tokens to expert t (the LM loss alone could not move a top-1 gate)."""
    from adapterkit.train import TrainConfig, Trainer

    m = _lora_model()
    moe.meteora(m, ["a", "b", "c"], top_k=1)
    g = torch.Generator().manual_seed(0)
    recs = [{"input_ids": (10 * (i % 3) + torch.randint(0, 10, (6,), generator=g)).tolist()} for i in range(24)]
    fn = lambda ids: ids[:, 0] // 10  # noqa: E731  (the row's task, read from its tokens)
    cfg = TrainConfig(out_dir=tmp_path / "run", lr=0.1, steps=30, batch_size=12, progress=False, log_every=100)
    with routing.task_ids(m, fn):
        Trainer(m, recs, config=cfg, loss_terms=[lambda mm: moe.routing_loss(mm, "moe")]).train()
    m.eval()
    x = torch.tensor([r["input_ids"] for r in recs[:12]])
    m(x)
    gates = moe.last_gates(m, "moe")
    acc = sum(float((gg.argmax(-1) == (x[:, :1] // 10)).float().mean()) for gg in gates.values()) / len(gates)
    assert acc > 0.9, acc  # untrained gates route ~1/3 right
