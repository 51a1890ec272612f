"""Running an app under uvicorn: the URL announced once listening, SIGINT/SIGTERM draining
the running requests (the app refuses new ones meanwhile), then exit status 0."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Generator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from inferhub.server.state import ServerState


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
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="debug" if debug else "warning",
        access_log=debug,
        timeout_graceful_shutdown=drain_timeout,
        lifespan="on",
    )
    server = Server(config, app.state.server, announce)
    server.run()
    return server.started
