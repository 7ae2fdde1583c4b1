"""Clients nobody on the project wrote, against a real `pagedllm serve` on loopback: the `openai`
SDK (sync, async, streaming; tools, `response_format`, `.parse()` with a pydantic model, a
multi-turn tool conversation), `langchain-openai` (`invoke`, `stream`, `batch`, `bind_tools`,
`with_structured_output`) and `litellm` (the `hosted_vllm/` provider).

The model is the tiny random Llama (tests/conftest.py), sampled at temperature 1.0: it picks any
token the grammar allows, so a tool call or an object that parses proves the constraint reached
the sampler through the client's own request shape, not that the model knew the answer.
langchain-openai and litellm are the `compat` extra (`make compat`); without them their tests
skip, saying how to install them. Marked slow: starting the server is most of its ~60 s.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from tests.entrypoints.test_openai_server import API_KEY, serving
from tests.entrypoints.test_structured_output import server_flags

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 120  # far more than any constrained answer here needs


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)


def _compat(name: str):
    return pytest.importorskip(
        name, reason=f"{name} is not installed: `make compat` installs the client extras")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    yield from serving(*server_flags(tiny_llama_dir))


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"{server.url}/v1"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def check_call(name: str, arguments: str | dict) -> None:
    assert name in SCHEMAS, name
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, SCHEMAS[name])


# ---- openai ---------------------------------------------------------------------------------
def test_openai_sync_tools_stream_equals_plain(client, model):
    """Sync client, tool_choice required: the streamed deltas reassemble into the plain answer
    (same seed), and every call names a declared function with valid arguments."""
    args = {"model": model, "messages": USER, "tools": TOOLS, "tool_choice": "required",
            "temperature": 1.0, "seed": 4, "max_tokens": MAX_TOKENS}
    plain = client.chat.completions.create(**args).choices[0]
    assert plain.finish_reason == "tool_calls" and plain.message.tool_calls
    calls: dict[int, list] = {}
    for chunk in client.chat.completions.create(**args, stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, [None, "", ""])
            entry[0] = entry[0] or d.id
            entry[1] += d.function.name or ""
            entry[2] += d.function.arguments or ""
    assert [(c.function.name, c.function.arguments) for c in plain.message.tool_calls] \
        == [tuple(calls[i][1:]) for i in sorted(calls)]
    assert all(calls[i][0] for i in calls)  # each streamed call carries its id
    for c in plain.message.tool_calls:
        check_call(c.function.name, c.function.arguments)


def test_openai_multi_turn_tool_conversation(client, model):
    """The agent loop: a forced call, the assistant message echoed with model_dump() (content
    null, tool_calls), a `tool` reply per call, then a plain answer (tool_choice none)."""
    messages = list(USER)
    first = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, temperature=1.0, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=MAX_TOKENS)
    message = first.choices[0].message
    assert message.content is None and message.tool_calls[0].function.name == "get_weather"
    messages.append(message.model_dump())
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "{\"temp\": 21}"})
    again = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                           tool_choice="none", max_tokens=5, temperature=0)
    assert again.choices[0].message.tool_calls is None
    assert again.choices[0].finish_reason in ("stop", "length")


def test_openai_parse_with_a_pydantic_model(client, model):
    """`client.chat.completions.parse(response_format=Person)`: the SDK sends a strict
    json_schema and parses the reply into the model."""
    for seed in range(3):
        resp = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "Describe a person."}],
            response_format=Person, temperature=1.0, seed=seed, max_tokens=MAX_TOKENS)
        parsed = resp.choices[0].message.parsed
        assert isinstance(parsed, Person), resp.choices[0].message.content


def test_openai_async_stream_response_format(base_url, model):
    schema = Person.model_json_schema()  # pydantic never sets additionalProperties

    async def main():
        client = openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0,
                                    timeout=120)
        text = ""
        stream = await client.chat.completions.create(
            model=model, messages=USER, temperature=1.0, seed=2, max_tokens=MAX_TOKENS,
            stream=True, stream_options={"include_usage": True},
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": schema, "strict": True}})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
            text += "".join(c.delta.content or "" for c in chunk.choices)
        await client.close()
        return text, usage

    text, usage = asyncio.run(main())
    jsonschema.validate(json.loads(text), schema)
    assert usage is not None and usage.completion_tokens > 0


# ---- langchain-openai -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(base_url, model):
    langchain_openai = _compat("langchain_openai")
    return langchain_openai.ChatOpenAI(model=model, base_url=base_url, api_key=API_KEY,
                                       temperature=1.0, max_tokens=MAX_TOKENS, max_retries=0,
                                       timeout=120, seed=3)


def test_langchain_invoke_stream_batch(chat_model):
    short = chat_model.bind(max_tokens=6)
    reply = short.invoke("Say hello.")
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"]
    chunks = list(short.stream("Say hello."))
    assert len(chunks) > 1 and "".join(c.content for c in chunks) == reply.content  # same seed
    replies = short.batch(["Say hello.", "Name a color.", "Count to three."])
    assert len(replies) == 3 and all(isinstance(r.content, str) for r in replies)


@pytest.mark.parametrize("tool_choice", ["any", "add"])
def test_langchain_bind_tools(chat_model, tool_choice):
    """bind_tools with a forced choice ("any" is LangChain's spelling of "required")."""
    bound = chat_model.bind_tools(TOOLS, tool_choice=tool_choice)
    for _ in range(2):
        reply = bound.invoke("What is the weather in Paris?")
        assert reply.tool_calls, reply
        for call in reply.tool_calls:
            check_call(call["name"], call["args"])
            assert tool_choice == "any" or call["name"] == tool_choice
    streamed = None
    for chunk in bound.stream("What is 2 + 3?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls and all(c["name"] in SCHEMAS for c in streamed.tool_calls)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat_model, method):
    structured = chat_model.with_structured_output(Person, method=method)
    for _ in range(2):
        assert isinstance(structured.invoke("Describe a person."), Person)


# ---- litellm --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litellm():
    # No network here: litellm would fetch its model price list at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return _compat("litellm")


def test_litellm_hosted_vllm(litellm, base_url, model):
    common = {"model": f"hosted_vllm/{model}", "api_base": base_url, "api_key": API_KEY,
              "temperature": 1.0, "seed": 6, "max_tokens": MAX_TOKENS}
    reply = litellm.completion(messages=USER, **{**common, "max_tokens": 6})
    text = reply.choices[0].message.content
    assert isinstance(text, str) and reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 6
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(
        messages=USER, stream=True, **{**common, "max_tokens": 6}))
    assert streamed == text  # same seed
    # Tools, forced: litellm passes tools and tool_choice through to the server.
    called = litellm.completion(messages=USER, tools=TOOLS, tool_choice="required", **common)
    calls = called.choices[0].message.tool_calls
    assert calls and called.choices[0].finish_reason == "tool_calls"
    for call in calls:
        check_call(call.function.name, call.function.arguments)
    # response_format with a pydantic model: litellm turns it into a strict json_schema.
    answer = litellm.completion(messages=[{"role": "user", "content": "Describe a person."}],
                                response_format=Person, **common)
    Person.model_validate_json(answer.choices[0].message.content)


def test_litellm_async(litellm, base_url, model):
    async def main():
        return await litellm.acompletion(
            model=f"hosted_vllm/{model}", api_base=base_url, api_key=API_KEY, messages=USER,
            max_tokens=4, temperature=0)

    assert asyncio.run(main()).choices[0].finish_reason in ("stop", "length")
