"""The OpenAI-compatible server, end to end: a real `pagedllm serve` process on a free loopback
port, driven by the official `openai` client (sync and async) and httpx.

One server with the default model serves the module (429s: test_admission.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytestmark = pytest.mark.slow  # loads the default model

API_KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
START_TIMEOUT_S = 180
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ServerProcess:
    def __init__(self, *extra: str, env: dict | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--api-key", API_KEY, "--uvicorn-log-level", "warning",
               "--max-model-len", str(MAX_MODEL_LEN), "--cpu-kv-cache-gib", "0.25",
               "--swap-space", "0.25", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=env)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {START_TIMEOUT_S} s:\n{self.output()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def server():
    yield from serving()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                              timeout=120)


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def scrape(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(pagedllm:[a-z0-9_]+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)}


def wait_idle(http, timeout_s: float = 15.0) -> dict:
    """Poll /metrics until nothing runs or waits and no KV block is in use (aborts land in
    the core's next drain); returns the metrics."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(http)
        if m["pagedllm:num_requests_running"] == m["pagedllm:num_requests_waiting"] == 0 \
                and m["pagedllm:kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, f"still busy after {timeout_s} s: {m}"
        time.sleep(0.1)


def serving(*extra: str):
    """A fixture body: a started `pagedllm serve` with these flags, stopped afterwards."""
    proc = ServerProcess(*extra)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def assert_error(resp, status: int, *fragments: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in err["message"], err
    return err


# ---- basics ----------------------------------------------------------------------------------
def test_models_version_health(server, http, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/version").json()["version"]
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed


def test_chat_sync(client):
    resp = client.chat.completions.create(model=MODEL, messages=chat("What is 2 + 2?"),
                                          max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, messages=chat("Name three fruits."), max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_completion_stream_equals_non_stream_async(server):
    async def run():
        async with async_client(server) as aclient:
            kwargs = dict(model=MODEL, prompt="The three primary colors are", max_tokens=20,
                          temperature=0)
            full = await aclient.completions.create(**kwargs)
            stream = await aclient.completions.create(**kwargs, stream=True)
            text = "".join([c.choices[0].text async for c in stream])
            return full, text

    full, text = asyncio.run(run())
    assert full.choices[0].text and text == full.choices[0].text


def test_completion_prompt_forms_and_echo(http, client):
    prompt = "Once upon a time"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == prompt
    base = dict(model=MODEL, max_tokens=6, temperature=0)
    by_text = client.completions.create(prompt=prompt, **base).choices[0].text
    assert client.completions.create(prompt=ids, **base).choices[0].text == by_text
    many = client.completions.create(prompt=[prompt, "1, 2, 3,"], **base)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == by_text
    many_ids = client.completions.create(prompt=[ids, ids], **base)
    assert [c.text for c in many_ids.choices] == [by_text, by_text]
    assert many_ids.usage.prompt_tokens == 2 * len(ids)
    echoed = client.completions.create(prompt=prompt, echo=True, **base).choices[0].text
    assert echoed == prompt + by_text


def test_tokenize_messages_matches_chat_usage(http, client):
    messages = chat("Hello there")
    count = http.post("/tokenize", json={"messages": messages}).json()["count"]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert resp.usage.prompt_tokens == count


# ---- sampling features -----------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stop_string_never_leaks(client, endpoint):
    if endpoint == "chat":
        def create(**kw):
            return client.chat.completions.create(
                model=MODEL, messages=chat("Tell me about the moon."), temperature=0,
                max_tokens=40, **kw)

        def text_of(c):
            return c.message.content if hasattr(c, "message") else (c.delta.content or "")
    else:
        def create(**kw):
            return client.completions.create(model=MODEL, prompt="The moon is", temperature=0,
                                             max_tokens=40, **kw)

        def text_of(c):
            return c.text
    full = text_of(create().choices[0])
    assert len(full) > 20, full
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]

    cut = create(stop=[stop]).choices[0]
    assert text_of(cut) == expected and cut.finish_reason == "stop"
    pieces = [text_of(c.choices[0]) for c in create(stop=[stop], stream=True) if c.choices]
    streamed = "".join(pieces)
    assert streamed == expected and stop not in streamed
    kept = create(stop=[stop], extra_body={"include_stop_str_in_output": True}).choices[0]
    assert text_of(kept) == expected + stop


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL, messages=chat("Say hello."), max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert entry.logprob == pytest.approx(tops[0])  # greedy picks the most likely token


def test_completion_logprobs_and_echo(client, http):
    prompt = "The capital of France is"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                     logprobs=2)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text
    assert len(lp.token_logprobs) == resp.usage.completion_tokens == 5
    assert all(len(top) in (2, 3) and max(top.values()) == pytest.approx(v)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                       logprobs=1, echo=True).choices[0]
    num_prompt = len(http.post("/tokenize", json={"prompt": prompt}).json()["tokens"])
    assert echoed.text == prompt + resp.choices[0].text
    assert len(echoed.logprobs.tokens) == num_prompt + 5
    assert echoed.logprobs.token_logprobs[0] is None
    assert echoed.logprobs.token_logprobs[num_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_n2_with_seed(client):
    kwargs = dict(model=MODEL, prompt="My favourite animal is", max_tokens=12, temperature=1.0,
                  n=2, seed=1234)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.text for c in again.choices]  # seeded: reproducible
    assert texts[0] != texts[1]  # but the two samples differ
    assert 2 <= first.usage.completion_tokens <= 24
    streamed = ["", ""]
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts
    replies = client.chat.completions.create(
        model=MODEL, messages=chat("Name an animal."), max_tokens=8, temperature=1.0, n=2,
        seed=99)
    assert [c.index for c in replies.choices] == [0, 1]


# ---- errors ----------------------------------------------------------------------------------
# Unknown fields are ignored (tests/entrypoints/test_request_compat.py); a field that would
# change the answer and is not implemented stays a 400 naming it.
@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {"messages": chat("hi"), "functions": [{"name": "f"}]},
     "functions"),
    ("/v1/chat/completions", {"messages": chat("hi"), "modalities": ["audio"]}, "modalities"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2, "stream": True}, "best_of"),
])
def test_unimplemented_field_that_changes_the_answer_is_400(http, path, body, field):
    err = assert_error(http.post(path, json={"model": MODEL, **body}), 400, f"'{field}'")
    assert err["param"] == field


