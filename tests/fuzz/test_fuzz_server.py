"""A seeded fuzzer against a real `pagedllm serve`: no input may get a 5xx or leave work behind.

Each case is a valid request (completions, chat, /tokenize, /detokenize) with one to three
mutations: a field set to a hostile value (wrong type, int64 edges, huge or tiny floats, long
or surrogate strings, deep lists), a field dropped or an unknown one added; or the raw body
broken (truncated, invalid UTF-8, NaN/Infinity, deep nesting, not an object, wrong
Content-Type). Pass: every response < 500, streams end with [DONE], and afterwards /health is
200 with nothing running and no KV block in use.

    PAGEDLLM_FUZZ_CASES=2000 pytest tests/fuzz      (make test-fuzz; make test runs 300)
"""

from __future__ import annotations

import json
import os
import random

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.entrypoints.test_openai_server import API_KEY, serving, wait_idle  # noqa: E402

NUM_CASES = int(os.environ.get("PAGEDLLM_FUZZ_CASES", "300"))
SEED = int(os.environ.get("PAGEDLLM_FUZZ_SEED", "0"))

EVIL = [None, True, False, -1, 0, 1, 2**31, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**30,
        1e308, -1e308, 1e-45, -0.0, 0.5, "", "x", "x" * 5000, "\ud800", "\U0001f600" * 50,
        [], [1, 2, 3], ["a", "b"], [-1], [2**63], [None], {}, {"a": 1}, [[[[]]]],
        list(range(2000)), ["x" * 300] * 20]
SAMPLING_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
                   "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
                   "logprobs", "echo", "min_tokens", "stop_token_ids", "ignore_eos", "stream",
                   "stream_options", "cache_salt", "model", "user", "max_completion_tokens",
                   "top_logprobs", "include_stop_str_in_output", "skip_special_tokens",
                   # unknown fields are ignored; these are refused or shape the logits
                   "best_of", "suffix", "logit_bias", "allowed_token_ids", "bad_words",
                   "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                   "structured_outputs", "response_format", "functions", "modalities"]


def base_request(rng: random.Random) -> tuple[str, dict]:
    kind = rng.choice(["completions", "chat", "tokenize", "detokenize"])
    if kind == "completions":
        prompt = rng.choice(["Hello", [5, 6, 7], ["a", "b"], [[5, 6], [7]]])
        return "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0}
    if kind == "chat":
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    if kind == "tokenize":
        return "/tokenize", {"prompt": "Hello world"}
    return "/detokenize", {"tokens": [5, 6, 7]}


def mutate(rng: random.Random, body: dict) -> dict:
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.7:
            key = rng.choice(SAMPLING_FIELDS + list(body))
            body[key] = rng.choice(EVIL)
        elif op < 0.85 and body:
            body.pop(rng.choice(list(body)))
        else:
            body[f"unknown_{rng.randrange(100)}"] = rng.choice(EVIL)
        if "messages" in body and rng.random() < 0.2:
            body["messages"] = [{"role": rng.choice(["user", "tool", "x", None]),
                                 "content": rng.choice(EVIL)}]
    return body


def raw_body(rng: random.Random, body: dict) -> tuple[bytes, str]:
    """A broken body, and the Content-Type to send it with."""
    text = json.dumps(body)
    choice = rng.randrange(7)
    if choice == 0:
        return text[: rng.randrange(len(text))].encode(), "application/json"
    if choice == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "application/json"
    if choice == 2:
        return text.replace("2", "NaN", 1).replace("0", "Infinity", 1).encode(), \
            "application/json"
    if choice == 3:
        depth = rng.choice([40, 1000, 5000])
        return ("[" * depth + "]" * depth).encode(), "application/json"
    if choice == 4:
        return rng.choice([b"[]", b"1", b'"x"', b"null", b""]), "application/json"
    if choice == 5:
        return text.encode(), rng.choice(["text/plain", "application/x-www-form-urlencoded"])
    return ('{"prompt": "' + "\\ud800" * 3 + '", "max_tokens": 2}').encode(), "application/json"


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    yield from serving("--model", tiny_llama_dir, "--max-model-len", "512",
                       "--cpu-kv-cache-gib", "0.05", "--swap-space", "0.05",
                       "--max-request-body-bytes", "1000000")


def test_no_input_gets_a_5xx_or_leaves_work_behind(server):
    rng = random.Random(SEED)
    failures = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as http:
        for case in range(NUM_CASES):
            path, body = base_request(rng)
            if rng.random() < 0.3:
                content, ctype = raw_body(rng, body)
            else:
                content, ctype = json.dumps(mutate(rng, body)).encode(), "application/json"
            with http.stream("POST", path, content=content,
                             headers={"Content-Type": ctype}) as resp:
                data = resp.read()
            if resp.status_code >= 500:
                failures.append((case, path, content[:200], resp.status_code, data[:300]))
            elif resp.status_code == 200 and b"data: " in data[:10]:
                if not data.rstrip().endswith(b"data: [DONE]"):
                    failures.append((case, path, content[:200], "stream cut", data[-200:]))
        assert not failures, failures[:5]
        assert http.get("/health").status_code == 200
        assert wait_idle(http)["pagedllm:engine_alive"] == 1  # nothing running, no KV in use
        # ...and it still answers correctly.
        ok = http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3,
                                                "temperature": 0, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
