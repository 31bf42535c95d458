"""LoRA on a weight-only quantized base, with low-rank error correction.

* INT2.1 / LREC (Chai et al., 2023, "INT2.1: Towards Fine-Tunable Quantized Large Language
  Models with Error Correction through Low-Rank Adaptation", https://arxiv.org/abs/2306.08162):
  the targeted base weights are quantized (here int8 / int4, per-channel or group-wise,
  absmax or min-max: :mod:`adapterkit.quant.uniform`) and a LoRA is trained on top; the LoRA
  corrects the quantization error. ``init="lrec"`` starts it at the best rank-r correction
  of the error, data-free (Eckart-Young; LoftQ's one-step init)::

      E = W - deq(Q(W)) = U S V^T,   B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T
      => ||W - (deq + s B A)||_F = sqrt(sum_{i > r} S_i^2)   (minimal over rank-r corrections)

  The paper's LREC then *trains* the LoRA to match the fp model's outputs; do that with any
  trainer and a distillation loss (the tests do it on a toy model).
* Merge-then-quantize (QA-LoRA / EfficientDM "QALoRA", https://arxiv.org/abs/2310.03270):
  ``merge`` folds the LoRA into the quantized weight and RE-QUANTIZES, so the merged host
  holds an int weight again: ``W' = deq(Q(deq(Q(W)) + s B A))``. This merge is LOSSY: its
  relative error ``||W' - (deq + s B A)||_F / ||deq + s B A||_F`` is stored in
  ``piece.merge_error`` (and :func:`merge_errors`) and logged. While merged, the original fp
  weight is kept aside so that ``unmerge`` restores it exactly (``merge_and_unload`` drops it);
  ``piece.int_weight()`` gives the merged int codes and scales.

The quantized base is a property of the adapter: while it runs, its host computes
``deq(Q(W)) x + b + s B A dropout(x)``; with the adapter inactive (or on the other rows of a
mixed batch) the host is the fp base again. The host keeps its original fp weight (the one fp
copy; ``delete_adapter`` leaves it as it was); the piece keeps the int codes and scales as
non-persistent buffers (``qweight`` int8/uint8 one code per byte, ``qscale``, ``qzero``, one
per group) and dequantizes on the fly: the forward adds ``(deq - W) x`` to the host's output
(one extra matmul per call, no second fp weight kept).

Files: the LoRA tensors (as plain LoRA) + the quantization config (bits, group_size, scheme);
the base is re-quantized deterministically at load. Trainable parameters: ``r (in + out)`` per
host (+ ``out`` with ``bias``), as LoRA. Limits: two qlora adapters active on one host at once
would each apply the correction (activate one at a time); the codes are taken from the weight
at attach time, so another adapter merged into the same host later is not seen while this one
runs (its correction ``deq - W`` cancels it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NotMergeableError, UnsupportedModuleError
from ..inject import is_linear_like, linear_layers_except_head, resolve_targets
from ..quant import INT_BITS, SCHEMES, check_bits, check_group_size, dequantize_int, num_groups, quantize_int
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora import BASE_CHANGING_INITS, DEFAULT_TARGETS, LoRAConfig, LoRALinear, tied_weights

log = logging.getLogger("adapterkit.qlora")


@dataclass(frozen=True)
class QLoRAConfig(LoRAConfig):
    """LoRA on a quantized base. LoRA's fields, plus:

    bits: 8 or 4: the base weights' width.
    group_size: -1 = per output channel (default), k > 0 = row-wise groups of k inputs
        (k must divide in_features), None = one scale per matrix.
    scheme: "absmax" (symmetric, codes in [-(2^(b-1)-1), 2^(b-1)-1]) or "minmax"
        (asymmetric with a zero-point, codes in [0, 2^b - 1]).
    init: LoRA's "kaiming" / "gaussian" / "random", or "lrec" (default): the best rank-r
        correction of the quantization error (SVD of W - deq(Q(W))).
    """

    method = "qlora"
    bits: int = 4
    group_size: int | None = -1
    scheme: str = "absmax"
    init: str = "lrec"  # type: ignore[assignment]

    def __post_init__(self) -> None:
        name = type(self).__name__
        lrec = self.init == "lrec"
        if lrec:  # LoRAConfig validates init against its own list
            object.__setattr__(self, "init", "kaiming")
        try:
            super().__post_init__()
        finally:
            if lrec:
                object.__setattr__(self, "init", "lrec")
        if self.init in BASE_CHANGING_INITS:
            raise ConfigError(f"{name}.init={self.init!r} rewrites the base weight; use 'lrec', 'kaiming' or 'gaussian'")
        check_bits(self.bits, INT_BITS, f"{name}.bits")
        check_group_size(self.group_size, f"{name}.group_size")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"{name}.scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")

    def for_loading(self) -> "QLoRAConfig":
        # the saved A, B overwrite the factors: skip the SVD
        return self.replace(init="kaiming") if self.init == "lrec" else self  # type: ignore[return-value]


class QLoRALinear(LoRALinear):
    """LoRA on a Linear / Conv1D whose weight runs as ``deq(Q(W))`` while the adapter is active."""

    def __init__(self, host: nn.Module, cfg: QLoRAConfig) -> None:
        super().__init__(host, cfg)  # _initialise leaves A = B = 0 for "lrec" (done below)
        self.bits, self.group_size, self.scheme = cfg.bits, cfg.group_size, cfg.scheme
        w = self.weight_2d().detach()  # (out, in)
        num_groups(tuple(w.shape), cfg.group_size, f"{type(host).__name__} weight")
        codes, scale, zero = quantize_int(w, cfg.bits, cfg.group_size, cfg.scheme)
        # recomputable from the base + config: never saved
        self.register_buffer("qweight", codes, persistent=False)  # (out, in) int8 / uint8
        self.register_buffer("qscale", scale, persistent=False)  # (G,)
        self.register_buffer("qzero", zero, persistent=False)  # (G,)
        self.merge_error: float | None = None
        self._stash: torch.Tensor | None = None
        if cfg.init == "lrec":
            self._lrec_init()

    def _initialise(self, init: str) -> None:
        if init != "lrec":
            super()._initialise(init)

    def _lrec_init(self) -> None:
        """A, B = the top-r SVD factors of E = W - deq, split so that s B A = E_r."""
        W = self.weight_2d().detach().float()
        E = W - self.deq_2d()  # (out, in)
        r, s = self.r, self.scaling
        if r > min(E.shape):
            raise ConfigError(f"qlora lrec init: r={r} exceeds min(out, in)={min(E.shape)} of a weight {tuple(E.shape)}")
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        root = torch.sqrt(S[:r] / s)
        with torch.no_grad():
            self.lora_A.copy_((root[:, None] * Vh[:r]).to(self.lora_A.dtype))
            self.lora_B.copy_((U[:, :r] * root[None, :]).to(self.lora_B.dtype))

    # -- the quantized base --------------------------------------------------------------
    def deq_2d(self) -> torch.Tensor:
        """deq(Q(W)), float32 (out, in)."""
        return dequantize_int(self.qweight, self.qscale, self.qzero, self.group_size)

    def int_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero) of the base's int weight: after ``merge``, the re-quantized merged one."""
        if self.merged:
            return self.mweight, self.mscale, self.mzero
        return self.qweight, self.qscale, self.qzero

    def forward_post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # the host computed W x + b; make it deq x + b: add (deq - W) x, then the LoRA branch
        err = self.deq_2d() - self.weight_2d().detach().float()  # (out, in)
        base = F.linear(x.to(torch.float32), err).to(y.dtype)  # (..., out)
        return y + base + self.lora_out(self.dropout(x)).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """deq - W + s B A in the host's layout and dtype: the piece's exact (unquantized) effect.
        Formed in fp32 (deq - W is a small difference), cast back to W's dtype once."""
        w = self.host.weight
        d = self.deq_2d() - self.weight_2d().detach().float() + (self.b_2d().float() @ self.a_2d().float()) * self.scaling
        return self.to_host_layout(d).to(w.dtype)

    # -- merge then quantize ---------------------------------------------------------------
    def merge(self) -> None:
        self.check_mergeable()
        host = self.host
        if self.lora_bias is not None and getattr(host, "bias", None) is None:
            raise NotMergeableError(
                f"cannot merge a LoRA bias into {type(host).__name__} {tuple(host.weight.shape)}: it has no bias"
            )
        with torch.no_grad():
            target = self.deq_2d() + (self.b_2d().float() @ self.a_2d().float()) * self.scaling  # (out, in)
            codes, scale, zero = quantize_int(target, self.bits, self.group_size, self.scheme)
            merged = dequantize_int(codes, scale, zero, self.group_size)
            self.merge_error = float(torch.linalg.norm(merged - target) / torch.linalg.norm(target).clamp_min(1e-30))
            w = host.weight
            self._stash = w.detach().clone()  # the exact weight to give back on unmerge
            w.copy_(self.to_host_layout(merged).to(w.dtype))
        self.register_buffer("mweight", codes, persistent=False)
        self.register_buffer("mscale", scale, persistent=False)
        self.register_buffer("mzero", zero, persistent=False)
        self._merge_bias(+1)
        self.merged = True
        log.info("qlora merge re-quantized %s to int%d: relative error %.3e (lossy)",
                 type(host).__name__, self.bits, self.merge_error)

    def unmerge(self) -> None:
        assert self._stash is not None
        with torch.no_grad():
            self.host.weight.copy_(self._stash)
        self._stash = None
        for n in ("mweight", "mscale", "mzero"):
            delattr(self, n)
        self._merge_bias(-1)
        self.merged = False


