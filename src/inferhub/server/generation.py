"""One admitted generation request from admission to its single `settle`: the engine
sub-requests (one per prompt) merged into one stream of choice outputs, the token counts
billing needs, disconnect detection (stream or not), SSE framing and metrics.

The lifecycle, whatever happens: `admit_generation` (check, reserve) -> `collect()` or
`sse()` -> `settle()` exactly once (completed, client_disconnected, error, timeout, shutdown).

Overload and time limits: `admit_generation` refuses a request at once (503, Retry-After)
when `max_queued_requests` requests already wait for the model's engine; a request still
running `request_timeout_s` after it arrived is aborted (504, or an error event once its
stream has started), and a stream whose client reads too slowly to take it in that time is
cut. The engine never waits for a client: a slow reader's outputs wait in its own queue,
which holds at most its `n * max_tokens` outputs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from inferhub.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from inferhub.engine.sampling_params import SamplingParams
from inferhub.gateway.interface import Admission, Principal
from inferhub.server.errors import APIError, as_api_error, overloaded, request_timeout, server_error
from inferhub.server.responses import Usage
from inferhub.server.state import ServerState, ServingEngine

log = logging.getLogger("inferhub.requests")

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"
ABORT_WAIT_S = 10.0  # how long cleanup waits for the engine to confirm an abort (one step)
STREAM_GRACE_S = 5.0  # past the request timeout, for the error event to reach the client


# Characters that JSON leaves raw but that str.splitlines() treats as line ends: SSE ends lines
# only at CR/LF, yet clients that split with splitlines() (httpx's aiter_lines) would cut an
# event in two. In JSON they can only stand inside strings, where the \u escape means the same.
_SPLITLINES_ESCAPES = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_data(json_text: str) -> bytes:
    """One SSE event carrying `json_text`, with no character a line splitter could break on."""
    return b"data: " + json_text.translate(_SPLITLINES_ESCAPES).encode() + b"\n\n"


def sse(model: BaseModel) -> bytes:
    return sse_data(model.model_dump_json())


@dataclass
class ChoiceResult:
    """One choice, accumulated (non-streaming responses)."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class ChunkRenderer(Protocol):
    """Turns a generation's events into response-format chunks (chat or completions)."""

    def start(self) -> list[BaseModel]: ...

    def output(self, index: int, out: CompletionOutput) -> list[BaseModel]: ...

    def end(self, usage: Usage) -> list[BaseModel]: ...


