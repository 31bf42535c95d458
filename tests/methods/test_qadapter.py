"""Low-precision adapters (Jie et al., 2023): forward == dequantized reference, packed files,
QAT, save/load, counts, merge and bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.api import adapter_parameters, get_record
from adapterkit.errors import ConfigError, NotMergeableError
from adapterkit.methods.bottleneck import BottleneckConfig
from adapterkit.methods.qadapter import QAdapterConfig
from adapterkit.quant import dequantize_normal_reference, quantize_normal_reference, unpack_bits
from _method_checks import assert_mixed_batch_rows_match
from conftest import randomize_adapters, tiny_bert, tiny_llama


def _mlp(seed: int = 0, d: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 4))


def _deq_ref(w: torch.Tensor, cfg: QAdapterConfig) -> torch.Tensor:
    c, m, s = quantize_normal_reference(w, cfg.bits, cfg.group_size, cfg.codebook)
    return dequantize_normal_reference(c, m, s, cfg.bits, cfg.group_size, cfg.codebook)


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ConfigError, match=r"bits must be one of 1, 2, 4, 8, got 3"):
        QAdapterConfig(bits=3)
    with pytest.raises(ConfigError, match="bits must be one of"):
        ak.make_config("qadapter", bits=16)
    with pytest.raises(ConfigError, match="base_method must be one of lora, bottleneck"):
        QAdapterConfig(base_method="ia3")
    with pytest.raises(ConfigError, match="group_size"):
        QAdapterConfig(group_size=0)
    with pytest.raises(ConfigError, match="codebook"):
        QAdapterConfig(codebook="nf4")
    with pytest.raises(ConfigError, match="rewrites the base"):
        QAdapterConfig(base_config={"init": "pissa"})
    with pytest.raises(ConfigError, match="has no field 'rank'"):
        QAdapterConfig(base_config={"rank": 4})
    with pytest.raises(ConfigError, match="must not hold 'targets'"):
        QAdapterConfig(base_config={"targets": ["q_proj"]})
    cfg = QAdapterConfig.wrap(ak.LoRAConfig(r=4, alpha=8, targets=["q_proj"]), bits=2, group_size=-1)
    assert cfg.base() == ak.LoRAConfig(r=4, alpha=8, targets=("q_proj",))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["base_config"]["r"] == 4 and QAdapterConfig.from_dict(d) == cfg
    hash(cfg)
    b = QAdapterConfig(base_method="bottleneck", base_config={"mode": "parallel"})
    assert b.base().scaling == 4.0 and b.base().reduction_factor == 2  # the mode's defaults, made explicit


@pytest.mark.parametrize("bits,group_size", [(1, None), (2, -1), (4, None), (8, -1)])
def test_lora_forward_equals_lora_with_dequantized_weights(bits: int, group_size: int | None, ids) -> None:
    cfg = QAdapterConfig(bits=bits, group_size=group_size, base_config={"r": 4, "alpha": 8})
    m = tiny_llama()
    ak.add_adapter(m, "q", cfg)
    randomize_adapters(m)
    ref = tiny_llama()
    ak.add_adapter(ref, "l", ak.LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for h, p in get_record(m, "q").pieces.items():
            rp = get_record(ref, "l").pieces[h]
            rp.lora_A.copy_(_deq_ref(p.lora_A, cfg))
            rp.lora_B.copy_(_deq_ref(p.lora_B, cfg))
            assert len(torch.unique(_deq_ref(p.lora_A, cfg))) <= 2**bits * (1 if group_size is None else 4)
        assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-5)


def test_bottleneck_forward_equals_reference(ids) -> None:
    cfg = QAdapterConfig(base_method="bottleneck", bits=2, group_size=-1, base_config={"mode": "houlsby"})
    m = tiny_bert()
    ak.add_adapter(m, "q", cfg)
    randomize_adapters(m)
    ref = tiny_bert()
    ak.add_adapter(ref, "b", cfg.base())
    with torch.no_grad():
        for h, p in get_record(m, "q").pieces.items():
            rp = get_record(ref, "b").pieces[h]
            for lin in ("adapter_down", "adapter_up"):
                getattr(rp, lin).weight.copy_(_deq_ref(getattr(p, lin).weight, cfg))
                getattr(rp, lin).bias.copy_(getattr(p, lin).bias)  # biases stay fp
        assert torch.allclose(m(ids).last_hidden_state, ref(ids).last_hidden_state, atol=1e-5)
        assert not torch.allclose(m(ids).last_hidden_state, tiny_bert()(ids).last_hidden_state, atol=1e-3)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_file_holds_packed_codes(bits: int, tmp_path) -> None:
    m = _mlp()
    cfg = QAdapterConfig(bits=bits, group_size=-1, targets=["0", "2"], base_config={"r": 3})
    ak.add_adapter(m, "q", cfg)
    randomize_adapters(m)
    ak.save_adapter(m, "q", tmp_path / "a")
    t = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert "0.lora_A" not in t and t["0.lora_A.qcodes"].dtype == torch.uint8
    p = get_record(m, "q").pieces["0"]
    n = p.lora_A.numel()  # (3, 16) = 48 codes
    assert t["0.lora_A.qcodes"].shape == (-(-n * bits // 8),)
    assert t["0.lora_A.qmean"].shape == (3,) and t["0.lora_A.qstd"].shape == (3,)
    codes, mean, std = quantize_normal_reference(p.lora_A, bits, -1)
    assert torch.equal(unpack_bits(t["0.lora_A.qcodes"], bits, n).reshape(3, 16), codes)
    assert torch.allclose(t["0.lora_A.qmean"], mean) and torch.allclose(t["0.lora_A.qstd"], std)


def test_file_size_scales_with_bits(tmp_path) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    ak.add_adapter(m, "fp", ak.LoRAConfig(r=32, targets=["0", "1"]))
    ak.save_adapter(m, "fp", tmp_path / "fp")
    fp32 = (tmp_path / "fp" / "adapter.safetensors").stat().st_size  # 4 * 2 * 2 * 32 * 256 bytes + header
    for bits in (1, 2, 4, 8):
        ak.add_adapter(m, f"q{bits}", QAdapterConfig(bits=bits, targets=["0", "1"], base_config={"r": 32}))
        ak.save_adapter(m, f"q{bits}", tmp_path / f"q{bits}")
        size = (tmp_path / f"q{bits}" / "adapter.safetensors").stat().st_size
        ratio = size / fp32
        assert bits / 32 < ratio < bits / 32 * 1.1 + 0.01, (bits, ratio)  # 4 bits: ~1/8 of the fp32 file


@pytest.mark.parametrize("base_method,model,bits", [("lora", tiny_llama, 1), ("bottleneck", tiny_bert, 8)])
def test_save_load_round_trip_is_exact(base_method: str, model, bits: int, ids, tmp_path) -> None:
    m = model()
    ak.add_adapter(m, "q", QAdapterConfig(base_method=base_method, bits=bits, base_config={}))
    randomize_adapters(m)

    def out(mm):
        o = mm(ids)
        return o.logits if hasattr(o, "logits") else o.last_hidden_state

    want = out(m)
    ak.save_adapter(m, "q", tmp_path / "a")
    m2 = model()
    ak.load_adapter(m2, tmp_path / "a", name="q")
    assert torch.equal(out(m2), want)
    # re-saving the loaded adapter writes the very same codes (no drift from re-quantizing)
    ak.save_adapter(m2, "q", tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / "adapter.safetensors")), load_file(str(tmp_path / "b" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the loaded codes survive a copy and a dtype change (checked by value, not by tensor identity)
    assert torch.equal(out(copy.deepcopy(m2)), want)
    assert torch.allclose(out(m2.double()).float(), want, atol=1e-5)
    m2.float()
    # once the optimizer moves a latent weight, the forward re-quantizes it
    p = next(iter(adapter_parameters(m2, "q").values()))
    with torch.no_grad():
        p.add_(0.5)
    assert not torch.equal(out(m2), want)


def test_qat_trains_only_adapter_params_and_lowers_the_loss() -> None:
    torch.manual_seed(0)
    m = _mlp(seed=1)
    teacher = _mlp(seed=2)
    x = torch.randn(128, 16)
    with torch.no_grad():
        y = teacher(x)
    # r=4 keeps every factor under 256 elements: fast on a loaded 2-core machine
    ak.add_adapter(m, "q", QAdapterConfig(bits=1, targets=["0", "2"], base_config={"r": 4, "alpha": 4}))
    params = list(adapter_parameters(m, "q").values())
    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(100):
        loss = ((m(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    assert all(p.grad is None for n, p in m.named_parameters() if ".adapterkit." not in f".{n}")
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])


def test_trainable_parameter_count_is_the_wrapped_methods() -> None:
    m = tiny_llama()
    ak.add_adapter(m, "q", QAdapterConfig(bits=2, base_config={"r": 4}))
    # LoRA on q_proj (64 -> 64) and v_proj (64 -> 32) of 2 layers: r (in + out) each
    assert ak.trainable_parameters(m, "q") == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    b = tiny_bert()
    ak.add_adapter(b, "q", QAdapterConfig(base_method="bottleneck", bits=2, base_config={"mode": "pfeiffer"}))
    d, k = 64, 64 // 16  # one adapter after each FFN of 2 layers: down (k, d) + k, up (d, k) + d
    assert ak.trainable_parameters(b, "q") == 2 * (k * d + k + d * k + d)


def test_merge_lora_base_and_refuse_bottleneck(ids) -> None:
    m = tiny_llama()
    base = m(ids).logits
    ak.add_adapter(m, "q", QAdapterConfig(bits=2, base_config={"r": 4}))
    randomize_adapters(m)
    want = m(ids).logits
    ak.merge(m, "q")
    assert torch.allclose(m(ids).logits, want, atol=1e-4)
    ak.unmerge(m, "q")
    ak.set_adapter(m, None)
    assert torch.allclose(m(ids).logits, base, atol=1e-5)
    b = tiny_bert()
    ak.add_adapter(b, "q", QAdapterConfig(base_method="bottleneck", base_config={}))
    with pytest.raises(NotMergeableError):
        ak.merge(b, "q")


def test_mixed_batch_rows(ids) -> None:
    m = tiny_llama()
    ak.add_adapter(m, "a", QAdapterConfig(bits=1, base_config={"r": 4}))
    ak.add_adapter(m, "b", QAdapterConfig(bits=4, base_config={"r": 2}))
    randomize_adapters(m)
    assert_mixed_batch_rows_match(m, ids, ["a", "b", None, "a"])


def test_group_size_must_divide() -> None:
    with pytest.raises(ConfigError, match="does not divide"):
        ak.add_adapter(_mlp(), "q", QAdapterConfig(group_size=5, targets=["0"], base_config={"r": 4}))
    assert "qadapter" in ak.list_methods()
    assert isinstance(QAdapterConfig(base_method="bottleneck", base_config={}).base(), BottleneckConfig)