def merge_errors(model: nn.Module, name: str) -> dict[str, float]:
    """Relative Frobenius error of the last merge-then-quantize of each host of adapter ``name``."""
    from ..state import get_state  # local: state imports methods.base only, but keep methods light

    rec = get_state(model).record(name)
    return {h: p.merge_error for h, p in rec.pieces.items() if isinstance(p, QLoRALinear) and p.merge_error is not None}


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, QLoRAConfig)
    what = f"qlora adapter {name!r}"
    hosts = resolve_targets(model, cfg.targets, accept=lambda n, m: is_linear_like(m), defaults=DEFAULT_TARGETS,
                            fallback=linear_layers_except_head, what=what)
    mods = dict(model.named_modules())
    tied = tied_weights(model, {h: mods[h] for h in hosts})
    pieces: dict[str, AdapterModule] = {}
    for h in hosts:
        if not is_linear_like(mods[h]):
            raise UnsupportedModuleError(f"{what} quantizes Linear / Conv1D weights, not {h!r} ({type(mods[h]).__name__})")
        if not mods[h].weight.is_floating_point():
            raise UnsupportedModuleError(f"{what}: {h!r} already has a {mods[h].weight.dtype} weight")
        p = QLoRALinear(mods[h], cfg)
        p.tied_with = tied.get(h)
        pieces[h] = p
    return pieces


register(MethodSpec(name="qlora", config_cls=QLoRAConfig, attach=attach, mergeable=True,
                    paper="INT2.1: Fine-Tunable Quantized LLMs with Error Correction through Low-Rank Adaptation "
                          "(Chai et al., 2023); EfficientDM / QALoRA merge-then-quantize (He et al., 2023)"))
