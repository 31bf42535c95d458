"""Shared helpers of the server tests (no tests here): a char-level tokenizer with a chat
template, a tiny random Llama, LoRA adapters on disk (good and bad), uvicorn in a thread."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

uvicorn = pytest.importorskip("uvicorn")

API_KEY = "test-key"
MAX_MODEL_LEN = 256
MAX_LORA_RANK = 8


# ----------------------------------------------------------------------------- model + adapters
def char_tokenizer() -> Any:
    """A 128-token character-level HF tokenizer with a chat template (no downloads)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    extra = [chr(c) for c in range(161, 161 + 128 - len(specials) - len(chars))]
    vocab = {t: i for i, t in enumerate(specials + chars + extra)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=template)


def tiny_llama(hidden: int = 64, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def save_lora(model: torch.nn.Module, path: Path, r: int, seed: int, fmt: str = "adapterkit") -> Path:
    """Attach a LoRA with random (non-identity) weights, save it to `path`, detach it."""
    import adapterkit as ak

    ak.add_adapter(model, "tmp", ak.LoRAConfig(r=r, alpha=2 * r, targets=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapterkit.tmp." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ak.save_adapter(model, "tmp", path, format=fmt)
    ak.delete_adapter(model, "tmp")
    return path


def corrupt_with_nan(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = path / "adapter.safetensors"
    t = load_file(f)
    k = sorted(t)[0]
    t[k][0, 0] = float("nan")
    save_file(t, f)


@dataclass
class Served:
    """The running server: base URL, the engine (for direct reference outputs) and paths."""

    url: str
    engine: Any
    root: Path
    outside: Path
    base: str
    model_dir: Path | None = None

    def client(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("api_key", API_KEY)
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


class ServerThread:
    """uvicorn on 127.0.0.1 on a free port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        cfg = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@contextmanager
def serve_cli(*argv: str) -> Iterator[tuple[Any, ServerThread]]:
    """The app built by the CLI's own parser and ``build_app`` from ``adapterkit serve ARGV``,
    run on uvicorn; yields (engine, server thread) and shuts the engine down afterwards."""
    from adapterkit.cli import build_parser
    from adapterkit.serve.cli import build_app

    app = build_app(build_parser().parse_args(["serve", *argv]))
    engine = app.state.server.engine
    try:
        with ServerThread(app) as st:
            yield engine, st
    finally:
        engine.shutdown()


@contextmanager
def serve_tree(tmp: Path, *argv: str, prepare: Any = None) -> Iterator[Served]:
    """:func:`build_tree` under ``tmp`` served with ``--model DIR --adapter-root ROOT --api-key``
    and ``argv``; ``prepare(root)`` may change the tree first."""
    model_dir, root, outside = build_tree(tmp)
    if prepare is not None:
        prepare(root)
    with serve_cli("--model", str(model_dir), "--adapter-root", str(root), "--api-key", API_KEY, *argv) as (eng, st):
        yield Served(f"http://127.0.0.1:{st.port}", eng, root, outside, eng.model_name, model_dir)


def build_tree(tmp: Path) -> tuple[Path, Path, Path]:
    """Model dir, adapter root (alpha native r=4, beta PEFT r=8, extras + bad ones nested), outside dir."""
    model_dir, root, outside = tmp / "model", tmp / "adapters", tmp / "outside"
    model = tiny_llama()
    model.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    save_lora(model, root / "alpha", r=4, seed=1)
    save_lora(model, root / "beta", r=8, seed=2, fmt="peft")
    save_lora(model, root / "extra" / "delta", r=4, seed=3)  # nested: not discovered, loadable
    save_lora(model, root / "extra" / "epsilon", r=2, seed=4)
    save_lora(model, root / "bad" / "rank16", r=16, seed=5)
    corrupt_with_nan(save_lora(model, root / "bad" / "nan", r=4, seed=6))
    trunc = save_lora(model, root / "bad" / "truncated", r=4, seed=7) / "adapter.safetensors"
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    save_lora(tiny_llama(hidden=32, seed=9), root / "bad" / "otherbase", r=4, seed=8)
    save_lora(model, outside / "gamma", r=4, seed=10)
    os.symlink(outside / "gamma", root / "evil")  # an adapter dir inside the root escaping it
    os.symlink(outside, root / "extra" / "escape")
    return model_dir, root, outside


def greedy(engine: Any, prompt: str | list[int], adapter: str | None, max_tokens: int = 12,
           ignore_eos: bool = False) -> str:
    """The engine's own greedy output (the reference the HTTP answers must equal)."""
    from adapterkit.serve.types import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    out = engine.generate_sync([prompt], [adapter], params)
    return out[0].text


def wait_idle(engine: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if (s.running == 0 and s.queue_len == 0 and s.pool_pages_kv == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


async def sse_stream(h: httpx.AsyncClient, body: dict[str, Any], cancel_after: int | None) -> tuple[str, str | None]:
    """POST a streamed completion; returns (text, finish_reason). With `cancel_after`, close
    the connection after that many data events (a client disconnect)."""
    text, finish, n = [], None, 0
    async with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            text.append(ev["choices"][0]["text"])
            finish = ev["choices"][0]["finish_reason"] or finish
            n += 1
            if cancel_after is not None and n >= cancel_after:
                break  # leaving the block closes the connection mid-stream
    return "".join(text), finish
