"""Unit tests of the HTTP layer's pure parts: adapter path containment, start-up discovery,
CLI argument parsing, request schemas and the engine-error -> HTTP status mapping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

pytest.importorskip("fastapi")

from adapterkit.errors import (  # noqa: E402
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    DuplicateAdapterError,
    IncompatibleBaseError,
    QueueFullError,
    UnsupportedModuleError,
)
from adapterkit.serve.api import (  # noqa: E402
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    engine_error,
    resolve_adapter_path,
)
from adapterkit.serve.cli import add_serve_parser, discover_adapters, parse_adapter_specs  # noqa: E402


def fake_adapter(path: Path, peft: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / ("adapter_model.safetensors" if peft else "adapter.safetensors")).write_bytes(b"x")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    fake_adapter(root / "a")
    fake_adapter(root / "b", peft=True)
    fake_adapter(root / "nested" / "c")
    (root / "not-an-adapter").mkdir()
    fake_adapter(outside / "x")
    os.symlink(outside / "x", root / "link")
    os.symlink(root / "a", root / "alias")  # a symlink that stays inside is fine
    return Path(os.path.realpath(root)), Path(os.path.realpath(outside))


def test_resolve_inside_root(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    assert resolve_adapter_path("a", [root]) == root / "a"
    assert resolve_adapter_path("nested/c", [root]) == root / "nested" / "c"
    assert resolve_adapter_path(str(root / "b"), [root]) == root / "b"
    assert resolve_adapter_path("alias", [root]) == root / "a"


def test_resolve_second_root(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = tree
    other = fake_adapter(tmp_path / "r2" / "z").parent
    assert resolve_adapter_path("z", [root, Path(os.path.realpath(other))]) == Path(os.path.realpath(other)) / "z"


@pytest.mark.parametrize("path", ["../outside/x", "a/../../outside/x", "..", "link", "link/"])
def test_resolve_refuses_escapes(tree: tuple[Path, Path], path: str) -> None:
    root, _ = tree
    with pytest.raises(APIError) as ei:
        resolve_adapter_path(path, [root])
    assert ei.value.status == 400 and ei.value.param == "lora_path"
    assert ei.value.code == "path_outside_adapter_roots"


def test_resolve_refuses_absolute_outside_and_missing(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    with pytest.raises(APIError, match="outside the adapter roots"):
        resolve_adapter_path(str(outside / "x"), [root])
    with pytest.raises(APIError) as ei:
        resolve_adapter_path("missing", [root])
    assert ei.value.code == "adapter_not_found"
    with pytest.raises(APIError) as ei:
        resolve_adapter_path("a", [])
    assert ei.value.code == "no_adapter_roots"
    with pytest.raises(APIError):
        resolve_adapter_path("a\x00b", [root])


def test_discover_adapters(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = tree
    found = discover_adapters([root])
    # native + PEFT, the inside alias; not nested, not the non-adapter dir, not the escaping link
    assert sorted(found) == ["a", "alias", "b"]
    assert found["alias"] == root / "a"
    dup = fake_adapter(tmp_path / "r2" / "a").parent
    with pytest.raises(ConfigError, match="'a'"):
        discover_adapters([root, dup])
    with pytest.raises(ConfigError, match="not a directory"):
        discover_adapters([tmp_path / "nope"])


def test_parse_adapter_specs_and_cli() -> None:
    import argparse

    assert parse_adapter_specs(["m=out/m", "n = x=y "]) == {"m": "out/m", "n": "x=y"}
    for bad in (["m"], ["=p"], ["m="], ["m=a", "m=b"]):
        with pytest.raises(ConfigError, match="--adapter"):
            parse_adapter_specs(bad)
    p = argparse.ArgumentParser()
    add_serve_parser(p.add_subparsers())
    a = p.parse_args(["serve", "--model", "default", "--adapter", "m=x", "--adapter-root", "r1", "--adapter-root",
                      "r2", "--max-loras", "3", "--max-lora-rank", "16", "--max-queue", "5", "--api-key", "k",
                      "--port", "9"])
    assert (a.model, a.adapter, a.adapter_root, a.max_loras, a.max_lora_rank, a.max_queue, a.api_key, a.port) == \
        ("default", ["m=x"], ["r1", "r2"], 3, 16, 5, "k", 9)
    from adapterkit.serve.cli import engine_config, run_serve

    assert a.fn is run_serve
    cfg = engine_config(a)
    assert (cfg.max_loras, cfg.max_lora_rank, cfg.max_queue) == (3, 16, 5)
    assert cfg.pool_bytes == 2**30 and not cfg.cpu_prepack  # --pool-gib 1 and no prepack by default
    b = p.parse_args(["serve", "--pool-gib", "0.5", "--cpu-prepack"])
    assert engine_config(b).pool_bytes == 2**29 and engine_config(b).cpu_prepack
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="--pool-gib"):
            engine_config(p.parse_args(["serve", "--pool-gib", bad]))


def test_schemas() -> None:
    r = CompletionRequest(model="m", prompt=["only"], stop="x", top_k=-1)
    assert r.prompt == "only" and r.stop_list() == ["x"] and r.max_tokens == 16
    assert CompletionRequest(model="m", prompt=[[1, 2]]).prompt == [1, 2]
    for bad in ({"prompt": ["a", "b"]}, {"prompt": []}, {"n": 0}, {"n": 65}, {"temperature": -0.1}, {"top_p": 0},
                {"stop": [""]}, {"stop": ["s"] * 17}, {"max_tokens": 0}, {"logprobs": 21}, {"logprobs": True},
                {"presence_penalty": 2.5}, {"frequency_penalty": -2.1}, {"repetition_penalty": 0.0},
                {"n": 3, "best_of": 1},
                {"max_tokens": 2, "min_tokens": 3}, {"seed": 2**70}, {"top_k": -2}):
        with pytest.raises(ValidationError):
            CompletionRequest(**{"model": "m", "prompt": "p", **bad})
    c = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                  {"type": "text", "text": "b"}]}],
                              max_completion_tokens=5, max_tokens=9)
    assert c.messages[0].text() == "ab" and c.max_new_tokens() == 5
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[])
    with pytest.raises(APIError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "image_url"}]}]) \
            .messages[0].text()


@pytest.mark.parametrize("exc,status,code", [
    (AdapterNotFoundError("adapter 'x' is not registered"), 404, "model_not_found"),
    (QueueFullError("full"), 429, "queue_full"),
    (DuplicateAdapterError("dup"), 409, "adapter_already_loaded"),
    (IncompatibleBaseError("base"), 400, "incompatible_base"),
    (AdapterFileError("nan"), 400, "invalid_adapter_file"),
    (ConfigError("top_p: must be in (0, 1]"), 400, "invalid_value"),
    (UnsupportedModuleError("dora"), 400, "unsupported_adapter"),
    (TimeoutError("slow"), 503, "timeout"),
    (RuntimeError("boom"), 500, None),
])
def test_engine_error_mapping(exc: Exception, status: int, code: str | None) -> None:
    err = engine_error(exc)
    assert err.status == status and err.code == code
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


def test_config_error_param_comes_from_the_message() -> None:
    assert engine_error(ConfigError("top_p: must be in (0, 1]")).param == "top_p"
    assert engine_error(ConfigError("prompt: 300 tokens > max_model_len"), prompt_param="messages").param == "messages"
    assert engine_error(ConfigError("adapter 'a' (p): rank r=16 exceeds"), param="lora_path").param == "lora_path"


def test_adapter_names_follow_the_rule_at_start_and_cli_body_limit_flag() -> None:
    import argparse

    from adapterkit.serve.api import adapter_name_problem
    from adapterkit.serve.cli import DEFAULT_MAX_BODY_BYTES

    assert adapter_name_problem("math-v2.1_x:q") is None
    for bad in ("a/b", "", ".x", "x" * 201):
        assert "A-Z a-z 0-9" in (adapter_name_problem(bad) or "")
    with pytest.raises(ConfigError, match="--adapter: adapter name 'a/b' is not allowed"):
        parse_adapter_specs(["a/b=out/x"])
    p = argparse.ArgumentParser()
    add_serve_parser(p.add_subparsers())
    assert p.parse_args(["serve"]).max_body_bytes == DEFAULT_MAX_BODY_BYTES == 4 * 2**20
    assert p.parse_args(["serve", "--max-body-bytes", "1024"]).max_body_bytes == 1024


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_create_app_refuses_a_bad_body_limit(limit: object) -> None:
    from adapterkit.serve.server import create_app

    with pytest.raises(ConfigError, match="max_body_bytes"):
        create_app(object(), max_body_bytes=limit)  # type: ignore[arg-type]