class Generation:
    """An admitted request on one engine; see the module docstring for its lifecycle."""

    def __init__(
        self,
        state: ServerState,
        engine: ServingEngine,
        admission: Admission,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        user: str | None,
        arrival: float,
    ) -> None:
        self.state = state
        self.engine = engine
        self.admission = admission
        self.request_id = admission.request_id
        self.model = admission.model
        self.prompts = prompts
        self.params = params
        self.user = user
        self.arrival = arrival
        self.num_choices = len(prompts) * params.n
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.first_token_at: float | None = None
        self._tokens: dict[int, int] = {}  # global choice index -> tokens generated
        self._finish: dict[int, str] = {}
        self._cached: dict[int, int] = {}  # prompt index -> cached prompt tokens
        self._open: set[int] = set(range(len(prompts)))  # prompts whose request still runs
        self._settled = False
        self._queued = True  # counted in state.queued until its first engine output
        timeout = state.config.request_timeout_s
        self.timeout_s = timeout
        self.deadline = None if timeout is None else arrival + timeout
        self.timed_out = False

    # -- counts --------------------------------------------------------------------------------
    @property
    def completion_tokens(self) -> int:
        return sum(self._tokens.values())

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens, sum(self._cached.values()))

    def _dequeue(self) -> None:
        if self._queued:
            self._queued = False
            self.state.queued[self.model] -= 1

    def _timeout_error(self) -> APIError:
        self.timed_out = True
        return request_timeout(self.timeout_s or 0.0)

    def sub_request_id(self, prompt_index: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{prompt_index}"

    def _absorb(
        self, prompt_index: int, out: RequestOutput
    ) -> tuple[list[tuple[int, CompletionOutput]], int]:
        """Take one engine output into the counts; returns its events and its new tokens."""
        self._cached[prompt_index] = out.num_cached_tokens
        new_tokens = 0
        events = []
        for c in out.outputs:
            index = prompt_index * self.params.n + c.index
            # Counts are cumulative; a late, older output must not lower them.
            seen = self._tokens.get(index, 0)
            if c.num_output_tokens > seen:
                new_tokens += c.num_output_tokens - seen
                self._tokens[index] = c.num_output_tokens
            if c.finish_reason is not None:
                self._finish[index] = c.finish_reason
            events.append((index, c))
        if out.finished:
            self._open.discard(prompt_index)
        if new_tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        return events, new_tokens

    # -- the merged stream -----------------------------------------------------------------------
    async def events(self) -> AsyncGenerator[tuple[int, CompletionOutput], None]:
        """Every choice output of every prompt, as (global choice index, output).

        Raises APIError when the engine fails a request or aborts it on shutdown. Closing
        this iterator early aborts whatever still runs in the engine."""
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

        async def pump(prompt_index: int) -> None:
            stream = self.engine.generate(
                self.sub_request_id(prompt_index), self.prompts[prompt_index], self.params
            )
            try:
                async for out in stream:
                    queue.put_nowait((prompt_index, out))
            except BaseException as exc:
                queue.put_nowait(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(self.prompts))]
        running = len(tasks)
        try:
            while running:
                if self.deadline is None:
                    item = await queue.get()
                else:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the item
                    # when it arrives together with a cancellation and drops the cancellation
                    # (a client that left looked like one that stayed: CI caught it)
                    try:
                        async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                            item = await queue.get()
                    except TimeoutError:
                        raise self._timeout_error() from None
                self._dequeue()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                prompt_index, out = item
                events, new_tokens = self._absorb(prompt_index, out)
                if new_tokens:
                    await self.state.gatekeeper.record_tokens(self.admission, new_tokens)
                if out.error:
                    raise server_error(f"The engine failed on this request: {out.error}")
                for index, c in events:
                    if c.finish_reason == "abort":
                        raise server_error(
                            "The request was aborted because the server is shutting down.", 503
                        )
                    yield index, c
        finally:
            with anyio.CancelScope(shield=True):
                await self._stop(tasks, queue)

    async def _stop(
        self,
        tasks: Sequence[asyncio.Future[None]],
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None],
    ) -> None:
        """Abort what still runs and count every token the engine generated: its final
        counts of aborted requests, and outputs still queued that nobody read."""
        abort_and_wait: Callable[[str], Awaitable[RequestOutput | None]] | None = getattr(
            self.engine, "abort_and_wait", None
        )
        new_tokens = 0
        confirmed = abort_and_wait is not None
        for prompt_index in sorted(self._open):
            if abort_and_wait is None:
                break
            try:
                final = await asyncio.wait_for(
                    abort_and_wait(self.sub_request_id(prompt_index)), ABORT_WAIT_S
                )
            except (TimeoutError, RuntimeError):
                confirmed = False  # the engine is gone; the tokens seen so far are what we know
                continue
            if final is not None:
                new_tokens += self._absorb(prompt_index, final)[1]
        if confirmed:
            # The engine has handed over every output of these requests (a request that ended
            # just before its abort included): let the pumps read them to their final output
            # rather than drop what they have not read yet.
            await asyncio.wait(tasks, timeout=ABORT_WAIT_S)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, tuple):
                new_tokens += self._absorb(*item)[1]
        if new_tokens:
            try:
                await self.state.gatekeeper.record_tokens(self.admission, new_tokens)
            except Exception:
                log.exception("recording the last tokens of %s failed", self.request_id)

    # -- non-streaming -------------------------------------------------------------------------------
    async def collect(self, request: Request) -> list[ChoiceResult] | None:
        """Run to the end and return the choices in index order; None if the client left
        first (the engine requests are then aborted). Settles in every case."""
        end_state = "error"
        try:
            results = await until_disconnected(request, self._accumulate())
            end_state = "completed" if results is not None else "client_disconnected"
            return results
        except BaseException as exc:
            end_state = self._end_state_of(exc)
            raise
        finally:
            await self.settle(end_state)

    async def _accumulate(self) -> list[ChoiceResult]:
        results = {i: ChoiceResult(i) for i in range(self.num_choices)}
        async with aclosing(self.events()) as events:
            async for index, c in events:
                r = results[index]
                if c.text_delta:
                    r.text_parts.append(c.text_delta)
                if c.logprobs_delta is not None:
                    r.logprobs = r.logprobs or []
                    r.logprobs.extend(c.logprobs_delta)
                if c.finish_reason is not None:
                    r.finish_reason = c.finish_reason
        return [results[i] for i in range(self.num_choices)]

    # -- streaming -------------------------------------------------------------------------------------
    async def sse(self, render: ChunkRenderer, include_usage: bool) -> AsyncGenerator[bytes, None]:
        """The SSE body: the renderer's chunks, an optional usage chunk, then `[DONE]`.
        An error after the stream started is sent as an OpenAI error event."""
        end_state = "error"
        try:
            for chunk in render.start():
                yield sse(chunk)
            async with aclosing(self.events()) as events:
                async for index, c in events:
                    for chunk in render.output(index, c):
                        yield sse(chunk)
            if include_usage:
                for chunk in render.end(self.usage()):
                    yield sse(chunk)
            yield DONE
            end_state = "completed"
        except Exception as exc:  # the stream has started: the error becomes an event
            end_state = "timeout" if self.timed_out else "error"
            body = as_api_error(exc).body()
            yield sse_data(json.dumps(body, ensure_ascii=False)) + DONE
        except BaseException as exc:
            end_state = self._end_state_of(exc)
            raise
        finally:
            await self.settle(end_state)

    def streaming_response(
        self, body: AsyncGenerator[bytes, None], headers: dict[str, str]
    ) -> GenerationStream:
        return GenerationStream(self, body, headers)

    # -- the end ---------------------------------------------------------------------------------------
    def _end_state_of(self, exc: BaseException) -> str:
        if self.timed_out:
            return "timeout"
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return "shutdown" if self.state.draining else "client_disconnected"
        return "error"

    async def settle(self, end_state: str) -> None:
        """Bill the engine's token counts; only the first call does anything."""
        if self._settled:
            return
        self._settled = True
        finish_reasons = [self._finish.get(i, "abort") for i in range(self.num_choices)]
        with anyio.CancelScope(shield=True):
            try:
                await self.state.gatekeeper.settle(
                    self.admission,
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion_tokens,
                    end_state=end_state,
                    finish_reasons=finish_reasons,
                )
            except Exception:
                log.exception("settling %s failed", self.request_id)
            finally:
                self._release(end_state, finish_reasons)

    def _release(self, end_state: str, finish_reasons: list[str]) -> None:
        self._dequeue()
        e2e = time.monotonic() - self.arrival
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        self.state.metrics.observe_request(
            self.model,
            end_state,
            e2e=e2e,
            ttft=ttft,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            num_choices=self.num_choices,
        )
        log.info(
            "request %s model=%s user=%r end=%s finish=%s prompt_tokens=%d completion_tokens=%d "
            "e2e=%.3fs",
            self.request_id, self.model, self.user, end_state, ",".join(finish_reasons),
            self.prompt_tokens, self.completion_tokens, e2e,
        )  # fmt: skip
        self.state.in_flight -= 1
        if self.state.in_flight == 0:
            self.state.idle.set()


