"""LoRA on an int8/int4 base (INT2.1 LREC init, QA-LoRA merge-then-quantize) against references."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.api import adapter_parameters, get_record
from adapterkit.errors import ConfigError
from adapterkit.methods.qlora import QLoRAConfig, merge_errors
from adapterkit.quant import dequantize_int_reference, quantize_int, quantize_int_reference
from _method_checks import assert_mixed_batch_rows_match
from conftest import randomize_adapters, tiny_gpt2, tiny_llama


def _deq_ref(w: torch.Tensor, cfg: QLoRAConfig) -> torch.Tensor:
    return dequantize_int_reference(*quantize_int_reference(w, cfg.bits, cfg.group_size, cfg.scheme), cfg.group_size)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="bits must be one of 4, 8, got 2"):
        QLoRAConfig(bits=2)
    with pytest.raises(ConfigError, match="scheme"):
        QLoRAConfig(scheme="nf4")
    with pytest.raises(ConfigError, match="group_size"):
        QLoRAConfig(group_size=-2)
    with pytest.raises(ConfigError, match="rewrites the base"):
        QLoRAConfig(init="pissa")
    with pytest.raises(ConfigError, match="init must be one of"):
        QLoRAConfig(init="loftq")
    cfg = QLoRAConfig(r=4, bits=8, group_size=16, scheme="minmax")
    assert cfg.init == "lrec" and cfg.for_loading().init == "kaiming"
    assert QLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="does not divide the 64 input columns"):
        ak.add_adapter(tiny_llama(), "q", QLoRAConfig(group_size=48))


@pytest.mark.parametrize("bits,scheme,group_size", [(8, "absmax", -1), (4, "minmax", 16), (4, "absmax", None)])
def test_forward_equals_lora_on_the_dequantized_base(bits: int, scheme: str, group_size: int | None, ids) -> None:
    cfg = QLoRAConfig(r=4, bits=bits, scheme=scheme, group_size=group_size, init="kaiming")
    m = tiny_llama()
    ak.add_adapter(m, "q", cfg)
    randomize_adapters(m)
    ref = tiny_llama()  # the reference: weights replaced by deq(Q(W)) from the reference functions, + plain LoRA
    ak.add_adapter(ref, "l", ak.LoRAConfig(r=4))
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for h, p in get_record(m, "q").pieces.items():
            mods[h].weight.copy_(_deq_ref(mods[h].weight, cfg))
            get_record(ref, "l").pieces[h].lora_A.copy_(p.lora_A)
            get_record(ref, "l").pieces[h].lora_B.copy_(p.lora_B)
        assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-4)


def test_conv1d_host(ids) -> None:
    cfg = QLoRAConfig(r=2, bits=8, init="kaiming")  # GPT-2 c_attn: Conv1D, weight stored (in, out)
    m = tiny_gpt2()
    ak.add_adapter(m, "q", cfg)
    ref = tiny_gpt2()
    with torch.no_grad():
        for h in get_record(m, "q").pieces:
            w = dict(ref.named_modules())[h].weight
            w.copy_(_deq_ref(w.T, cfg).T)  # per OUTPUT channel: quantize the (out, in) matrix
        assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-4)


def test_int8_base_is_close_to_fp_and_inactive_is_fp(ids) -> None:
    m = tiny_llama()
    fp = m(ids).logits
    ak.add_adapter(m, "q8", QLoRAConfig(bits=8, init="kaiming"))
    ak.add_adapter(m, "q4", QLoRAConfig(bits=4, init="kaiming"))
    ak.set_adapter(m, "q8")
    e8 = _rel(m(ids).logits, fp)
    ak.set_adapter(m, "q4")
    e4 = _rel(m(ids).logits, fp)
    assert 0 < e8 < 0.01 and e8 < e4 < 0.3
    ak.set_adapter(m, None)
    assert torch.equal(m(ids).logits, fp)  # the host kept its fp weight


def test_lrec_init_is_the_best_rank_r_correction() -> None:
    m = tiny_llama()
    ak.add_adapter(m, "q", QLoRAConfig(r=6, alpha=12, bits=4))
    for h, p in get_record(m, "q").pieces.items():
        W = p.weight_2d().detach()
        deq = _deq_ref(W, QLoRAConfig(bits=4))
        assert torch.allclose(p.deq_2d(), deq)
        S = torch.linalg.svdvals(W - deq)
        BA = (p.lora_B @ p.lora_A).detach()
        after = float((W - (deq + p.scaling * BA)).norm())
        zero_init = float((W - deq).norm())
        # Eckart-Young: the best rank-6 approximation leaves exactly the tail singular values
        assert after == pytest.approx(float(S[6:].square().sum().sqrt()), rel=1e-4)
        assert after < zero_init
        # and a random rank-6 correction of the same size does worse
        g = torch.Generator().manual_seed(0)
        rnd = torch.randn(W.shape[0], 6, generator=g) @ torch.randn(6, W.shape[1], generator=g)
        rnd = rnd / rnd.norm() * (p.scaling * BA).norm()
        assert after < float((W - deq - rnd).norm())


def test_training_the_lora_corrects_the_quantized_base(ids) -> None:
    m = tiny_llama()
    with torch.no_grad():
        fp = m(ids).logits
    ak.add_adapter(m, "q", QLoRAConfig(r=4, bits=4, init="kaiming", targets=["q_proj", "v_proj", "o_proj"]))
    params = list(adapter_parameters(m, "q").values())
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(10):  # distill the fp model (INT2.1's error correction objective)
        loss = ((m(ids).logits - fp) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in m.named_parameters() if ".adapterkit." not in f".{n}")
    assert ak.trainable_parameters(m, "q") == 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 64))  # r (in + out) per host


def test_save_load_requantizes_the_base_deterministically(ids, tmp_path) -> None:
    cfg = QLoRAConfig(r=4, bits=4, group_size=32, scheme="minmax")
    m = tiny_llama()
    ak.add_adapter(m, "q", cfg)
    randomize_adapters(m, std=0.02)
    want = m(ids).logits
    ak.save_adapter(m, "q", tmp_path / "a")
    t = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in t} == {"lora_A", "lora_B"}  # the adapter only: no base codes
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["method"] == "qlora" and meta["config"]["bits"] == 4 and meta["config"]["group_size"] == 32
    assert meta["config"]["scheme"] == "minmax"
    m2 = tiny_llama()
    ak.load_adapter(m2, tmp_path / "a", name="q")
    assert torch.equal(m2(ids).logits, want)
    for h, p in get_record(m2, "q").pieces.items():
        assert torch.equal(p.qweight, get_record(m, "q").pieces[h].qweight)


def test_merge_requantizes_and_reports_the_error(ids) -> None:
    cfg = QLoRAConfig(r=4, bits=8)
    m = tiny_llama()
    orig = {n: p.detach().clone() for n, p in m.named_parameters()}
    ak.add_adapter(m, "q", cfg)
    randomize_adapters(m, std=0.05)
    want = m(ids).logits
    ak.merge(m, "q")
    merged = m(ids).logits
    assert 0 < _rel(merged, want) < 0.02  # lossy, but close at 8 bits
    errs = merge_errors(m, "q")
    assert set(errs) == set(get_record(m, "q").pieces) and all(0 < e < 0.01 for e in errs.values())
    for h, p in get_record(m, "q").pieces.items():
        codes, scale, zero = p.int_weight()
        host_w = dict(m.named_modules())[h].weight
        # the merged host weight IS an int8 weight: its codes dequantize to it, and it re-quantizes to itself
        assert torch.equal(dequantize_int_reference(codes, scale, zero, -1), host_w)
        assert torch.equal(quantize_int(host_w, 8)[0], codes)
        target = p.deq_2d() + p.scaling * p.lora_B.detach() @ p.lora_A.detach()
        assert errs[h] == pytest.approx(_rel(host_w, target), rel=1e-4)
    ak.unmerge(m, "q")
    assert torch.allclose(m(ids).logits, want, atol=1e-6)
    ak.delete_adapter(m, "q")
    assert all(torch.equal(p, orig[n]) for n, p in m.named_parameters())


def test_mixed_batch_rows(ids) -> None:
    m = tiny_llama()
    ak.add_adapter(m, "q", QLoRAConfig(r=2, bits=4))
    ak.add_adapter(m, "l", ak.LoRAConfig(r=2))
    randomize_adapters(m)
    names = ["q", None, "l", "q"]
    assert_mixed_batch_rows_match(m, ids, names)
    assert "qlora" in ak.list_methods()
