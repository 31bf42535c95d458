"""adapterkit: parameter-efficient adapters for any PyTorch model."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import (  # noqa: E402
    AdapterCount,
    ParameterSummary,
    active_adapters,
    adapter_batch,
    add_adapter,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    get_adapter_config,
    list_adapters,
    load_adapter,
    merge,
    merge_adapters,
    merge_and_unload,
    merge_into_base,
    parameter_summary,
    print_trainable_parameters,
    save_adapter,
    set_adapter,
    set_requires_grad,
    trainable_parameters,
    unload,
    unmerge,
    unmerge_from_base,
)
from .errors import AdapterError  # noqa: E402
from .compose import Average, Fuse, Parallel, ScaLearn, Stack  # noqa: E402
from .methods import (  # noqa: E402
    BottleneckConfig,
    DoRAConfig,
    IA3Config,
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from .registry import list_methods, make_config  # noqa: E402

_SUBPACKAGES = ("models", "train", "serve", "formats", "compose", "ops", "methods", "quant")


def __getattr__(name: str):
    # heavy subpackages load on first use: `ak.models.load_default()`, `ak.train.Trainer`
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'adapterkit' has no attribute {name!r}")


__all__ = [
    "__version__",
    "AdapterError",
    "LoRAConfig",
    "DoRAConfig",
    "BottleneckConfig",
    "IA3Config",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "combine_adapters",
    "merge_adapters",
    "Stack",
    "Average",
    "Parallel",
    "Fuse",
    "ScaLearn",
    "AdapterCount",
    "ParameterSummary",
    "active_adapters",
    "adapter_batch",
    "add_adapter",
    "disable_adapters",
    "merge_into_base",
    "unmerge_from_base",
    "parameter_summary",
    "print_trainable_parameters",
    "set_requires_grad",
    "unload",
    "delete_adapter",
    "get_adapter_config",
    "list_adapters",
    "list_methods",
    "load_adapter",
    "make_config",
    "merge",
    "merge_and_unload",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
]
