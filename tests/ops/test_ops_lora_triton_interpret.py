"""Triton BGMV / SGMV kernels vs the torch reference WITHOUT a GPU: Triton's interpreter
(TRITON_INTERPRET=1) runs the kernel bodies with numpy on CPU tensors.

Interpret mode is process-wide and fixed when triton is IMPORTED: `triton.jit` reads
TRITON_INTERPRET at decoration time, for our kernels and for triton's own standard library
(`tl.zeros`, ...), and an interpreted kernel calling a compiled `tl.zeros` fails. Setting the
variable inside the pytest process would therefore either come too late (triton already
imported) or turn the CUDA tests in test_ops_lora_triton.py into interpreted ones. So:

  * the kernel tests below run only in a process started with TRITON_INTERPRET=1
    (`TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/ops/test_ops_lora_triton_interpret.py`);
  * in a normal run they are skipped and `test_interpreter_suite_in_subprocess` runs this file
    in a child pytest with the variable set, and fails with the child's output if any failed.

Shapes are small (the interpreter is slow) but cross every block edge: in / out / R not
multiples of the block sizes, several R / K / N blocks, SGMV segments longer than one tile.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from adapterkit.ops.lora import add_lora_ref, make_plan

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")


def test_interpreter_suite_in_subprocess():
    if INTERPRETED:
        pytest.skip("this is the child process")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    # every kernel test ran and passed; only this driver is skipped in the child
    assert proc.returncode == 0 and re.search(r"\b\d+ passed, 1 skipped in ", out), out[-6000:]


@pytest.fixture(scope="module")
def lt() -> ModuleType:
    from adapterkit.ops import lora_triton

    assert type(lora_triton._sgmv_kernel).__name__ == "InterpretedFunction"
    return lora_triton


# name: (S, R, in, out, slot counts {slot: tokens}, -1 tokens). Blocks: BGMV K 128 / N 128,
# SGMV K 64 / N 64 / M 16 here, R block = next pow2 of R in [16, 64].
CASES = {
    # R 8 < R block 16; in 150: 2 BGMV / 3 SGMV K blocks, ragged; out 140: 2 / 3 N blocks;
    # segments of 17 (two M tiles, ragged), 16 (exactly one) and 1 token
    "ragged": (5, 8, 150, 140, {2: 17, 0: 16, 4: 1, 1: 2}, 3),
    # R 80: two R blocks (64 + ragged 16) in the shrink grid and the expand loop
    "wide_rank": (3, 80, 70, 70, {0: 5, 2: 9}, 2),
    # 40 slots, only high ones used: slot offsets into the stacked tensors
    "many_slots": (40, 16, 48, 24, {39: 3, 33: 18, 7: 1}, 2),
    "one_token": (1, 16, 16, 16, {0: 1}, 0),
}


def _case(name: str, layout: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random problem for CASES[name] in a slot layout:
    stacked: A (S, R, in), B (S, out, R) contiguous (CUDA `LoraSlots`), x and y contiguous;
    views:   A, B transposed views of A^T (S, in, R), B^T (S, R, out) storage (CPU `LoraSlots`),
             x a column-strided view, y a column slice of a wider fused output (`gu[:, :ff]`).
    Mixed ranks: slot s keeps only its first 1 + s % R ranks (zero padding); slot 0 full rank."""
    S, R, din, dout, counts, n_none = CASES[name]
    g = torch.Generator().manual_seed(seed)
    slots = torch.tensor([s for s, c in counts.items() for _ in range(c)] + [-1] * n_none)
    slots = slots[torch.randperm(slots.shape[0], generator=g)]  # a segment's tokens are scattered
    T = slots.shape[0]
    A = torch.randn(S, R, din, generator=g) / din**0.5
    B = torch.randn(S, dout, R, generator=g)
    ranks = torch.tensor([R if s == 0 else 1 + s % R for s in range(S)])
    for s in range(S):
        A[s, ranks[s]:] = 0
        B[s, :, ranks[s]:] = 0
    scale = torch.rand(S, generator=g) + 0.5
    x = torch.randn(T, din, generator=g)
    y = torch.randn(T, dout, generator=g)
    A, B, x, y = A.to(dtype), B.to(dtype), x.to(dtype), y.to(dtype)
    fused = None
    if layout == "views":
        A = A.transpose(1, 2).contiguous().transpose(1, 2)
        B = B.transpose(1, 2).contiguous().transpose(1, 2)
        x = torch.stack([x, torch.full_like(x, float("nan"))], dim=2).view(T, 2 * din)[:, ::2]  # stride 2
        fused = torch.randn(T, dout + 24, generator=g).to(dtype)
        fused[:, :dout] = y
        y = fused[:, :dout]
        assert not (A.is_contiguous() or B.is_contiguous() or x.is_contiguous())  # y too unless T == 1
    return y, x, A, B, scale, slots, ranks, fused