class GenerationStream(StreamingResponse):
    """An SSE response that settles its generation even if the body never ran (the client
    left before the first byte)."""

    media_type = "text/event-stream"

    def __init__(
        self, generation: Generation, body: AsyncGenerator[bytes, None], headers: dict[str, str]
    ) -> None:
        super().__init__(
            body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers}
        )
        self.generation = generation
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        generation = self.generation
        try:
            if generation.deadline is None:
                await super().__call__(scope, receive, send)
            else:
                # The engine side times out in events(); this cuts a client that reads too
                # slowly to take the stream in (its sends wait on the socket).
                with anyio.move_on_after(
                    generation.deadline - time.monotonic() + STREAM_GRACE_S
                ) as scope_:
                    await super().__call__(scope, receive, send)
                if scope_.cancelled_caught:
                    generation.timed_out = True
                    log.warning(
                        "cut the stream of %s: its client read too slowly",
                        self.generation.request_id,
                    )
        finally:
            # A disconnect can leave the body suspended at a `yield` that Starlette never
            # closes: close it now (that aborts the engine requests), then settle if the body
            # never ran at all.
            with anyio.CancelScope(shield=True):
                await self._body.aclose()
            await self.generation.settle("client_disconnected")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work` unless the client disconnects first; then cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def admit_generation(
    state: ServerState,
    principal: Principal,
    engine: ServingEngine,
    *,
    request_id: str,
    prompts: list[list[int]],
    params: SamplingParams,
    user: str | None,
    arrival: float,
) -> Generation:
    """Check the request against the engine, then reserve it with the gatekeeper."""
    if state.draining:
        raise server_error("The server is shutting down; no new requests are accepted.", 503)
    for prompt in prompts:
        engine.check_request(prompt, params)
    queued = state.queued.get(engine.name, 0)
    if queued >= state.config.max_queued_requests:
        state.metrics.observe_overload(engine.name)
        raise overloaded(engine.name, queued)
    max_completion = sum(
        params.n * (params.max_tokens or engine.max_model_len - len(p)) for p in prompts
    )
    admission = await state.gatekeeper.admit(
        principal,
        request_id=request_id,
        model=engine.name,
        prompt_tokens=sum(len(p) for p in prompts),
        max_completion_tokens=max_completion,
    )
    state.in_flight += 1
    state.idle.clear()
    state.queued[engine.name] = state.queued.get(engine.name, 0) + 1
    return Generation(state, engine, admission, prompts, params, user=user, arrival=arrival)
