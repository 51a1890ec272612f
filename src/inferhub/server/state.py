"""What one app holds (`app.state.server`): its config, engines, gatekeeper and metrics, and
the protocols the server needs from an engine (the real `AsyncEngine` satisfies them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Protocol, cast

from fastapi import Depends, Header, Request

from inferhub.config import ServerConfig
from inferhub.engine.outputs import RequestOutput
from inferhub.engine.sampling_params import SamplingParams
from inferhub.gateway.interface import Gatekeeper, Principal
from inferhub.server.errors import model_not_found

if TYPE_CHECKING:
    from inferhub.server.metrics import ServerMetrics


class ServingTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]: ...


class EngineStatsLike(Protocol):
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_used_blocks(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def kv_cache_usage(self) -> float: ...
    @property
    def prefix_cache_hit_rate(self) -> float: ...
    @property
    def total_prompt_tokens(self) -> int: ...
    @property
    def total_generation_tokens(self) -> int: ...


class ServingEngine(Protocol):
    """The part of `inferhub.engine.async_engine.AsyncEngine` the server uses."""

    name: str
    max_model_len: int

    @property
    def tokenizer(self) -> ServingTokenizer: ...

    def start(self) -> None: ...

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStatsLike: ...

    def shutdown(self) -> None: ...


@dataclass
class ServerState:
    """Everything a request handler may reach; one per app, no module-level state."""

    config: ServerConfig
    engines: Mapping[str, ServingEngine]
    gatekeeper: Gatekeeper
    metrics: ServerMetrics
    started_at: int = 0
    ready: bool = False  # engines started and not draining
    draining: bool = False  # shutdown began: refuse new work, let running requests end
    in_flight: int = 0  # admitted requests not yet settled
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Per model: admitted requests that have not had their first output from the engine yet
    # (waiting in its queue or in prefill); bounded by config.max_queued_requests.
    queued: dict[str, int] = field(default_factory=dict)

    def engine_for(self, model: str) -> ServingEngine:
        engine = self.engines.get(model)
        if engine is None:
            raise model_not_found(model)
        return engine


def get_state(request: Request) -> ServerState:
    return cast(ServerState, request.app.state.server)


StateDep = Annotated[ServerState, Depends(get_state)]


async def authenticate(
    state: StateDep, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    return await state.gatekeeper.authenticate(authorization)


PrincipalDep = Annotated[Principal, Depends(authenticate)]
