"""Public interface of the serving engine (S-LoRA style), shared with the HTTP layer.

Everything the server (`serve/api.py`, `serve/server.py`) needs to code against lives here:
plain dataclasses and one Protocol. The implementation is `adapterkit.serve.engine.Engine`.

    from adapterkit.serve.engine import Engine
    from adapterkit.serve.types import EngineConfig, GenerationRequest, SamplingParams

    engine = Engine(hf_model, tokenizer, EngineConfig(max_loras=8))   # starts a background loop
    engine.register_adapter("math", "out/math")                        # validated now, loaded lazily
    async for chunk in engine.generate(GenerationRequest(prompt="2+2=", adapter="math",
                                                         params=SamplingParams(max_tokens=8))):
        print(chunk.text, chunk.finish_reason)
    engine.shutdown()

Errors (all from `adapterkit.errors`, so the HTTP layer can map them):
  * ConfigError            bad SamplingParams / EngineConfig field or request (message names the field) -> 400
  * AdapterNotFoundError   request names an adapter that is not registered -> 404
  * AdapterFileError, IncompatibleBaseError   register_adapter got a bad adapter -> 400
  * DuplicateAdapterError  register_adapter with a name already registered -> 409
  * QueueFullError         submit while `max_queue` requests are waiting -> 429
"""
from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from adapterkit.errors import ConfigError

FinishReason = Literal["stop", "length", "abort", "error"]
MAX_LOGPROBS = 20  # most alternatives per token (vLLM's default max_logprobs, OpenAI chat's top_logprobs)


