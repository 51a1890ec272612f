"""POST /v1/chat/completions: the messages through the model's chat template, one engine
request (its n choices inside), and the answer or the SSE chunks in OpenAI's shape."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from jinja2 import TemplateError
from pydantic import BaseModel

from inferhub.engine.outputs import CompletionOutput
from inferhub.server.errors import APIError
from inferhub.server.generation import ChoiceResult, Generation, admit_generation
from inferhub.server.protocol import ChatCompletionRequest
from inferhub.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    Usage,
    now,
)
from inferhub.server.state import PrincipalDep, StateDep, authenticate

router = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], tags=["chat"])


class ChatRenderer:
    """Stream chunks: a role chunk per choice, content chunks, a finish chunk per choice, and
    (if asked) a usage chunk with no choices."""

    def __init__(self, request_id: str, model: str, n: int, with_logprobs: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.n = n
        self.with_logprobs = with_logprobs
        self.created = now()

    def _chunk(
        self, choices: list[ChatChunkChoice], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def start(self) -> list[BaseModel]:
        return [
            self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(self.n)
        ]

    def output(self, index: int, out: CompletionOutput) -> list[BaseModel]:
        chunks: list[BaseModel] = []
        logprobs = out.logprobs_delta if self.with_logprobs else None
        if out.text_delta or logprobs:
            chunks.append(
                self._chunk(
                    [
                        ChatChunkChoice(
                            index=index,
                            delta=ChatDelta(content=out.text_delta),
                            logprobs=ChatLogprobs.of(logprobs) if logprobs else None,
                        )
                    ]
                )
            )
        if out.finish_reason is not None:
            chunks.append(
                self._chunk(
                    [
                        ChatChunkChoice(
                            index=index, delta=ChatDelta(), finish_reason=out.finish_reason
                        )
                    ]
                )
            )
        return chunks

    def end(self, usage: Usage) -> list[BaseModel]:
        return [self._chunk([], usage)]


def _choice(r: ChoiceResult, with_logprobs: bool) -> ChatChoice:
    return ChatChoice(
        index=r.index,
        message=ChatMessageOut(content=r.text),
        logprobs=ChatLogprobs.of(r.logprobs or []) if with_logprobs else None,
        finish_reason=r.finish_reason,
    )


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest,
    principal: PrincipalDep,
    state: StateDep,
    request: Request,
    response: Response,
) -> ChatCompletion | Response:
    arrival = time.monotonic()
    engine = state.engine_for(body.model)
    params = body.to_sampling_params()
    try:
        prompt = engine.tokenizer.apply_chat_template(body.template_messages())
    except (TemplateError, ValueError) as exc:
        raise APIError(
            400, f"The model's chat template refused the messages: {exc}", param="messages"
        ) from exc
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    gen: Generation = await admit_generation(
        state,
        principal,
        engine,
        request_id=request_id,
        prompts=[prompt],
        params=params,
        user=body.user,
        arrival=arrival,
    )
    headers = {"x-request-id": request_id, **gen.admission.headers}
    with_logprobs = params.logprobs is not None
    if body.stream:
        render = ChatRenderer(request_id, engine.name, params.n, with_logprobs)
        return gen.streaming_response(gen.sse(render, body.include_usage), headers)
    results = await gen.collect(request)
    if results is None:  # the client left; nobody reads this
        return Response(status_code=499)
    response.headers.update(headers)
    return ChatCompletion(
        id=request_id,
        model=engine.name,
        choices=[_choice(r, with_logprobs) for r in results],
        usage=gen.usage(),
    )
