"""Base-model loading: the embedded default SmolLM2-135M-Instruct and local HF dirs."""
from adapterkit.models.default import (
    DEFAULT_MODEL_NAME,
    INSTALL_HINT,
    cache_root,
    default_cache_dir,
    default_model_path,
    load_default,
    load_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "INSTALL_HINT",
    "cache_root",
    "default_cache_dir",
    "default_model_path",
    "load_default",
    "load_model",
]
