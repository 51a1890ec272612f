"""The engine loop in its own thread, with one async stream of outputs per request."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass

from inferhub.config import EngineConfig
from inferhub.engine.errors import EngineDeadError
from inferhub.engine.llm_engine import EngineStats, LLMEngine
from inferhub.engine.outputs import RequestOutput
from inferhub.engine.sampling_params import SamplingParams
from inferhub.models.loader import LoadedModel

log = logging.getLogger(__name__)

OutputQueue = asyncio.Queue[RequestOutput | BaseException]  # one request's stream


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    stream: OutputQueue


@dataclass
class _Abort:
    request_id: str
    done: asyncio.Future[RequestOutput | None] | None = None


class AsyncEngine:
    """Runs `LLMEngine.step()` in a background thread; `generate()` streams per request.

    Requests and aborts reach the thread through a queue and are applied before the next
    step, so an abort frees the request's blocks within one step.
    """

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.engine = LLMEngine(config, loaded)
        self.config = config
        self.name = config.name or config.model
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None
        self._stats = self.engine.stats()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"engine-{self.name}", daemon=True
            )
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what still runs and stop the loop."""
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    # -- API -------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_token_ids, params)

    def stats(self) -> EngineStats:
        return self._stats

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; closing the stream early aborts the request."""
        if self._dead is not None or not self.is_running:
            raise EngineDeadError(f"the engine of {self.name} is not running")
        self.check_request(prompt_token_ids, params)
        stream: OutputQueue = asyncio.Queue()
        self._inbox.put(
            _Add(request_id, prompt_token_ids, params, asyncio.get_running_loop(), stream)
        )
        async with aclosing(stream_outputs(stream, lambda: self.abort(request_id))) as outs:
            async for out in outs:
                yield out

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    async def abort_and_wait(self, request_id: str) -> RequestOutput | None:
        """Abort and wait for the engine to do it; returns the final output (with the exact
        number of tokens generated per choice) or None if the request had already ended."""
        if not self.is_running:
            raise EngineDeadError(f"the engine of {self.name} is not running")
        fut: asyncio.Future[RequestOutput | None] = asyncio.get_running_loop().create_future()
        self._inbox.put(_Abort(request_id, fut))
        return await fut

    # -- the loop (engine thread) ------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        add = self._streams.get(out.request_id)
        if add is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        add.loop.call_soon_threadsafe(add.stream.put_nowait, out)

    def _deliver_step(self, outs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one call: one wake-up of the loop
        (and one GIL hand-over) per step instead of one per request."""
        routed = []
        for out in outs:
            add = self._streams.get(out.request_id)
            if add is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            routed.append((add.loop, add.stream, out))
        for loop, items in group_by_loop(routed).items():
            loop.call_soon_threadsafe(put_all, items)

    def _handle(self, msg: _Add | _Abort) -> None:
        if isinstance(msg, _Add):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
            except Exception as exc:
                msg.loop.call_soon_threadsafe(msg.stream.put_nowait, exc)
                return
            self._streams[msg.request_id] = msg
        else:
            final = self.engine.abort_request(msg.request_id)
            add = self._streams.pop(msg.request_id, None)
            if final is not None and add is not None:
                add.loop.call_soon_threadsafe(add.stream.put_nowait, final)
            if msg.done is not None:
                fut = msg.done
                fut.get_loop().call_soon_threadsafe(
                    lambda: None if fut.done() else fut.set_result(final)
                )

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                block = not self.engine.has_unfinished_requests()
                try:
                    msg = self._inbox.get(block=block)
                    while True:
                        if msg is None:
                            break
                        self._handle(msg)
                        msg = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                if self._stopping.is_set():
                    break
                self._deliver_step(self.engine.step())
                self._stats = self.engine.stats()
        except BaseException as exc:  # pragma: no cover - a bug in the engine itself
            log.exception("engine loop died")
            self._dead = exc
            for add in list(self._streams.values()):
                add.loop.call_soon_threadsafe(add.stream.put_nowait, EngineDeadError(str(exc)))
            self._streams.clear()
            return
        # Shutdown: abort what still runs so that callers see a final output.
        for request_id in list(self._streams):
            last = self.engine.abort_request(request_id)
            if last is not None:
                self._deliver(last)
        self._stats = self.engine.stats()


# -- the stream side, shared with the engine in a child process (engine_process.py) ------------
async def stream_outputs(
    stream: OutputQueue, abort: Callable[[], None]
) -> AsyncGenerator[RequestOutput, None]:
    """A request's outputs from its queue up to the finished one; an exception put there is
    raised; a consumer that stops before the end calls `abort`."""
    finished = False
    try:
        while True:
            item = await stream.get()
            if isinstance(item, BaseException):
                raise item
            finished = item.finished
            yield item
            if finished:
                return
    finally:
        if not finished:
            abort()


def group_by_loop(
    routed: Iterable[tuple[asyncio.AbstractEventLoop, OutputQueue, RequestOutput]],
) -> dict[asyncio.AbstractEventLoop, list[tuple[OutputQueue, RequestOutput]]]:
    """A step's outputs by the event loop of their stream: one hand-over (one wake-up of the
    loop, one GIL hand-over) per loop and step instead of one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputQueue, RequestOutput]]] = {}
    for loop, stream, out in routed:
        by_loop.setdefault(loop, []).append((stream, out))
    return by_loop


def put_all(items: list[tuple[OutputQueue, RequestOutput]]) -> None:
    """Runs in the event loop: each output into its stream's queue."""
    for stream, out in items:
        stream.put_nowait(out)
