"""Running an app under uvicorn: the URL announced once listening, SIGINT/SIGTERM draining
the running requests (the app refuses new ones meanwhile), then exit status 0; a deadline on
each request head, so that slow-header (slowloris) clients cannot hold connections open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
from collections.abc import Callable, Generator
from types import FrameType
from typing import ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from inferhub.server.errors import error_body
from inferhub.server.state import ServerState

log = logging.getLogger(__name__)

# How long a connection may take to send a request head (request line and headers), from
# when it opens or its previous response ends. uvicorn has no such limit of its own: its
# keep-alive timeout stops at the first byte, so a client sending a header byte now and then
# would hold its connection (and, with many of them, the server's sockets) forever.
HEADER_TIMEOUT_S = 10.0


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose next request head has not fully
    arrived within `header_timeout` seconds (a request whose head arrived is never cut), and
    answers a request that is not valid HTTP with OpenAI's JSON error instead of plain text."""

    header_timeout: ClassVar[float] = HEADER_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None
    _waiting_after: object = None  # the cycle (or None) that was current when the wait began

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._check_head()

    def on_response_complete(self) -> None:
        self._await_head()  # before super(): it may start a pipelined request at once
        super().on_response_complete()
        self._check_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body(msg, "invalid_request_error")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _await_head(self) -> None:
        self._stop_timer()
        self._waiting_after = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _check_head(self) -> None:
        if self._head_timer is not None and self.cycle is not self._waiting_after:
            self._stop_timer()  # a new request's head arrived: its cycle exists

    def _stop_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.cycle is not self._waiting_after:
            return
        log.info(
            "closing a connection from %s: no request head in %ss", self.client, self.header_timeout
        )
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def guarded_protocol(seconds: float) -> type[GuardedProtocol]:
    """The protocol class with its own head deadline (uvicorn builds one per connection)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"header_timeout": seconds})


class Server(uvicorn.Server):
    """uvicorn's Server that announces the URL once listening, marks the app as draining on
    SIGINT/SIGTERM, and does not re-raise the signal afterwards: a drained shutdown exits 0."""

    def __init__(
        self, config: uvicorn.Config, state: ServerState, announce: Callable[[str], None]
    ) -> None:
        super().__init__(config)
        self.state = state
        self.announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            port = self.servers[0].sockets[0].getsockname()[1]
            host = self.config.host
            self.announce(f"http://{f'[{host}]' if ':' in host else host}:{port}/v1")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True
        self.state.ready = False
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def server_config(
    app: FastAPI,
    *,
    host: str,
    port: int,
    drain_timeout: int,
    debug: bool,
    header_timeout: float = HEADER_TIMEOUT_S,
) -> uvicorn.Config:
    """The uvicorn configuration `run_server` serves with."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(header_timeout),
        log_level="debug" if debug else "warning",
        access_log=debug,
        timeout_graceful_shutdown=drain_timeout,
        lifespan="on",
    )


def run_server(
    app: FastAPI,
    *,
    host: str,
    port: int,
    drain_timeout: int,
    debug: bool,
    announce: Callable[[str], None],
) -> bool:
    """Serve until a signal, then drain for up to `drain_timeout` seconds; whether it started."""
    config = server_config(app, host=host, port=port, drain_timeout=drain_timeout, debug=debug)
    server = Server(config, app.state.server, announce)
    server.run()
    return server.started
