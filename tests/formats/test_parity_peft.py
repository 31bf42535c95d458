"""Parity with the real ``peft`` package, both directions, on tiny random-weight models.

(1) PEFT model with random non-zero adapter weights -> ``save_pretrained`` -> ``ak.load_adapter``
    into a fresh copy of the base -> same outputs;
(2) adapterkit adapter with random weights -> ``ak.save_adapter(format="peft")`` ->
    ``PeftModel.from_pretrained(fresh base)`` -> same outputs.

Acceptance: max |output difference| <= 1e-5 in fp32. Every case also checks that the adapter
really changes the output (so equal outputs cannot come from an adapter that does nothing).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import adapterkit as ak
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

peft = pytest.importorskip("peft")

TOL = 1e-5
#: the adapter must move the output by more than this (else parity would prove nothing)
MIN_EFFECT = 1e-3


class ConvNet(nn.Module):
    """A tiny vision net with Conv2d and Linear layers (PEFT handles it as a custom model)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 8, 4, 4)
        return self.head(h.flatten(1))


def tiny_convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def _ids(model: Any) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"input_ids": torch.randint(0, 128, (2, 9), generator=g)}


def _pixels(model: Any) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def _images(model: Any) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"x": torch.randn(2, 3, 8, 8, generator=g)}


def _out(o: Any) -> torch.Tensor:
    if isinstance(o, torch.Tensor):
        return o
    return o["logits"] if "logits" in o else o["last_hidden_state"]


@dataclass
class Case:
    base: Callable[[], nn.Module]
    peft_config: Callable[[], Any]
    ak_config: Callable[[], Any]
    inputs: Callable[[Any], dict[str, torch.Tensor]] = _ids
    #: PEFT's prompt tuning returns logits for its virtual tokens too: drop them
    virtual: int = 0


def _lora(**kw: Any) -> Callable[[], Any]:
    return lambda: peft.LoraConfig(init_lora_weights=False, **kw)


CASES: dict[str, Case] = {
    "llama-lora": Case(tiny_llama, _lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                       lambda: ak.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])),
    "llama-rslora-bias": Case(
        tiny_llama, _lora(r=4, lora_alpha=6, use_rslora=True, lora_bias=True, target_modules=["o_proj", "up_proj"]),
        lambda: ak.LoRAConfig(r=4, alpha=6, use_rslora=True, bias=True, targets=["o_proj", "up_proj"])),
    "llama-lora-embedding": Case(tiny_llama, _lora(r=4, lora_alpha=8, target_modules=["embed_tokens", "k_proj"]),
                                 lambda: ak.LoRAConfig(r=4, alpha=8, targets=["embed_tokens", "k_proj"])),
    "gpt2-lora-conv1d": Case(tiny_gpt2, _lora(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                              fan_in_fan_out=True),
                             lambda: ak.LoRAConfig(r=4, alpha=8, targets=["c_attn", "c_fc"])),
    "bert-lora": Case(tiny_bert, _lora(r=4, lora_alpha=8, target_modules=["query", "value"]),
                      lambda: ak.LoRAConfig(r=4, alpha=8, targets=["query", "value"])),
    # transformers 5 ViT: q_proj/v_proj; the patch embedding "projection" is a Conv2d
    "vit-lora": Case(tiny_vit, _lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "projection"]),
                     lambda: ak.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "projection"]), inputs=_pixels),
    "convnet-lora-conv2d": Case(tiny_convnet, _lora(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"]),
                                lambda: ak.LoRAConfig(r=2, alpha=4, targets=["conv1", "conv2", "head"]),
                                inputs=_images),
    "llama-dora": Case(tiny_llama, _lora(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
                       lambda: ak.make_config("dora", r=4, alpha=8, targets=["q_proj", "v_proj"])),
    "llama-dora-embedding": Case(tiny_llama, _lora(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"]),
                                 lambda: ak.make_config("dora", r=4, alpha=8, targets=["embed_tokens"])),
    "gpt2-dora-conv1d": Case(tiny_gpt2, _lora(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn"],
                                              fan_in_fan_out=True),
                             lambda: ak.make_config("dora", r=4, alpha=8, targets=["c_attn"])),
    "vit-dora": Case(tiny_vit, _lora(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
                     lambda: ak.make_config("dora", r=4, alpha=8, targets=["q_proj", "v_proj"]), inputs=_pixels),
    "convnet-dora-conv2d": Case(tiny_convnet, _lora(r=2, lora_alpha=4, use_dora=True, target_modules=["conv1", "conv2"]),
                                lambda: ak.make_config("dora", r=2, alpha=4, targets=["conv1", "conv2"]),
                                inputs=_images),
    "llama-ia3": Case(tiny_llama, lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                         feedforward_modules=["down_proj"]),
                      lambda: ak.make_config("ia3", targets=["k_proj", "v_proj", "down_proj"],
                                             feedforward_targets=["down_proj"])),
    "gpt2-ia3-conv1d": Case(tiny_gpt2, lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                              feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
                            lambda: ak.make_config("ia3", targets=["c_attn", "mlp.c_proj"],
                                                   feedforward_targets=["mlp.c_proj"])),
    "bert-ia3": Case(tiny_bert, lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                       feedforward_modules=["output.dense"]),
                     lambda: ak.make_config("ia3", targets=["key", "value", "output.dense"],
                                            feedforward_targets=["output.dense"])),
    "llama-prompt": Case(tiny_llama, lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                         lambda: ak.make_config("prompt", num_virtual_tokens=4), virtual=4),
    "gpt2-prompt": Case(tiny_gpt2, lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                        lambda: ak.make_config("prompt", num_virtual_tokens=3), virtual=3),
    "llama-prefix": Case(tiny_llama, lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                         lambda: ak.make_config("prefix", num_virtual_tokens=4)),
    "gpt2-prefix": Case(tiny_gpt2, lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                        lambda: ak.make_config("prefix", num_virtual_tokens=3)),
    "llama-prefix-projection": Case(
        tiny_llama,
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                        encoder_hidden_size=16),
        lambda: ak.make_config("prefix", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16)),
}


