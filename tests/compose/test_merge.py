"""Merging algebra: properties on random adapters of every LoRA variant."""
from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.compose import merge_adapters
from adapterkit.compose.merge import dare, prune_magnitude, svd_factors, ties
from adapterkit.errors import ConfigError
from adapterkit.methods.dora import DoRAConfig
from _device_check import DeviceMixCheck
from conftest import randomize_adapters, tiny_llama

TARGETS = ["q_proj", "v_proj"]
VARIANTS = {
    "lora_r4": lambda: ak.LoRAConfig(r=4, alpha=8, targets=TARGETS),
    "lora_r2_rslora": lambda: ak.LoRAConfig(r=2, alpha=3, use_rslora=True, targets=TARGETS),
    "lora_r6_alpha1": lambda: ak.LoRAConfig(r=6, alpha=1, targets=TARGETS),
}


def _model(names, dora=False):
    m = tiny_llama()
    for i, n in enumerate(names):
        ak.add_adapter(m, n, VARIANTS[n]())
    if dora:
        ak.add_adapter(m, "dora", DoRAConfig(r=3, alpha=6, targets=TARGETS))
    randomize_adapters(m, std=0.2)
    return m


def _delta(m, name, host="model.layers.0.self_attn.q_proj"):
    return ak.api.get_record(m, name).pieces[host].delta_weight().detach()


def _all_hosts(m, name):
    return ak.api.get_record(m, name).pieces


