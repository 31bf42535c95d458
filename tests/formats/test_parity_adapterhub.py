"""Parity with the real AdapterHub ``adapters`` package (1.3), both directions, on tiny random-weight
BERT / RoBERTa / GPT-2 / Llama models.

(1) ``adapters`` adds an adapter, every adapter weight is made random and non-zero,
    ``model.save_adapter`` -> ``ak.load_adapter`` into the same base -> the same logits;
(2) an adapterkit adapter with random weights -> ``write_adapterhub`` -> ``model.load_adapter`` in
    ``adapters`` -> the same logits.

Acceptance: max |logit difference| <= 1e-5 in fp32, and every adapter moves the logits by more than
1e-3 (equal outputs from an adapter that does nothing would prove nothing). What adapterkit cannot
reproduce is refused by name (checked here too, on files the real package wrote).

``adapters`` 1.3 pins transformers 4.57 while adapterkit runs on transformers 5, so the real
package runs in its own virtualenv, as a subprocess: ``.venv-adapters`` at the repository root
(``python -m venv .venv-adapters && .venv-adapters/bin/pip install --no-deps adapters==1.3.0
transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2`` plus a ``.pth`` file pointing at
``.venv``'s site-packages for torch and the rest), or the interpreter named by
``ADAPTERKIT_ADAPTERHUB_PYTHON``. The base weights are made on the AdapterHub side and loaded by
both, so both sides compute with identical weights. Two subprocess runs serve the whole module.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

import adapterkit.api as ak
from adapterkit.errors import AdapterFileError, ConfigError
from adapterkit.formats.adapterhub import write_adapterhub
from adapterkit.formats.convert import convert
from adapterkit.methods.bottleneck import BottleneckConfig
from adapterkit.methods.compacter import CompacterConfig
from adapterkit.methods.ia3 import IA3Config
from adapterkit.methods.lora import LoRAConfig

ROOT = Path(__file__).resolve().parents[2]
AH_PYTHON = Path(os.environ.get("ADAPTERKIT_ADAPTERHUB_PYTHON", ROOT / ".venv-adapters" / "bin" / "python"))
SIDE = Path(__file__).with_name("_adapterhub_side.py")
if not AH_PYTHON.exists():
    pytest.skip(f"the real AdapterHub package needs its own interpreter (transformers 4.x): {AH_PYTHON} is missing; "
                f"see this module's docstring", allow_module_level=True)

TOL = 1e-5
MIN_EFFECT = 1e-3
ARCHS = ("bert", "roberta", "gpt2", "llama")
PRE_LN = ("gpt2", "llama")
HEADED = ("bert-cls", "llama-cls")  # *ForSequenceClassification: a static head travels with the adapter
LOAD = {"bert": AutoModelForMaskedLM, "roberta": AutoModelForMaskedLM, "gpt2": AutoModelForCausalLM,
        "llama": AutoModelForCausalLM, "bert-cls": AutoModelForSequenceClassification,
        "llama-cls": AutoModelForSequenceClassification}


@dataclass
class Case:
    id: str
    arch: str
    config: Any  # AdapterHub: a config name or dict; adapterkit: an AdapterConfig
    kw: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None  # the field named in the refusal, if adapterkit must refuse
    train_head: bool = False  # AdapterHub side: change the static head too (saved with the adapter)
    via_convert: bool = False  # adapterkit side: save natively, then convert(to="adapterhub") without the model
    std: float = 0.3  # AdapterHub side: the adapter weights' random scale
    safetensors: bool = False  # AdapterHub side: save_adapter(..., use_safetensors=True)


# -- (1) AdapterHub -> adapterkit -------------------------------------------------------------------
LORA_AH = {"r": 2, "alpha": 4, "attn_matrices": ["q", "k", "v"], "intermediate_lora": True, "output_lora": True}
READ: list[Case] = []
for _a in ARCHS:
    _pre = _a in PRE_LN
    READ += [
        Case(f"{_a}-seq_bn", _a, "seq_bn"),
        Case(f"{_a}-double_seq_bn", _a, "double_seq_bn", {"non_linearity": "gelu"}),
        Case(f"{_a}-par_bn", _a, "par_bn", refused="is_parallel" if _pre else None),
        Case(f"{_a}-scaled_par_bn", _a, "scaled_par_bn", refused="is_parallel" if _pre else None),
        Case(f"{_a}-seq_bn-no-olb", _a, "seq_bn", {"original_ln_before": False, "scaling": 2.0}),
        Case(f"{_a}-lora", _a, "lora", LORA_AH),
        Case(f"{_a}-lora-qv", _a, "lora", {"r": 3, "alpha": 8, "leave_out": [0]}),
        Case(f"{_a}-ia3", _a, "ia3"),
        Case(f"{_a}-prefix_tuning", _a, "prefix_tuning", {"prefix_length": 3, "bottleneck_size": 8},
             refused="architecture"),
        Case(f"{_a}-compacter", _a, "compacter", {"phm_dim": 2, "reduction_factor": 8}),
        Case(f"{_a}-compacter++", _a, "compacter++", {"phm_dim": 4, "reduction_factor": 4, "phm_rank": 2}),
    ]
READ += [
    Case("bert-seq_bn-residual-after-ln", "bert", "seq_bn", {"residual_before_ln": False, "leave_out": [1]}),
    Case("roberta-double_seq_bn-olb", "roberta", "double_seq_bn", {"original_ln_before": True}),
    Case("llama-seq_bn-residual-after-ln", "llama", "seq_bn", {"residual_before_ln": False},
         refused="residual_before_ln"),
    Case("gpt2-double_seq_bn-olb", "gpt2", "double_seq_bn", {"original_ln_before": True},
         refused="original_ln_before"),
    Case("bert-compacter-own-rules", "bert", "compacter", {"phm_dim": 2, "reduction_factor": 8,
                                                          "shared_phm_rule": False, "phm_bias": False}, std=1.0),
    Case("bert-compacter-uniform", "bert", "compacter", {"phm_dim": 2, "reduction_factor": 8, "phm_c_init": "uniform"},
         refused="phm_c_init"),
    Case("llama-compacter-factorized-rule", "llama", "compacter++", {"phm_dim": 2, "reduction_factor": 8,
                                                                     "factorized_phm_rule": True},
         refused="factorized_phm_rule"),
    Case("bert-seq_bn-ln_after", "bert", "seq_bn", {"ln_after": True}, refused="ln_after"),
    Case("llama-dora", "llama", "dora", {"r": 2}, refused="use_dora"),
    Case("bert-seq_bn-channel", "bert", "seq_bn", {"scaling": "channel"}, refused="scaling"),
    Case("bert-cls-seq_bn-head", "bert-cls", "seq_bn", train_head=True),
    Case("llama-cls-lora-head", "llama-cls", "lora", {"r": 2}, train_head=True),
    Case("bert-cls-seq_bn-head-safetensors", "bert-cls", "seq_bn", train_head=True, safetensors=True),
    Case("gpt2-lora-safetensors", "gpt2", "lora", LORA_AH, safetensors=True),
]

# -- (2) adapterkit -> AdapterHub -------------------------------------------------------------------
LORA_OURS = {"bert": ["query", "key", "value", "intermediate.dense"], "roberta": ["query", "value"],
             "gpt2": ["c_attn", "mlp.c_fc", "mlp.c_proj"], "llama": ["q_proj", "v_proj", "up_proj", "down_proj"]}
IA3_OURS = {"bert": ["key", "value", "intermediate.dense"], "roberta": ["value"], "gpt2": ["c_attn", "mlp.c_fc"],
            "llama": ["k_proj", "v_proj", "down_proj"]}
LAYERS = {"gpt2": ["transformer.h.0", "transformer.h.1"], "llama": ["model.layers.0", "model.layers.1"]}
WRITE: list[Case] = []
for _a in ARCHS:
    _pre = _a in PRE_LN
    WRITE += [
        Case(f"{_a}-pfeiffer", _a, BottleneckConfig(mode="pfeiffer", reduction_factor=8)),
        Case(f"{_a}-houlsby", _a, BottleneckConfig(mode="houlsby", non_linearity="gelu", scaling="learned")),
        Case(f"{_a}-parallel", _a, BottleneckConfig(mode="parallel"), refused="parallel" if _pre else None),
        Case(f"{_a}-lora", _a, LoRAConfig(r=2, alpha=6, targets=LORA_OURS[_a])),
        Case(f"{_a}-lora-rslora", _a, LoRAConfig(r=4, alpha=4, use_rslora=True, dropout=0.1)),
        Case(f"{_a}-ia3", _a, IA3Config(targets=IA3_OURS[_a])),
        Case(f"{_a}-compacter", _a, CompacterConfig(mode="compacter", phm_dim=2, reduction_factor=8)),
        Case(f"{_a}-compacter++", _a, CompacterConfig(mode="compacter++", phm_dim=4, phm_rank=2, reduction_factor=4,
                                                      shared_phm_rule=False, phm_bias=False)),
    ]
    if _pre:
        WRITE.append(Case(f"{_a}-pfeiffer-on-layer", _a, BottleneckConfig(mode="pfeiffer", targets=LAYERS[_a])))
    else:
        WRITE.append(Case(f"{_a}-pfeiffer-residual-after-ln", _a, BottleneckConfig(mode="pfeiffer",
                                                                                   residual_before_ln=False)))
WRITE += [
    Case("bert-cls-pfeiffer-head", "bert-cls", BottleneckConfig(mode="pfeiffer")),  # + a copy of "classifier"
    Case("llama-cls-lora-head", "llama-cls", LoRAConfig(r=2, targets=["q_proj", "v_proj"])),  # + "score"
    Case("bert-cls-pfeiffer-head-convert", "bert-cls", BottleneckConfig(mode="pfeiffer"), via_convert=True),
    Case("gpt2-lora-convert", "gpt2", LoRAConfig(r=2, targets=["c_attn", "mlp.c_fc"]), via_convert=True),
    Case("llama-ia3-feedforward", "llama", IA3Config(), refused="feedforward"),
    Case("llama-lora-o_proj", "llama", LoRAConfig(r=2, targets=["o_proj"]), refused="o_proj"),
    Case("llama-lora-one-layer", "llama", LoRAConfig(r=2, targets=["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"]),
         refused="lacks"),
]


# -- harness ------------------------------------------------------------------------------------------
def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 100, (2, 9), generator=g)


def _run_side(work: Path, job: dict[str, Any]) -> dict[str, Any]:
    path = work / f"job-{job['result']}.json"
    path.write_text(json.dumps({"work": str(work), **job}))
    proc = subprocess.run([str(AH_PYTHON), str(SIDE), str(path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(work / job["result"], weights_only=True)


def _base(work: Path, arch: str) -> torch.nn.Module:
    return LOAD[arch].from_pretrained(str(work / f"base-{arch}"), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("adapterhub")
    torch.save(_ids(), w / "ids.pt")
    return w


@pytest.fixture(scope="module")
def theirs(work: Path) -> dict[str, Any]:
    """AdapterHub's bases, adapters (saved under <work>/ah-<case>) and logits."""
    make = [{"case": c.id, "arch": c.arch, "config": c.config, "kw": c.kw, "name": "x",
             "out": str(work / f"ah-{c.id}"), "train_head": c.train_head, "std": c.std,
             "safetensors": c.safetensors} for c in READ]
    return _run_side(work, {"bases": list(ARCHS + HEADED), "make": make, "result": "read.pt"})


