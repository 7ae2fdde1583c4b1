"""Priority through a real `pagedllm serve` process (a tiny model, a KV pool of 20 blocks of 16
tokens): a long low-priority request fills the pool; a short high-priority one sent after it
preempts it and finishes first. Under FCFS the same pair finishes in arrival order (the
short one waits for blocks), which is what the priority run must beat."""

from __future__ import annotations

import threading
import time

import pytest

from tests.entrypoints.test_openai_server import API_KEY, ServerProcess

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow  # two server processes (~30 s each to start on 2 shared cores)
openai = pytest.importorskip("openai")

NUM_BLOCKS = 20  # 320 token slots
LOW = ([100 + i % 500 for i in range(200)], 120)  # 200 + 120 tokens: the whole pool
HIGH = ([700 + i for i in range(120)], 8)  # needs 8 blocks; 7 are free once LOW is running


@pytest.fixture(scope="module", params=["priority", "fcfs"])
def server(request, tiny_llama_dir):
    proc = ServerProcess("--model", tiny_llama_dir, "--served-model-name", "tiny",
                         "--max-model-len", "512",
                         "--num-gpu-blocks-override", str(NUM_BLOCKS), "--cpu-threads", "1",
                         "--scheduling-policy", request.param)
    try:
        proc.wait_ready()
        proc.policy = request.param
        yield proc
    finally:
        proc.stop()


def test_a_later_high_priority_request_finishes_first_under_a_full_pool(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                           timeout=60)
    prio = server.policy == "priority"
    finished: dict[str, float] = {}
    started = threading.Event()

    def low() -> None:
        try:
            stream = client.completions.create(
                model="tiny", prompt=LOW[0], max_tokens=LOW[1], temperature=0.0, stream=True,
                extra_body={"ignore_eos": True, "priority": 10 if prio else 0})
            for _ in stream:
                started.set()  # its prompt is in the pool
            finished["low"] = time.monotonic()
        finally:
            started.set()

    thread = threading.Thread(target=low)
    thread.start()
    assert started.wait(60) and "low" not in finished
    out = client.completions.create(
        model="tiny", prompt=HIGH[0], max_tokens=HIGH[1], temperature=0.0,
        extra_body={"ignore_eos": True, "priority": 0})
    finished["high"] = time.monotonic()
    thread.join(60)
    assert out.usage.completion_tokens == HIGH[1]
    order = sorted(finished, key=finished.get)
    assert order == (["high", "low"] if prio else ["low", "high"])
    metrics = httpx.get(f"{server.url}/metrics",
                        headers={"Authorization": f"Bearer {API_KEY}"}).text
    preemptions = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("pagedllm:num_preemptions_total ")]
    assert preemptions == [1.0 if prio else 0.0]  # the low one, once, by the high one


def test_priority_must_be_an_int_and_needs_the_priority_policy(server):
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6],
                                               "max_tokens": 1, "priority": 3})
        if server.policy == "priority":
            assert r.status_code == 200
        else:
            assert r.status_code == 400
            assert "got priority 3 but the scheduling policy is 'fcfs'" in r.text
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6],
                                               "max_tokens": 1, "priority": "high"})
        assert r.status_code == 400 and "priority" in r.text
