"""The request schema with no model: strict validation, OpenAI error bodies, SamplingParams."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from inferhub.server.errors import param_path, validation_error
from inferhub.server.protocol import ChatCompletionRequest, CompletionRequest

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER, **fields}


def error_of(model: type[ChatCompletionRequest | CompletionRequest], body: Any) -> dict[str, Any]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    err = validation_error(info.value.errors()).body()["error"]
    assert err["type"] == "invalid_request_error"
    return dict(err)


def test_param_path_names_nested_fields_like_openai() -> None:
    assert param_path(("body", "messages", 0, "role")) == "messages[0].role"
    assert param_path(("body", "temperature")) == "temperature"
    assert param_path(("body",)) == ""


def test_defaults_map_to_openai_defaults() -> None:
    p = ChatCompletionRequest.model_validate(chat()).to_sampling_params()
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.stop, p.logprobs) == (
        1,
        1.0,
        1.0,
        None,
        [],
        None,
    )
    assert (p.presence_penalty, p.frequency_penalty, p.logit_bias, p.seed) == (0.0, 0.0, None, None)


def test_every_parameter_reaches_sampling_params() -> None:
    req = ChatCompletionRequest.model_validate(
        chat(
            temperature=0, top_p=0.5, n=3, stop="END", max_tokens=7, presence_penalty=1.5,
            frequency_penalty=-1, logit_bias={"42": 100, "7": -100.0}, seed=123,
            logprobs=True, top_logprobs=2, user="u1", top_k=5, min_p=0.1,
            ignore_eos=True,
        )
    )  # fmt: skip
    p = req.to_sampling_params()
    assert (p.temperature, p.top_p, p.n, p.stop, p.max_tokens) == (0.0, 0.5, 3, ["END"], 7)
    assert (p.presence_penalty, p.frequency_penalty) == (1.5, -1.0)
    assert p.logit_bias == {42: 100.0, 7: -100.0}
    assert (p.seed, p.logprobs, p.top_k, p.min_p, p.ignore_eos) == (123, 2, 5, 0.1, True)
    assert req.user == "u1"


def test_logprobs_without_top_logprobs_means_zero_alternatives() -> None:
    assert (
        ChatCompletionRequest.model_validate(chat(logprobs=True)).to_sampling_params().logprobs == 0
    )
    assert (
        ChatCompletionRequest.model_validate(chat(logprobs=False)).to_sampling_params().logprobs
        is None
    )


def test_max_completion_tokens_is_max_tokens() -> None:
    req = ChatCompletionRequest.model_validate(chat(max_completion_tokens=9))
    assert req.to_sampling_params().max_tokens == 9


def test_text_parts_are_joined_and_developer_is_system() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
        }
    )
    assert req.template_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ab"},
    ]


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"temperature": 2.5}, "temperature", "2.5 is greater than the maximum of 2"),
        ({"temperature": -0.1}, "temperature", "less than the minimum of 0"),
        ({"top_p": 0}, "top_p", "less than or equal to the minimum of 0"),
        ({"top_p": 1.1}, "top_p", "greater than the maximum of 1"),
        ({"n": 0}, "n", "less than the minimum of 1"),
        ({"n": 129}, "n", "greater than the maximum of 128"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"stop": 5}, "stop", "expected a string or an array of strings"),
        ({"presence_penalty": 2.01}, "presence_penalty", "maximum of 2"),
        ({"frequency_penalty": -3}, "frequency_penalty", "minimum of -2"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "outside [-100, 100]"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias", "outside [-100, 100]"),
        ({"logit_bias": {"hello": 1}}, "logit_bias", "is not a token id"),
        ({"logit_bias": {"5": "1"}}, "logit_bias", "expected a number"),
        ({"logit_bias": [1]}, "logit_bias", "expected an object"),
        ({"max_tokens": 0}, "max_tokens", "minimum of 1"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "maximum of 20"),
        ({"top_logprobs": 2}, "top_logprobs", "requires 'logprobs'"),
        ({"max_tokens": 5, "max_completion_tokens": 5}, "max_completion_tokens", "not both"),
        (
            {"stream_options": {"include_usage": True}},
            "stream_options",
            "only allowed when 'stream'",
        ),
        (
            {"stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
            "expected a boolean",
        ),
        ({"temperature": "1"}, "temperature", "expected a number, but got a string"),
        ({"temperature": True}, "temperature", "expected a number, but got a boolean"),
        ({"n": 1.0}, "n", "expected an integer, but got a number"),
        ({"n": "2"}, "n", "expected an integer, but got a string"),
        ({"stream": "true"}, "stream", "expected a boolean"),
        ({"seed": 1.5}, "seed", "expected an integer"),
        ({"seed": 2**64}, "seed", "greater than the maximum"),
        ({"user": 5}, "user", "expected a string"),
        ({"model": 5}, "model", "expected a string"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": "hi"}, "messages", "expected an array"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "Invalid value: 'robot'",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "no tool calling"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "Missing required parameter"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "Missing required parameter"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "got null"),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "messages[0].content",
            "expected a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "only 'text'",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
            "messages[0].name",
            "not supported",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "colour": 1}]},
            "messages[0].colour",
            "Unrecognized",
        ),
        ({"messages": ["hi"]}, "messages[0]", "expected an object"),
        ({"foo": 1}, "foo", "Unrecognized request argument supplied: foo"),
        ({"tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ({"top_k": -1}, "top_k", "minimum of 0"),
        ({"repetition_penalty": 1.2}, "repetition_penalty", "Unrecognized"),
    ],
)
def test_invalid_chat_requests(fields: dict[str, Any], param: str, fragment: str) -> None:
    err = error_of(ChatCompletionRequest, chat(**fields))
    assert err["param"] == param
    assert fragment in err["message"]


def test_missing_model_and_messages() -> None:
    err = error_of(ChatCompletionRequest, {"messages": USER})
    assert (err["param"], err["message"]) == ("model", "Missing required parameter: 'model'.")
    assert error_of(ChatCompletionRequest, {"model": "m"})["param"] == "messages"


def test_accepted_no_op_values_of_unsupported_fields() -> None:
    req = ChatCompletionRequest.model_validate(
        chat(response_format={"type": "text"}, modalities=["text"], store=False, tools=None)
    )
    assert req.messages[0].content == "hi"


def test_null_means_default() -> None:
    p = ChatCompletionRequest.model_validate(
        chat(temperature=None, top_p=None, n=None, stop=None, max_tokens=None, seed=None)
    ).to_sampling_params()
    assert (p.temperature, p.top_p, p.n, p.stop, p.max_tokens) == (1.0, 1.0, 1, [], None)


# -- completions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("text", ["text"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt: Any, expected: list[Any]) -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt == expected


def test_completion_defaults_to_16_tokens() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    assert req.to_sampling_params().max_tokens == 16


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"prompt": []}, "prompt", "non-empty"),
        ({"prompt": [1, "a"]}, "prompt", "only strings"),
        ({"prompt": [[]]}, "prompt", "only strings"),
        ({"prompt": 5}, "prompt", "expected a string"),
        ({"suffix": "x"}, "suffix", "not supported"),
        ({"logprobs": 6}, "logprobs", "maximum of 5"),
        ({"logprobs": True}, "logprobs", "expected an integer"),
        ({"echo": True, "logprobs": 1}, "echo", "not supported"),
        ({"best_of": 3}, "best_of", "not supported"),
        ({"prompt": ["a"] * 65, "n": 2}, "prompt", "At most 128 choices"),
        ({"messages": USER}, "messages", "Unrecognized"),
    ],
)
def test_invalid_completion_requests(fields: dict[str, Any], param: str, fragment: str) -> None:
    err = error_of(CompletionRequest, {"model": "m", "prompt": "x", **fields})
    assert err["param"] == param
    assert fragment in err["message"]
