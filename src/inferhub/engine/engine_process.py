"""The engine loop in a child process: the `AsyncEngine` interface, without sharing a GIL.

In one process the HTTP event loop and the engine thread take turns on the GIL: every torch
op releases it, the event loop grabs it, and the engine thread then blocks to get it back
(~120 times per decode step at concurrency 16), while its OpenMP worker falls asleep in
between. Measured on the 2-core CPU: the forward pass of a 16-sequence decode step ran ~45%
slower in the server than offline, with 70k voluntary context switches of the engine thread
(none offline). Here the engine (`LLMEngine.step()` in a loop) owns the main thread of its own
process, as vLLM's EngineCore and SGLang's scheduler do.

Protocol, one `multiprocessing` pipe, pickled tuples:
  parent -> child: ("add", request_id, prompt_token_ids, params) | ("abort", request_id, token)
                   | ("stop",)
  child -> parent: ("ready", _EngineInfo) | ("error", message)         (once, at start)
                   ("step", [RequestOutput], EngineStats)             (after every step)
                   ("failed", request_id, exception)                  (add_request refused)
                   ("aborted", request_id, RequestOutput | None, token, EngineStats)
                   ("dead", message)                                  (the loop crashed)
Requests are checked in the parent (`check_request` with the child's limits) before they are
sent, so bad input fails at once, as with the in-thread engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import pickle
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from inferhub.config import EngineConfig
from inferhub.engine.async_engine import OutputQueue, group_by_loop, put_all, stream_outputs
from inferhub.engine.errors import EngineDeadError, EngineError
from inferhub.engine.llm_engine import EngineStats, LLMEngine, RequestLimits, check_request
from inferhub.engine.outputs import RequestOutput
from inferhub.engine.sampling_params import SamplingParams
from inferhub.models.config import ModelConfig
from inferhub.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a large model from a slow disk


@dataclass
class _EngineInfo:
    tokenizer: Tokenizer
    model_config: ModelConfig
    limits: RequestLimits
    stats: EngineStats


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: OutputQueue


class ProcessEngine:
    """`AsyncEngine`'s interface with `LLMEngine` in a child process (spawned: safe with
    threads, CUDA and OpenMP). The constructor returns once the model is loaded there."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.name = config.name or config.model
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=_engine_main,
            args=(config, child_conn),
            name=f"engine-{self.name}",
            daemon=True,  # never outlives the server
        )
        self._process.start()
        child_conn.close()
        try:
            if not self._conn.poll(START_TIMEOUT_S):
                raise EngineError(f"the engine of {self.name} did not start in time")
            first = self._conn.recv()
        except (EOFError, OSError):
            first = ("error", f"the engine process exited with code {self._process.exitcode}")
        except BaseException:
            self._kill()
            raise
        if first[0] != "ready":
            self._kill()
            raise EngineError(first[1])
        info: _EngineInfo = first[1]
        self.tokenizer = info.tokenizer
        self.model_config = info.model_config
        self.max_model_len = info.limits.max_model_len
        self._limits = info.limits
        self._stats = info.stats
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # _streams and _waiters: loop threads and the receiver
        self._streams: dict[str, _Stream] = {}
        self._waiters: dict[int, asyncio.Future[RequestOutput | None]] = {}
        self._tokens = itertools.count()
        self._dead: BaseException | None = None
        self._stopping = False
        self._receiver: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._receiver is None:
            self._receiver = threading.Thread(
                target=self._receive, name=f"engine-{self.name}-receiver", daemon=True
            )
            self._receiver.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what still runs (callers see a final output) and stop the process."""
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(EngineDeadError):
            self._send(("stop",))
        if self._receiver is not None:
            self._receiver.join(timeout)
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("the engine process of %s did not stop; killing it", self.name)
            self._kill()
        self._conn.close()

    def _kill(self) -> None:
        self._process.kill()
        self._process.join(5.0)

    @property
    def is_running(self) -> bool:
        return (
            self._receiver is not None
            and self._dead is None
            and not self._stopping
            and self._process.is_alive()
        )

    # -- API -------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        check_request(self._limits, prompt_token_ids, params)

    def stats(self) -> EngineStats:
        return self._stats

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; closing the stream early aborts the request."""
        if not self.is_running:
            raise EngineDeadError(f"the engine of {self.name} is not running")
        self.check_request(prompt_token_ids, params)
        queue: OutputQueue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = _Stream(asyncio.get_running_loop(), queue)
        async with aclosing(stream_outputs(queue, lambda: self.abort(request_id))) as outs:
            self._send(("add", request_id, prompt_token_ids, params))
            async for out in outs:
                yield out

    def abort(self, request_id: str) -> None:
        with contextlib.suppress(EngineDeadError):
            self._send(("abort", request_id, None))

    async def abort_and_wait(self, request_id: str) -> RequestOutput | None:
        """Abort and wait for the engine to do it; returns the final output (with the exact
        number of tokens generated per choice) or None if the request had already ended."""
        if not self.is_running:
            raise EngineDeadError(f"the engine of {self.name} is not running")
        fut: asyncio.Future[RequestOutput | None] = asyncio.get_running_loop().create_future()
        token = next(self._tokens)
        with self._lock:
            self._waiters[token] = fut
        self._send(("abort", request_id, token))
        return await fut

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError) as exc:  # the pipe is closed: the process is gone
            raise EngineDeadError(f"the engine of {self.name} is not running") from exc

    # -- the receiver thread -----------------------------------------------------------------
    def _receive(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "step":
                self._stats = msg[2]
                self._deliver(msg[1])
            elif kind == "failed":
                self._fail_one(msg[1], msg[2])
            elif kind == "aborted":
                self._stats = msg[4]
                self._aborted(msg[1], msg[2], msg[3])
            elif kind == "dead":
                self._dead = EngineDeadError(msg[1])
                log.error("the engine of %s died: %s", self.name, msg[1])
        if self._dead is None and not self._stopping:
            self._dead = EngineDeadError(
                f"the engine process of {self.name} exited (code {self._process.exitcode})"
            )
            log.error("%s", self._dead)
        self._fail_all(EngineDeadError(f"the engine of {self.name} stopped"))

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one call (one wake-up per step)."""
        routed = []
        with self._lock:
            for out in outs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                routed.append((stream.loop, stream.queue, out))
        for loop, items in group_by_loop(routed).items():
            _call_soon(loop, put_all, items)

    def _fail_one(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            _call_soon(stream.loop, stream.queue.put_nowait, exc)

    def _aborted(self, request_id: str, final: RequestOutput | None, token: int | None) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            fut = None if token is None else self._waiters.pop(token, None)
        if final is not None and stream is not None:
            _call_soon(stream.loop, stream.queue.put_nowait, final)
        if fut is not None:
            _call_soon(fut.get_loop(), _resolve, fut, final)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            waiters, self._waiters = list(self._waiters.values()), {}
        for stream in streams:
            _call_soon(stream.loop, stream.queue.put_nowait, exc)
        for fut in waiters:
            _call_soon(fut.get_loop(), _resolve, fut, None)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
        loop.call_soon_threadsafe(fn, *args)


def _resolve(fut: asyncio.Future[RequestOutput | None], value: RequestOutput | None) -> None:
    if not fut.done():
        fut.set_result(value)


# -- the child process ---------------------------------------------------------------------------
def _engine_main(config: EngineConfig, conn: Connection) -> None:
    """The child's main: load, report ready, then step while there is work."""
    # Ctrl-C reaches the whole process group; the parent drains, then sends "stop".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = LLMEngine(config)
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(
        ("ready", _EngineInfo(engine.tokenizer, engine.model_config, engine.limits, engine.stats()))
    )
    try:
        _loop(engine, conn)
    except (EOFError, OSError, KeyboardInterrupt):  # the parent is gone (or Ctrl-C reached us)
        pass
    except BaseException as exc:  # a bug in the engine itself
        log.exception("engine loop died")
        with contextlib.suppress(OSError):
            conn.send(("dead", f"{type(exc).__name__}: {exc}"))


def _loop(engine: LLMEngine, conn: Connection) -> None:
    while True:
        # Block for a message when idle; otherwise take whatever has arrived, then step.
        if not engine.has_unfinished_requests() or conn.poll():
            msg = conn.recv()
            while True:
                if msg[0] == "stop":
                    _stop(engine, conn)
                    return
                _handle(engine, conn, msg)
                if not conn.poll():
                    break
                msg = conn.recv()
        if engine.has_unfinished_requests():
            outs = engine.step()
            conn.send(("step", outs, engine.stats()))


def _handle(engine: LLMEngine, conn: Connection, msg: tuple[Any, ...]) -> None:
    if msg[0] == "add":
        _, request_id, prompt, params = msg
        try:
            engine.add_request(request_id, prompt, params)
        except Exception as exc:
            conn.send(("failed", request_id, _picklable(exc)))
    elif msg[0] == "abort":
        _, request_id, token = msg
        final = engine.abort_request(request_id)
        conn.send(("aborted", request_id, final, token, engine.stats()))


def _stop(engine: LLMEngine, conn: Connection) -> None:
    """Shutdown: abort what still runs so that callers see a final output."""
    finals = [
        out
        for request_id in engine.request_ids()
        if (out := engine.abort_request(request_id)) is not None
    ]
    conn.send(("step", finals, engine.stats()))


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return EngineError(f"{type(exc).__name__}: {exc}")
    return exc
