"""Hyperformer++ (Karimi Mahabadi et al., 2021, "Parameter-efficient Multi-task Fine-tuning for
Transformers via Shared Hypernetworks", https://arxiv.org/abs/2106.04489).

One hypernetwork, shared by every adapter site of the model, generates each site's
bottleneck adapter from the row's task and the site's index::

    I      = P([z_task ; e_site])                          P: Linear(t + l, hid) -> ReLU -> Linear(hid, p)
    W_down = (G_dw I).view(b, d_in),   b_down = G_db I      G_*: Linear(p, .) with bias
    W_up   = (G_uw I).view(d_out, b),  b_up   = G_ub I
    a(h)   = W_up act(W_down h + b_down) + b_up

``z_task`` (T, t): learned task embeddings; ``e_site`` (L, l): learned embeddings of the L
adapter sites (the paper's layer-id and adapter-position embeddings, one per site). The
adapters sit like :mod:`adapterkit.methods.bottleneck` ones (``mode``: series "pfeiffer" /
"houlsby", or "parallel"); every site must have the same widths. ``G_uw`` and ``G_ub`` start
at zero, so a fresh model is the base model (the house convention for adapters; the paper
draws them at random), and the paper's conditional layer norms are not generated.

All parameters are in one piece on the root model (keys ``adapterkit.<name>.*``, saved
without prefix); the per-site pieces hold none. Trainable parameters (exact)::

    T t + L l + (t + l) hid + hid + hid p + p
      + (p + 1) b d_in + (p + 1) b + (p + 1) d_out b + (p + 1) d_out

Task ids: ``with ak.compose.task_ids(model, ids):``, one per batch row (not needed when
``n_tasks == 1``). Weights are generated once per distinct task in the batch, per site.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..methods.base import AdapterConfig, AdapterModule
from ..registry import MethodSpec, register
from .routing import TaskContext, task_context
from .shared import TaskRowPiece, adapter_sites, bottleneck_rows, bottleneck_width, check_bottleneck_fields, check_int


@dataclass(frozen=True)
class HyperformerConfig(AdapterConfig):
    """A shared hypernetwork generating every site's adapter from (task, site).

    n_tasks: T. task_dim: t, task embedding width. site_dim: l, site (layer id) embedding width.
    hidden_dim: hid, the task projector's hidden width. proj_dim: p, the projected embedding I.
    mode / reduction_factor / bottleneck_size / non_linearity: the generated adapters, as in
    BottleneckConfig (bottleneck b = d_in // reduction_factor unless bottleneck_size).
    """

    method = "hyperformer"
    n_tasks: int = 1
    task_dim: int = 64
    site_dim: int = 16
    hidden_dim: int = 128
    proj_dim: int = 64
    mode: str = "pfeiffer"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("n_tasks", "task_dim", "site_dim", "hidden_dim", "proj_dim"):
            check_int(self, f)
        check_bottleneck_fields(self)


class HyperNetwork(AdapterModule):
    """The shared parameters, on the root model; no hooks of its own."""

    has_post = False

    def __init__(self, cfg: HyperformerConfig, n_sites: int, d_in: int, d_out: int, like: nn.Module) -> None:
        super().__init__()
        w = next(like.parameters(), None)
        kw = {"device": w.device if w is not None else None,
              "dtype": w.dtype if w is not None and w.is_floating_point() else None}
        b = bottleneck_width(cfg, d_in)
        self.b, self.d_in, self.d_out = b, d_in, d_out
        t, l, hid, p = cfg.task_dim, cfg.site_dim, cfg.hidden_dim, cfg.proj_dim
        self.task_embedding = nn.Parameter(torch.randn(cfg.n_tasks, t, **kw))  # (T, t)
        self.site_embedding = nn.Parameter(torch.randn(n_sites, l, **kw))  # (L, l)
        self.projector = nn.Sequential(nn.Linear(t + l, hid, **kw), nn.ReLU(), nn.Linear(hid, p, **kw))
        self.down_weight = nn.Linear(p, b * d_in, **kw)
        self.down_bias = nn.Linear(p, b, **kw)
        self.up_weight = nn.Linear(p, d_out * b, **kw)
        self.up_bias = nn.Linear(p, d_out, **kw)
        with torch.no_grad():
            for g in (self.down_weight, self.down_bias):
                nn.init.normal_(g.weight, std=1e-2)  # the authors' init_linear_layer
                nn.init.zeros_(g.bias)
            for g in (self.up_weight, self.up_bias):  # zero: every generated adapter starts as the identity
                nn.init.zeros_(g.weight)
                nn.init.zeros_(g.bias)

    def generate(self, tasks: torch.Tensor, site: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adapter weights of ``tasks`` (U,) at site ``site``:
        W_down (U, b, d_in), b_down (U, b), W_up (U, d_out, b), b_up (U, d_out)."""
        U = tasks.shape[0]
        z = self.task_embedding[tasks]  # (U, t)
        e = self.site_embedding[site].expand(U, -1)  # (U, l)
        i = self.projector(torch.cat([z, e], dim=-1))  # (U, p)
        return (self.down_weight(i).view(U, self.b, self.d_in), self.down_bias(i),
                self.up_weight(i).view(U, self.d_out, self.b), self.up_bias(i))


class HyperPiece(TaskRowPiece):
    """One site: runs the adapter the shared hypernetwork generates for (row task, this site)."""

    def __init__(self, host: nn.Module, net: HyperNetwork, site: int, reads_input: bool, act: str,
                 ctx: TaskContext, n_tasks: int, who: str) -> None:
        super().__init__(ctx, n_tasks, reads_input, who)
        self.bind(host)
        self.site, self.act_name = site, act
        # a plain attribute, not a submodule: the network is saved and counted once, at the root
        object.__setattr__(self, "_net", net)

    def task_adapter(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        net: HyperNetwork = self.__dict__["_net"]
        uniq, inv = torch.unique(ids, return_inverse=True)  # generate once per distinct task
        wd, bd, wu, bu = net.generate(uniq.to(net.task_embedding.device), self.site)
        return bottleneck_rows(h.to(wd.dtype), wd[inv], bd[inv], wu[inv], bu[inv], self.act_name)


def attach(model: nn.Module, name: str, cfg: AdapterConfig) -> dict[str, AdapterModule]:
    assert isinstance(cfg, HyperformerConfig)
    what = f"hyperformer adapter {name!r}"
    sites = adapter_sites(model, cfg, what)
    dims = {h: (d_in, d_out) for h, _, d_in, d_out, _ in sites}
    if len(set(dims.values())) > 1:
        raise ConfigError(f"{what}: one hypernetwork generates every site's adapter, so every site needs the same "
                          f"(input, output) widths; got {dims}")
    d_in, d_out = next(iter(dims.values()))
    net = HyperNetwork(cfg, len(sites), d_in, d_out, sites[0][1])
    ctx = task_context(model)
    pieces: dict[str, AdapterModule] = {"": net}
    for k, (h, mod, _, _, reads_x) in enumerate(sites):
        pieces[h] = HyperPiece(mod, net, k, reads_x, cfg.non_linearity.lower(), ctx, cfg.n_tasks, what)
    return pieces


register(MethodSpec(name="hyperformer", config_cls=HyperformerConfig, attach=attach, mergeable=False,
                    paper="Parameter-efficient Multi-task Fine-tuning for Transformers via Shared Hypernetworks "
                          "(Karimi Mahabadi et al., 2021)"))

__all__ = ["HyperformerConfig", "HyperNetwork", "HyperPiece"]
