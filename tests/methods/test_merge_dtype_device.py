"""merge / unmerge of every mergeable method keep the base weights' dtype and device.

On a bf16 model (and on CUDA when present): after ``merge`` every base parameter has its
old dtype and device and the merged model computes what the adapter did; after ``unmerge``
the weights are back (bf16 round-off at most). Every method the registry calls mergeable
must appear in ``CONFIGS`` (a new method cannot slip past).

Catching CPU-made tensors without a GPU: the same merges run on a ``meta`` model under
:class:`DeviceMixCheck`, which reports any op mixing a meta tensor with a non-scalar CPU
tensor (the error a CUDA model would hit). Three methods cannot be built on meta (NO_META);
they are covered by the bf16 and CUDA tests.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.registry import get_method
from _device_check import DeviceMixCheck
from conftest import randomize_adapters, tiny_llama

T = ["q_proj", "v_proj"]


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 8), generator=g) for _ in range(2)]


def _sft(m: nn.Module):
    from adapterkit.methods.sft import SFTConfig, prepare_sft

    g = torch.Generator().manual_seed(0)
    idx = {n: torch.randperm(mod.weight.numel(), generator=g)[:50].to(mod.weight.device)
           for n, mod in m.named_modules() if n.endswith(tuple(T))}
    return prepare_sft(m, SFTConfig(targets=T), indices=idx)


def _prep(name: str, **kw) -> Callable[[nn.Module], object]:
    def make(m: nn.Module):
        cfg = ak.make_config(name, **kw)
        prep = getattr(ak.methods, f"prepare_{name}")
        return prep(m, cfg, [b.to(m.device) for b in _batches()])
    return make


# method -> config for a tiny Llama (a function of the model where data must be seen first)
CONFIGS: dict[str, Callable[[nn.Module], object]] = {
    "lora": lambda m: ak.LoRAConfig(r=4, alpha=8, targets=T),
    "dora": lambda m: ak.DoRAConfig(r=4, targets=T),
    "dylora": lambda m: ak.make_config("dylora", r=4, targets=T),
    "hydra": lambda m: ak.make_config("hydra", r=4, targets=T),
    "bone": lambda m: ak.make_config("bone", r=16, targets=T),
    "ia3": lambda m: ak.IA3Config(),
    "lora_xs": lambda m: ak.make_config("lora_xs", r=4, targets=T),
    "sorsa": lambda m: ak.make_config("sorsa", r=4, targets=T),
    "paca": lambda m: ak.make_config("paca", r=4, targets=T),
    "qadapter": lambda m: ak.make_config("qadapter", bits=4, targets=T, base_config={"r": 4}),
    "qlora": lambda m: ak.make_config("qlora", r=4, targets=T),
    "s2ft": lambda m: ak.make_config("s2ft", heads=1, channels=4),
    "ssf": lambda m: ak.make_config("ssf"),
    "sft": _sft,
    "corda": _prep("corda", r=4, targets=T),
    "lora_sb": _prep("lora_sb", r=4, targets=T),
    "spt": _prep("spt", budget=3000, r=2, targets=T),
}
MERGEABLE = sorted(n for n in ak.list_methods() if get_method(n).mergeable)
_NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CASES = [pytest.param(m, "cpu", id=f"{m}-cpu") for m in MERGEABLE] + [
    pytest.param(m, "cuda", id=f"{m}-cuda", marks=_NEEDS_CUDA)
    for m in MERGEABLE]


def test_every_mergeable_method_is_covered():
    assert sorted(CONFIGS) == MERGEABLE


def _model(method: str, device: str, dtype: torch.dtype) -> nn.Module:
    m = tiny_llama().to(device=device, dtype=dtype)
    ak.add_adapter(m, "a", CONFIGS[method](m))
    randomize_adapters(m, std=0.05)
    return m


def _base(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters() if ".adapterkit." not in f".{n}"}


@pytest.mark.parametrize("method,device", CASES)
def test_merge_unmerge_keep_dtype_and_device(method, device):
    dt = torch.bfloat16
    m = _model(method, device, dt)
    x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)
    before = _base(m)
    with torch.no_grad():
        ref = m(x).logits.float()
    ak.merge(m, "a")
    after = _base(m)
    assert after.keys() >= before.keys()
    for n, w in after.items():
        assert (w.dtype, w.device.type) == (dt, device), f"merge changed {n} to {w.dtype} on {w.device}"
    assert any(not torch.equal(after[n], before[n]) for n in before), "merge changed no weight"
    with torch.no_grad():
        merged = m(x).logits.float()
    # bf16 weights: the merged model rounds W + delta once more than the adapter's forward
    assert (merged - ref).abs().max().item() <= 0.05 * ref.abs().max().item() + 0.05
    ak.unmerge(m, "a")
    for n, w in _base(m).items():
        assert (w.dtype, w.device.type) == (dt, device), f"unmerge changed {n} to {w.dtype} on {w.device}"
        torch.testing.assert_close(w.float(), before[n].float(), rtol=2e-2, atol=2e-2, msg=f"unmerge of {n}")


# -- no CPU-made tensor meets a model on another device (checked on 'meta', no GPU needed) ---------
NO_META = {
    "corda": "prepare_corda checks the calibration covariance's values",
    "sft": "prepare_sft sorts positions with torch.unique, which has no meta kernel",
    "spt": "prepare_spt allocates by the scores' values (bincount)",
}


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.skip(reason=NO_META[m])) if m in NO_META else m
                                    for m in MERGEABLE])
def test_merge_on_meta_mixes_no_cpu_tensor(method):
    with torch.device("meta"):
        m = tiny_llama()
    check = DeviceMixCheck()
    with check:  # attaching too: its inits run on the model's device as well
        ak.add_adapter(m, "a", CONFIGS[method](m))
        ak.merge(m, "a")
        ak.unmerge(m, "a")
    assert check.mixed == []
    assert {p.device.type for p in m.parameters()} == {"meta"}


def test_device_mix_check_catches_a_cpu_tensor():
    check = DeviceMixCheck()
    w = torch.zeros(3, 4, device="meta")
    with check:
        w.add_(torch.ones(3, 4))  # accepted silently by meta's in-place add: the check must see it
        w.index_put_((torch.tensor([0, 2]),), torch.zeros(2, 4, device="meta"))  # CPU indices: allowed
    assert len(check.mixed) == 1 and "add_" in check.mixed[0]


@pytest.mark.parametrize("method", ["dora", "sorsa", "corda"])
def test_small_deltas_survive_bf16(method):
    """Deltas that are a small difference of large terms (DoRA's W' - W, SORSA's W_p - W_p0,
    CorDA's B A - B0 A0) are formed in fp32: in bf16 they would keep only a few bits."""
    import copy

    m = tiny_llama().to(torch.bfloat16)
    ak.add_adapter(m, "a", CONFIGS[method](m))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a little training: small steps away from the identity
        for p in ak.api.adapter_parameters(m, "a").values():
            p.add_((torch.randn(p.shape, generator=g) * (0.01 * p.float().abs().mean().item() + 1e-3)).to(p.dtype))
    m32 = copy.deepcopy(m).float()  # the same (bf16-valued) numbers, fp32 math
    pieces32 = ak.api.get_record(m32, "a").pieces
    for h, p in ak.api.get_record(m, "a").pieces.items():
        d16, d32 = p.delta_weight(), pieces32[h].delta_weight()
        assert d16.dtype == torch.bfloat16
        torch.testing.assert_close(d16.float(), d32, rtol=1e-2, atol=1e-2 * d32.abs().max().item(), msg=h)


@pytest.mark.parametrize("method,device", CASES)
def test_delta_weight_has_the_weights_dtype_device_and_shape(method, device):
    m = _model(method, device, torch.bfloat16)
    for h, p in ak.api.get_record(m, "a").pieces.items():
        try:
            d = p.delta_weight()
        except ak.errors.NotMergeableError:  # (IA)^3 scales W: no additive delta
            continue
        w = p.host.weight
        assert (d.dtype, d.device, d.shape) == (w.dtype, w.device, w.shape), h
