"""The server under load.

- Admission control counts the real queue: `--max-waiting N` refuses (429, Retry-After) only a
  request that would still wait for a slot after the step that first sees it, beyond N waiting
  ones. A burst that fits the free slots is admitted whole, however fast it comes.
- Streams aborted at random points leak nothing: no KV block, no open request, no memory.

One real `pagedllm serve` with the tiny random Llama: 72 sequence slots, --max-waiting 4.
"""

from __future__ import annotations

import asyncio
import random
import re

import pytest

from tests.entrypoints.test_openai_server import (
    API_KEY, assert_error, scrape, serving, wait_idle,
)

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

SLOTS, MAX_WAITING = 72, 4
# Long enough that no request of a burst finishes before the burst has been answered.
LONG = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "temperature": 0,
        "stream": True}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    yield from serving("--model", tiny_llama_dir, "--max-model-len", "512",
                       "--cpu-kv-cache-gib", "0.1", "--swap-space", "0.05",
                       "--max-num-seqs", str(SLOTS), "--max-waiting", str(MAX_WAITING))


async def burst(url: str, n: int, body: dict, opened: list) -> list[httpx.Response]:
    """Send n streaming requests at once; keep the admitted ones open (in `opened`)."""
    client = httpx.AsyncClient(base_url=url, timeout=60,
                               headers={"Authorization": f"Bearer {API_KEY}"},
                               limits=httpx.Limits(max_connections=n + 8))
    opened.append(client)

    async def one() -> httpx.Response:
        resp = await client.send(client.build_request("POST", "/v1/completions", json=body),
                                 stream=True)
        if resp.status_code != 200:
            await resp.aread()
        else:
            opened.append(resp)
        return resp

    return await asyncio.gather(*(one() for _ in range(n)))


async def close(opened: list) -> None:
    for item in reversed(opened):
        await item.aclose()


def test_a_burst_that_fits_the_free_slots_is_admitted_whole_then_the_cap_holds(server, http):
    refused_before = scrape(http)["pagedllm:num_requests_refused_total"]

    async def main():
        opened: list = []
        try:
            # 64 at once into 72 free slots: every one runs, none waits, none is refused.
            first = await burst(server.url, 64, LONG, opened)
            # 64 more while those run: 8 free slots, then 4 may wait; the other 52 get 429.
            second = await burst(server.url, 64, LONG, opened)
            running = scrape(http)
        finally:
            await close(opened)
        return first, second, running

    first, second, running = asyncio.run(main())
    assert [r.status_code for r in first] == [200] * 64
    codes = [r.status_code for r in second]
    assert codes.count(200) == SLOTS - 64 + MAX_WAITING and codes.count(429) == 52
    assert running["pagedllm:num_requests_running"] == SLOTS
    assert running["pagedllm:num_requests_waiting"] == MAX_WAITING
    for resp in second:
        if resp.status_code == 429:
            assert resp.headers["Retry-After"] == "1"
            err = assert_error(resp, 429, f"requests wait (max_waiting={MAX_WAITING})")
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
    assert re.search(r"WARNING pagedllm: POST /v1/completions -> 429: the server is busy",
                     server.output())
    m = wait_idle(http)
    assert m["pagedllm:num_requests_refused_total"] - refused_before == 52
    assert m["pagedllm:kv_cache_usage_perc"] == 0
    assert http.post("/v1/completions", json={**LONG, "max_tokens": 4, "stream": False}
                     ).status_code == 200


def test_refusals_reach_every_client_shape(server, http):
    """Full: chat streams and the openai client get the 429 too, before any event."""
    async def main():
        opened: list = []
        try:
            held = await burst(server.url, SLOTS + MAX_WAITING, LONG, opened)
            assert [r.status_code for r in held] == [200] * (SLOTS + MAX_WAITING)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                         headers=headers) as c:
                chat = await c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "stream": True})
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY,
                                        max_retries=0)
            with pytest.raises(openai.RateLimitError):
                await client.completions.create(model=server_model(http), prompt="hi")
            return chat
        finally:
            await close(opened)

    chat = asyncio.run(main())
    assert assert_error(chat, 429, "the server is busy")["code"] == "queue_full"
    assert http.get("/health").status_code == 200
    assert wait_idle(http)["pagedllm:kv_cache_usage_perc"] == 0


def server_model(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


def rss_mib(pid: int) -> float:
    """Resident memory of the server: its frontend process and the engine core process."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


# Growth allowed over 250 aborted streams after a warm-up of 50. Measured (2 cores, tiny
# Llama): the frontend stays flat (+0.2 MiB); the core process grows +30 MiB over the first
# 250, then +2 to +15 per further 250, flattening, while its count of Python objects stays
# flat (within 100 of 412k over 1,280 streams): native caches per batch shape (oneDNN,
# allocator arenas) that fill once, not request state. A leak of a request's tensors or
# blocks per stream would exceed the bound; leaked requests or blocks fail the exact checks.
RSS_GROWTH_BOUND_MIB = 64


def test_streams_aborted_at_random_points_leak_nothing(server, http):
    rng = random.Random(0)
    body = {**LONG, "max_tokens": 64}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        stop_after = rng.choice([0, 0, 1, 2, 5, 10, 30])  # events read before hanging up
        request = client.build_request("POST", "/v1/completions",
                                       json={**body, "prompt": f"Story {i}:"})
        resp = await client.send(request, stream=True)
        try:
            n = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if n >= stop_after:
                        break
        finally:
            await resp.aclose()

    async def wave(start: int, count: int, width: int = 16) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers={
                "Authorization": f"Bearer {API_KEY}"}) as client:
            for k in range(start, start + count, width):
                await asyncio.gather(*(one(client, i) for i in range(k, min(k + width,
                                                                          start + count))))

    asyncio.run(wave(0, 50))
    wait_idle(http)
    before = rss_mib(server.proc.pid)
    asyncio.run(wave(50, 250))
    m = wait_idle(http)
    after = rss_mib(server.proc.pid)
    assert m["pagedllm:num_requests_running"] == m["pagedllm:num_requests_waiting"] == 0
    assert m["pagedllm:kv_cache_usage_perc"] == 0
    print(f"server RSS {before:.0f} -> {after:.0f} MiB over 250 aborted streams")
    assert after - before < RSS_GROWTH_BOUND_MIB, (before, after)
    assert http.get("/health").status_code == 200
