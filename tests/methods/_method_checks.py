"""Checks shared by the method tests (imported as ``from _method_checks import ...``, like conftest)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.api import adapter_state_dict, get_record
from adapterkit.errors import ConfigError, UnsupportedModuleError


# -- model surgery ---------------------------------------------------------------------------
def random_biases(model: nn.Module) -> nn.Module:
    """The tiny models start with zero biases: make them random so that bias scaling is tested."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``path`` of ``model`` (used to build reference models)."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def adapter_pieces(model: nn.Module, name: str = "a") -> dict:
    """The per-host pieces of adapter ``name``."""
    return get_record(model, name).pieces


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every non-adapter tensor in the state dict (to check merge/unmerge against)."""
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapterkit." not in k}


def peft_lora_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s LoRA/DoRA tensors under PEFT's key names (adapter "default")."""
    sd = {}
    for k, v in adapter_state_dict(model, name).items():
        mod, par = k.rsplit(".", 1)
        suffix = "" if par.startswith("lora_embedding") else ".weight"
        sd[f"base_model.model.{mod}.{par}.default{suffix}"] = v
    return sd


# -- assertions ------------------------------------------------------------------------------
def assert_base_restored(model: nn.Module, base: dict[str, torch.Tensor], atol: float | None = None) -> None:
    """Every tensor in ``base`` (see base_weights) is back: bit-exact, or allclose at ``atol`` if given."""
    for k, v in model.state_dict().items():
        if k in base:
            if atol is None:
                assert torch.equal(v, base[k]), k
            else:
                assert torch.allclose(v, base[k], atol=atol), k


def assert_merge_round_trip(model: nn.Module, name: str, ids: torch.Tensor, restore_atol: float | None = None):
    """Merging adapter ``name`` keeps the logits on ``ids`` (max abs diff < 1e-4), and unmerging it
    restores every base tensor (bit-exact, or allclose at ``restore_atol``; see assert_base_restored).
    Returns (the logits before merging, the base_weights snapshot)."""
    base = base_weights(model)
    with torch.no_grad():
        want = model(ids).logits
        ak.merge(model, name)
        assert (model(ids).logits - want).abs().max() < 1e-4
        ak.unmerge(model, name)
    assert_base_restored(model, base, atol=restore_atol)
    return want, base


def assert_fresh_adapter_is_identity(model: nn.Module, ids: torch.Tensor, config, name: str = "a") -> None:
    """Adding adapter ``name`` with ``config`` leaves the model's first output bit-exactly unchanged."""
    base = model(ids)[0]
    ak.add_adapter(model, name, config)
    torch.testing.assert_close(model(ids)[0], base, rtol=0, atol=0)


def assert_mixed_batch_rows_match(model: nn.Module, ids: torch.Tensor, names: list, atol: float = 1e-5) -> None:
    """Row i of one ``adapter_batch(model, names)`` forward equals row i run alone with adapter
    ``names[i]`` active (None: the base model): |mixed - alone| <= atol + 1e-5 * |alone|.

    Leaves ``names[-1]`` active. Runs under the caller's grad mode (wrap in torch.no_grad() as needed).
    """
    with ak.adapter_batch(model, names):
        mixed = model(ids)[0]
    for i, n in enumerate(names):
        ak.set_adapter(model, n)
        alone = model(ids[i:i + 1])[0]
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=atol,
                                   msg=lambda m, i=i, n=n: f"row {i} (adapter {n!r}): {m}")


def assert_rank_and_embedding_errors(make_config, too_big_r: int, match: str) -> None:
    """On Linear(4, 3) + Embedding(5, 4): r=``too_big_r`` on the Linear is a ConfigError matching ``match``,
    the Embedding is an UnsupportedModuleError, and neither leaves an adapter behind."""
    m = nn.Sequential(nn.Linear(4, 3), nn.Embedding(5, 4))
    with pytest.raises(ConfigError, match=match):
        ak.add_adapter(m, "x", make_config(r=too_big_r, targets=["0"]))
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        ak.add_adapter(m, "x", make_config(r=2, targets=["1"]))
    assert ak.list_adapters(m) == []


def generate_left_padded_batch_and_rows_alone(model: nn.Module):
    """Greedy-generate 4 tokens for rows of length 7 and 5 (the second left-padded by 2), batched and
    each alone. Checks the padded row's tokens equal its run alone, and every step's logits of both rows
    equal their runs alone (atol 1e-5). Returns (batched, [alone_0, alone_1]) for further checks."""
    torch.manual_seed(3)
    a, b = torch.randint(1, 128, (1, 7)), torch.randint(1, 128, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **kw)
        alone = [model.generate(x, attention_mask=torch.ones_like(x), **kw) for x in (a, b)]
    assert both.sequences[1, 2:].tolist() == alone[1].sequences[0].tolist()
    for step, lg in enumerate(both.logits):
        for row in (0, 1):
            torch.testing.assert_close(lg[row], alone[row].logits[step][0], rtol=0, atol=1e-5)
    return both, alone


def assert_decode_step_matches_full_forward(model: nn.Module, ids: torch.Tensor, cache_len: int) -> None:
    """A forward with use_cache returns a cache of ``cache_len`` positions; one decode step on it gives
    the last-position logits of a full forward over ids + the new token (atol 1e-5)."""
    nxt = torch.randint(0, 128, (ids.shape[0], 1))
    with torch.no_grad():
        first = model(ids, use_cache=True)
        assert first.past_key_values.get_seq_length() == cache_len
        mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
        step = model(nxt, past_key_values=first.past_key_values, attention_mask=mask)
        full = model(torch.cat([ids, nxt], dim=1)).logits
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=0, atol=1e-5)
