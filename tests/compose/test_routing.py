"""Poly / MHR against a naive per-row loop over the papers' formulas."""
from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.compose import routing as R
from adapterkit.errors import AdapterError, ConfigError
from conftest import randomize_adapters, tiny_llama

HOST = "model.layers.0.self_attn.q_proj"


def _model(**kw):
    m = tiny_llama()
    cfg = R.PolyConfig(**{"n_tasks": 3, "n_skills": 4, "n_heads": 1, "r": 4, "alpha": 8.0,
                          "targets": ["q_proj", "v_proj"], **kw})
    ak.add_adapter(m, "poly", cfg)
    randomize_adapters(m, std=0.3)
    return m


def _naive_weights(z: torch.Tensor, routing: str, temp: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Routing weights of one task, z (h, K), written out element by element."""
    h, K = z.shape
    w = torch.zeros(h, K)
    for j in range(h):
        if routing == "softmax":
            e = [torch.exp(z[j, k] / temp) for k in range(K)]
            for k in range(K):
                w[j, k] = e[k] / sum(e)
        else:
            s = [torch.sigmoid(z[j, k] if noise is None else (z[j, k] + noise[j, k]) / temp) for k in range(K)]
            for k in range(K):
                w[j, k] = s[k] / (sum(s) + 1e-12)
    return w


def _naive_delta(p: R.PolyPiece, x: torch.Tensor, ids: list[int], noise: torch.Tensor | None = None) -> torch.Tensor:
    """Per row b: build A_t, B_t head by head from the inventory, then s * B_t A_t x_b."""
    K, r, i = p.lora_A.shape
    o = p.lora_B.shape[1]
    h = p.n_heads
    out = []
    for b, t in enumerate(ids):
        w = _naive_weights(p.logits[t].detach(), p.routing, p.temperature,
                           None if noise is None else noise[b])
        A = torch.zeros(r, i)
        B = torch.zeros(o, r)
        for j in range(h):
            ci = slice(j * i // h, (j + 1) * i // h)
            co = slice(j * o // h, (j + 1) * o // h)
            for k in range(K):
                A[:, ci] += w[j, k] * p.lora_A[k][:, ci].detach()
                B[co, :] += w[j, k] * p.lora_B[k][co, :].detach()
        out.append(p.scaling * (x[b] @ A.T @ B.T))
    return torch.stack(out)


@pytest.mark.parametrize("heads,routing", [(1, "poly"), (4, "poly"), (2, "softmax")])
def test_piece_matches_naive_loop(heads, routing):
    m = _model(n_heads=heads, routing=routing, temperature=0.7)
    p = ak.api.get_record(m, "poly").pieces[HOST]
    x = torch.randn(4, 5, 64)
    y = torch.randn(4, 5, 64)
    ids = [2, 0, 2, 1]
    with R.task_ids(m, ids):
        got = p.forward_post(x, y)
    torch.testing.assert_close(got, y + _naive_delta(p, x, ids), rtol=1e-5, atol=1e-5)


def test_gumbel_sigmoid_in_training_matches_reference(monkeypatch):
    m = _model(n_heads=2, temperature=0.5)
    p = ak.api.get_record(m, "poly").pieces[HOST]
    p.train()
    ids = [1, 1, 0]
    torch.manual_seed(0)
    noise = torch.randn(3, 2, 4)  # fixed "logistic" noise per row (the test pins it)
    calls = []

    def fake_noise(shape):
        calls.append(tuple(shape))
        return noise  # one sample per row

    monkeypatch.setattr(p, "noise", fake_noise)
    x, y = torch.randn(3, 2, 64), torch.zeros(3, 2, 64)
    with R.task_ids(m, ids):
        got = p.forward_post(x, y)
    assert calls == [(3, 2, 4)]
    torch.testing.assert_close(got, _naive_delta(p, x, ids, noise=noise), rtol=1e-5, atol=1e-5)
    # with real noise, training routing is random and eval routing is not
    monkeypatch.undo()
    with R.task_ids(m, ids):
        a, b = p.forward_post(x, y), p.forward_post(x, y)
        assert (a - b).abs().max() > 1e-6
        p.eval()
        torch.testing.assert_close(p.forward_post(x, y), p.forward_post(x, y), rtol=0, atol=0)


def test_whole_model_rows_use_their_task_and_grads_flow():
    m = _model(n_heads=2)
    x = torch.randint(0, 128, (3, 6))
    with R.task_ids(m, [0, 1, 2]):
        mixed = m(x).logits
    for b, t in enumerate([0, 1, 2]):
        with R.task_ids(m, t):  # one int: every row that task
            solo = m(x[b:b + 1]).logits
        torch.testing.assert_close(mixed[b:b + 1], solo, rtol=1e-4, atol=1e-4)
    # gradients reach the inventory and only the routing rows of the tasks in the batch
    m.train()
    with R.task_ids(m, torch.tensor([0, 0, 2])):
        m(x).logits.sum().backward()
    p = ak.api.get_record(m, "poly").pieces[HOST]
    assert p.lora_A.grad.abs().sum() > 0 and p.lora_B.grad.abs().sum() > 0
    g = p.routing_logits.grad
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0 and g[1].abs().sum() == 0
    assert all(not q.requires_grad or ".adapterkit." in n for n, q in m.named_parameters())


def test_callable_ids_and_mixed_batch():
    m = _model()
    x = torch.randint(0, 128, (2, 5))
    with R.task_ids(m, [1, 2]):
        ref = m(x).logits
    with R.task_ids(m, lambda inp: torch.tensor([1, 2])[: inp.shape[0]]):
        torch.testing.assert_close(m(input_ids=x).logits, ref)
    # adapter_batch: only row 1 uses poly; its task id is the row's own
    ak.add_adapter(m, "other", ak.LoRAConfig(r=2, targets=["q_proj"]))
    with R.task_ids(m, [1, 2]), ak.adapter_batch(m, [None, "poly"]):
        got = m(x).logits
    torch.testing.assert_close(got[1:], ref[1:], rtol=1e-5, atol=1e-5)
    ak.set_adapter(m, None)
    torch.testing.assert_close(got[:1], m(x[:1]).logits, rtol=1e-5, atol=1e-5)


def test_task_lora_exact_and_mhr_mu_average():
    m = _model(n_heads=4)
    x = torch.randint(0, 128, (2, 7))
    with R.task_ids(m, 1):
        ref = m(x).logits
    R.task_lora(m, "poly", 1, "t1")
    ak.set_adapter(m, "t1")
    torch.testing.assert_close(m(x).logits, ref, rtol=1e-4, atol=1e-4)
    R.new_task_adapter(m, "poly", "mu", mode="mu")
    p = ak.api.get_record(m, "poly").pieces[HOST]
    q = ak.api.get_record(m, "mu").pieces[HOST]
    torch.testing.assert_close(q.lora_A, p.lora_A.mean(0))
    torch.testing.assert_close(q.lora_B, p.lora_B.mean(0))
    assert q.lora_A.requires_grad and not p.lora_A.requires_grad and not p.routing_logits.requires_grad


def test_mhr_z_trains_router_only():
    m = _model(n_heads=2)
    R.new_task_adapter(m, "poly", "z", n_tasks=2, mode="z")
    ak.set_adapter(m, "z")
    p, q = (ak.api.get_record(m, n).pieces[HOST] for n in ("poly", "z"))
    torch.testing.assert_close(q.lora_A, p.lora_A)
    cfg = ak.api.get_record(m, "z").config
    n_hosts = 4  # q_proj, v_proj x 2 layers
    assert ak.trainable_parameters(m) == n_hosts * cfg.n_tasks * cfg.n_heads * cfg.n_skills
    m.train()
    with R.task_ids(m, [0, 1]):
        m(torch.randint(0, 128, (2, 4))).logits.sum().backward()
    assert q.routing_logits.grad.abs().sum() > 0 and q.lora_A.grad is None and p.lora_A.grad is None


def test_counts_save_load_roundtrip(tmp_path):
    m = _model(n_heads=2)
    cfg = ak.api.get_record(m, "poly").config
    # q_proj 64->64, v_proj 64->32 (2 kv heads of 16), 2 layers
    per = lambda i, o: cfg.n_skills * cfg.r * (i + o) + cfg.n_tasks * cfg.n_heads * cfg.n_skills  # noqa: E731
    assert ak.trainable_parameters(m, "poly") == 2 * (per(64, 64) + per(64, 32))
    ak.save_adapter(m, "poly", tmp_path / "p")
    m2 = tiny_llama()
    ak.load_adapter(m2, tmp_path / "p", name="poly")
    x = torch.randint(0, 128, (3, 5))
    with R.task_ids(m, [2, 1, 0]), R.task_ids(m2, [2, 1, 0]):
        torch.testing.assert_close(m2(x).logits, m(x).logits)


def test_shared_routing_one_matrix_for_every_layer(tmp_path):
    m = _model(n_heads=2, shared_routing=True)
    rec = ak.api.get_record(m, "poly")
    router = rec.pieces[""]
    layers = [p for h, p in rec.pieces.items() if h]
    assert all(p.logits is router.routing_logits for p in layers)
    assert all("routing_logits" not in dict(p.named_parameters()) for p in layers)
    cfg = rec.config
    inv = lambda i, o: cfg.n_skills * cfg.r * (i + o)  # noqa: E731
    assert ak.trainable_parameters(m, "poly") == 2 * (inv(64, 64) + inv(64, 32)) + 3 * 2 * 4
    x = torch.randn(2, 3, 64)
    with R.task_ids(m, [1, 2]):
        for p in layers:
            torch.testing.assert_close(p.forward_post(x, torch.zeros(2, 3, p.out_features)),
                                       _naive_delta(p, x, [1, 2]), rtol=1e-5, atol=1e-5)
        m.train()
        m(torch.randint(0, 128, (2, 4))).logits.sum().backward()
    g = router.routing_logits.grad
    assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0
    m.eval()
    ak.save_adapter(m, "poly", tmp_path / "p")
    m2 = tiny_llama()
    ak.load_adapter(m2, tmp_path / "p", name="poly")
    ids = torch.randint(0, 128, (3, 5))
    with R.task_ids(m, [0, 2, 1]), R.task_ids(m2, [0, 2, 1]):
        torch.testing.assert_close(m2(ids).logits, m(ids).logits)
    R.task_lora(m, "poly", 2, "t2")  # the export reads the shared matrix too
    ak.set_adapter(m, "t2")
    ref = m(ids).logits
    ak.set_adapter(m, "poly")
    with R.task_ids(m, 2):
        torch.testing.assert_close(m(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_bad_input():
    with pytest.raises(ConfigError, match="routing"):
        R.PolyConfig(n_tasks=2, routing="argmax")
    with pytest.raises(ConfigError, match="n_skills"):
        R.PolyConfig(n_tasks=2, n_skills=0)
    m = tiny_llama()
    with pytest.raises(ConfigError, match="n_heads=3 must divide"):
        ak.add_adapter(m, "p", R.PolyConfig(n_tasks=2, n_heads=3, targets=["q_proj"]))
    m = _model()
    x = torch.randint(0, 128, (2, 5))
    with pytest.raises(AdapterError, match="task_ids"):
        m(x)
    with pytest.raises(AdapterError, match="task id 3 is out of range"), R.task_ids(m, [0, 3]):
        m(x)
    with pytest.raises(AdapterError, match="3 task ids for a batch of 2"), R.task_ids(m, [0, 1, 2]):
        m(x)
    with pytest.raises(ConfigError, match="integer"):
        with R.task_ids(m, [0.5, 1.0]):
            pass
    with pytest.raises(ConfigError, match="not a poly adapter"):
        ak.add_adapter(m, "l", ak.LoRAConfig(r=2))
        R.task_lora(m, "l", 0, "x")
    with pytest.raises(ConfigError, match="mode"):
        R.new_task_adapter(m, "poly", "q", mode="w")


class _Chain(torch.nn.Module):
    """A fake LM whose greedy next token is ``table[current token]`` (else token 5)."""

    def __init__(self, table: dict[int, int], vocab: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.table, self.vocab = table, vocab

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        nxt = torch.tensor([[self.table.get(int(t), 5) for t in row] for row in input_ids])
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_forced_exact_match_equals_a_greedy_loop():
    from adapterkit.compose.tasks import forced_exact_match
    from adapterkit.demo import render_prompt
    from adapterkit.train.toy import toy_tokenizer

    tok = toy_tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    nl, a, b = enc("\n")[0], enc("a")[0], enc("b")[0]
    end = tok.get_vocab()["<|im_end|>"]
    model = _Chain({nl: a, a: b, b: end}, len(tok))  # greedy answer after the template: "ab" + <|im_end|>
    exs = [{"prompt": "p", "completion": c} for c in ("ab", "a", "abb", "ba", "b")]

    def greedy(prompt: str) -> str:  # the slow path: decode token by token until a stop token
        ids = enc(render_prompt(tok, prompt))
        out = []
        for _ in range(8):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == end:
                return tok.decode(out)
            out.append(nxt)
            ids.append(nxt)
        return tok.decode(out) + "<no stop>"

    want = [greedy(e["prompt"]) == e["completion"] for e in exs]
    assert want == [True, False, False, False, False]
    assert forced_exact_match(model, tok, exs, batch_size=2) == want