@pytest.fixture(scope="module")
def exported(work: Path, theirs: dict[str, Any]) -> dict[str, Any]:
    """Our adapters (random weights) written in AdapterHub's format, our logits, then AdapterHub's."""
    ours: dict[str, Any] = {}
    run = []
    for c in WRITE:
        model = _base(work, c.arch)
        ak.add_adapter(model, "x", c.config)
        _randomize(model)
        ak.set_adapter(model, "x")
        with torch.no_grad():
            ours[c.id] = model(_ids()).logits
        rec = ak.get_record(model, "x")
        try:
            if c.via_convert:
                ak.save_adapter(model, "x", work / f"native-{c.id}")
                convert(work / f"native-{c.id}", work / f"ak-{c.id}", to="adapterhub")
            else:
                write_adapterhub(work / f"ak-{c.id}", model, rec.method, rec.config, ak.adapter_state_dict(model, "x"),
                                 "x")
        except ConfigError as e:
            ours[f"error:{c.id}"] = e
            continue
        run.append({"case": c.id, "arch": c.arch, "dir": str(work / f"ak-{c.id}")})
    return {"ours": ours, "theirs": _run_side(work, {"run": run, "result": "write.pt"})}


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ak.adapter_parameters(model, "x").items():
            around_one = n.endswith("ia3_l") or n.endswith("scaling")
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if around_one else 0.0))


