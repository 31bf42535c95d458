"""Pure tensor kernels (import only torch). Each kernel has a plain reference beside it."""
from adapterkit.ops.lora import (
    BACKENDS,
    LoraPlan,
    add_lora,
    add_lora_cpu,
    add_lora_bgmv,
    add_lora_grouped,
    add_lora_ref,
    lora_expand_ref,
    lora_shrink_ref,
    make_plan,
)

__all__ = ["BACKENDS", "LoraPlan", "add_lora", "add_lora_cpu", "add_lora_bgmv", "add_lora_grouped",
           "add_lora_ref", "lora_expand_ref", "lora_shrink_ref", "make_plan"]
