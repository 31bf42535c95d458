"""Combining adapters: composition blocks, fusion/scaling over trained adapters, routing and
mixtures of experts, shared and generated weights, and the merging algebra."""
from .blocks import Average, Parallel, Stack
from .fusion import Fuse, FusionConfig, add_fusion
from .hyper import HyperformerConfig
from .merge import merge_adapters
from .moe import MeteoRAConfig, MixDAConfig, last_gates, meteora, mixda, routing_loss
from .routing import PolyConfig, new_task_adapter, set_trainable, task_ids, task_lora
from .scalearn import ScaLearn, ScaLearnConfig, add_scalearn
from .shared import SharedAdapterConfig

__all__ = [
    "Average", "Fuse", "FusionConfig", "HyperformerConfig", "MeteoRAConfig", "MixDAConfig", "Parallel",
    "PolyConfig", "ScaLearn", "ScaLearnConfig", "SharedAdapterConfig", "Stack", "add_fusion", "add_scalearn",
    "last_gates", "merge_adapters", "meteora", "mixda", "new_task_adapter", "routing_loss", "set_trainable",
    "task_ids", "task_lora",
]