@pytest.mark.parametrize("body,field", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"logprobs": 99}, "logprobs"),
    ({"temperature": "hot"}, "temperature"),
    ({"stop": [1, 2]}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], "x"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
])
def test_invalid_value_is_400(http, body, field):
    err = assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", **body}),
                       400, field)
    assert err["type"] == "invalid_request_error"


def test_cache_salt_is_taken_and_checked(http):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}
    assert http.post("/v1/completions", json={**body, "cache_salt": "tenant-a"}).status_code == 200
    assert_error(http.post("/v1/completions", json={**body, "cache_salt": ""}), 400, "cache_salt")


def test_invalid_values_with_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=chat("hi"), top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    # tool_choice "auto" (the default with tools) needs --tool-call-parser; "required" does not.
    with pytest.raises(openai.BadRequestError, match="tool-call-parser"):
        client.chat.completions.create(model=MODEL, messages=chat("hi"), tools=[{
            "type": "function", "function": {"name": "f", "parameters": {}}}])


def test_too_long_names_the_context_length(http, client):
    long_prompt = "hello " * (MAX_MODEL_LEN + 50)
    msg = f"maximum context length is {MAX_MODEL_LEN} tokens"
    err = assert_error(http.post("/v1/completions", json={"prompt": long_prompt}), 400, msg)
    assert err["code"] == "context_length_exceeded"
    assert_error(http.post("/v1/chat/completions", json={"messages": chat(long_prompt)}), 400, msg)
    err = assert_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2000}),
                       400, msg, "However, you requested")
    with pytest.raises(openai.BadRequestError, match=msg):
        client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=MAX_MODEL_LEN)


def test_unknown_model_is_404(http, client):
    err = assert_error(http.post("/v1/completions", json={"model": "gpt-17", "prompt": "hi"}), 404,
                       "gpt-17")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=chat("hi"))


def test_api_key_required_everywhere_but_health(server):
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/version"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/tokenize"), ("POST", "/detokenize")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            resp = httpx.request(method, server.url + path, headers=headers, json={}, timeout=10)
            assert_error(resp, 401, "API key")
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---- disconnects, concurrency, metrics ----------------------------------------------------------
def test_disconnect_mid_stream_frees_blocks(server, http):
    before = wait_idle(http)["pagedllm:generation_tokens_total"]
    body = {"model": MODEL, "messages": chat("Write a very long story."), "max_tokens": 500,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as resp:
        assert resp.status_code == 200
        got = [line for _, line in zip(range(12), resp.iter_lines())]
        assert any(line.startswith("data: ") for line in got)
        m = scrape(http)
        assert m["pagedllm:num_requests_running"] == 1
        assert m["pagedllm:kv_cache_usage_perc"] > 0
    after = wait_idle(http)["pagedllm:generation_tokens_total"]
    assert after - before < 400  # aborted long before max_tokens


def test_disconnect_non_streaming_frees_blocks(server, http):
    before = wait_idle(http)["pagedllm:generation_tokens_total"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=1.5),
                   headers={"Authorization": f"Bearer {API_KEY}"})
    after = wait_idle(http)["pagedllm:generation_tokens_total"]
    assert 0 < after - before < 400


