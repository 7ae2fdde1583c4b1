"""Batch-invariant mode against a real `pagedllm serve` (the logic of vLLM's online
batch-invariance test, written anew): 16 prompts of 10-50 words, temperature 0.6, top_p 1.0,
8 tokens, seed 42, logprobs 5, through /v1/completions:

  each prompt alone (cold prefix cache) -> alone again (warm) -> all 16 in one request ->
  16 concurrent requests; and on a second server that prefills in chunks of 8 tokens, all 16
  in one request from a cold cache.

Every run must give the same tokens and bitwise-equal token logprobs and top logprobs (JSON
floats are exact: Python writes the shortest repr that reads back to the same double).
`test_without_the_mode_the_bits_differ` shows the same check failing on a server without it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from .entrypoints.test_openai_server import API_KEY, serving
from .test_batch_invariance_offline import prompts

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow  # two servers of the default model, ~100 requests

BODY = {"model": "SmolLM2-135M-Instruct", "temperature": 0.6, "top_p": 1.0, "max_tokens": 8,
        "seed": 42, "logprobs": 5}


@pytest.fixture(scope="module")
def server():
    yield from serving("--batch-invariant")


def complete(url: str, prompt: str | list[str]) -> list[tuple]:
    """One /v1/completions request; per choice: (text, tokens, token_logprobs, top_logprobs)."""
    resp = httpx.post(f"{url}/v1/completions", json={**BODY, "prompt": prompt}, timeout=300,
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    return [(c["text"], c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"],
             c["logprobs"]["top_logprobs"]) for c in choices]


def runs(url: str, texts: list[str]) -> dict[str, list[tuple]]:
    out = {"alone, cold cache": [complete(url, t)[0] for t in texts],
           "alone, warm cache": [complete(url, t)[0] for t in texts],
           "one request of 16": complete(url, texts)}
    with ThreadPoolExecutor(len(texts)) as pool:
        out["16 concurrent"] = [r[0] for r in pool.map(lambda t: complete(url, t), texts)]
    return out


def mismatches(reference: list[tuple], other: list[tuple]) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(reference, other, strict=True)) if a != b]


def test_alone_batched_concurrent_cold_warm_chunked_are_bitwise_equal(server):
    texts = prompts(16, seed=1)
    got = runs(server.url, texts)
    reference = got.pop("alone, cold cache")
    assert all(len(r[1]) == 8 and len(r[3]) == 8 for r in reference)
    for name, other in got.items():
        assert mismatches(reference, other) == [], name
    # Chunked prefill (8-token chunks, several requests' chunks in one step), cold cache.
    for proc in serving("--batch-invariant", "--max-num-batched-tokens", "8"):
        chunked = complete(proc.url, texts)
    assert mismatches(reference, chunked) == [], "chunked prefill"


@pytest.mark.heavy  # the negative control: make test-heavy
def test_without_the_mode_the_bits_differ():
    """The check above can fail: a server without the mode gives other bits in a batch."""
    texts = prompts(16, seed=1)
    for proc in serving("--no-batch-invariant"):
        alone = [complete(proc.url, t)[0] for t in texts]
        batched = complete(proc.url, texts)
    assert mismatches(alone, batched) != []
