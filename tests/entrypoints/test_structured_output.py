"""Structured output and logits shaping through a real `pagedllm serve`, sampled at temperature
1.0 from the tiny random Llama: a random model picks any token the mask allows, so an output that
parses proves the mask, not the model (SmolLM2 would mostly write valid JSON unaided).

Requests run concurrently (continuous batching), n=2 (one matcher per sample), streamed and not.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.entrypoints.test_openai_server import API_KEY, serving

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{3}-[0-9]{2,4}"
CHOICES = ["red", "green", "blue", "dark \"purple\""]
NUM_REQUESTS = 20
MAX_TOKENS = 200  # far more than any output of these constraints needs
MESSAGES = [{"role": "user", "content": "Describe a person."}]


def server_flags(model_dir: str) -> tuple[str, ...]:
    """A tiny-model server with grammars and tool calls (shared with test_clients.py).
    Compact JSON: the random model would otherwise pick whitespace until max_tokens."""
    return ("--model", model_dir, "--max-model-len", "512", "--cpu-kv-cache-gib", "0.05",
            "--swap-space", "0.05", "--structured-outputs-disable-any-whitespace",
            "--tool-call-parser", "hermes")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    yield from serving(*server_flags(tiny_llama_dir))


@pytest.fixture(scope="module")
def aclient_factory(server):
    return lambda: openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY,
                                      max_retries=0, timeout=120)


async def _one(client, stream: bool, seed: int, **kwargs) -> list[tuple[str, str]]:
    """(text, finish_reason) of each of the n=2 choices."""
    args = dict(model=(await client.models.list()).data[0].id, messages=MESSAGES,
                temperature=1.0, n=2, seed=seed, max_tokens=MAX_TOKENS, **kwargs)
    if not stream:
        resp = await client.chat.completions.create(**args)
        return [(c.message.content, c.finish_reason) for c in resp.choices]
    texts, finish = ["", ""], [None, None]
    async for chunk in await client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    return list(zip(texts, finish))


def _streamed_equals_plain(one, factory, num_requests: int, **kwargs) -> list:
    """Each seed sent non-streamed and streamed at once; the two answers must be equal
    (seeded sampling; streamed deltas reassemble into the answer). Returns every choice."""
    async def main():
        client = factory()
        jobs = [one(client, stream, seed, **kwargs)
                for seed in range(num_requests) for stream in (False, True)]
        results = await asyncio.gather(*jobs)
        await client.close()
        return results

    results = asyncio.run(main())
    for k in range(0, len(results), 2):
        assert results[k] == results[k + 1]
    return [choice for r in results for choice in r]


def run_all(factory, num_requests: int = NUM_REQUESTS, **kwargs) -> list[tuple[str, str]]:
    return _streamed_equals_plain(_one, factory, num_requests, **kwargs)


@pytest.mark.parametrize("spelling", ["response_format", "guided_json", "structured_outputs"])
def test_json_schema_outputs_validate(aclient_factory, spelling):
    extra = {
        "response_format": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "person", "schema": SCHEMA, "strict": True}}},
        "guided_json": {"extra_body": {"guided_json": SCHEMA}},
        "structured_outputs": {"extra_body": {"structured_outputs": {"json": SCHEMA}}},
    }[spelling]
    choices = run_all(aclient_factory, **extra)
    assert len(choices) == 2 * 2 * NUM_REQUESTS
    for text, finish in choices:
        assert finish == "stop", text
        value = json.loads(text)
        jsonschema.validate(value, SCHEMA)
        # Properties come in the schema's order (a pydantic model's field order).
        assert list(value) == [k for k in SCHEMA["properties"] if k in value], text
    assert len({text for text, _ in choices}) > NUM_REQUESTS  # really sampled


def test_json_object(aclient_factory):
    # Any object: a random model may still be inside one at max_tokens, so few requests.
    for text, finish in run_all(aclient_factory, 4, response_format={"type": "json_object"}):
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{") and finish == "length"


def test_regex_and_choice(aclient_factory):
    for text, finish in run_all(aclient_factory, extra_body={"guided_regex": REGEX}):
        assert finish == "stop" and re.fullmatch(REGEX, text), text
    seen = set()
    for text, finish in run_all(aclient_factory, extra_body={"guided_choice": CHOICES}):
        assert finish == "stop" and text in CHOICES, text
        seen.add(text)
    assert len(seen) > 1


def test_invalid_constraints_are_400(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as http:
        for body, param in [({"guided_regex": "[0-9"}, "structured_outputs.regex"),
                            ({"guided_json": {"type": "objectx"}}, "structured_outputs.json"),
                            ({"guided_json": "{", }, "guided_json"),
                            ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
                            ({"structured_outputs": {"regex": "a", "json": {}}},
                             "structured_outputs")]:
            resp = http.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
            assert resp.status_code == 400, (body, resp.text)
            assert param in resp.json()["error"]["message"] + str(resp.json()["error"]["param"])


# ---- logit_bias, allowed_token_ids, bad_words (greedy, against the server itself) -----------
def _completion(http, **body) -> list[int]:
    resp = http.post("/v1/completions", json={
        "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
        "ignore_eos": True, "logprobs": 0, **body})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    return choice["logprobs"]["tokens"], choice["text"]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_logit_bias_allowed_and_bad_words(http, tokenizer):
    def piece(token_id: int) -> str:
        return tokenizer.decode([token_id])

    base_tokens, base_text = _completion(http)
    first = tokenizer.encode(base_text, add_special_tokens=False)[0]
    assert base_tokens[0] == piece(first)
    # +100 on one token: greedy picks it at every step.
    assert _completion(http, logit_bias={"42": 100})[0] == [piece(42)] * 6
    # -100 on the greedy first token: greedy takes another one.
    assert _completion(http, logit_bias={str(first): -100})[0][0] != base_tokens[0]
    # allowed_token_ids: every token is one of them, and not always the same one.
    allowed = [100, 200, 300, 400]
    tokens, _ = _completion(http, allowed_token_ids=allowed)
    assert len(tokens) == 6 and set(tokens) <= {piece(t) for t in allowed}
    # bad_words: the word is banned as written and after a space (each one token here).
    word = base_tokens[0].strip()
    banned = [tokenizer.encode(w, add_special_tokens=False) for w in (word, " " + word)]
    assert all(len(ids) == 1 for ids in banned), banned
    tokens, text = _completion(http, bad_words=[word])
    assert not {piece(ids[0]) for ids in banned} & set(tokens)
    assert text != base_text


# ---- tool calling ---------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                         "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


async def _calls(client, stream: bool, seed: int, **kwargs) -> list[tuple[list, str]]:
    """[(name, arguments) of each call, finish_reason] of each of the n=2 choices."""
    args = dict(model=(await client.models.list()).data[0].id, messages=MESSAGES,
                temperature=1.0, n=2, seed=seed, max_tokens=MAX_TOKENS, tools=TOOLS, **kwargs)
    if not stream:
        resp = await client.chat.completions.create(**args)
        return [([(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []],
                 ch.finish_reason) for ch in resp.choices]
    calls: list[dict] = [{}, {}]  # per choice: index -> [name, arguments, id]
    finish = [None, None]
    async for chunk in await client.chat.completions.create(**args, stream=True):
        for ch in chunk.choices:
            finish[ch.index] = ch.finish_reason or finish[ch.index]
            for d in ch.delta.tool_calls or []:
                entry = calls[ch.index].setdefault(d.index, ["", "", None])
                if d.id:
                    assert entry[2] is None  # the id comes once, in the call's first delta
                    entry[2] = d.id
                entry[0] += d.function.name or "" if d.function else ""
                entry[1] += d.function.arguments or "" if d.function else ""
    return [([(e[0], e[1]) for _, e in sorted(c.items())], f) for c, f in zip(calls, finish)]


def _run_calls(factory, num_requests: int, **kwargs) -> list[tuple[list, str]]:
    return _streamed_equals_plain(_calls, factory, num_requests, **kwargs)


@pytest.mark.parametrize("tool_choice", ["required", "add"])
def test_forced_tool_calls_always_parse(aclient_factory, tool_choice):
    choice = tool_choice if tool_choice == "required" else {
        "type": "function", "function": {"name": tool_choice}}
    seen = set()
    for calls, finish in _run_calls(aclient_factory, 10, tool_choice=choice):
        assert finish == "tool_calls" and calls
        for name, arguments in calls:
            assert name in SCHEMAS and (tool_choice == "required" or name == tool_choice)
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
            seen.add(name)
    assert seen == (set(SCHEMAS) if tool_choice == "required" else {tool_choice})


def test_tool_choice_errors(http):
    for body, param in [({"tools": TOOLS, "tool_choice": {"type": "function",
                                                          "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [{"type": "function"}]}, "tools[0]"),
                        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice")]:
        resp = http.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text
    # tool_choice "none": the tools are accepted and no call is made.
    resp = http.post("/v1/chat/completions", json={
        "messages": MESSAGES, "tools": TOOLS, "tool_choice": "none", "max_tokens": 3})
    assert resp.status_code == 200 and "tool_calls" not in resp.json()["choices"][0]["message"]
    # tool_choice "auto" (the default with tools): the model's own text, read by --tool-call-parser.
    resp = http.post("/v1/chat/completions", json={
        "messages": MESSAGES, "tools": TOOLS, "max_tokens": 3})
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
