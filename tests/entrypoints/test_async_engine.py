"""AsyncLLMEngine against a fake engine (no model): threading, errors, aborts, loop death."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("prometheus_client")

from pagedllm.engine.async_engine import (
    AsyncLLMEngine, EngineDeadError, QueueFullError,
)
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams


class _Scheduler:
    def __init__(self) -> None:
        self.waiting: list[str] = []


class FakeEngine:
    """Emits one token ("t<i>") per step per request; records which threads call it."""

    max_model_len = 64
    vocab_size = 100
    tokenizer = None

    def __init__(self, step_delay: float = 0.0) -> None:
        self.scheduler = _Scheduler()
        self.running: dict[str, list] = {}  # id -> [params, tokens so far, arrival]
        self.threads: set[str] = set()
        self.aborted: list[str] = []
        self.crash = False
        self.step_delay = step_delay
        # While a gate is given and not yet set, steps emit nothing: the test holds requests
        # alive while it probes (blocking here instead would also stall the engine's inbox).
        self.gate: threading.Event | None = None

    def _touch(self) -> None:
        self.threads.add(threading.current_thread().name)

    def add_request(self, request_id, prompt, params, prompt_token_ids=None, priority=0,
                    arrival_time=None) -> None:
        self._touch()
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        self.scheduler.waiting.append(request_id)
        self.running[request_id] = [params, [], arrival_time]

    def abort_request(self, request_id: str) -> None:
        self._touch()
        self.aborted.append(request_id)
        self.running.pop(request_id, None)
        if request_id in self.scheduler.waiting:
            self.scheduler.waiting.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self.running)

    def get_metrics(self) -> dict:
        return {"num_requests_running": len(self.running), "generation_tokens_total": 0}

    def step(self) -> list[RequestOutput]:
        self._touch()
        if self.crash:
            raise RuntimeError("boom")
        if self.gate is not None and not self.gate.is_set():
            time.sleep(0.001)
            return []
        time.sleep(self.step_delay)
        self.scheduler.waiting.clear()
        outs = []
        now = time.monotonic()
        for rid, (params, tokens, arrival) in list(self.running.items()):
            tokens.append(len(tokens))
            done = len(tokens) >= params.max_tokens
            text = "".join(f"t{t}" for t in tokens)
            outs.append(RequestOutput(
                rid, None, [1], [CompletionOutput(0, text, list(tokens), None, None,
                                                  "length" if done else None,
                                                  delta_text=f"t{tokens[-1]}")],
                done, metrics={"arrival_time": arrival, "first_token_time": now,
                               "last_token_time": now}))
            if done:
                del self.running[rid]
        return outs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_streams_outputs_in_order_on_one_engine_thread():
    fake = FakeEngine()

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        try:
            a = await engine.add_request("a", [1, 2], SamplingParams(max_tokens=3))
            b = await engine.add_request("b", [1], SamplingParams(max_tokens=5))
            texts_a = [o.outputs[0].delta_text async for o in a]
            texts_b = [o.outputs[0].delta_text async for o in b]
            return texts_a, texts_b, engine.get_metrics()
        finally:
            engine.stop()

    texts_a, texts_b, _ = run(main())
    assert texts_a == ["t0", "t1", "t2"]
    assert texts_b == ["t0", "t1", "t2", "t3", "t4"]
    assert fake.threads == {"pagedllm-engine"}  # the event loop never touched the engine


def test_bad_request_raises_and_others_continue():
    fake = FakeEngine()
    fake.gate = threading.Event()  # "good" cannot finish before the duplicate id is tried

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        try:
            good = await engine.add_request("good", [1], SamplingParams(max_tokens=2))
            with pytest.raises(ValueError, match="empty"):
                await engine.add_request("bad", [], SamplingParams())
            with pytest.raises(ValueError, match="already in use"):
                await engine.add_request("good", [1], SamplingParams())
            fake.gate.set()
            return [o.finished async for o in good]
        finally:
            fake.gate.set()
            engine.stop()

    assert run(main()) == [False, True]


def test_queue_full():
    async def main():
        engine = AsyncLLMEngine(FakeEngine(), max_waiting=0)
        engine.start()
        try:
            with pytest.raises(QueueFullError):
                await engine.add_request("a", [1], SamplingParams())
            return engine.get_metrics()
        finally:
            engine.stop()

    assert run(main())["num_requests_running"] == 0


def test_close_aborts_in_the_engine():
    fake = FakeEngine(step_delay=0.01)

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        try:
            stream = await engine.add_request("long", [1], SamplingParams(max_tokens=10_000))
            await stream.__anext__()
            stream.close()
            rest = [o async for o in stream]  # a closed stream ends at once
            for _ in range(200):
                if not fake.running:
                    break
                await asyncio.sleep(0.01)
            return rest
        finally:
            engine.stop()

    assert run(main()) == []
    assert fake.aborted == ["long"] and not fake.running


def test_step_loop_death_fails_pending_and_new_requests():
    fake = FakeEngine(step_delay=0.01)

    async def main():
        engine = AsyncLLMEngine(fake)
        engine.start()
        try:
            stream = await engine.add_request("a", [1], SamplingParams(max_tokens=10_000))
            await stream.__anext__()
            assert engine.is_healthy
            fake.crash = True
            with pytest.raises(EngineDeadError, match="boom"):
                async for _ in stream:
                    pass
            assert not engine.is_healthy
            with pytest.raises(EngineDeadError):
                await engine.add_request("b", [1], SamplingParams())
        finally:
            engine.stop()

    run(main())


def test_http_health_503_after_loop_death():
    from starlette.testclient import TestClient

    from pagedllm.entrypoints.openai.api_server import build_app

    fake = FakeEngine(step_delay=0.01)
    engine = AsyncLLMEngine(fake)
    app = build_app(engine, "fake", "/nowhere")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        fake.crash = True
        resp = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4})
        assert resp.status_code == 503 and "boom" in resp.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        resp = client.post("/v1/completions", json={"prompt": [1, 2]})
        assert resp.status_code == 503