class ContextLengthError(ConfigError):
    """A request does not fit in ``max_model_len``: the prompt alone, or the prompt plus an
    explicit ``max_tokens`` (`GenerationRequest.strict_max_tokens`). The message starts with the
    field at fault (``"prompt: ..."``, ``"max_tokens: ..."``)."""


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits. Validated on construction (ConfigError names the field)."""

    max_num_seqs: int = 64  # most sequences running (decoding or prefilling) at once
    max_num_batched_tokens: int = 1024  # token budget of one forward step (prefill + decode)
    max_queue: int = 4096  # most requests waiting; submit beyond it raises QueueFullError
    max_loras: int = 8  # adapter slots on the device (adapters usable in one step)
    max_lora_rank: int = 64  # largest rank accepted at registration; slots are padded to it
    max_cpu_loras: int | None = None  # host-memory cache of adapter tensors (None: keep all)
    block_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # pages in the unified pool (None: sized from pool_bytes)
    pool_bytes: int = 256 * 2**20  # pool size when num_pages is None
    max_model_len: int = 2048  # prompt + output tokens of one sequence
    dtype: str = "float32"  # compute / cache dtype: float32, bfloat16, float16
    device: str = "cpu"
    prefetch: bool = True  # load adapters of queued requests into free slots ahead of time
    seed: int = 0  # seed for requests without their own seed
    # Automatic prefix caching (vLLM's APC, `serve/kv.py`): full prompt blocks computed once are
    # reused by later requests with the same leading tokens under the same adapter registration.
    enable_prefix_caching: bool = True
    # Prepack every base matrix in oneDNN's layout (`ops.linear.prepack`): ~10-15% faster fp32
    # steps on CPU, but a second copy of those weights where the model's own dtype already
    # matches (else the runner's converted copy is prepacked anyway, at no extra memory).
    cpu_prepack: bool = False
    # Co-serving (adapterkit.serve.coserve): fine-tuning jobs trained inside the engine loop.
    fine_tuning: bool = False  # accept jobs (engine.fine_tuning is a CoServe)
    fine_tuning_dir: str | None = None  # (or a Path) job dirs (checkpoints, final adapters); required with fine_tuning
    max_fine_tuning_jobs: int = 1  # jobs queued + running at once; more raise QueueFullError
    # Inference first: while requests are running, one training slice (a micro-batch, after the
    # step's inference batch) holds at most ft_token_share * max_num_batched_tokens padded
    # tokens (at least one example), and training takes at most ft_time_share of the engine's
    # time. With no request in the engine, training runs back to back with the whole budget.
    ft_token_share: float = 0.25
    ft_time_share: float = 0.2

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue", "max_loras",
                     "max_lora_rank", "block_size", "max_model_len", "pool_bytes"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, name, f"must be an int >= 1, got {v!r}")
        _check(self.num_pages is None or (isinstance(self.num_pages, int) and self.num_pages >= 1),
               "num_pages", f"must be None or an int >= 1, got {self.num_pages!r}")
        _check(self.max_cpu_loras is None or (isinstance(self.max_cpu_loras, int) and self.max_cpu_loras >= 1),
               "max_cpu_loras", f"must be None or an int >= 1, got {self.max_cpu_loras!r}")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "dtype",
               f"must be float32, bfloat16 or float16, got {self.dtype!r}")
        _check(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
               f"must be true or false, got {self.enable_prefix_caching!r}")
        _check(isinstance(self.cpu_prepack, bool), "cpu_prepack", f"must be true or false, got {self.cpu_prepack!r}")
        _check(isinstance(self.fine_tuning, bool), "fine_tuning", f"must be true or false, got {self.fine_tuning!r}")
        _check(not self.fine_tuning or (self.fine_tuning_dir is not None and str(self.fine_tuning_dir) != ""),
               "fine_tuning_dir", f"must name a directory when fine_tuning is on, got {self.fine_tuning_dir!r}")
        _check(isinstance(self.max_fine_tuning_jobs, int) and not isinstance(self.max_fine_tuning_jobs, bool)
               and self.max_fine_tuning_jobs >= 1, "max_fine_tuning_jobs",
               f"must be an int >= 1, got {self.max_fine_tuning_jobs!r}")
        for name in ("ft_token_share", "ft_time_share"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1, name,
                   f"must be a number in (0, 1], got {v!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy (argmax)."""

    max_tokens: int = 16  # most new tokens
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 -> off
    seed: int | None = None  # per-request torch.Generator seed (reproducible sampling)
    stop: tuple[str, ...] = ()  # stop strings (not included in the output text)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens (included in token_ids)
    ignore_eos: bool = False  # keep going past the EOS token
    min_tokens: int = 0  # EOS / stop tokens are masked until this many tokens are out
    # Log-probs of the model's raw distribution (log_softmax of the logits in fp32, before
    # temperature / top-k / top-p / min_tokens masking, as vLLM's default): None = off, k >= 0 =
    # the chosen token's log-prob plus the k most likely alternatives.
    logprobs: int | None = None  # for every generated token
    prompt_logprobs: int | None = None  # for every prompt token (the first gets None: nothing predicts it)
    # vLLM's penalties (`sampling.apply_penalties`), applied before temperature / greedy argmax:
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # in [-2, 2]; times each token's count among those generated
    repetition_penalty: float = 1.0  # > 0; divides (scales) logits of tokens in the prompt or output

    def __post_init__(self) -> None:
        # accept lists / a single string from JSON, store tuples (frozen + hashable)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LOGPROBS), name,
                   f"must be None or an int in [0, {MAX_LOGPROBS}], got {v!r}")
        # max_tokens 0 scores the prompt without generating (lm-eval's log-likelihood requests)
        low = 0 if self.prompt_logprobs is not None else 1
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= low, "max_tokens",
               f"must be an int >= {low}, got {self.max_tokens!r}"
               + ("" if low == 0 else " (0 only with prompt_logprobs)"))
        _check(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
               and self.temperature >= 0, "temperature", f"must be a finite float >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p",
               f"must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"must be an int >= 0, got {self.top_k!r}")
        _check(self.seed is None or isinstance(self.seed, int), "seed", f"must be None or an int, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               f"must be non-empty strings, got {self.stop!r}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               f"must be ints >= 0, got {self.stop_token_ids!r}")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and -2 <= v <= 2, name,
                   f"must be a float in [-2, 2], got {v!r}")
        v = self.repetition_penalty
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
               "repetition_penalty", f"must be a finite float > 0, got {v!r}")

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (they then need the request's token history)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationRequest:
    """One prompt for one adapter (None = base model). Give `prompt` (needs a tokenizer) or
    `prompt_token_ids` (takes precedence).

    `strict_max_tokens`: False (default) caps the output at the room the context leaves
    (finish_reason "length"); True refuses at submit, with `ContextLengthError`, a request whose
    prompt + ``params.max_tokens`` exceed ``max_model_len`` (the HTTP layer sets it when the
    client gave ``max_tokens``, as vLLM answers 400 there).
    """

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    strict_max_tokens: bool = False

    def __post_init__(self) -> None:
        if self.prompt is None and self.prompt_token_ids is None:
            raise ConfigError("prompt: give `prompt` or `prompt_token_ids`")
        if self.prompt_token_ids is not None:
            _check(len(self.prompt_token_ids) >= 1, "prompt_token_ids", "must not be empty")
            _check(all(isinstance(t, int) and t >= 0 for t in self.prompt_token_ids), "prompt_token_ids",
                   "must be ints >= 0")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """The log-prob of one token (prompt or generated) and the most likely alternatives at its
    position. `logprob` is None only for the first prompt token (nothing predicts it)."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-prob), best first; k entries


@dataclass(frozen=True)
class GenerationChunk:
    """A streamed piece of output: the tokens produced since the previous chunk.

    `text` is the decoded delta (held back while it could still be the start of a stop
    string or an incomplete UTF-8 character; "" without a tokenizer). The last chunk of a
    request has `finish_reason` set ("stop": EOS / stop string / stop token, "length":
    max_tokens or max_model_len, "abort": cancelled, "error": see `error`).
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    usage: Usage
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when params.logprobs is set
    # every prompt token, in the first chunk after the prompt is computed (params.prompt_logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationOutput:
    """The whole result of one request (what `generate_sync` returns)."""

    request_id: str
    adapter: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    ttft_s: float  # submit -> first token
    latency_s: float  # submit -> finished
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    source: str  # a path, or "<memory>" for host tensors
    method: str  # "lora"
    rank: int
    alpha: float
    targets: tuple[str, ...]  # leaf module names, e.g. ("q_proj", "v_proj")
    loaded: bool  # in a device slot now
    slot: int | None
    running_requests: int
    host_bytes: int  # bytes of the tensors (fp32 as stored)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot. Latencies are over the most recent finished requests (a window)."""

    queue_len: int
    running: int
    finished: int
    aborted: int
    generated_tokens: int
    tokens_per_s: float  # generated tokens / s over the window
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float  # per-output-token latency (after the first)
    tpot_p99_s: float
    adapters_registered: int
    adapter_slots: int
    adapter_slots_used: int
    cache_hits: int
    cache_misses: int
    cache_evictions: int
    pool_pages_total: int  # = kv + adapter + cached + free
    pool_pages_kv: int  # held by requests
    pool_pages_adapter: int
    pool_pages_cached: int  # prefix-cache pages no request holds (evicted on demand)
    pool_pages_free: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens whose K/V came from the cache

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@runtime_checkable
class EngineProtocol(Protocol):
    """What the HTTP layer may call. All methods are thread-safe.

    The engine runs its own background loop (a thread); `generate` is an async generator that
    can be consumed from any asyncio loop.
    """

    config: EngineConfig
    model_name: str  # the base model's name (for /v1/models)
    tokenizer: Any | None  # HF tokenizer (encode/decode/apply_chat_template) or None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Submit and stream chunks until one has finish_reason set. Raises (before the first
        chunk) QueueFullError, AdapterNotFoundError, ConfigError (prompt too long for
        max_model_len: field "prompt"). If the consumer stops iterating (client disconnect)
        the request is aborted and its KV pages freed."""
        ...

    def generate_sync(self, prompts: Sequence[str | list[int]], adapters: Sequence[str | None] | None = None,
                      params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        """Submit all prompts at once (continuous batching), block until all finish, keep order."""
        ...

    def abort(self, request_id: str) -> bool:
        """Cancel a queued or running request; its KV pages are freed before this returns.
        Its stream ends with finish_reason "abort". False if unknown / already finished."""
        ...

    def register_adapter(self, name: str, path: str) -> AdapterInfo:
        """Validate (rank <= max_lora_rank, targets/shapes match the base, no NaN/Inf) and
        register. Raises DuplicateAdapterError, AdapterFileError, IncompatibleBaseError, ConfigError."""
        ...

    def unregister_adapter(self, name: str, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests for `name`. wait=True blocks until its running and queued
        requests finish (TimeoutError after `timeout`); wait=False aborts them now. The adapter's
        slot and host memory are freed. Raises AdapterNotFoundError."""
        ...

    def list_adapters(self) -> list[AdapterInfo]: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None:
        """Abort everything and stop the loop (idempotent)."""
        ...
