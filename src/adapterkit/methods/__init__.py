"""Built-in adapter methods: one module per family. Importing registers them."""
from .base import AdapterConfig, AdapterModule
from .bone import BoneConfig
from .bottleneck import BottleneckConfig
from .corda import CorDAConfig, prepare_corda
from .dora import DoRAConfig
from .dylora import DyLoRAConfig, truncate_dylora
from .hydra import HydraConfig
from .ia3 import IA3Config
from .lora import LoRAConfig
from .lora_xs import LoRASBConfig, LoRAXSConfig, prepare_lora_sb
from .mola import MoLAConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .sorsa import SORSAConfig

__all__ = ["AdapterConfig", "AdapterModule", "BoneConfig", "BottleneckConfig", "CorDAConfig", "DoRAConfig",
           "DyLoRAConfig", "HydraConfig", "IA3Config", "LoRAConfig", "LoRASBConfig", "LoRAXSConfig", "MoLAConfig",
           "PrefixTuningConfig", "PromptTuningConfig", "SORSAConfig", "prepare_corda", "prepare_lora_sb",
           "truncate_dylora"]
