"""Scale serving out with Ray Serve: N engine replicas behind one OpenAI-compatible ingress.

    adapterkit serve --ray --replicas 2 --model DIR --adapter-root /shared/adapters
    serve run adapterkit.serve.ray:app_builder model=DIR adapter_root=/shared/adapters replicas=2

Two deployments:

* ``EngineReplica`` (N replicas): each owns one `Engine`, built from the same `EngineConfig`
  as a single-node server. Two tiers per replica, as in S-LoRA: ``max_loras`` device slots
  (the engine's own slot LRU) over a host-memory tier of ``max_cpu_loras`` adapters (default
  `DEFAULT_HOST_LORAS`). The host tier is Ray Serve's model multiplexing
  (``@serve.multiplexed(max_num_models_per_replica=max_cpu_loras)``): an adapter is read from
  disk and registered in the engine on its first request to this replica (a cold load), stays
  in host memory when the engine evicts it from its slot, and re-enters a slot from RAM (a
  warm load) on its next request. Only when the host tier is full does the least recently
  used adapter leave it (unregistered from the engine, after its running requests finish).
  So the multiplexed ids a replica reports to Ray's router are its host-tier residents, and
  a request goes back to a replica that holds its adapter in RAM, not only in a slot.
* ``Ingress`` (one replica): the existing FastAPI app of `adapterkit.serve.server` (same
  routes, validation and error shapes) over `ReplicaEngine`, an `EngineProtocol` that sends
  each generation to a replica through a handle with ``multiplexed_model_id`` = the adapter's
  key, so Ray's router prefers a replica that already holds the adapter and falls back to
  another when that one is at ``max_ongoing_requests``. Base-model requests carry no id and
  go to any replica.

The adapter catalog (name -> path) lives in the ingress; adapter files must be readable by
every replica at the same path (shared storage, or one machine). ``load_lora_adapter`` checks
the adapter on one replica and adds it to the catalog; each replica then loads it on its
first request. ``unload_lora_adapter`` removes it from the catalog at once (new requests get
404); replicas drop their copy by LRU. A name loaded again gets a new key (``name@N``), so a
replica never serves a stale copy. ``GET /metrics`` sums the replicas (see `_Board`), and
``GET /v1/replicas`` lists per replica its cold loads (disk), warm loads (host -> slot), slot
hits, host-tier evictions, host-tier residents and slot residents.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError

from adapterkit.errors import AdapterNotFoundError, ConfigError, DuplicateAdapterError, did_you_mean
from adapterkit.serve.api import APIError
from adapterkit.serve.types import AdapterInfo, EngineConfig, EngineStats, GenerationChunk, GenerationRequest

log = logging.getLogger("adapterkit.serve.ray")
BOARD_NAMESPACE = "adapterkit"
STALE_S = 5.0  # a replica silent this long (dead, or being replaced) leaves the sums
_PUSH_S = 1.0
# host-tier size when --max-cpu-loras is not given: generous (1,024 rank-16 LoRAs on q,k,v,o of
# SmolLM2-135M are ~7.5 GB fp32; of a 7B model ~69 GB: set it there), but bounded, so a replica
# that sees every adapter of a large catalog cannot grow without limit; size it as adapters x
# `host_bytes` (see /v1/adapters)
DEFAULT_HOST_LORAS = 1024


# ----------------------------------------------------------------------------- shared state
class _Board:
    """A tiny named Ray actor the replicas report to (cold loads, resident adapters, engine
    stats); the ingress reads it for ``/metrics``, ``/v1/replicas`` and ``/v1/adapters``."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def put(self, replica: str, row: dict[str, Any]) -> None:
        self.rows[replica] = {**row, "t": time.time()}

    def read(self, max_age: float) -> list[dict[str, Any]]:
        now = time.time()
        return [dict(r, replica=k) for k, r in sorted(self.rows.items()) if now - r["t"] <= max_age]


def _board(app_name: str) -> Any:
    import ray

    # detached: it must outlive whichever replica created it (replicas come and go)
    return ray.remote(_Board).options(name=f"board:{app_name}", namespace=BOARD_NAMESPACE, get_if_exists=True,
                                      lifetime="detached", num_cpus=0).remote()


@dataclasses.dataclass
class _Failure:
    """An exception from a replica, returned (not raised) so the ingress re-raises the original
    typed error with its own message (a raised one arrives wrapped in Ray's traceback text)."""

    exc: BaseException


