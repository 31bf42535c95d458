"""Built-in adapter methods: one module per family. Importing registers them."""
from .base import AdapterConfig, AdapterModule
from .bone import BoneConfig
from .bottleneck import BottleneckConfig
from .compacter import CompacterConfig
from .corda import CorDAConfig, prepare_corda
from .dora import DoRAConfig
from .dylora import DyLoRAConfig, truncate_dylora
from .hydra import HydraConfig
from .ia3 import IA3Config
from .invertible import InvertibleConfig
from .lora import LoRAConfig
from .lora_xs import LoRASBConfig, LoRAXSConfig, prepare_lora_sb
from .mola import MoLAConfig
from .mosa import MoSAConfig, mosa_merge, set_mosa_modules
from .paca import PaCAConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .qadapter import QAdapterConfig
from .qlora import QLoRAConfig
from .s2ft import S2FTConfig
from .sft import SFTConfig, prepare_sft
from .sorsa import SORSAConfig
from .spt import SPTConfig, prepare_spt
from .ssf import SSFConfig

__all__ = [
    "AdapterConfig", "AdapterModule", "BoneConfig", "BottleneckConfig", "CompacterConfig", "CorDAConfig",
    "DoRAConfig", "DyLoRAConfig", "HydraConfig", "IA3Config", "InvertibleConfig", "LoRAConfig", "LoRASBConfig",
    "LoRAXSConfig", "MoLAConfig", "MoSAConfig", "PaCAConfig", "PrefixTuningConfig", "PromptTuningConfig",
    "QAdapterConfig", "QLoRAConfig", "S2FTConfig", "SFTConfig", "SORSAConfig", "SPTConfig", "SSFConfig",
    "mosa_merge", "prepare_corda", "prepare_lora_sb", "prepare_sft", "prepare_spt", "set_mosa_modules",
    "truncate_dylora",
]
