"""Tool-call readers without a server: the Hermes `<tool_call>` parser, its streaming form
against its non-streamed form (any split of the text), and tools reaching the chat template."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")

from pagedllm.entrypoints.llm import LLM
from pagedllm.entrypoints.openai.tool_calls import HermesCalls, JsonCalls

CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_B = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
TEXTS = [
    "No tools needed: 4.",
    CALL_A,
    "Let me check. " + CALL_A + "\n" + CALL_B,
    "Broken: <tool_call>{not json}</tool_call> after",
    "Cut off: <tool_call>{\"name\": \"add\", \"argu",
    "a < b and <tool_ nothing",
]


def strip_ids(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_extract():
    content, calls = HermesCalls().extract("Let me check. " + CALL_A + "\n" + CALL_B)
    assert content == "Let me check."
    assert strip_ids(calls) == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    text = "Broken: <tool_call>{not json}</tool_call> after"
    assert HermesCalls().extract(text) == (text, [])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", range(5))
def test_hermes_stream_reassembles_into_extract(text, seed):
    rng = random.Random(seed)
    parser, deltas, pos = HermesCalls(), [], 0
    while pos < len(text):
        step = rng.randint(1, 7)
        deltas += parser.feed(text[pos:pos + step])
        pos += step
    deltas += parser.finish()
    content = "".join(d.get("content") or "" for d in deltas)
    calls: dict[int, list] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            entry = calls.setdefault(tc["index"], ["", ""])
            entry[0] += tc["function"].get("name", "")
            entry[1] += tc["function"]["arguments"]
    expected_content, expected_calls = HermesCalls().extract(text)
    assert [(n, json.loads(a)) for n, a in calls.values()] == strip_ids(expected_calls)
    if expected_calls:  # around calls, streamed content keeps the model's whitespace
        assert content.strip() == (expected_content or "")
    else:
        assert content == text


def test_json_calls_required_and_named():
    content, calls = JsonCalls("required").extract(
        '[{"name": "add", "parameters": {"a": 1, "b": 2}}]')
    assert content is None and strip_ids(calls) == [("add", {"a": 1, "b": 2})]
    assert strip_ids(JsonCalls("add").extract('{"a": 3, "b": 4}')[1]) == [
        ("add", {"a": 3, "b": 4})]
    assert JsonCalls("add").extract('{"a": 3, ') == ('{"a": 3, ', [])  # cut by max_tokens


def test_tools_reach_the_chat_template():
    class Tokenizer:
        chat_template = "x"

        def apply_chat_template(self, conversation, **kwargs):
            self.kwargs = kwargs
            return "rendered"

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [1, 2]}

    tok, tools = Tokenizer(), [{"type": "function", "function": {"name": "f"}}]
    LLM.encode_chat_with(tok, [{"role": "user", "content": "hi"}], True, tools)
    assert tok.kwargs["tools"] == tools
    LLM.encode_chat_with(tok, [{"role": "user", "content": "hi"}], True)
    assert "tools" not in tok.kwargs


@pytest.mark.parametrize("tools,choice,param", [
    ([{"type": "function", "function": {"name": "f"}}], {"function": 5}, "tool_choice"),
    ([{"type": "function", "function": {"name": "f", "parameters": 5}}], "required", "tools[0]"),
    ([{"type": "retrieval"}], "required", "tools[0]"),
    (None, "required", "tool_choice"),
    ([{"type": "function", "function": {"name": "f"}}], "auto", "tool_choice"),  # no parser
])
def test_check_tools_errors_name_the_field(tools, choice, param):
    from pagedllm.entrypoints.openai.protocol import APIError
    from pagedllm.entrypoints.openai.tool_calls import check_tools

    with pytest.raises(APIError) as exc:
        check_tools(tools, choice, None)
    assert exc.value.status == 400 and exc.value.param == param
