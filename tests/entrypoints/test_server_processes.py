"""`pagedllm serve` as processes: frontend, engine core, tensor-parallel workers.

A tiny random Llama (2 layers, hidden 64, 4 heads, 2 KV heads) served at -tp 2, so the
process tree is: server ─ engine core ─ one TP worker. The tests kill parts of it and check
what clients and the process table see.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytest.importorskip("fastapi")

from pagedllm import LLM, SamplingParams  # noqa: E402
from tests.entrypoints.test_openai_server import API_KEY, ServerProcess  # noqa: E402

PROMPTS = ["The capital of France is", "Hello, my name is", "Once upon a time"]


def _serve(path: str, *extra: str) -> ServerProcess:
    server = ServerProcess("--model", path, "--max-model-len", "512", "--cpu-kv-cache-gib",
                           "0.05", "--swap-space", "0.05", *extra)
    server.wait_ready()
    return server


def _spawned(pid: int) -> list[psutil.Process]:
    """Descendants started by multiprocessing spawn (engine core, TP workers), oldest first."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return sorted(found, key=lambda p: p.create_time())


def _client(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60,
                        headers={"Authorization": f"Bearer {API_KEY}"})


def _stream_events(server, prompt: str, events: list, started: threading.Event,
                   opened: threading.Semaphore | None = None) -> None:
    body = {"model": _model(server), "prompt": prompt, "max_tokens": 400, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    with _client(server) as http, http.stream("POST", "/v1/completions", json=body) as resp:
        if opened is not None:
            opened.release()  # headers came: the engine holds the request
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append((time.monotonic(), line[6:]))
                started.set()


def _model(server) -> str:
    with _client(server) as http:
        return http.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, cpu_kv_cache_gib=0.05, swap_space=0.05)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


@pytest.mark.parametrize("victim", ["core", "worker"])
def test_tp2_server_equals_offline_then_a_dead_process_fails_streams(tiny_llama_dir, offline,
                                                                      victim):
    server = _serve(tiny_llama_dir, "-tp", "2")
    try:
        core, worker = _spawned(server.proc.pid)  # the core, then its rank-1 worker
        with _client(server) as http:
            got = [http.post("/v1/completions", json={
                "model": _model(server), "prompt": p, "max_tokens": 16,
                "temperature": 0.0}).json()["choices"][0]["text"] for p in PROMPTS]
        assert got == offline  # TP=2 behind a core process == TP=1 in process

        streams = [([], threading.Event()) for _ in range(4)]
        threads = [threading.Thread(target=_stream_events, args=(server, p, ev, st))
                   for p, (ev, st) in zip(PROMPTS + PROMPTS[:1], streams)]
        for t in threads:
            t.start()
        for _, started in streams:
            assert started.wait(30)
        killed_at = time.monotonic()
        os.kill((core if victim == "core" else worker).pid, signal.SIGKILL)
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a client hung after the engine died"
        for events, _ in streams:
            assert events[-1][1] == "[DONE]"
            error = json.loads(events[-2][1])["error"]
            assert "engine core" in error["message"] and events[-1][0] - killed_at < 10
        with _client(server) as http:
            assert http.get("/health").status_code == 503
            assert http.post("/v1/completions", json={
                "model": _model(server), "prompt": "hi", "max_tokens": 2}).status_code == 503
    finally:
        server.stop()


def test_killing_the_server_leaves_no_orphans(tiny_llama_dir):
    server = _serve(tiny_llama_dir, "-tp", "2")
    spawned = _spawned(server.proc.pid)
    assert len(spawned) == 2
    server.proc.kill()  # no shutdown path runs: only the kernel's parent-death signal
    server.proc.wait(10)
    gone, alive = psutil.wait_procs(spawned, timeout=10)
    assert not alive, f"orphans left behind: {alive}"
    server.log.close()