def _run(lt: ModuleType, kind: str, y, x, A, B, scale, slots, ranks):
    plan = make_plan(slots, ranks)
    if kind == "bgmv":
        return lt.bgmv(y, x, A, B, scale, slots)
    if kind == "sgmv":
        return lt.sgmv(y, x, A, B, scale, plan, block_m=16)
    return lt.add_lora_triton(y, x, A, B, scale, plan)


@needs_interpreter
@pytest.mark.parametrize("kind", ["bgmv", "sgmv", "dispatch"])
@pytest.mark.parametrize("layout", ["stacked", "views"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference_fp32(lt, name, layout, kind):
    y, x, A, B, scale, slots, ranks, fused = _case(name, layout)
    y0 = y.clone()
    fused0 = None if fused is None else fused.clone()
    want = add_lora_ref(y.clone(), x, A, B, scale, slots)
    got = _run(lt, kind, y, x, A, B, scale, slots, ranks)
    assert got is y  # in place
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert torch.equal(got[slots < 0], y0[slots < 0])  # no adapter: rows untouched, bit for bit
    if fused is not None:  # the fused neighbour columns past y's slice are never written
        assert torch.equal(fused[:, y.shape[1]:], fused0[:, y.shape[1]:])


@needs_interpreter
@pytest.mark.parametrize("kind", ["bgmv", "sgmv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_low_precision(lt, dtype, kind):
    """fp16 / bf16 storage, fp32 accumulation: within one rounding of y's dtype of the fp32
    reference on the same (rounded) inputs."""
    y, x, A, B, scale, slots, ranks, _ = _case("ragged", "stacked", dtype)
    want = add_lora_ref(y.float(), x, A, B, scale, slots)  # ref computes in fp32 from the rounded inputs
    got = _run(lt, kind, y, x, A, B, scale, slots, ranks)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=torch.finfo(dtype).eps, atol=1e-4)


@needs_interpreter
def test_dispatch_bgmv_for_decode_sgmv_for_prefill(lt, monkeypatch):
    called = []
    for fn in ("bgmv", "sgmv"):
        real = getattr(lt, fn)
        monkeypatch.setattr(lt, fn, lambda *a, _f=real, _n=fn, **k: called.append(_n) or _f(*a, **k))
    g = torch.Generator().manual_seed(1)
    A, B, scale = torch.randn(4, 8, 16, generator=g), torch.randn(4, 24, 8, generator=g), torch.ones(4)
    for slots, kind in ((torch.tensor([3, 0, -1, 1]), "bgmv"), (torch.tensor([1] * 20 + [2] * 20), "sgmv")):
        x, y = torch.randn(slots.shape[0], 16, generator=g), torch.randn(slots.shape[0], 24, generator=g)
        want = add_lora_ref(y.clone(), x, A, B, scale, slots)
        torch.testing.assert_close(lt.add_lora_triton(y, x, A, B, scale, make_plan(slots)), want, rtol=2e-5, atol=2e-5)
        assert called[-1] == kind


@needs_interpreter
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_step_metadata_built_once_and_shared_by_layers(lt, kind):
    """One plan per step: the int32 slots / segment and tile tables are built by the first layer
    and reused (same tensors) by the others, which have other widths and ranks."""
    g = torch.Generator().manual_seed(2)
    slots = torch.tensor([2, 0, -1, 1]) if kind == "decode" else torch.tensor([0] * 18 + [-1] * 3 + [2] * 19)
    plan = make_plan(slots)
    T, seen = slots.shape[0], None
    for din, dout, R in ((24, 40, 8), (40, 24, 4), (33, 70, 16)):
        A, B = torch.randn(3, R, din, generator=g), torch.randn(3, dout, R, generator=g)
        x, y, scale = torch.randn(T, din, generator=g), torch.randn(T, dout, generator=g), torch.rand(3, generator=g)
        want = add_lora_ref(y.clone(), x, A, B, scale, slots)
        torch.testing.assert_close(lt.add_lora_triton(y, x, A, B, scale, plan), want, rtol=2e-5, atol=2e-5)
        entries = [v if isinstance(v, tuple) else (v,) for k, v in plan.memo.items() if k[0].startswith("triton")]
        assert len(entries) == 1
        if seen is not None:
            assert all(a is b for a, b in zip(entries[0], seen, strict=True))
        seen = entries[0]


@needs_interpreter
def test_bad_inputs_raise_value_error_naming_the_tensor(lt):
    A, B, scale = torch.zeros(2, 4, 16), torch.zeros(2, 8, 4), torch.ones(2)
    x, y, slots = torch.zeros(3, 16), torch.zeros(3, 8), torch.tensor([0, 1, -1])
    with pytest.raises(ValueError, match=r"x has shape \(3, 12\), expected \(3, 16\)"):
        lt.bgmv(y, x[:, :12], A, B, scale, slots)
    with pytest.raises(ValueError, match="y has shape"):
        lt.sgmv(y[:2], x, A, B, scale, make_plan(slots))
    with pytest.raises(ValueError, match=r"B has shape \(2, 8, 3\)"):
        lt.add_lora_triton(y, x, A, B[:, :, :3], scale, make_plan(slots))
    with pytest.raises(ValueError, match="scale has shape"):
        lt.bgmv(y, x, A, B, torch.ones(3), slots)
    with pytest.raises(ValueError, match="A is on meta"):
        lt.bgmv(y, x, A.to("meta"), B, scale, slots)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        lt.sgmv(y, x, A, B, scale, make_plan(slots), block_m=8)


def _lora(model, r: int, seed: int) -> SimpleNamespace:
    """In-memory LoRA on every attention and MLP projection (native key names), random A and B."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for m in names:
                lin = getattr(getattr(layer, part), m)
                tensors[f"model.layers.{i}.{part}.{m}.lora_A"] = torch.randn(r, lin.in_features, generator=g) * 0.3
                tensors[f"model.layers.{i}.{part}.{m}.lora_B"] = torch.randn(lin.out_features, r, generator=g) * 0.3
    cfg = {"r": r, "alpha": float(2 * r), "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]}
    return SimpleNamespace(method="lora", config=cfg, tensors=tensors)


@needs_interpreter
@pytest.mark.parametrize("slot_layout", ["stacked", "transposed"])
def test_engine_through_triton_kernels_matches_cpu_path(lt, monkeypatch, slot_layout):
    """The serving engine with the Triton kernels as its LoRA backend (what runs on CUDA: the
    runner's column slices of the fused qkv / gate-up outputs, pre-scaled slots with scale=None,
    plans with true ranks, prefill through SGMV and decode through BGMV) generates exactly the
    tokens of the CPU path. stacked: the CUDA slot layout; transposed: the CPU one."""
    from conftest import tiny_llama

    from adapterkit.ops import lora as lora_ops
    from adapterkit.serve.engine import Engine
    from adapterkit.serve.types import EngineConfig, SamplingParams

    model = tiny_llama(seed=5)
    model.generation_config.eos_token_id = None
    adapters = {f"a{r}": _lora(model, r, seed=r) for r in (2, 4, 8)}
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=rng).tolist() for n in (1, 7, 20, 3, 12, 5)]
    names = ["a2", None, "a8", "a4", "a2", "a8"]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def generate(adapter_names):
        eng = Engine(model, config=EngineConfig(max_loras=4, block_size=4, num_pages=64))
        eng.slots.transposed = slot_layout == "transposed"  # no slot allocated yet: sets the layout
        try:
            for n, ad in adapters.items():
                eng.register_adapter(n, ad)
            return [o.token_ids for o in eng.generate_sync(prompts, adapter_names, greedy)]
        finally:
            eng.shutdown()

    want = generate(names)
    assert want != generate([None] * len(prompts))  # the adapters change the output: the check can fail
    called = []
    for fn in ("bgmv", "sgmv"):
        real = getattr(lt, fn)
        monkeypatch.setattr(lt, fn, lambda *a, _f=real, _n=fn, **k: called.append(_n) or _f(*a, **k))
    monkeypatch.setitem(lora_ops.BACKENDS, "cpu", lt.add_lora_triton)
    assert generate(names) == want
    assert {"bgmv", "sgmv"} <= set(called)
