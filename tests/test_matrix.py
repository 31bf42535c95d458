"""One data-driven matrix: every method x every toy model it applies to.

For each cell: forward runs and (after randomising the adapter) changes the output;
backward puts gradients only on the method's trainable parameters; save -> load into a
fresh base gives the same outputs; merged == unmerged where the method is mergeable;
the trainable-parameter count equals the closed form from the method's paper, computed
here from the targeted modules' shapes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.inject import weight_io
from conftest import randomize_adapters, tiny_bert, tiny_llama, tiny_vit


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict]]] = {
    "llama": (tiny_llama, lambda: {"input_ids": torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))}),
    "bert": (tiny_bert, lambda: {"input_ids": torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))}),
    "vit": (tiny_vit, lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}),
    "conv": (TinyConvNet, lambda: {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}),
}


def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _mods(model: nn.Module, pieces) -> list[nn.Module]:
    m = dict(model.named_modules())
    return [m[h] for h in pieces]


def lora_count(r: int) -> Callable:
    def count(model, rec):
        total = 0
        for mod in _mods(model, rec.pieces):
            if isinstance(mod, nn.Conv2d):
                kh, kw = mod.kernel_size
                total += r * mod.in_channels * kh * kw + mod.out_channels * r
            else:
                o, i = weight_io(mod)
                total += r * (i + o)
        return total
    return count


def dora_count(r: int) -> Callable:
    def count(model, rec):
        return lora_count(r)(model, rec) + sum(weight_io(m)[0] for m in _mods(model, rec.pieces))
    return count


FF_SUFFIXES = ("down_proj", "output.dense", "fc2", "mlp.c_proj")  # PEFT's feed-forward defaults


def ia3_count(model, rec):
    # one vector per host: input-sized on feed-forward layers (scales x), output-sized elsewhere
    total = 0
    for name, mod in zip(rec.pieces, _mods(model, rec.pieces)):
        o, i = weight_io(mod)
        total += i if name.endswith(FF_SUFFIXES) else o
    return total


def bottleneck_count(model, rec):
    # per site: down (h*b + b) + up (b*h + h); h = hidden size, b = h // reduction_factor
    h = model.config.hidden_size
    b = h // rec.config.reduction_factor
    return len(rec.pieces) * (2 * h * b + b + h)


def prompt_count(model, rec):
    return rec.config.num_virtual_tokens * model.config.hidden_size


def prefix_count(model, rec):
    c = model.config
    kv_dim = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    return rec.config.num_virtual_tokens * c.num_hidden_layers * 2 * kv_dim


@dataclass
class Cell:
    method: str
    config: Callable[[str], ak.methods.AdapterConfig]
    models: tuple[str, ...]
    count: Callable | None
    mergeable: bool


CONV_TARGETS = {"conv": ["conv1", "conv2"]}
CELLS = [
    Cell("lora", lambda k: ak.LoRAConfig(r=4, targets=CONV_TARGETS.get(k)), ("llama", "bert", "vit", "conv"),
         lora_count(4), True),
    Cell("dora", lambda k: ak.DoRAConfig(r=4, targets=CONV_TARGETS.get(k)), ("llama", "bert", "vit", "conv"),
         None, True),
    Cell("ia3", lambda k: ak.IA3Config(), ("llama", "bert", "vit"), ia3_count, True),
    Cell("bottleneck", lambda k: ak.BottleneckConfig(mode="houlsby", reduction_factor=8), ("llama", "bert", "vit"),
         bottleneck_count, False),
    Cell("prompt", lambda k: ak.PromptTuningConfig(num_virtual_tokens=3), ("llama",), prompt_count, False),
    Cell("prefix", lambda k: ak.PrefixTuningConfig(num_virtual_tokens=3), ("llama",), prefix_count, False),
]
_LM = ("llama", "bert", "vit")
CELLS += [
    Cell("lora_xs", lambda k: ak.make_config("lora_xs", r=4), _LM, None, True),
    Cell("sorsa", lambda k: ak.make_config("sorsa", r=4), _LM, None, True),
    Cell("hydra", lambda k: ak.make_config("hydra", r=4), _LM, None, True),
    Cell("bone", lambda k: ak.make_config("bone", r=16), _LM, None, True),
    Cell("dylora", lambda k: ak.make_config("dylora", r=4), _LM, None, True),
    Cell("mola", lambda k: ak.make_config("mola", r=2, experts_per_layer="2,3"), _LM, None, False),
]
CELLS += [
    Cell("ssf", lambda k: ak.make_config("ssf", targets=CONV_TARGETS.get(k)), ("llama", "bert", "vit", "conv"),
         None, True),
    Cell("compacter", lambda k: ak.make_config("compacter", reduction_factor=8), _LM, None, False),
    Cell("compacter", lambda k: ak.make_config("compacter", mode="compacter++"), _LM, None, False),
    Cell("mosa", lambda k: ak.make_config("mosa", mode="houlsby", reduction_factor=8), _LM, bottleneck_count, False),
    Cell("invertible", lambda k: ak.make_config("invertible"), ("llama",), None, False),
]
CELLS += [
    Cell("qadapter", lambda k: ak.make_config("qadapter", bits=2, base_config={"r": 4}), _LM, lora_count(4), True),
    Cell("qadapter", lambda k: ak.make_config("qadapter", base_method="bottleneck", bits=4,
                                              base_config={"mode": "houlsby", "reduction_factor": 8}), _LM, None, False),
]
CELLS += [
    Cell("paca", lambda k: ak.make_config("paca", r=4), _LM,
         lambda model, rec: sum(4 * weight_io(m)[0] for m in _mods(model, rec.pieces)), True),
    Cell("s2ft", lambda k: ak.make_config("s2ft", heads=1, channels=4), _LM, None, True),
]
PARAMS = [pytest.param(c, m, id=f"{c.method}{i}-{m}") for i, c in enumerate(CELLS) for m in c.models]


def _attach(cell: Cell, kind: str):
    make, inputs = MODELS[kind]
    model = make().eval()
    x = inputs()
    base = _out(model, x).detach()
    rec = ak.add_adapter(model, "a", cell.config(kind))
    return model, x, base, rec


@pytest.mark.parametrize("cell,kind", PARAMS)
def test_cell(cell: Cell, kind: str, tmp_path):
    model, x, base, rec = _attach(cell, kind)
    randomize_adapters(model, std=0.2)
    out = _out(model, x)
    assert out.shape == base.shape
    assert (out - base).abs().max().item() > 1e-4, "a random adapter must change the output"

    # backward: gradients only on this adapter's parameters
    model.train()
    model.zero_grad()
    _out(model, x).float().pow(2).mean().backward()
    own = {id(p) for p in ak.api.adapter_parameters(model, "a").values()}
    for n, p in model.named_parameters():
        if id(p) not in own:
            assert p.grad is None, f"base parameter {n} got a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ak.api.adapter_parameters(model, "a").values())
    model.eval()
    ref = _out(model, x).detach()

    # exact trainable count
    if cell.count is not None:
        assert ak.trainable_parameters(model, "a") == cell.count(model, rec)
    assert ak.trainable_parameters(model, "a") == sum(p.numel() for p in ak.api.adapter_parameters(model, "a").values())

    # save -> load into a fresh base
    ak.save_adapter(model, "a", tmp_path / "a")
    fresh = MODELS[kind][0]().eval()
    ak.load_adapter(fresh, tmp_path / "a")
    assert (_out(fresh, x) - ref).abs().max().item() <= 1e-5

    # merge
    if cell.mergeable:
        ak.merge(model, "a")
        assert (_out(model, x) - ref).abs().max().item() <= 1e-4
        ak.unmerge(model, "a")
        assert (_out(model, x) - ref).abs().max().item() <= 1e-5
    else:
        with pytest.raises(ak.errors.NotMergeableError):
            ak.merge(model, "a")


def test_every_registered_method_is_in_the_matrix_or_has_its_own_suite():
    covered = {c.method for c in CELLS}
    import pathlib

    here = pathlib.Path(__file__).parent
    suites = [p for d in ("methods", "compose") for p in (here / d).glob("test_*.py")]
    own_suites = {p.stem.removeprefix("test_") for p in suites}
    texts = "\n".join(p.read_text() for p in suites)
    missing = [m for m in ak.list_methods() if m not in covered and m not in own_suites and f'"{m}"' not in texts]
    assert not missing, f"methods with no tests: {missing}"


def test_dora_count_closed_form():
    model, _, _, rec = _attach(CELLS[1], "llama")
    assert ak.trainable_parameters(model, "a") == dora_count(4)(model, rec)


def test_ia3_count_closed_form():
    model, _, _, rec = _attach(CELLS[2], "llama")
    # (IA)^3 on Llama: k (out 32), v (out 32), down_proj (in 128) per layer, 2 layers
    assert ak.trainable_parameters(model, "a") == 2 * (32 + 32 + 128)
