"""The HTTP layer's wire format and request checks, with no app and no engine calls:

  * request schemas (pydantic), response bodies and the SSE stream format;
  * the OpenAI error shape and the mapping of engine errors (`adapterkit.errors`) to statuses;
  * the containment rule for client-supplied adapter paths (`resolve_adapter_path`).

The schemas follow the OpenAI
REST API (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``) plus vLLM's
sampling extras (``top_k``, ``min_tokens``, ``ignore_eos``) and vLLM's LoRA admin
endpoints (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``).

Every error the server returns has OpenAI's JSON shape::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

so the official ``openai`` client raises its typed exceptions (``BadRequestError``,
``NotFoundError``, ``AuthenticationError``, ``RateLimitError``) with ``.param``/``.code``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator

from adapterkit.errors import (
    AdapterError,
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    DuplicateAdapterError,
    IncompatibleBaseError,
    QueueFullError,
    UnsupportedModuleError,
)
from adapterkit.serve.logprobs import LogprobFormatter
from adapterkit.serve.types import MAX_LOGPROBS, ContextLengthError, GenerationChunk

log = logging.getLogger("adapterkit.serve")


class APIError(Exception):
    """An error with an HTTP status, rendered in OpenAI's error shape.

    Attributes:
        status: HTTP status code (400, 401, 404, 429, 500, ...).
        message: human-readable text naming the offending field/value.
        type: OpenAI error type, e.g. ``invalid_request_error``.
        param: the request field at fault (``"temperature"``, ``"model"``), or None.
        code: a short machine-readable code (``"model_not_found"``), or None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.message, self.type, self.param, self.code)


class ErrorDetail(BaseModel):
    """The ``error`` object of every error response (for the OpenAPI schema)."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """``{"error": {...}}``: OpenAI's error shape (for the OpenAPI schema)."""

    error: ErrorDetail