@pytest.mark.parametrize("method", ["cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_single_adapter_weight_one_is_identity(method, variant):
    m = _model([variant])
    merge_adapters(m, {variant: 1.0}, method=method, name="m", r=8)
    for h in _all_hosts(m, variant):
        torch.testing.assert_close(_delta(m, "m", h), _delta(m, variant, h), atol=1e-5, rtol=1e-4)


def test_single_dora_adapter_svd_full_rank_is_identity():
    m = _model([], dora=True)
    merge_adapters(m, {"dora": 1.0}, method="svd", name="m", r=64)  # full rank: exact
    x = torch.randint(0, 128, (2, 7))
    ak.set_adapter(m, "dora")
    ref = m(x).logits
    ak.set_adapter(m, "m")
    assert (m(x).logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_equal_weights_average_the_deltas(method):
    names = sorted(VARIANTS)  # different ranks, alphas, rsLoRA
    m = _model(names)
    merge_adapters(m, {n: 1 / 3 for n in names}, method=method, name="avg", r=64)
    for h in _all_hosts(m, names[0]):
        want = sum(_delta(m, n, h) for n in names) / 3
        torch.testing.assert_close(_delta(m, "avg", h), want, atol=1e-5, rtol=1e-4)


def test_cat_output_equals_active_sum():
    names = sorted(VARIANTS)
    m = _model(names)
    x = torch.randint(0, 128, (2, 7))
    ak.set_adapter(m, names)  # LoRA deltas on the same modules add up
    ref = m(x).logits
    merge_adapters(m, {n: 1.0 for n in names}, method="cat", name="sum")
    ak.set_adapter(m, "sum")
    assert (m(x).logits - ref).abs().max().item() <= 1e-4


def test_svd_is_best_rank_k():
    names = sorted(VARIANTS)
    m = _model(names)
    w = {n: 0.5 + i for i, n in enumerate(names)}
    merge_adapters(m, w, method="svd", name="k3", r=3)
    for h in _all_hosts(m, names[0]):
        full = sum(w[n] * _delta(m, n, h) for n in names)
        U, S, Vh = torch.linalg.svd(full)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(_delta(m, "k3", h), best, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["cat", "svd", "ties", "magnitude_prune"])
def test_order_independent(method):
    names = sorted(VARIANTS)
    m = _model(names)
    w = {n: 0.3 + 0.2 * i for i, n in enumerate(names)}
    merge_adapters(m, w, method=method, name="fwd", r=5, density=0.5)
    merge_adapters(m, dict(reversed(list(w.items()))), method=method, name="rev", r=5, density=0.5)
    for h in _all_hosts(m, names[0]):
        torch.testing.assert_close(_delta(m, "fwd", h), _delta(m, "rev", h), atol=1e-5, rtol=1e-4)


def test_merged_adapter_saves_and_loads(tmp_path):
    names = sorted(VARIANTS)
    m = _model(names)
    merge_adapters(m, {n: 0.5 for n in names}, method="ties", name="t", r=4, density=0.3)
    x = torch.randint(0, 128, (2, 7))
    ak.set_adapter(m, "t")
    ref = m(x).logits
    ak.save_adapter(m, "t", tmp_path / "t")
    m2 = tiny_llama()
    ak.load_adapter(m2, tmp_path / "t")
    assert (m2(x).logits - ref).abs().max().item() <= 1e-5


def test_refusals():
    m = _model(["lora_r4", "lora_r2_rslora"], dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        merge_adapters(m, {"dora": 1.0, "lora_r4": 1.0}, method="cat")
    with pytest.raises(ConfigError, match="equal ranks"):
        merge_adapters(m, {"lora_r4": 1.0, "lora_r2_rslora": 1.0}, method="linear")
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge_adapters(m, {"lora_r4": 1.0}, method="avg")
    with pytest.raises(ConfigError, match="density"):
        merge_adapters(m, {"lora_r4": 1.0}, method="ties", density=0)


# -- kernels against a plain reference --------------------------------------------------------
def test_prune_magnitude_keeps_top_fraction():
    d = torch.tensor([[0.1, -5.0], [2.0, -0.3]])
    torch.testing.assert_close(prune_magnitude(d, 0.5), torch.tensor([[0.0, -5.0], [2.0, 0.0]]))


def test_dare_is_unbiased_and_sparse():
    g = torch.Generator().manual_seed(0)
    d = torch.ones(200, 200)
    out = dare(d, 0.25, g)
    assert abs((out != 0).float().mean().item() - 0.25) < 0.02
    assert abs(out.mean().item() - 1.0) < 0.05
    assert set(out.unique().tolist()) <= {0.0, 4.0}


def test_ties_reference():
    D = torch.tensor([[[1.0, -2.0, 3.0]], [[2.0, 1.0, -1.0]], [[-0.5, -1.0, 0.0]]])  # (3, 1, 3)
    ws = torch.ones(3, 1, 1)
    # column 0: sum>0 -> keep 1, 2 -> mean 1.5; column 1: sum<0 -> keep -2, -1 -> -1.5; column 2: sum>0 -> keep 3 -> 3
    torch.testing.assert_close(ties(D, ws), torch.tensor([[1.5, -1.5, 3.0]]))


def test_svd_factors_pad_when_rank_exceeds():
    d = torch.randn(5, 3)
    b, a = svd_factors(d, 8)
    assert b.shape == (5, 8) and a.shape == (8, 3)
    torch.testing.assert_close(b @ a, d, atol=1e-5, rtol=1e-5)


def test_sparse_diffs_merge_exactly(tmp_path):
    from adapterkit.methods.sft import SFTConfig, prepare_sft

    m = tiny_llama()
    hosts = [n for n, mod in m.named_modules() if n.endswith(("q_proj", "v_proj"))]
    g = torch.Generator().manual_seed(0)
    for name, seed in (("lang", 1), ("task", 2)):
        idx = {h: torch.randperm(dict(m.named_modules())[h].weight.numel(), generator=g)[:40] for h in hosts}
        ak.add_adapter(m, name, prepare_sft(m, SFTConfig(targets=["q_proj", "v_proj"]), indices=idx))
    randomize_adapters(m, std=0.2)
    x = torch.randint(0, 128, (2, 7))
    merge_adapters(m, {"lang": 0.5, "task": 2.0}, method="linear", name="both")
    for h in hosts:
        want = 0.5 * ak.api.get_record(m, "lang").pieces[h].dense_2d() + 2.0 * ak.api.get_record(m, "task").pieces[h].dense_2d()
        torch.testing.assert_close(ak.api.get_record(m, "both").pieces[h].dense_2d(), want, atol=1e-6, rtol=1e-6)
    merge_adapters(m, {"lang": 1.0, "task": 1.0}, method="cat", name="sum")
    ak.set_adapter(m, ["lang", "task"])  # sparse diffs compose by addition
    ref = m(x).logits
    ak.set_adapter(m, "sum")
    assert (m(x).logits - ref).abs().max().item() <= 1e-5
    with pytest.raises(ConfigError, match="sparse"):
        merge_adapters(m, {"lang": 1.0}, method="svd", name="bad")


# -- devices and dtypes: bf16 models, CUDA, and no CPU-made tensor meeting a model elsewhere -------
METHODS = ["cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])


def _mixed_model(method, meta=False):
    """Adapters of several ranks on q/v, one on q/k (so cat pads with zero blocks), DoRA
    where the method takes it (linear needs equal ranks)."""
    names = ["lora_r4"] if method == "linear" else sorted(VARIANTS)
    if meta:
        with torch.device("meta"):
            m = tiny_llama()
    else:
        m = tiny_llama()
    for n in names:
        ak.add_adapter(m, n, VARIANTS[n]())
    ak.add_adapter(m, "qk", ak.LoRAConfig(r=4, alpha=4, targets=["q_proj", "k_proj"]))
    names.append("qk")
    if method not in ("cat", "linear"):
        ak.add_adapter(m, "dora", DoRAConfig(r=3, alpha=6, targets=TARGETS))
        names.append("dora")
    if not meta:
        randomize_adapters(m, std=0.2)
    return m, {n: 0.4 + 0.3 * i for i, n in enumerate(names)}


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("method", METHODS)
def test_bf16_merge_matches_fp32(method, device):
    """The same adapters on a bf16 model (on ``device``) and on an fp32 CPU copy holding the
    same (bf16-rounded) values: the bf16 merge is bf16, on the device, and equals the fp32
    merge up to bf16 rounding of the result."""
    import copy

    m16, w = _mixed_model(method)
    m16.to(torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    m16.to(device)
    for m in (m16, m32):
        merge_adapters(m, w, method=method, name="m", r=6, density=0.5, seed=3)
    for h, p16 in _all_hosts(m16, "m").items():
        assert (p16.A.dtype, p16.B.dtype) == (torch.bfloat16, torch.bfloat16)
        assert p16.A.device.type == device and p16.B.device.type == device
        got = (p16.b_2d().float() @ p16.a_2d().float()).cpu()
        p32 = _all_hosts(m32, "m")[h]
        want = p32.b_2d() @ p32.a_2d()
        # factors rounded to bf16 (relative 2^-9 each)
        tol = 2e-2 * want.abs().max().item()
        torch.testing.assert_close(got, want, atol=tol, rtol=2e-2, msg=f"{method} on {h}")


@pytest.mark.parametrize("method", METHODS)
def test_merge_on_meta_makes_no_cpu_tensor(method):
    """Without a GPU: on a 'meta' model, any tensor the merge builds on the CPU (a zero
    block, a weight vector, a DARE mask) meets a meta tensor, which a dispatch mode reports."""
    m, w = _mixed_model(method, meta=True)
    check = DeviceMixCheck()
    with check:
        merge_adapters(m, w, method=method, name="m", r=4, density=0.5)
    assert check.mixed == []
    assert all(p.device.type == "meta" for p in ak.api.adapter_parameters(m, "m").values())


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_sparse_diffs_merge_on_bf16(device):
    from adapterkit.methods.sft import SFTConfig, prepare_sft

    m = tiny_llama().to(device=device, dtype=torch.bfloat16)
    hosts = [n for n, mod in m.named_modules() if n.endswith(("q_proj", "v_proj"))]
    g = torch.Generator().manual_seed(0)
    for name in ("lang", "task"):
        idx = {h: torch.randperm(dict(m.named_modules())[h].weight.numel(), generator=g)[:40].to(device) for h in hosts}
        ak.add_adapter(m, name, prepare_sft(m, SFTConfig(targets=["q_proj", "v_proj"]), indices=idx))
    randomize_adapters(m, std=0.2)
    merge_adapters(m, {"lang": 0.5, "task": 2.0}, method="linear", name="both")
    for h in hosts:
        p = ak.api.get_record(m, "both").pieces[h]
        assert p.values.dtype == torch.bfloat16 and p.values.device.type == device
        want = (0.5 * ak.api.get_record(m, "lang").pieces[h].dense_2d().float()
                + 2.0 * ak.api.get_record(m, "task").pieces[h].dense_2d().float())
        torch.testing.assert_close(p.dense_2d().float(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_keep_dtype(dtype):
    d = torch.randn(6, 5).to(dtype)
    g = torch.Generator().manual_seed(0)
    assert prune_magnitude(d, 0.5).dtype == dtype
    assert dare(d, 0.5, g).dtype == dtype
    assert ties(torch.stack([d, -d, d]), torch.ones(3, 1, 1)).dtype == dtype
    b, a = svd_factors(d, 3)
    assert (b.dtype, a.dtype) == (dtype, dtype)
    torch.testing.assert_close((b.float() @ a.float()), svd_factors(d.float(), 3)[0] @ svd_factors(d.float(), 3)[1],
                               atol=5e-2, rtol=5e-2)


def test_dare_masks_do_not_depend_on_the_device():
    d = torch.randn(50, 40)
    a = dare(d, 0.3, torch.Generator().manual_seed(7))
    b = dare(d.to("meta"), 0.3, torch.Generator().manual_seed(7))
    assert b.device.type == "meta" and a.shape == b.shape
    if torch.cuda.is_available():
        torch.testing.assert_close(dare(d.cuda(), 0.3, torch.Generator().manual_seed(7)).cpu(), a)
