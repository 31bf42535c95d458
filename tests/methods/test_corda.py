"""CorDA against the paper: SVD(W C) = U S V^T, W = U S V^T C^-1, adapt the smallest (kpm) or largest (ipm) r."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.api import get_record
from adapterkit.errors import ConfigError
from adapterkit.methods.corda import CorDAConfig, prepare_corda
from conftest import tiny_llama


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.unused = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    net = Net().eval()
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=g) * torch.logspace(0, -2, 16)[:, None]  # anisotropic inputs
    batches = [torch.randn(3, 10, 16, generator=g) @ mix for _ in range(4)]
    return net, batches


def reference(W: torch.Tensor, batches: list[torch.Tensor], damp: float = 0.01):
    X = torch.cat([b.reshape(-1, 16) for b in batches])
    C = X.T @ X / X.shape[0]
    C = C + damp * C.diagonal().mean() * torch.eye(16)
    U, S, Vh = torch.linalg.svd(W @ C, full_matrices=False)
    return X, U, S, Vh @ torch.linalg.inv(C)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_decomposition_matches_reference_and_adapter_starts_as_identity(mode):
    net, batches = setup()
    W, b = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    X, U, S, VhCi = reference(W, batches)
    assert torch.allclose(U * S @ VhCi, W, atol=1e-4)  # the decomposition is exact
    cfg = CorDAConfig(r=3, alpha=6, mode=mode, targets=["lin"])
    ak.add_adapter(net, "c", prepare_corda(net, cfg, batches))
    p = get_record(net, "c").pieces["lin"]
    sel = slice(0, 3) if mode == "ipm" else slice(9, 12)
    part = U[:, sel] * S[sel] @ VhCi[sel]
    assert torch.allclose(p.scaling * p.corda_B0 @ p.corda_A0, part, atol=1e-4)
    assert torch.allclose(net(X), F.linear(X, W, b), atol=1e-5)
    with torch.no_grad():
        p.lora_A.add_(torch.randn_like(p.lora_A) * 0.1)
        p.lora_B.add_(torch.randn_like(p.lora_B) * 0.1)
    want = F.linear(X, W - part + 2.0 * p.lora_B @ p.lora_A, b)  # frozen residual + trained part
    assert torch.allclose(net(X), want, atol=1e-4)
    assert ak.trainable_parameters(net, "c") == 3 * (16 + 12)


def test_context_orientation_kpm_preserves_and_ipm_captures_the_context():
    """On the calibration context, the kpm-adapted components barely change the outputs (their
    removal hurts far less than removing the smallest plain-SVD components), while the ipm ones
    carry more of the output than the plain top-r SVD components."""
    net, batches = setup(1)
    W = net.lin.weight.detach()
    X = torch.cat([b.reshape(-1, 16) for b in batches])
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    plain_small = (U[:, -3:] * S[-3:] @ Vh[-3:]) @ X.T
    plain_large = (U[:, :3] * S[:3] @ Vh[:3]) @ X.T
    out = {}
    for mode in ("kpm", "ipm"):
        cfg = CorDAConfig(r=3, mode=mode, targets=["lin"])
        ak.add_adapter(net, mode, prepare_corda(net, cfg, batches))
        p = get_record(net, mode).pieces["lin"]
        out[mode] = (p.scaling * p.corda_B0 @ p.corda_A0).detach() @ X.T
    assert out["kpm"].norm() < 0.2 * plain_small.norm()
    assert out["ipm"].norm() > plain_large.norm()


def test_llm_calibration_save_load_without_data_and_merge(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 7))
    cfg = CorDAConfig(r=4, mode="ipm", targets=["q_proj", "down_proj"])
    with pytest.raises(ConfigError, match="prepare_corda"):
        ak.add_adapter(model, "c", cfg)
    prepare_corda(model, cfg, [ids, {"input_ids": ids[:1]}])
    ak.add_adapter(model, "c", cfg)
    with torch.no_grad():
        for n, t in model.named_parameters():
            if ".adapterkit." in n:
                t.add_(torch.randn_like(t) * 0.02)
        want = model(ids).logits
    ak.save_adapter(model, "c", tmp_path / "c")
    keys = {k.rsplit(".", 1)[1] for k in load_file(tmp_path / "c" / "adapter.safetensors")}
    assert keys == {"lora_A", "lora_B", "corda_A0", "corda_B0"}
    fresh = tiny_llama()
    rec = ak.load_adapter(fresh, tmp_path / "c", trainable=True)
    assert rec.config.init_from == "file"
    with torch.no_grad():
        assert (fresh(ids).logits - want).abs().max() < 1e-4
        ak.merge(fresh, "c")
        assert (fresh(ids).logits - want).abs().max() < 1e-4
    fresh.train()
    ak.unmerge(fresh, "c")
    fresh(ids).logits.sum().backward()
    for n, t in fresh.named_parameters():
        assert (t.grad is not None) == n.endswith(("lora_A", "lora_B")), n


def test_errors():
    with pytest.raises(ConfigError, match="mode"):
        CorDAConfig(mode="xyz")
    net, batches = setup()
    cfg = CorDAConfig(r=2, targets=["lin", "unused"])
    with pytest.raises(ConfigError, match="'unused'"):
        ak.add_adapter(net, "c", prepare_corda(net, cfg, batches))
    with pytest.raises(ConfigError, match="no batches"):
        prepare_corda(net, CorDAConfig(r=2, targets=["lin"]), [])
    with pytest.raises(ConfigError, match="r=13 exceeds"):
        ak.add_adapter(net, "c", prepare_corda(net, CorDAConfig(r=13, targets=["lin"]), batches))