def test_sigterm_stops_the_whole_tree(tiny_llama_dir):
    server = _serve(tiny_llama_dir, "-tp", "2")
    spawned = _spawned(server.proc.pid)
    server.proc.terminate()
    assert server.proc.wait(30) == 0
    gone, alive = psutil.wait_procs(spawned, timeout=10)
    assert not alive
    server.log.close()


def test_dead_core_reads_dead_in_metrics_and_says_when_to_retry(tiny_llama_dir):
    def scrape(http) -> dict[str, float]:
        return {m.group(1): float(m.group(2)) for m in re.finditer(
            r"^pagedllm:([a-z_]+(?:\{[^}]*\})?) (\S+)$", http.get("/metrics").text, re.M)}

    server = _serve(tiny_llama_dir)
    try:
        (core,) = _spawned(server.proc.pid)
        streams = [([], threading.Event()) for _ in range(2)]
        threads = [threading.Thread(target=_stream_events, args=(server, p, ev, st))
                   for p, (ev, st) in zip(PROMPTS, streams)]
        for t in threads:
            t.start()
        for _, started in streams:
            assert started.wait(30)
        with _client(server) as http:
            live = scrape(http)
            assert live["engine_alive"] == 1 and live["num_requests_running"] == 2
            assert live["kv_cache_usage_perc"] > 0
            os.kill(core.pid, signal.SIGKILL)
            for t in threads:
                t.join(30)
                assert not t.is_alive()
            dead = scrape(http)
            assert dead["engine_alive"] == 0
            for gauge in ("num_requests_running", "num_requests_waiting",
                          "num_requests_swapped", "kv_cache_usage_perc"):
                assert dead[gauge] == 0, gauge
            assert dead['request_success_total{finished_reason="error"}'] == 2
            assert dead["generation_tokens_total"] >= live["generation_tokens_total"] > 0
            for resp in (http.get("/health"), http.head("/health"), http.post(
                    "/v1/completions", json={"prompt": "hi", "max_tokens": 2})):
                assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
            assert http.post("/v1/completions", json={"prompt": "hi"}).json()["error"][
                "type"] == "service_unavailable_error"
    finally:
        server.stop()


def test_sigterm_with_8_streams_ends_each_and_exits_0(tiny_llama_dir):
    # Two run at a time, so most of the 8 are still open (running or waiting) at the signal.
    server = _serve(tiny_llama_dir, "--max-num-seqs", "2", "--shutdown-timeout", "1")
    try:
        spawned = _spawned(server.proc.pid)
        started = threading.Event()  # set by whichever stream gets a token first
        opened = threading.Semaphore(0)  # released once per stream the server has accepted
        streams = [([], started) for _ in range(8)]
        threads = [threading.Thread(target=_stream_events,
                                    args=(server, f"story {i}", ev, st, opened))
                   for i, (ev, st) in enumerate(streams)]
        for t in threads:
            t.start()
        # The signal must find all 8 accepted: one sent after it gets a plain 503, not a stream.
        for _ in streams:
            assert opened.acquire(timeout=60)
        assert started.wait(60)
        time.sleep(0.2)
        t0 = time.monotonic()
        server.proc.terminate()
        assert server.proc.wait(30) == 0
        assert time.monotonic() - t0 < 1 + 10  # the shutdown timeout, plus slack for a loaded host
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        ended = {"done": 0, "aborted": 0}
        for events, _ in streams:
            assert events and events[-1][1] == "[DONE]"  # no stream is cut off mid-way
            body = json.loads(events[-2][1]) if len(events) > 1 else {}
            if "error" in body:
                assert "shutting down" in body["error"]["message"]
                ended["aborted"] += 1
            else:
                assert body["choices"][0]["finish_reason"] == "length"
                ended["done"] += 1
        assert ended["aborted"] >= 1 and sum(ended.values()) == 8, ended
        gone, alive = psutil.wait_procs(spawned, timeout=10)
        assert not alive
    finally:
        if server.proc.poll() is None:
            server.stop()
