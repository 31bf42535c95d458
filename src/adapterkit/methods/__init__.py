"""Built-in adapter methods: one module per family. Importing registers them."""
from .base import AdapterConfig, AdapterModule
from .lora import LoRAConfig
from .prompt import PromptTuningConfig
from .prefix import PrefixTuningConfig
from .bottleneck import BottleneckConfig
from .ia3 import IA3Config
from .dora import DoRAConfig
from .lora_xs import LoRASBConfig, LoRAXSConfig, prepare_lora_sb

__all__ = ["AdapterConfig", "AdapterModule", "BottleneckConfig", "DoRAConfig", "IA3Config", "LoRAConfig",
           "PrefixTuningConfig", "PromptTuningConfig"]
