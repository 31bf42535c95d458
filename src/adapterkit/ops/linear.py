"""Dense `x @ W.T` for the serving forward, through oneDNN on CPU. Imports only torch.

On this project's CPUs (AMD EPYC with AVX-512), torch's default fp32 CPU matmul goes to MKL,
which does not use AVX-512 there. At serving shapes (48 decode rows x SmolLM2 widths, 2 cores)
it reaches ~185 GFLOP/s. oneDNN (torch's `mkldnn` ops, the ones `torch.compile`'s CPU backend
emits) reaches ~270 with the plain weight, ~330 with the weight prepacked into oneDNN's blocked
layout, and ~2.2x MKL on a 768-row prefill. bf16 matmuls already go through oneDNN; prepacking
still helps them (~490 -> ~600 GFLOP/s). Figures: docs/benchmarks.md ("Roofline").

    w = prepack(weight, rows_hint=48)   # or keep `weight` (shares the model's storage)
    y = linear(x, w)                    # == linear_ref(x, weight) to fp32 rounding

`prepack` returns a tensor only `linear` can read (oneDNN layout), a copy of the weight:
`serve.runner.ModelRunner` prepacks the copies it owns anyway (a model served in another
dtype) and, with `EngineConfig.cpu_prepack`, also weights it would otherwise share with the model.
"""
from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.bfloat16)


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The reference: x (..., in) @ w (out, in).T -> (..., out)."""
    return x @ w.T


def onednn_available() -> bool:
    """torch was built with oneDNN (mkldnn) and has its linear op."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_ok(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype in _DTYPES and w.dim() == 2 and onednn_available()
            and (w.is_mkldnn or w.is_contiguous()))


def prepack(w: torch.Tensor, rows_hint: int = 48) -> torch.Tensor:
    """`w` (out, in) in oneDNN's blocked layout for `linear` (a copy), tuned for `rows_hint` rows
    of x; `w` itself where oneDNN cannot take it (not CPU, another dtype, no oneDNN build)."""
    if not _onednn_ok(w) or w.is_mkldnn:
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w (out, in).T -> (..., out) in x's dtype; w plain or from `prepack`.

    Raises:
        ValueError: the shapes or dtypes do not match (names both).
    """
    if x.shape[-1] != w.shape[1] or x.dtype != w.dtype:
        raise ValueError(f"linear: x {tuple(x.shape)} {x.dtype} does not fit weight {tuple(w.shape)} {w.dtype} "
                         "(x's last dim must equal the weight's in_features, same dtype)")
    # plain bf16 weights: torch's matmul already calls oneDNN, and measured as fast
    if x.device.type == "cpu" and (w.is_mkldnn or (w.dtype == torch.float32 and _onednn_ok(w))):
        return torch.ops.mkldnn._linear_pointwise(x if x.is_contiguous() else x.contiguous(), w, None, "none", [], "")
    return x @ w.T


def linear_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`torch.nn.functional.linear(x, w, b)` with `linear`'s fp32 oneDNN path (a drop-in for an
    `nn.Linear`'s forward: any dtype mix `F.linear` takes, shapes checked by torch)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and _onednn_ok(w)
            and x.shape[-1] == w.shape[1] and (b is None or b.dtype == torch.float32)):
        return torch.ops.mkldnn._linear_pointwise(x if x.is_contiguous() else x.contiguous(), w, b, "none", [], "")
    return torch.nn.functional.linear(x, w, b)
