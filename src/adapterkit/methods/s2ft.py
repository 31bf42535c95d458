"""S2FT: Structured Sparse Fine-Tuning (Yang et al., 2024, https://arxiv.org/abs/2412.06289,
"S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity").

S2FT "selects sparsely and computes densely": in every block it selects a few attention
heads and a few FFN channels, and updates only the dense sub-matrices of the *output*
projections that read them:

* attention: the columns of the output projection W_o (out, n_heads * head_dim) belonging to
  the selected heads, ``cols = [h * head_dim, (h + 1) * head_dim)`` for each selected h;
* FFN: the columns of the down projection W_down (out, intermediate) of the selected channels.

Updating the output side only means backward needs just the selected heads' / channels'
activations ``x[..., cols]`` (the reason the paper picks W_o and W_down). Here each update is
a :class:`~adapterkit.methods.paca.ColumnDeltaPiece`: a fixed column index ``s2ft_cols``
(persistent, saved) and the trainable change ``s2ft_delta`` (out, |cols|) of those columns::

    W'[:, cols] = W[:, cols] + delta,        y = x W^T + b + x[..., cols] delta^T

so it is an adapter like any other: several coexist, mixed batches work, merge is exact, the
file holds only the diff. Trainable parameters: ``out * heads * head_dim`` per attention
output projection plus ``out * channels`` per FFN down projection.

Selection (``S2FTConfig.selection``): "random" (the paper's default, S2FT-R) or "weight" (the
heads / channels whose columns of the output projection have the largest squared L2 norm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import is_linear_like, resolve_targets
from ..registry import MethodSpec, register
from .base import AdapterConfig, AdapterModule
from .lora import tied_weights
from .lora_xs import LinearPiece
from .paca import ColumnDeltaPiece, host_generator

#: attention output projections, first that matches wins
ATTN_OUT_TARGETS: tuple[tuple[str, ...] | str, ...] = (
    ("o_proj",),  # Llama, Mistral, Qwen2, OPT-style
    ("attn.c_proj",),  # GPT-2
    ("attention.output.dense",),  # BERT, RoBERTa, ViT
    ("out_proj",),  # OPT, BART, CLIP
)
#: FFN down projections, first that matches wins
FFN_DOWN_TARGETS: tuple[tuple[str, ...] | str, ...] = (
    ("down_proj",),  # Llama, Mistral, Qwen2
    ("mlp.c_proj",),  # GPT-2
    r".*layer\.\d+\.output\.dense",  # BERT, RoBERTa, ViT (not attention.output.dense)
    ("fc2",),  # OPT, BART, CLIP
)
SELECTIONS = ("random", "weight")


@dataclass(frozen=True)
class S2FTConfig(AdapterConfig):
    """S2FT hyper-parameters.

    targets: attention output projections (default: :data:`ATTN_OUT_TARGETS`).
    ffn_targets: FFN down projections (default: :data:`FFN_DOWN_TARGETS`).
    heads: heads selected per attention output projection (0: none).
    channels: FFN channels selected per down projection (0: none).
    head_dim: width of one head in the output projection's input; None reads the model's
    config (``head_dim``, else ``hidden_size // num_attention_heads``).
    selection: "random" or "weight" (largest column-norm heads/channels).
    seed: seeds the random selection (combined with the module path); the selection is
    saved with the adapter, so loading never redraws it.
    """

    method = "s2ft"
    heads: int = 1
    channels: int = 16
    ffn_targets: tuple[str, ...] | str | None = None
    head_dim: int | None = None
    selection: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for f in ("heads", "channels", "seed"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name}.{f} must be an integer >= 0, got {v!r}")
        if self.heads == 0 and self.channels == 0:
            raise ConfigError(f"{name}: heads and channels are both 0, nothing would train")
        hd = self.head_dim
        if hd is not None and (not isinstance(hd, int) or isinstance(hd, bool) or hd < 1):
            raise ConfigError(f"{name}.head_dim must be an integer >= 1 or None, got {hd!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"{name}.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        t = self.ffn_targets
        if isinstance(t, (list, tuple)):
            if not t or not all(isinstance(x, str) and x for x in t):
                raise ConfigError(f"{name}.ffn_targets must be non-empty names, a regex string or None, got {t!r}")
            object.__setattr__(self, "ffn_targets", tuple(t))
        elif t is not None and not (isinstance(t, str) and t):
            raise ConfigError(f"{name}.ffn_targets must be a list of names, a regex string or None, got {t!r}")


class S2FTPiece(ColumnDeltaPiece):
    PREFIX = "s2ft"


def model_head_dim(model: nn.Module, cfg: S2FTConfig) -> int:
    if cfg.head_dim is not None:
        return cfg.head_dim
    mc = getattr(model, "config", None)
    hd = getattr(mc, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    hidden = getattr(mc, "hidden_size", None) or getattr(mc, "n_embd", None)
    heads = getattr(mc, "num_attention_heads", None) or getattr(mc, "n_head", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    raise ConfigError(f"s2ft cannot tell the head size of {type(model).__name__}; pass S2FTConfig(head_dim=...)")


def select_groups(w2: torch.Tensor, group: int, count: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """Columns of the ``count`` selected groups of ``group`` consecutive input columns of
    ``w2`` (out, in): sorted (count * group,) long."""
    n = w2.shape[1] // group
    if how == "random":
        picked = torch.randperm(n, generator=gen)[:count]
    else:  # "weight": the groups whose columns carry the most weight (squared L2 norm)
        score = w2.detach().float().pow(2).sum(0).reshape(n, group).sum(1)
        picked = torch.topk(score, count).indices
    picked = picked.sort().values
    return (picked[:, None] * group + torch.arange(group)[None, :]).reshape(-1)


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, S2FTConfig)
    what = f"s2ft adapter {name!r}"
    accept = lambda n, m: is_linear_like(m)  # noqa: E731
    mods = dict(model.named_modules())
    groups: dict[str, tuple[str, int, int]] = {}  # host -> (kind, group width, count)
    if cfg.heads:
        hd = model_head_dim(model, cfg)
        for h in resolve_targets(model, cfg.targets, accept=accept, defaults=ATTN_OUT_TARGETS, what=what):
            groups[h] = ("head", hd, cfg.heads)
    if cfg.channels:
        for h in resolve_targets(model, cfg.ffn_targets, accept=accept, defaults=FFN_DOWN_TARGETS, what=what):
            if h in groups:
                raise ConfigError(f"{what}: module {h!r} matches both targets (attention) and ffn_targets (FFN)")
            groups[h] = ("channel", 1, cfg.channels)
    hosts = {h: mods[h] for h in groups}
    tied = tied_weights(model, hosts)
    pieces: dict[str, AdapterModule] = {}
    for h, (kind, width, count) in groups.items():
        geo = LinearPiece(hosts[h], cfg.method)
        n_in = geo.in_features
        if n_in % width:
            raise ConfigError(f"{what}: in_features={n_in} of {h!r} is not a multiple of head_dim={width}")
        if count > n_in // width:
            raise ConfigError(f"{what}: {kind}s={count} exceeds the {n_in // width} {kind}s of {h!r} "
                              f"(weight {tuple(hosts[h].weight.shape)})")
        cols = select_groups(geo.weight_2d(), width, count, cfg.selection, host_generator(cfg.seed, h))
        p = S2FTPiece(hosts[h], cfg.method, cols)
        p.tied_with = tied.get(h)
        pieces[h] = p
    return pieces


register(MethodSpec(name="s2ft", config_cls=S2FTConfig, attach=attach, mergeable=True,
                    paper="S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity "
                          "(Yang et al., 2024)"))
