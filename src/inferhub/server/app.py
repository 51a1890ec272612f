"""The app factory: `create_app(config, engines, gatekeeper)` wires the OpenAI routers, the
operator and account APIs (/admin, /v1/dashboard), the error shape, metrics, /health and
/ready, and owns the lifecycle of the engines and the gatekeeper (started at startup; at
shutdown, running requests drain, then the engines stop, then the gatekeeper closes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse

from inferhub import __version__
from inferhub.config import ServerConfig
from inferhub.gateway.interface import Gatekeeper
from inferhub.server import chat, completions, models
from inferhub.server.admin import admin_router
from inferhub.server.console.routes import console_router
from inferhub.server.dashboard import dashboard_router
from inferhub.server.errors import install_error_handlers, server_error
from inferhub.server.limits import BodyLimit, UnicodeGuard
from inferhub.server.metrics import CONTENT_TYPE, RequestCounter, ServerMetrics
from inferhub.server.state import ServerState, ServingEngine, StateDep

# After the HTTP server's own graceful wait, how long shutdown waits for cancelled requests
# to settle before the engines stop.
SETTLE_WAIT_S = 5.0

ops = APIRouter(tags=["operations"])


@ops.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@ops.get("/ready", response_model=None)
async def ready(state: StateDep) -> dict[str, object] | JSONResponse:
    """Readiness: every model is loaded and its engine runs, and the server is not draining."""
    down = [name for name, e in state.engines.items() if not getattr(e, "is_running", True)]
    if not state.ready or down:
        why = (
            "draining" if state.draining else f"engines not running: {down}" if down else "starting"
        )
        return server_error(f"Not ready ({why}).", 503).response()
    return {"status": "ready", "models": list(state.engines)}


@ops.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def create_app(
    config: ServerConfig, engines: Mapping[str, ServingEngine], gatekeeper: Gatekeeper
) -> FastAPI:
    """An app serving `engines` (served name -> engine), letting `gatekeeper` decide who may
    call and what it costs. The app starts the engines and shuts them down."""
    state = ServerState(
        config=config,
        engines=dict(engines),
        gatekeeper=gatekeeper,
        metrics=ServerMetrics(lambda: state.engines),
        started_at=int(time.time()),
    )
    state.idle.set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The database gateway has start/close (recovery, heartbeat); the protocol does not.
        gatekeeper_start = getattr(gatekeeper, "start", None)
        if gatekeeper_start is not None:
            await gatekeeper_start()
        for engine in state.engines.values():
            engine.start()
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            state.draining = True
            with anyio.move_on_after(SETTLE_WAIT_S):
                await state.idle.wait()
            for engine in state.engines.values():
                await asyncio.to_thread(engine.shutdown)
            gatekeeper_close = getattr(gatekeeper, "close", None)
            if gatekeeper_close is not None:
                await gatekeeper_close()

    app = FastAPI(
        title="inferhub",
        version=__version__,
        lifespan=lifespan,
        strict_content_type=False,
    )
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(UnicodeGuard)  # inside BodyLimit: sees only bodies within the limit
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestCounter, metrics=state.metrics)

    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(models.router)
    app.include_router(ops)
    # The operator and account APIs answer 404 `not_available` without the database gateway.
    app.include_router(admin_router())
    app.include_router(dashboard_router())
    app.include_router(console_router())  # the web console at /console
    return app