class _Resident:
    """One adapter in a replica's host tier (registered in its engine); unregistered when
    multiplexing evicts it from the host tier."""

    def __init__(self, replica: _ReplicaBase, key: str) -> None:
        self.replica, self.key = replica, key

    def __del__(self) -> None:  # Ray calls it on eviction; again (a no-op) when collected
        key, self.key = self.key, None
        if key is None:
            return
        try:
            self.replica.engine.unregister_adapter(key, wait=True, timeout=self.replica.unload_timeout)
        except Exception:  # noqa: BLE001 - already gone / engine shut down: nothing left to free
            pass
        self.replica.evictions += 1


# ----------------------------------------------------------------------------- replicas
class _ReplicaBase:
    """The state of one engine replica; `replica_class` adds the multiplexed loader."""

    def __init__(self, model: str, config: dict[str, Any], served_model_name: str, app_name: str,
                 threads: int | None = None, unload_timeout: float = 600.0) -> None:
        import torch

        from adapterkit.models import load_model
        from adapterkit.serve.engine import Engine

        if threads:
            torch.set_num_threads(threads)  # N replicas on one machine must not each take every core
        cfg = EngineConfig(**config)
        hf, tok = load_model(model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
        self.engine = Engine(hf, tok, cfg, model_name=served_model_name)
        self.unload_timeout = unload_timeout
        self.paths: dict[str, str] = {}  # key -> path of the adapters asked for
        self.cold_loads = self.evictions = 0  # disk reads; host-tier evictions
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.board = _board(app_name)
        self._pusher: asyncio.Task | None = None
        self._start_pusher()

    def _start_pusher(self) -> None:
        """Report to the board every second, from the replica's event loop (started from the
        first request if the constructor ran outside it)."""
        if self._pusher is None:
            try:
                self._pusher = asyncio.get_running_loop().create_task(self._push_forever())
            except RuntimeError:
                pass

    async def load_adapter(self, key: str) -> _Resident:  # replaced by the multiplexed one
        raise NotImplementedError

    async def _load(self, key: str) -> _Resident:
        """Register adapter `key` from its path into the host tier (a cold load: a disk read)."""
        path = self.paths[key]
        await asyncio.get_running_loop().run_in_executor(None, self.engine.register_adapter, key, path)
        self.cold_loads += 1
        res = _Resident(self, key)
        await self._push()  # before answering: whoever reads the board next sees this load
        return res

    def _report(self) -> dict[str, Any]:
        """The counters this replica reports (engine calls: run it off the event loop).

        Every cold load is followed by exactly one slot load (the first step of the request
        that caused it), so the slot loads beyond the cold loads are warm loads, host -> slot.
        A request aborted between its cold load and its first step leaves that slot load
        undone: warm loads then read one low per such request."""
        stats = self.engine.stats()
        infos = self.engine.list_adapters()
        return {"cold_loads": self.cold_loads, "warm_loads": max(0, stats.cache_misses - self.cold_loads),
                "slot_hits": stats.cache_hits, "evictions": self.evictions,
                "resident": [a.name for a in infos], "in_slots": [a.name for a in infos if a.loaded],
                "stats": stats.to_dict()}

    async def _push(self) -> None:
        row = await asyncio.get_running_loop().run_in_executor(None, self._report)
        await self.board.put.remote(self.replica_id, row)

    async def _push_forever(self) -> None:
        while True:
            try:
                await self._push()
            except Exception:  # noqa: BLE001 - reporting must never take the replica down
                log.debug("board push failed", exc_info=True)
            await asyncio.sleep(_PUSH_S)

    async def generate(self, req: GenerationRequest, key: str | None = None,
                       path: str | None = None) -> AsyncIterator[GenerationChunk | _Failure]:
        """Stream `req`'s chunks; with `key`, load the adapter at `path` under `key` first (if
        this replica does not hold it). Errors before the first chunk come as one `_Failure`."""
        self._start_pusher()
        try:
            stream = None
            for attempt in range(3):
                if key is not None:
                    self.paths[key] = path  # type: ignore[assignment]
                    await self.load_adapter(key)
                    req = dataclasses.replace(req, adapter=key)
                stream = self.engine.generate(req)
                try:
                    first = await stream.__anext__()
                    break
                except AdapterNotFoundError:  # evicted between the load and the submit: load again
                    if key is None or attempt == 2:
                        raise
        except Exception as exc:  # noqa: BLE001 - delivered to the ingress as the typed error
            yield _Failure(exc)
            return
        yield first
        if not first.finished:
            async for chunk in stream:
                yield chunk

    async def probe(self, path: str) -> int | _Failure:
        """Validate the adapter at `path` against this base (register + unregister under a
        scratch name); its rank, or the typed error."""
        scratch = f"probe.{os.getpid()}.{time.monotonic_ns()}"
        loop = asyncio.get_running_loop()
        try:
            info = await loop.run_in_executor(None, self.engine.register_adapter, scratch, path)
        except Exception as exc:  # noqa: BLE001
            return _Failure(exc)
        await loop.run_in_executor(None, self.engine.unregister_adapter, scratch)
        return info.rank

    async def crash(self) -> None:
        """Exit the replica process at once (tests: Serve must replace it)."""
        os._exit(1)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


_REPLICA_CLASSES: dict[int, type] = {}


def replica_class(host_loras: int) -> type:
    """An engine replica class whose multiplexed loader (the host tier) keeps at most
    `host_loras` adapters (the limit of ``@serve.multiplexed`` is fixed when the method is
    decorated)."""
    if host_loras not in _REPLICA_CLASSES:
        class EngineReplica(_ReplicaBase):
            @serve.multiplexed(max_num_models_per_replica=host_loras)
            async def load_adapter(self, key: str) -> _Resident:
                return await self._load(key)

        _REPLICA_CLASSES[host_loras] = EngineReplica
    return _REPLICA_CLASSES[host_loras]


# ----------------------------------------------------------------------------- ingress side
@dataclasses.dataclass
class _Entry:
    path: str
    key: str
    rank: int


def _config_rank(path: Path) -> int:
    """The rank an adapter's config declares (native ``r``/``rank``; PEFT ``r``); 0 if unreadable."""
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return 0
    cfg = cfg.get("config", cfg) if isinstance(cfg, dict) else {}
    r = cfg.get("r", cfg.get("rank", 0)) if isinstance(cfg, dict) else 0
    return r if isinstance(r, int) else 0


class ReplicaEngine:
    """The `EngineProtocol` the ingress's FastAPI app runs on: generations go to the replicas,
    the adapter catalog and the tokenizer live here.

    Args:
        handle: the ``EngineReplica`` deployment's handle.
        tokenizer: the base model's tokenizer (chat templates, /tokenize).
        config: the replicas' `EngineConfig`.
        model_name: the base model's name.
        adapters: the catalog at start, name -> path.
        board: the `_Board` actor the replicas report to.
        multiplex: route by adapter (True) or to any replica (False: the random-routing baseline).
    """

    def __init__(self, handle: Any, tokenizer: Any, config: EngineConfig, model_name: str,
                 adapters: dict[str, Path], board: Any, multiplex: bool = True) -> None:
        self.handle, self.tokenizer, self.config, self.model_name = handle, tokenizer, config, model_name
        self.board, self.multiplex = board, multiplex
        self._lock = threading.Lock()
        self._versions: dict[str, int] = {}  # name -> loads so far (a reload gets a new key)
        self.catalog = {n: _Entry(str(p), self._next_key(n), _config_rank(p)) for n, p in adapters.items()}

    def _next_key(self, name: str) -> str:
        v = self._versions.get(name, 0)
        self._versions[name] = v + 1
        return name if v == 0 else f"{name}@{v}"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        key = path = None
        if request.adapter is not None:
            entry = self.catalog.get(request.adapter)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {request.adapter!r} is not registered."
                                           + did_you_mean(request.adapter, list(self.catalog)))
            key, path = entry.key, entry.path
        opts: dict[str, Any] = {"stream": True}
        if key is not None and self.multiplex:
            opts["multiplexed_model_id"] = key
        gen = self.handle.options(**opts).generate.remote(request, key, path)
        done = False
        try:
            try:
                async for item in gen:
                    if isinstance(item, _Failure):
                        done = True
                        raise item.exc
                    done = item.finished
                    yield item
            except RayActorError as exc:  # the replica process died under this request
                done = True
                raise APIError(503, "The engine replica serving this request stopped before it finished "
                               f"({type(exc).__name__}); Ray Serve replaces it. Retry the request.",
                               type="server_error", code="replica_unavailable") from None
        finally:
            if not done:  # the client left: cancelling the call aborts the replica's request
                gen.cancel()

    def abort(self, request_id: str) -> bool:
        """Nothing to do here: closing the `generate` stream cancels the replica's request."""
        return False

    def register_adapter(self, name: str, path: str) -> AdapterInfo:
        """Check the adapter on one replica, then add it to the catalog (replicas load it on
        first use). Raises DuplicateAdapterError and the engine's file/base errors."""
        if name in self.catalog:
            raise DuplicateAdapterError(f"adapter {name!r} is already registered")
        rank = self.handle.probe.remote(path).result()
        if isinstance(rank, _Failure):
            raise rank.exc
        with self._lock:
            if name in self.catalog:
                raise DuplicateAdapterError(f"adapter {name!r} is already registered")
            self.catalog[name] = entry = _Entry(path, self._next_key(name), rank)
        return self._info(name, entry, set())

    def unregister_adapter(self, name: str, wait: bool = True, timeout: float | None = None) -> None:
        """Drop `name` from the catalog: new requests get 404; requests already on a replica
        finish; replicas free the copy by LRU."""
        with self._lock:
            if self.catalog.pop(name, None) is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not registered."
                                           + did_you_mean(name, list(self.catalog)))

    def replicas(self) -> list[dict[str, Any]]:
        """Each live replica's report: replica id, cold_loads (disk), warm_loads (host -> slot),
        slot_hits, evictions (host tier), resident (host-tier keys), in_slots, engine stats."""
        import ray

        return ray.get(self.board.read.remote(STALE_S))

    def _info(self, name: str, e: _Entry, resident: set[str]) -> AdapterInfo:
        return AdapterInfo(name=name, source=e.path, method="lora", rank=e.rank, alpha=0.0, targets=(),
                           loaded=e.key in resident, slot=None, running_requests=0, host_bytes=0)

    def list_adapters(self) -> list[AdapterInfo]:
        """The catalog; ``loaded``: in a device slot of some replica (as on one engine)."""
        resident = {k for r in self.replicas() for k in r.get("in_slots", ())}
        return [self._info(n, e, resident) for n, e in sorted(self.catalog.items())]

    def stats(self) -> EngineStats:
        """The replicas' stats summed (latency percentiles: the worst replica's)."""
        rows = [r["stats"] for r in self.replicas()]
        fields = [f.name for f in dataclasses.fields(EngineStats)]
        if not rows:
            return EngineStats(**{f: 0 for f in fields})
        worst = {"ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s"}
        return EngineStats(**{f: (max if f in worst else sum)(r[f] for r in rows) for f in fields})

    def shutdown(self) -> None:
        pass


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP ingress: `adapterkit.serve.server.create_app` over a `ReplicaEngine`."""

    def __init__(self, replicas: Any, model: str, config: dict[str, Any], served_model_name: str, app_name: str,
                 adapter_roots: list[str], adapters: dict[str, str], api_key: str | None,
                 max_body_bytes: int | None, multiplex: bool = True) -> None:
        from adapterkit.serve.cli import discover_adapters

        found = {**discover_adapters(adapter_roots), **{n: Path(p) for n, p in adapters.items()}}
        self.engine = ReplicaEngine(replicas, _load_tokenizer(model), EngineConfig(**config), served_model_name,
                                    found, _board(app_name), multiplex)
        self.kw = dict(adapter_roots=adapter_roots, api_key=api_key, served_model_name=served_model_name,
                       max_body_bytes=max_body_bytes)

    def __serve_build_asgi_app__(self) -> Any:
        import anyio

        from adapterkit.serve.server import create_app

        app = create_app(self.engine, **self.kw)

        @app.get("/v1/replicas")
        async def replicas() -> dict[str, Any]:
            """Each live replica: id, cold/warm loads, slot hits, host-tier evictions, host-tier and
            slot residents, engine stats."""
            return {"object": "list", "data": await anyio.to_thread.run_sync(self.engine.replicas)}

        return app


def _load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    if model == "default":
        from adapterkit.models.default import default_model_path

        model = str(default_model_path())
    return AutoTokenizer.from_pretrained(model, local_files_only=True)


# ----------------------------------------------------------------------------- building
def build_ray_app(args: argparse.Namespace, *, replicas: int = 2, replica_cpus: float = 1.0,
                  multiplex: bool = True, app_name: str = "adapterkit") -> Any:
    """The Ray Serve application for parsed ``adapterkit serve`` arguments.

    Args:
        args: ``adapterkit serve`` arguments (``--model``, ``--adapter-root``, ``--max-loras``
            = device slots per replica, ``--max-cpu-loras`` = host tier per replica, default
            `DEFAULT_HOST_LORAS`...).
        replicas: engine replicas.
        replica_cpus: CPUs Ray reserves per replica (torch threads = this, at least 1).
        multiplex: route by adapter; False routes every request to any replica (baseline).
        app_name: the Serve application's name (also names its report board).
    Returns:
        A bound application for ``serve.run``.
    Raises:
        ConfigError: bad ``--adapter`` specs, a name found twice, ``replicas < 1``, a host
            tier smaller than the device slots.
    """
    from adapterkit.serve.cli import base_model_name, discover_adapters, engine_config, parse_adapter_specs

    if replicas < 1:
        raise ConfigError(f"--replicas: must be >= 1, got {replicas}")
    host_loras = DEFAULT_HOST_LORAS if args.max_cpu_loras is None else args.max_cpu_loras
    if host_loras < args.max_loras:
        raise ConfigError(f"--max-cpu-loras: under --ray it is each replica's host tier and must hold at least "
                          f"the {args.max_loras} device slots (--max-loras), got {host_loras}")
    explicit = parse_adapter_specs(args.adapter)
    clash = sorted(set(explicit) & set(discover_adapters(args.adapter_root)))
    if clash:
        raise ConfigError(f"--adapter: {clash} also found under --adapter-root; use another name")
    cfg = dataclasses.asdict(engine_config(args))
    cfg["max_cpu_loras"] = None  # the engine keeps what it holds: the multiplexed LRU bounds the host tier
    name = base_model_name(args)
    model = args.model if args.model == "default" else os.path.realpath(args.model)
    rep = serve.deployment(replica_class(host_loras), name="EngineReplica", num_replicas=replicas,
                           max_ongoing_requests=args.max_num_seqs,
                           # Ray hides GPUs from actors that reserve none: one per CUDA replica
                           ray_actor_options={"num_cpus": replica_cpus,
                                              "num_gpus": 1 if str(args.device).startswith("cuda") else 0})
    bound = rep.bind(model, cfg, name, app_name, max(1, int(replica_cpus)), args.unload_timeout)
    roots = [os.path.realpath(r) for r in args.adapter_root]
    adapters = {n: os.path.realpath(p) for n, p in explicit.items()}
    return Ingress.bind(bound, model, cfg, name, app_name, roots, adapters, args.api_key, args.max_body_bytes,
                        multiplex)


def app_builder(cli_args: dict[str, str]) -> Any:
    """``serve run adapterkit.serve.ray:app_builder model=DIR adapter_root=DIR replicas=2 ...``:
    each ``key=value`` is the ``adapterkit serve`` flag ``--key value`` (``_`` for ``-``;
    ``adapter_root`` may hold several roots separated by ``,``), plus ``replicas`` and
    ``replica_cpus``."""
    from adapterkit.cli import build_parser

    kv = dict(cli_args)
    replicas = int(kv.pop("replicas", 2))
    cpus = float(kv.pop("replica_cpus", 1))
    argv = ["serve"]
    for k, v in kv.items():
        for part in (v.split(",") if k in ("adapter_root", "adapter") else [v]):
            argv += [f"--{k.replace('_', '-')}", part]
    return build_ray_app(build_parser().parse_args(argv), replicas=replicas, replica_cpus=cpus)


def run_ray(args: argparse.Namespace) -> int:
    """``adapterkit serve --ray``: start (or join, with ``RAY_ADDRESS``) a Ray cluster, deploy,
    and serve HTTP on ``--host``/``--port`` until interrupted."""
    import ray

    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_ray_app(args, replicas=args.replicas, replica_cpus=args.replica_cpus)
    serve.run(app, name="adapterkit", route_prefix="/")
    log.info("serving on http://%s:%d with %d replicas (Ctrl-C stops)", args.host, args.port, args.replicas)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill`, systemd, docker stop: shut Serve down too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


__all__ = ["DEFAULT_HOST_LORAS", "Ingress", "ReplicaEngine", "app_builder", "build_ray_app", "replica_class", "run_ray"]