def randomize_peft(model: nn.Module, seed: int = 3) -> None:
    """Random non-zero values for every trainable (adapter) parameter of a PEFT model."""
    g = torch.Generator().manual_seed(seed)
    n_done = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "lora_magnitude_vector" in n or "ia3_l" in n:
                p.mul_(1 + 0.2 * noise)  # around their identity values
            elif "prompt_encoder" in n or "prefix" in n:
                p.copy_(noise)
            else:
                p.copy_(0.1 * noise)
            n_done += 1
    assert n_done, "the PEFT model has no trainable adapter parameters"


def run(model: nn.Module, inputs: dict[str, torch.Tensor], virtual: int = 0) -> torch.Tensor:
    with torch.no_grad():
        out = _out(model(**inputs))
    return out[:, virtual:] if virtual else out


def assert_close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    effect = (want - base).abs().max().item()
    assert effect > MIN_EFFECT, f"the adapter barely changes the output ({effect:.2e}): the test would prove nothing"
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"max |difference| {diff:.3e} > {TOL}"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_adapterkit(case: str, tmp_path) -> None:
    c = CASES[case]
    pm = peft.get_peft_model(c.base(), c.peft_config()).eval()
    randomize_peft(pm)
    inputs = c.inputs(pm)
    want = run(pm, inputs, c.virtual)
    pm.save_pretrained(tmp_path / "peft")

    model = c.base()
    base_out = run(model, inputs)
    ak.load_adapter(model, tmp_path / "peft", name="imported")
    assert_close(run(model, inputs), want, base_out)


@pytest.mark.parametrize("case", list(CASES))
def test_adapterkit_to_peft(case: str, tmp_path) -> None:
    c = CASES[case]
    model = c.base()
    inputs = c.inputs(model)
    base_out = run(model, inputs)
    ak.add_adapter(model, "mine", c.ak_config())
    randomize_adapters(model, std=0.3 if c.virtual or "prefix" in case else 0.1)
    want = run(model, inputs)
    ak.save_adapter(model, "mine", tmp_path / "peft", format="peft")

    pm = peft.PeftModel.from_pretrained(c.base(), tmp_path / "peft").eval()
    assert_close(run(pm, inputs, c.virtual), want, base_out)


def test_pissa_exports_as_plain_lora_for_the_original_base(tmp_path) -> None:
    """PiSSA rewrites the base weight; the PEFT file must work on the ORIGINAL base."""
    model = tiny_llama()
    inputs = _ids(model)
    base_out = run(model, inputs)
    ak.add_adapter(model, "p", ak.LoRAConfig(r=2, alpha=4, init="pissa", targets=["q_proj", "v_proj"]))
    randomize_adapters(model, std=0.05)
    want = run(model, inputs)
    ak.save_adapter(model, "p", tmp_path / "peft", format="peft")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    assert_close(run(pm, inputs), want, base_out)
