"""Built-in adapter methods: one module per family. Importing registers them."""
from .base import AdapterConfig, AdapterModule
from .dora import DoRAConfig
from .lora import LoRAConfig

__all__ = ["AdapterConfig", "AdapterModule", "DoRAConfig", "LoRAConfig"]
