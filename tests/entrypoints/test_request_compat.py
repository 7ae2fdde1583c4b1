"""What real clients send, against a real `pagedllm serve` (the tiny random Llama): the exact
payloads of issue 17 succeed, unknown fields are ignored with one warning naming them, and a
field that would change the answer and is not implemented is still a 400 naming it."""

from __future__ import annotations

import json

import pytest

from tests.entrypoints.test_openai_server import API_KEY, assert_error, serving

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

BASE = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
USER = {"role": "user", "content": "What is the weather in Paris?"}
# resp.choices[0].message.model_dump() of openai's ChatCompletionMessage.
ECHOED = {"role": "assistant", "content": "Sunny.", "refusal": None, "tool_calls": None,
          "annotations": [], "audio": None, "function_call": None}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    yield from serving("--model", tiny_llama_dir, "--max-model-len", "512",
                       "--cpu-kv-cache-gib", "0.05", "--swap-space", "0.05")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def ok(http, body: dict, path: str = "/v1/chat/completions") -> dict:
    resp = http.post(path, json={**BASE, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("body", [
    {"messages": [{**USER, "name": "alice"}]},
    {"messages": [USER, ECHOED, {"role": "user", "content": "And tomorrow?"}]},
    {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"}]},
    {"messages": [USER], "user": "u-1", "metadata": {"k": "v"}, "store": False,
     "parallel_tool_calls": True, "service_tier": "auto"},
    {"messages": [USER], "best_of": 1},
    {"messages": [USER], "n": 2, "best_of": 2, "temperature": 1.0, "seed": 3},
    {"messages": [USER], "max_completion_tokens": 3},
    {"messages": [USER], "n": 2, "best_of": 4, "temperature": 1.0, "seed": 3},
], ids=["name", "echoed-assistant", "tool-turns", "openai-extras", "best_of-1", "best_of-n",
        "max_completion_tokens", "best_of>n"])
def test_client_payloads_succeed(http, body):
    out = ok(http, body)
    assert len(out["choices"]) == body.get("n", 1)
    expected = body.get("max_completion_tokens", BASE["max_tokens"]) * body.get("n", 1)
    assert out["usage"]["completion_tokens"] == expected


def test_best_of_returns_the_n_best_of_its_samples(http):
    """best_of=4, n=2 returns the 2 of the 4 seeded samples (n=4, same seed) with the highest
    cumulative logprob, best first."""
    body = {"prompt": "The capital of France is", "temperature": 1.0, "seed": 5,
            "logprobs": 0, "max_tokens": 6, "ignore_eos": True}
    samples = ok(http, {**body, "n": 4}, "/v1/completions")["choices"]
    best = ok(http, {**body, "n": 2, "best_of": 4}, "/v1/completions")["choices"]

    def score(choice):
        return sum(choice["logprobs"]["token_logprobs"])

    ranked = sorted(samples, key=score, reverse=True)[:2]
    assert [c["text"] for c in best] == [c["text"] for c in ranked]
    assert [c["index"] for c in best] == [0, 1]


def test_echoed_message_model_dump_from_the_openai_client(client):
    """The agent loop as written with the openai client: append message.model_dump()."""
    messages = [USER]
    model = client.models.list().data[0].id
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=3,
                                           temperature=0)
    messages.append(first.choices[0].message.model_dump())
    messages.append({"role": "user", "content": "More?"})
    again = client.chat.completions.create(model=first.model, messages=messages, max_tokens=3,
                                           temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_unknown_fields_are_ignored_with_one_warning(server, http):
    plain = ok(http, {"prompt": "The capital of France is"}, "/v1/completions")
    extra = ok(http, {"prompt": "The capital of France is", "frobnicate": 1, "zzz_hint": "x"},
               "/v1/completions")
    assert extra["choices"][0]["text"] == plain["choices"][0]["text"]
    log = server.output()
    assert "ignoring unknown request fields: frobnicate, zzz_hint" in log
    assert log.count("frobnicate") == 1


@pytest.mark.parametrize("path,body,field,fragment", [
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix", "insertion"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3, "n": 2, "stream": True}, "best_of",
     "cannot be streamed"),
    ("/v1/completions", {"prompt": "hi", "best_of": 1, "n": 2}, "best_of", ">= n"),
    ("/v1/chat/completions", {"messages": [USER], "functions": [{"name": "f"}]}, "functions",
     "legacy"),
    ("/v1/chat/completions", {"messages": [USER], "modalities": ["text", "audio"]},
     "modalities", "text output"),
    ("/v1/chat/completions", {"messages": [USER], "response_format": {"type": "yaml"}},
     "response_format.type", "json_schema"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None}]},
     "messages[0].content", "tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]},
     "messages[0].tool_call_id", "required"),
])
def test_fields_that_change_the_answer_stay_400(http, path, body, field, fragment):
    err = assert_error(http.post(path, json=body), 400, fragment)
    assert err["param"] == field


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "The capital of France is", "n": 2}),
    ("/v1/chat/completions", {"messages": [USER], "n": 2}),
])
def test_continuous_usage_stats_on_every_chunk(http, path, body):
    payload = {**BASE, **body, "stream": True, "temperature": 1.0, "seed": 1,
               "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with http.stream("POST", path, json=payload) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks and all(c["usage"] is not None for c in chunks)
    completion = [c["usage"]["completion_tokens"] for c in chunks]
    assert completion == sorted(completion)  # running totals never go back
    assert completion[-1] == 2 * BASE["max_tokens"]
    assert len({c["usage"]["prompt_tokens"] for c in chunks}) == 1