def _check(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> None:
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"max |logit difference| {diff:.3g} > {TOL}"
    effect = (theirs - base).abs().max().item()
    assert effect > MIN_EFFECT, f"the adapter barely changes the output ({effect:.3g})"


def test_bases_agree(work: Path, theirs: dict[str, Any]) -> None:
    """transformers 5 (here) and 4.57 (AdapterHub's) compute the same base logits from the same weights."""
    for arch in ARCHS + HEADED:
        with torch.no_grad():
            ours = _base(work, arch)(_ids()).logits
        assert (ours - theirs[f"base-{arch}"]).abs().max().item() <= TOL, arch


@pytest.mark.parametrize("case", READ, ids=[c.id for c in READ])
def test_adapterhub_to_adapterkit(case: Case, work: Path, theirs: dict[str, Any]) -> None:
    assert f"error:{case.id}" not in theirs, theirs.get(f"error:{case.id}")
    model = _base(work, case.arch)
    path = work / f"ah-{case.id}"
    if case.safetensors:  # the safetensors files are what is read
        assert (path / "adapter.safetensors").is_file() and not (path / "pytorch_adapter.bin").exists()
    if case.refused:
        with pytest.raises(AdapterFileError, match=f"AdapterHub config field '{case.refused}'"):
            ak.load_adapter(model, path, name="x")
        assert ak.list_adapters(model) == []
        return
    ak.load_adapter(model, path, name="x")
    ak.set_adapter(model, "x")
    with torch.no_grad():
        ours = model(_ids()).logits
    _check(ours, theirs[case.id], theirs[f"base-{case.arch}"])


@pytest.mark.parametrize("case", WRITE, ids=[c.id for c in WRITE])
def test_adapterkit_to_adapterhub(case: Case, exported: dict[str, Any], theirs: dict[str, Any]) -> None:
    ours, ah = exported["ours"], exported["theirs"]
    if case.refused:
        err = ours.get(f"error:{case.id}")
        assert isinstance(err, ConfigError), f"expected a ConfigError naming {case.refused!r}"
        assert case.refused in str(err)
        return
    assert f"error:{case.id}" not in ours, ours.get(f"error:{case.id}")
    assert f"error:{case.id}" not in ah, ah.get(f"error:{case.id}")
    _check(ours[case.id], ah[case.id], theirs[f"base-{case.arch}"])
