"""POST /v1/completions (the legacy text API): one engine request per prompt (text or token
ids), `echo`, and the legacy logprobs shape; choices are numbered prompt-major
(`prompt_index * n + choice`), as OpenAI does."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from inferhub.engine.errors import PromptTooLongError
from inferhub.engine.outputs import CompletionOutput
from inferhub.engine.sampling_params import SamplingParamsError
from inferhub.server.errors import APIError, from_prompt_too_long
from inferhub.server.generation import ChoiceResult, admit_generation
from inferhub.server.protocol import CompletionRequest, PromptItem
from inferhub.server.responses import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Usage,
    now,
)
from inferhub.server.state import PrincipalDep, ServingTokenizer, StateDep, authenticate

router = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], tags=["completions"])


class CompletionRenderer:
    """Stream chunks: the echoed prompt (if asked), text chunks, a finish chunk per choice,
    and (if asked) a usage chunk with no choices."""

    def __init__(
        self, request_id: str, model: str, n: int, echo_texts: list[str] | None, with_logprobs: bool
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.n = n
        self.echo_texts = echo_texts
        self.with_logprobs = with_logprobs
        self.created = now()
        self.offsets: dict[int, int] = {}  # choice -> length of the text sent so far

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def start(self) -> list[BaseModel]:
        if self.echo_texts is None:
            return []
        chunks: list[BaseModel] = []
        for p, text in enumerate(self.echo_texts):
            for k in range(self.n):
                self.offsets[p * self.n + k] = len(text)
                chunks.append(self._chunk([CompletionChoice(index=p * self.n + k, text=text)]))
        return chunks

    def output(self, index: int, out: CompletionOutput) -> list[BaseModel]:
        chunks: list[BaseModel] = []
        logprobs = out.logprobs_delta if self.with_logprobs else None
        if out.text_delta or logprobs:
            offset = self.offsets.get(index, 0)
            chunks.append(
                self._chunk(
                    [
                        CompletionChoice(
                            index=index,
                            text=out.text_delta,
                            logprobs=CompletionLogprobs.of(logprobs, offset) if logprobs else None,
                        )
                    ]
                )
            )
            self.offsets[index] = offset + len(out.text_delta)
        if out.finish_reason is not None:
            chunks.append(
                self._chunk(
                    [CompletionChoice(index=index, text="", finish_reason=out.finish_reason)]
                )
            )
        return chunks

    def end(self, usage: Usage) -> list[BaseModel]:
        return [self._chunk([], usage)]


def _tokenize(tokenizer: ServingTokenizer, prompt: PromptItem, index: int) -> list[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise APIError(400, f"Prompt {index} is empty.", param="prompt")
    if any(not 0 <= t < tokenizer.vocab_size for t in ids):
        raise APIError(
            400,
            f"Prompt {index} holds token ids outside the vocabulary (size {tokenizer.vocab_size}).",
            param="prompt",
        )
    return ids


def _choice(r: ChoiceResult, echo: str, with_logprobs: bool) -> CompletionChoice:
    return CompletionChoice(
        index=r.index,
        text=echo + r.text,
        logprobs=CompletionLogprobs.of(r.logprobs or [], len(echo)) if with_logprobs else None,
        finish_reason=r.finish_reason,
    )


@router.post("/completions", response_model=Completion)
async def create_completion(
    body: CompletionRequest,
    principal: PrincipalDep,
    state: StateDep,
    request: Request,
    response: Response,
) -> Completion | Response:
    arrival = time.monotonic()
    engine = state.engine_for(body.model)
    tokenizer = engine.tokenizer
    params = body.to_sampling_params()
    prompts = [_tokenize(tokenizer, p, i) for i, p in enumerate(body.prompt)]
    echo = (
        [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompt]
        if body.echo
        else None
    )
    request_id = f"cmpl-{uuid.uuid4().hex}"
    try:
        gen = await admit_generation(
            state,
            principal,
            engine,
            request_id=request_id,
            prompts=prompts,
            params=params,
            user=body.user,
            arrival=arrival,
        )
    except PromptTooLongError as exc:
        raise from_prompt_too_long(exc, param="prompt") from exc
    except SamplingParamsError as exc:
        if exc.param == "messages":
            raise APIError(400, exc.message, param="prompt") from exc
        raise
    headers = {"x-request-id": request_id, **gen.admission.headers}
    with_logprobs = params.logprobs is not None
    if body.stream:
        render = CompletionRenderer(request_id, engine.name, params.n, echo, with_logprobs)
        return gen.streaming_response(gen.sse(render, body.include_usage), headers)
    results = await gen.collect(request)
    if results is None:  # the client left; nobody reads this
        return Response(status_code=499)
    response.headers.update(headers)
    return Completion(
        id=request_id,
        model=engine.name,
        choices=[
            _choice(r, echo[r.index // params.n] if echo else "", with_logprobs) for r in results
        ],
        usage=gen.usage(),
    )
