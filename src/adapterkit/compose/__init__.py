"""Combining adapters: composition blocks and the merging algebra."""
from .blocks import Average, Parallel, Stack
from .merge import merge_adapters
from .fusion import Fuse, FusionConfig, add_fusion
from .scalearn import ScaLearn, ScaLearnConfig, add_scalearn
from .shared import SharedAdapterConfig
from .hyper import HyperformerConfig
from .routing import task_ids

__all__ = ["Average", "Stack", "merge_adapters"]
__all__ += ["Parallel", "Fuse", "FusionConfig", "add_fusion", "ScaLearn", "ScaLearnConfig", "add_scalearn", "SharedAdapterConfig", "HyperformerConfig", "task_ids"]