_ERROR_MEANINGS = {
    400: "invalid request (the field is in `param`); `invalid_json` when the body is not JSON",
    401: "missing or wrong API key", 404: "unknown model or adapter", 409: "adapter name already loaded",
    413: "request body over --max-body-bytes", 429: "request queue full",
    500: "the engine failed while generating", 503: "unload timed out waiting for the adapter's requests",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses an endpoint can answer (each with
    the error shape), so schema-driven clients and fuzzers know them."""
    return {st: {"model": ErrorBody, "description": _ERROR_MEANINGS[st]} for st in statuses}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    """A fresh OpenAI-style object id, e.g. ``cmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, the ``created`` field of every OpenAI object."""
    return int(time.time())


# JSON types are taken as sent: `true` is not the integer 1, "4" is not 4, 2.5 is not an int
# (pydantic's lax mode would coerce all three). Floats must be finite: JSON parsers accept NaN
# and Infinity, and a NaN would otherwise fail a range check with a misleading message.
def _integral(v: Any) -> Any:
    # JSON Schema's "integer" includes 4.0; Python's float type is the only way it arrives
    return int(v) if isinstance(v, float) and v.is_integer() else v


# (bounds sit inside the Annotated: outside, next to a validator, the schema would show "ge")
Int = Annotated[int, Strict(), BeforeValidator(_integral)]
PosInt = Annotated[int, Strict(), Field(ge=1), BeforeValidator(_integral)]
NonNegInt = Annotated[int, Strict(), Field(ge=0), BeforeValidator(_integral)]
TopK = Annotated[int, Strict(), Field(ge=-1), BeforeValidator(_integral)]
Seed = Annotated[int, Strict(), Field(ge=-(2**63), lt=2**64), BeforeValidator(_integral)]  # torch's range
TokenId = NonNegInt
LogprobsK = Annotated[int, Strict(), Field(ge=0, le=MAX_LOGPROBS), BeforeValidator(_integral)]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
# Documented in the OpenAPI schema only (the validators below give the clearer messages):
# fields accepted solely at the value that changes nothing.
_ONLY_ONE = {"minimum": 1, "maximum": 1}
MAX_N = 64  # choices per request (each is one engine sequence)

_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_at(value: Any) -> str | None:
    """The dotted path of the first string inside `value` holding a lone UTF-16 surrogate.

    JSON's ``"\\ud800"`` escape decodes to one; it is not Unicode text, so tokenizers, file
    paths and UTF-8 encoders all fail on it. Pairs decode to one real code point, so any
    surrogate left in a decoded string is lone. Iterative: bodies may nest deeply.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path
            continue
        if isinstance(v, dict):
            if any(isinstance(k, str) and _SURROGATE.search(k) for k in v):
                return f"a key of {path or 'the body'}"
            items = list(v.items())
        else:
            items = list(enumerate(v)) if isinstance(v, list) else []
        stack.extend(reversed([(f"{path}.{k}" if path else str(k), x) for k, x in items]))
    return None


class _Checked(BaseModel):
    """Refuses lone surrogates in any string of the body, naming the field (before any other
    check, so no later step ever sees text it cannot encode)."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        where = _surrogate_at(data) if isinstance(data, dict) else None
        if where:
            field = where.removeprefix("a key of ").split(".")[0]
            raise _FieldError(None if field == "the body" else field,
                              f"a lone UTF-16 surrogate (\\ud800-\\udfff) at {where}: that is not valid Unicode text")
        return data


class _Lenient(_Checked):
    # OpenAI clients send fields we do not implement (user, logit_bias, ...); accept and ignore
    # them rather than failing, as vLLM does. Fields that would change the output are refused
    # by the validators of `SamplingFields`.
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a final chunk with empty choices and usage."""

    include_usage: Bool = False


class SamplingFields(_Lenient):
    """Sampling fields shared by completions and chat (OpenAI + vLLM extras).

    Ranges follow OpenAI/vLLM: temperature in [0, 2] (0 = greedy), top_p in (0, 1],
    top_k = -1 or 0 (off) or >= 1, presence/frequency penalties in [-2, 2], repetition
    penalty > 0 (vLLM's extra; 1 = off), n in [1, `MAX_N`] independent choices (choice i
    sampled with seed ``seed + i`` when a seed is given, as vLLM does).
    """

    model: str
    max_tokens: PosInt | None = None
    temperature: Float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: TopK = -1
    n: PosInt = Field(default=1, le=MAX_N)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(json_schema_extra={"minLength": 1})] | \
        Annotated[list[str], Field(json_schema_extra={"maxItems": 16, "items": {"type": "string", "minLength": 1}})] \
        | None = None
    seed: Seed | None = None
    ignore_eos: Bool = False
    min_tokens: NonNegInt = 0
    presence_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: Float = Field(default=1.0, gt=0.0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > 16:
                raise ValueError(f"at most 16 stop sequences are allowed, got {len(v)}")
            if any(s == "" for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        elif v == "":
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _min_le_max(self) -> SamplingFields:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _FieldError("min_tokens", f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        return self

    def stop_list(self) -> list[str]:
        """``stop`` as a list (OpenAI accepts a string or a list)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token) for `SamplingParams`; None = off."""
        return None, None


class _FieldError(ValueError):
    """A cross-field validation error that knows which field to blame (becomes ``param``)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``prompt`` is one string or one list of token ids.

    A list of several prompts (OpenAI's batch form) is refused: one request = one sequence.
    """

    prompt: Annotated[str, Field(json_schema_extra={"minLength": 1})] | \
        Annotated[list[TokenId], Field(json_schema_extra={"minItems": 1})] | \
        Annotated[list[str], Field(json_schema_extra={"minItems": 1, "maxItems": 1})] | \
        Annotated[list[list[TokenId]], Field(json_schema_extra={"minItems": 1, "maxItems": 1})]
    max_tokens: NonNegInt | None = 16  # OpenAI's default; 0 only with echo (score the prompt)
    echo: Bool = False
    logprobs: LogprobsK | None = None
    suffix: str | None = Field(default=None, json_schema_extra={"enum": [None]})
    best_of: Int | None = Field(default=None, json_schema_extra=_ONLY_ONE)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(f"exactly one prompt per request is supported, got {len(v)}")
            v = v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _zero_needs_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise _FieldError("max_tokens", "max_tokens=0 generates nothing: it is only allowed with echo=true "
                              "(to score the prompt, e.g. with logprobs)")
        if self.best_of is not None and self.best_of < self.n:
            raise _FieldError("best_of", f"best_of={self.best_of} must be >= n={self.n}")
        return self

    def logprob_counts(self) -> tuple[int | None, int | None]:
        # max_tokens 0 always computes the prompt's log-probs (the engine's "score only" mode);
        # they are returned only when `logprobs` asks
        prompt = self.logprobs if self.echo and self.logprobs is not None else 0 if self.max_tokens == 0 else None
        return self.logprobs, prompt

    @field_validator("suffix", "best_of")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        allowed = {"suffix": (None,), "best_of": (None, 1)}[info.field_name]
        if v is True or v not in allowed:  # `True in (1,)` holds in Python, hence `is True`
            raise ValueError(f"{info.field_name}={v!r} is not supported by this server")
        return v


_TEXT_PART = {"type": "object", "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
              "required": ["type", "text"]}


class ChatMessage(_Lenient):
    """One chat message. ``content`` may be a string or OpenAI's list of text parts."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | Annotated[list[dict[str, Any]], Field(json_schema_extra={"items": _TEXT_PART})] | None = None

    def text(self) -> str:
        """The message text; list content must be ``[{"type": "text", "text": ...}, ...]``."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts: list[str] = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"only text content parts are supported, got type={part.get('type')!r}",
                               param="messages", code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` is OpenAI's newer name."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PosInt | None = None
    add_generation_prompt: Bool = True
    logprobs: Bool | None = False
    top_logprobs: LogprobsK | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "top_logprobs needs logprobs=true")
        return self

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0, None) if self.logprobs else (None, None)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Lenient):
    """vLLM's ``POST /tokenize``: ``prompt`` (text) or ``messages`` (the chat template applied).
    ``model`` may name an adapter or the base (they share one tokenizer); default the base."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = True  # prompt form only (the template writes its own)
    add_generation_prompt: Bool = True  # messages form only
    return_token_strs: Bool = False

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise _FieldError("prompt", "give exactly one of `prompt` (text) and `messages` (chat)")
        return self


class DetokenizeRequest(_Lenient):
    """vLLM's ``POST /detokenize``: token ids back to text."""

    model: str | None = None
    tokens: list[TokenId]


ADAPTER_NAME_RULE = ("1-200 characters from A-Z a-z 0-9 and '_' '.' '-' ':', starting with a letter, "
                     "a digit or '_'")
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")


def adapter_name_problem(name: str) -> str | None:
    """Why `name` cannot be an adapter name (None if it can). The name is what clients put in
    ``model``, so it is kept to characters that need no escaping anywhere: in URLs, log lines,
    metric labels and file names (a ``/`` would read as a path)."""
    if _ADAPTER_NAME.fullmatch(name):
        return None
    bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9_.:-]", c)})
    why = f"it has {''.join(bad)!r}" if bad else "it is too long" if len(name) > 200 else \
        f"it starts with {name[:1]!r}"
    return f"adapter name {name!r} is not allowed ({why}): use {ADAPTER_NAME_RULE}"


class LoadLoraRequest(_Checked):
    """vLLM's ``POST /v1/load_lora_adapter`` body. ``lora_name`` follows `ADAPTER_NAME_RULE`."""

    lora_name: str = Field(min_length=1, json_schema_extra={"pattern": f"^{_ADAPTER_NAME.pattern}$"})
    lora_path: str = Field(min_length=1)

    @field_validator("lora_name")
    @classmethod
    def _name_rule(cls, v: str) -> str:
        problem = adapter_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class UnloadLoraRequest(_Checked):
    """vLLM's ``POST /v1/unload_lora_adapter`` body (``lora_int_id`` accepted and ignored)."""

    model_config = ConfigDict(extra="allow")
    lora_name: str = Field(min_length=1, max_length=200)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(index: int, text: str, finish: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of a ``text_completion``'s ``choices``."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None, *,
                    chunk: bool = False) -> dict[str, Any]:
    """A ``text_completion`` object (full response, or one stream chunk when ``chunk``), with
    `choices` from `completion_choice`."""
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": now(), "model": model,
                            "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_choice(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of a non-streamed ``chat.completion``'s ``choices``."""
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish}


def chat_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object, with `choices` from `chat_choice`."""
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": use}


def chat_chunk(
    rid: str, model: str, delta: dict[str, Any] | None, finish: str | None, use: dict[str, int] | None = None,
    logprobs: dict[str, Any] | None = None, index: int = 0,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` of choice `index`; ``delta=None`` makes the usage-only chunk
    (empty choices)."""
    choices = [] if delta is None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}]
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return body


def model_card(name: str, owned_by: str, root: str, parent: str | None) -> dict[str, Any]:
    """One entry of ``GET /v1/models`` (OpenAI's ``model`` object, vLLM's root/parent extras)."""
    return {"id": name, "object": "model", "created": now(), "owned_by": owned_by, "root": root, "parent": parent}



class ChoiceShaper:
    """The text and ``logprobs`` of one choice, fed chunk by chunk: the echoed prompt goes in
    front of the first piece, and log-probs of chunks whose text the engine held back wait for
    the next piece, so every piece's log-probs cover exactly the tokens it completes.

    Args:
        formatter: formats the engine's log-probs, or None when the request asked for none.
        chat: chat shape (``{"content": [...]}``) instead of the completions one.
        echo: the prompt text to put first (completions ``echo``), or None.
    """

    def __init__(self, formatter: LogprobFormatter | None, chat: bool, echo: str | None = None) -> None:
        self.fmt, self.chat = formatter, chat
        self.text = echo or ""
        self.echo = echo is not None
        self.entries: list[Any] = []

    def feed(self, c: GenerationChunk) -> None:
        self.text += c.text
        if self.fmt is not None:
            if self.echo and c.prompt_logprobs is not None:
                self.entries += c.prompt_logprobs
            self.entries += c.logprobs or ()

    def pending(self) -> bool:
        """Something to send: text, or (an engine without a tokenizer, whose text is always empty)
        the log-probs of new tokens, so a token-id stream is incremental too."""
        return bool(self.text) or (self.fmt is not None and self.fmt.tok is None and bool(self.entries))

    def take(self) -> tuple[str, dict[str, Any] | None]:
        """The text and log-probs gathered since the last call."""
        text, entries = self.text, self.entries
        self.text, self.entries = "", []
        if self.fmt is None:
            return text, None
        return text, self.fmt.chat(entries) if self.chat else self.fmt.completion(entries)


def sse_json(obj: dict[str, Any]) -> str:
    """One SSE payload (compact JSON, as OpenAI sends)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


async def merge_choices(streams: Sequence[AsyncIterator[GenerationChunk]]
                        ) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """The chunks of several choices as they come: (choice index, chunk). Each stream is read
    by its own task; on exit (the consumer closed, an error) the tasks are cancelled and every
    stream is closed, which aborts its request.

    Raises:
        Whatever a stream raised, once it reaches the front of the queue.
    """
    if len(streams) == 1:  # the common case: no tasks
        async for c in streams[0]:
            yield 0, c
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | None, Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for c in stream:
                queue.put_nowait((i, c, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc))
        finally:
            queue.put_nowait((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(streams)]
    try:
        open_ = len(streams)
        while open_:
            i, c, exc = await queue.get()
            if exc is not None:
                raise exc
            if c is None:
                open_ -= 1
            else:
                yield i, c
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for st in streams:
            aclose = getattr(st, "aclose", None)
            if aclose is not None:
                await aclose()


async def sse_events(chunks: AsyncIterator[tuple[int, GenerationChunk]], rid: str, body: SamplingFields,
                     usage_now: Callable[[], dict[str, int]], chat: bool,
                     shapers: Sequence[ChoiceShaper] | None = None) -> AsyncIterator[str]:
    """The SSE ``data:`` payloads of one streamed request in OpenAI's chunk format.

    `chunks` yields (choice index, chunk) (`merge_choices`). Chat starts with a
    ``{"role": "assistant"}`` delta per choice; chunks whose text is held back by the engine (a
    possible stop-string prefix, a partial UTF-8 character) are skipped; each choice's last
    chunk carries its ``finish_reason``; ``stream_options.include_usage`` adds a chunk with
    empty ``choices`` and ``usage`` (all choices summed); an engine error becomes an
    ``{"error": ...}`` event. The stream always ends with ``[DONE]``. `chunks` is closed on exit
    (closing aborts the requests). `shapers` (one per choice) add the echoed prompt and the
    log-probs (each event carries those of its tokens).
    """
    model = body.model
    shapers = shapers or [ChoiceShaper(None, chat) for _ in range(body.n)]
    try:
        if chat:
            for i in range(len(shapers)):
                yield sse_json(chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, index=i))
        async for i, c in chunks:
            if c.finish_reason == "error":
                yield sse_json(error_body(c.error or "generation failed", "server_error", code="engine_error"))
                break
            shaper = shapers[i]
            shaper.feed(c)
            if not shaper.pending() and not c.finished:
                continue
            # formatting an echoed prompt's log-probs decodes every token: off the loop when long
            text, lps = await anyio.to_thread.run_sync(shaper.take) if len(shaper.entries) > 64 else shaper.take()
            if chat:
                yield sse_json(chat_chunk(rid, model, {"content": text} if text else {}, c.finish_reason,
                                          logprobs=lps, index=i))
            else:
                yield sse_json(completion_body(rid, model, [completion_choice(i, text, c.finish_reason, lps)], None,
                                               chunk=True))
        if body.include_usage():
            if chat:
                yield sse_json(chat_chunk(rid, model, None, None, usage_now()))
            else:
                yield sse_json({"id": rid, "object": "text_completion", "created": now(), "model": model,
                                "choices": [], "usage": usage_now()})
        yield "[DONE]"
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


# ----------------------------------------------------------------------------- adapter paths
def resolve_adapter_path(path: str, roots: Sequence[Path]) -> Path:
    """Resolve a client-supplied adapter path; it must lie inside one of `roots`.

    Relative paths are taken relative to each root in order (the first that exists wins);
    absolute paths must already point inside a root. Any ``..`` component is refused outright,
    and the final check is made on the real path (symlinks resolved), so a symlink inside a
    root that points outside it is refused too.

    Args:
        path: the ``lora_path`` of a load request.
        roots: the configured adapter roots, already real paths.
    Raises:
        APIError(400, param="lora_path"): no roots, ``..``, escape, or no such directory.
    """
    if not roots:
        raise APIError(400, "Loading adapters at runtime is disabled: the server has no adapter roots "
                       "(start it with --adapter-root DIR).", param="lora_path", code="no_adapter_roots")
    if "\x00" in path:
        raise APIError(400, "lora_path contains a NUL byte", param="lora_path", code="invalid_path")
    if ".." in Path(path).parts:
        raise APIError(400, f"lora_path {path!r} contains '..'; give a path inside an adapter root",
                       param="lora_path", code="path_outside_adapter_roots")
    candidates = [Path(path)] if os.path.isabs(path) else [root / path for root in roots]
    for cand in candidates:
        real = Path(os.path.realpath(cand))
        inside = any(is_within(real, root) for root in roots)
        if not inside:
            if os.path.isabs(path) or os.path.lexists(cand):
                # an absolute path elsewhere, or a symlink inside a root escaping it
                raise APIError(400, f"lora_path {path!r} resolves to {str(real)!r}, outside the adapter roots "
                               f"{[str(r) for r in roots]}", param="lora_path", code="path_outside_adapter_roots")
            continue
        if real.is_dir():
            return real
    raise APIError(400, f"lora_path {path!r} is not an adapter directory inside the adapter roots "
                   f"{[str(r) for r in roots]}", param="lora_path", code="adapter_not_found")


def is_within(path: Path, root: Path) -> bool:
    return os.path.commonpath([str(path), str(root)]) == str(root)


def is_adapter_dir(path: Path) -> bool:
    """A native (adapter.safetensors) or PEFT (adapter_model.safetensors) adapter directory."""
    return (path / "adapter_config.json").is_file() and (
        (path / "adapter.safetensors").is_file() or (path / "adapter_model.safetensors").is_file()
    )


# ----------------------------------------------------------------------------- error mapping
def _config_param(msg: str, default: str | None) -> str | None:
    """ConfigError messages start with ``"<field>: ..."``; that field is the OpenAI ``param``."""
    head = msg.split(":", 1)[0].strip()
    return head if head and head.replace("_", "").isalnum() and ":" in msg else default


def engine_error(exc: BaseException, *, prompt_param: str = "prompt", param: str | None = None,
                 max_tokens_param: str = "max_tokens") -> APIError:
    """Map an engine exception to an `APIError` (status + OpenAI error type/param/code).

    Args:
        exc: what the engine (or request construction) raised.
        prompt_param: the request field a ``prompt`` ConfigError blames (chat: ``messages``).
        max_tokens_param: the field a ``max_tokens`` ConfigError blames (chat may have used
            ``max_completion_tokens``).
        param: the field to blame regardless of the message (load endpoint: ``lora_path``).
    """
    if isinstance(exc, APIError):
        return exc
    msg = str(exc)
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, msg, param="model", code="model_not_found")
    if isinstance(exc, QueueFullError):
        return APIError(429, msg or "The request queue is full; retry later.", type="rate_limit_error",
                        code="queue_full")
    if isinstance(exc, DuplicateAdapterError):
        return APIError(409, msg, param="lora_name", code="adapter_already_loaded")
    if isinstance(exc, IncompatibleBaseError):
        return APIError(400, msg, param=param, code="incompatible_base")
    if isinstance(exc, AdapterFileError):
        return APIError(400, msg, param=param, code="invalid_adapter_file")
    if isinstance(exc, ConfigError):
        p = _config_param(msg, param)
        if p == "prompt" or p == "prompt_token_ids":
            p = prompt_param
        elif p == "max_tokens":
            p = max_tokens_param
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_value"
        return APIError(400, msg, param=param or p, code=code)
    if isinstance(exc, UnsupportedModuleError):
        return APIError(400, msg, param=param, code="unsupported_adapter")
    if isinstance(exc, AdapterError):
        return APIError(400, msg, param=param, code="invalid_adapter")
    if isinstance(exc, TimeoutError):
        return APIError(503, msg or "timed out", type="server_error", param=param, code="timeout")
    log.exception("internal error", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}: {msg}", type="server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI/pydantic validation errors -> one 400 naming the first offending field."""
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    # union types (str | list[int]) add the member type to loc ("prompt.str"): drop it
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_type_name(str(p))]
    ctx_err = (err.get("ctx") or {}).get("error")
    param = getattr(ctx_err, "field", None) or (loc[0] if loc else None)
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error") or err.get("msg")
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    where = ".".join(loc) or param or "body"
    if where == "body" and err.get("type") in ("model_attributes_type", "dict_type"):
        if isinstance(err.get("input"), (bytes, str)):  # FastAPI parses JSON only for a JSON content type
            return APIError(400, "the request body was not read as JSON: send 'Content-Type: application/json'",
                            code="invalid_json")
        msg = "the request body must be a JSON object"
    return APIError(400, f"{where}: {msg}", param=param, code="invalid_value")


def unparseable_body() -> APIError:
    """FastAPI's "error parsing the body" (bytes that are not UTF-8, JSON nested too deeply)."""
    return APIError(400, "the request body could not be parsed as JSON (it must be UTF-8 JSON, nested at most a "
                    "few hundred levels)", code="invalid_json")


def _is_type_name(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict") or "[" in part
