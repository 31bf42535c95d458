"""The AdapterHub side of the parity tests, run by the interpreter that has the real ``adapters``
package (it pins transformers 4.x, so it lives in its own virtualenv; see test_parity_adapterhub.py).

    python _adapterhub_side.py JOB.json

JOB.json: {"work": dir, "bases": [arch, ...], "make": [...], "run": [...]} where

* bases: build a tiny random model per arch and ``save_pretrained`` it to ``<work>/base-<arch>``
  (skipped when it exists); the adapterkit side loads the same weights from there;
* make: {"case", "arch", "config": name or dict, "kw": {...}, "name", "out", "train_head", "std",
  "safetensors"}: add the
  adapter with ``adapters``, give every adapter weight a random non-zero value (and, with train_head,
  change the head outside the base model), ``save_adapter`` it (with its head) to ``out`` and record
  the logits with it active;
* run: {"case", "arch", "dir"}: ``load_adapter`` a directory written by adapterkit, record logits.

Writes ``<work>/logits.pt``: {"base-<arch>": logits, case: logits}, for ``input_ids`` in
``<work>/ids.pt``. Errors per case are recorded as strings under ``"error:<case>"``.
"""
from __future__ import annotations

import json
import os
import sys

import torch

import adapters
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification, BertConfig,
                          BertForMaskedLM, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification, RobertaConfig, RobertaForMaskedLM)

V = 100
BUILD = {
    "bert": lambda: BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, max_position_embeddings=64)),
    "roberta": lambda: RobertaForMaskedLM(RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=64,
                                                        max_position_embeddings=64)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               bos_token_id=0, eos_token_id=0)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                  max_position_embeddings=64, bos_token_id=0, eos_token_id=0)),
    # sequence classification: a static head (classifier / score) saved with the adapter
    "bert-cls": lambda: BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4, intermediate_size=64,
                                                                 max_position_embeddings=64, num_labels=3)),
    "llama-cls": lambda: LlamaForSequenceClassification(LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                                    num_attention_heads=4, num_key_value_heads=2,
                                                                    intermediate_size=64, max_position_embeddings=64,
                                                                    num_labels=3, pad_token_id=0)),
}
LOAD = {"bert": AutoModelForMaskedLM, "roberta": AutoModelForMaskedLM, "gpt2": AutoModelForCausalLM,
        "llama": AutoModelForCausalLM, "bert-cls": AutoModelForSequenceClassification,
        "llama-cls": AutoModelForSequenceClassification}


def load_base(work: str, arch: str):
    return LOAD[arch].from_pretrained(os.path.join(work, f"base-{arch}"), attn_implementation="eager").eval()


def randomize(model, name: str, seed: int, std: float = 0.3) -> None:
    """Every adapter weight random and non-zero (AdapterHub zero-inits some); (IA)^3 vectors and
    learned scalings around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." not in n:
                continue
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if n.endswith("scaling") else noise)


def main() -> None:
    job = json.load(open(sys.argv[1]))
    work = job["work"]
    ids = torch.load(os.path.join(work, "ids.pt"))
    out: dict[str, object] = {}
    for arch in job.get("bases", []):
        d = os.path.join(work, f"base-{arch}")
        if not os.path.isdir(d):
            torch.manual_seed(0)
            BUILD[arch]().save_pretrained(d)
        with torch.no_grad():
            out[f"base-{arch}"] = load_base(work, arch)(ids).logits
    for m in job.get("make", []):
        try:
            model = load_base(work, m["arch"])
            adapters.init(model)
            cfg = adapters.AdapterConfig.load(m["config"], **m.get("kw", {}))
            model.add_adapter(m["name"], config=cfg)
            # (IA)^3 vectors multiply: keep them near 1
            if getattr(cfg, "composition_mode", None) == "scale":
                with torch.no_grad():
                    g = torch.Generator().manual_seed(m.get("seed", 1))
                    for n, p in model.named_parameters():
                        if f".{m['name']}." in n:
                            p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
            else:
                randomize(model, m["name"], m.get("seed", 1), m.get("std", 0.3))
            if m.get("train_head"):  # the head as after training: it differs from the base's
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if not n.startswith(model.base_model_prefix):
                            p.add_(torch.randn_like(p) * 0.3)
            model.set_active_adapters(m["name"])
            model.eval()
            with torch.no_grad():
                out[m["case"]] = model(ids).logits
            model.save_adapter(m["out"], m["name"], use_safetensors=m.get("safetensors", False))
        except Exception as e:  # noqa: BLE001 - reported to the test, which names the case
            out[f"error:{m['case']}"] = f"{type(e).__name__}: {e}"
    for r in job.get("run", []):
        try:
            model = load_base(work, r["arch"])
            adapters.init(model)
            name = model.load_adapter(r["dir"])
            model.set_active_adapters(name)
            model.eval()
            with torch.no_grad():
                out[r["case"]] = model(ids).logits
        except Exception as e:  # noqa: BLE001
            out[f"error:{r['case']}"] = f"{type(e).__name__}: {e}"
    torch.save(out, os.path.join(work, job.get("result", "logits.pt")))


if __name__ == "__main__":
    main()