QUESTIONS = [f"{q} (#{i})" for i, q in enumerate([
    "What is the capital of France?", "Name a color.", "What is 3 + 4?", "Say something nice.",
    "Name a planet.", "What do cats eat?", "Give me a word that rhymes with blue.",
    "What is water made of?"] * 4)]


def test_32_concurrent_equal_sequential(server, client):
    def kwargs(q):
        return dict(model=MODEL, messages=chat(q), max_tokens=6, temperature=0)

    sequential = [client.chat.completions.create(**kwargs(q)).choices[0].message.content
                  for q in QUESTIONS]

    async def run():
        async with async_client(server) as aclient:
            resps = await asyncio.gather(*(aclient.chat.completions.create(**kwargs(q))
                                           for q in QUESTIONS))
            return [r.choices[0].message.content for r in resps]

    assert len(QUESTIONS) == 32
    assert asyncio.run(run()) == sequential


def test_metrics_match_requests(http, client):
    names = ["num_requests_running", "num_requests_waiting", "num_requests_swapped",
             "kv_cache_usage_perc", "num_preemptions_total", "prefix_cache_queries_total",
             "prefix_cache_hits_total", "prompt_tokens_total", "generation_tokens_total",
             "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
             "e2e_request_latency_seconds_count"]
    before = wait_idle(http)
    assert all(f"pagedllm:{n}" in before for n in names), sorted(before)
    resp = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=7,
                                     temperature=0, extra_body={"ignore_eos": True})
    after = wait_idle(http)

    def delta(name):
        return after[f"pagedllm:{name}"] - before[f"pagedllm:{name}"]

    assert delta("prompt_tokens_total") == resp.usage.prompt_tokens
    assert delta("generation_tokens_total") == resp.usage.completion_tokens == 7
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds"):
        assert delta(f"{hist}_count") == 1 and delta(f"{hist}_sum") > 0


def test_still_healthy_at_end(server, client):
    assert server.proc.poll() is None
    assert httpx.get(f"{server.url}/health").status_code == 200
    resp = client.chat.completions.create(model=MODEL, messages=chat("Bye!"), max_tokens=4)
    assert resp.choices[0].message.content


# ---- health probes, retry hints, finished-request counters, error logs -------------------------
def test_head_health_answers_like_get(server):
    resp = httpx.head(f"{server.url}/health", timeout=10)  # no key needed, as for GET
    assert resp.status_code == 200 and resp.content == b""


def _success(metrics: dict) -> dict[str, float]:
    return {reason: metrics[f'pagedllm:request_success_total{{finished_reason="{reason}"}}']
            for reason in ("stop", "length", "abort", "error")}


def test_request_success_counts_each_request_once_by_reason(server, http, client):
    before = _success(wait_idle(http))
    length = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=3,
                                       temperature=0, n=2, extra_body={"ignore_eos": True})
    stop = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=64,
                                     temperature=0, stop=["e"], extra_body={"ignore_eos": True})
    assert [c.finish_reason for c in length.choices] == ["length", "length"]
    assert stop.choices[0].finish_reason == "stop"
    body = {"model": MODEL, "prompt": "Write a very long story.", "max_tokens": 500,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        assert [line for _, line in zip(range(4), resp.iter_lines())]  # then hang up
    after = _success(wait_idle(http))
    # n=2 counts once; the hung-up stream is an abort.
    assert {r: after[r] - before[r] for r in after} == {"stop": 1, "length": 1, "abort": 1,
                                                         "error": 0}


def test_4xx_log_line_says_why_without_the_body(server, http):
    secret = "a-prompt-that-must-not-reach-the-log"
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": secret,
                                              "temperature": -1})
    message = assert_error(resp, 400)["message"]
    assert "Retry-After" not in resp.headers
    log = server.output()
    assert f"WARNING pagedllm: POST /v1/completions -> 400: {message}" in log
    assert secret not in log
