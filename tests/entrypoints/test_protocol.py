"""Request schemas and error messages of the OpenAI server (no model, no server process)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from pydantic import ValidationError

from pagedllm.entrypoints.openai.api_server import served_model_name
from pagedllm.entrypoints.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)


def error_of(model, body: dict) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value)


@pytest.mark.parametrize("prompt,expected", [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_prompt_forms(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompt == expected


@pytest.mark.parametrize("prompt", [[], "", [[]], [True, 2], [["a"]], {"x": 1}, None, [1, "a"]])
def test_bad_prompts_name_the_field(prompt):
    err = error_of(CompletionRequest, {"prompt": prompt})
    assert err.status == 400 and err.param == "prompt" and "prompt" in err.message


def test_unknown_fields_are_ignored_and_named():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x", "foo": 1}],
                                frob=2, stream_options={"include_usage": True, "bar": 3})
    assert sorted(req.ignored_fields()) == ["frob", "messages[0].foo", "stream_options.bar"]
    req.check_unsupported()  # ignored fields are not refused
    assert error_of(CompletionRequest, {}).message == "Missing required field 'prompt'"


@pytest.mark.parametrize("model,body,field", [
    (CompletionRequest, {"prompt": "x", "suffix": "!"}, "suffix"),
    (CompletionRequest, {"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    (CompletionRequest, {"prompt": "x", "best_of": 1, "n": 2}, "best_of"),
    (ChatCompletionRequest, {"messages": [], "functions": [{"name": "f"}]}, "functions"),
    (ChatCompletionRequest, {"messages": [], "modalities": ["audio"]}, "modalities"),
])
def test_fields_that_would_change_the_answer_are_refused(model, body, field):
    with pytest.raises(APIError) as exc:
        model(**body).check_unsupported()
    assert exc.value.param == field and exc.value.status == 400
    body = {**body, field: None}
    model(**body).check_unsupported()  # null means "off"


def test_message_content_parts_and_roles():
    req = ChatCompletionRequest(messages=[{"role": "developer", "content": "be brief"}, {
        "role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert req.messages[1].content == "a\nb"
    err = error_of(ChatCompletionRequest, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert err.param == "messages[0].content" and "text content" in err.message
    assert error_of(ChatCompletionRequest, {"messages": [{"role": "robot", "content": "x"}]}
                    ).param == "messages[0].role"


def test_sampling_params_defaults_and_nulls():
    req = CompletionRequest(prompt="x", temperature=None, n=None, stop="END", top_k=-1)
    params = req.to_sampling_params(req.max_tokens, req.num_logprobs())
    assert (params.temperature, params.n, params.stop, params.max_tokens) == (1.0, 1, ["END"], 16)
    chat = ChatCompletionRequest(messages=[], max_tokens=5, max_completion_tokens=7,
                                 logprobs=True)
    assert chat.requested_max_tokens == 7 and chat.num_logprobs() == 0
    with pytest.raises(APIError, match="top_logprobs needs logprobs"):
        ChatCompletionRequest(messages=[], top_logprobs=2).num_logprobs()
    with pytest.raises(APIError, match="stream_options"):
        CompletionRequest(prompt="x", stream_options={"include_usage": True}
                          ).check_stream_options()


@pytest.mark.parametrize("model,name", [
    (None, "SmolLM2-135M-Instruct"),
    ("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("/models/llama-7b.Q8_0.gguf", "llama-7b"),
    ("/models/qwen2-0.5b-f16.gguf", "qwen2-0.5b"),
    ("/models/Qwen2-0.5B/", "Qwen2-0.5B"),
])
def test_served_model_name(model, name):
    assert served_model_name(model) == name
