"""The engine core behind ZeroMQ: in a process or a thread, against the in-process core.

Tiny random Llama (2 layers, hidden 64): these tests are about processes, protocols and the
frontend, so the model should cost nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.async_engine import AsyncLLM, EngineDeadError, QueueFullError
from pagedllm.engine.arg_utils import EngineArgs

ENGINE = dict(cpu_kv_cache_gib=0.05, swap_space=0.05, max_num_seqs=32)


def _workload():
    return [
        ("The capital of France is", SamplingParams(temperature=0.0, max_tokens=12)),
        ("Hello, my name is", SamplingParams(temperature=0.9, seed=7, n=3, max_tokens=16)),
        ("1, 2, 3,", SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=24, stop=[" a"])),
        ("Once upon", SamplingParams(temperature=0.0, max_tokens=8, logprobs=3,
                                     prompt_logprobs=2)),
        ("Tell me", SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[13],
                                   min_tokens=2)),
    ]


def _summary(outs):
    return [(o.prompt_token_ids, [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                                   c.logprobs) for c in o.outputs], o.prompt_logprobs)
            for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, **ENGINE)
    prompts, params = zip(*_workload())
    return _summary(llm.generate(list(prompts), list(params), use_tqdm=False))


@pytest.mark.parametrize("placement", ["process", "thread"])
def test_offline_core_behind_zmq_equals_in_process(tiny_llama_dir, reference, placement):
    llm = LLM(tiny_llama_dir, engine_core=placement, **ENGINE)
    try:
        prompts, params = zip(*_workload())
        assert _summary(llm.generate(list(prompts), list(params), use_tqdm=False)) == reference
        m = llm.get_metrics()
        assert m["num_requests_running"] == 0 and m["kv_cache_usage_perc"] == 0.0
        assert llm.llm_engine.check_integrity()
    finally:
        llm.shutdown()


def _async_llm(path, **kwargs) -> AsyncLLM:
    return AsyncLLM.from_engine_args(EngineArgs(model=path, **ENGINE), **kwargs)


async def _idle_core(engine: AsyncLLM) -> dict:
    """The core's counters once aborts have landed (they arrive with its next drain)."""
    for _ in range(200):
        m = await engine.get_core_metrics()
        if m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0:
            return m
        await asyncio.sleep(0.02)
    return m


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout=timeout))


def test_async_streams_equal_offline_and_closed_streams_free_blocks(tiny_llama_dir, reference):
    async def main():
        engine = _async_llm(tiny_llama_dir)
        engine.start()
        try:
            # Long streams that the client closes part-way (a disconnect).
            doomed = [await engine.add_request(
                f"long{i}", list(range(100, 140 + i)),
                SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
                for i in range(6)]
            streams = [await engine.add_request(f"r{i}", None, params, prompt=prompt)
                       for i, (prompt, params) in enumerate(_workload())]
            for k, stream in enumerate(doomed):
                for _ in range(k):
                    await stream.__anext__()
                stream.close()

            async def last(stream):
                out = None
                async for out in stream:
                    pass
                return out
            outs = await asyncio.gather(*(last(s) for s in streams))
            assert await engine.check_integrity()
            return outs, await _idle_core(engine)
        finally:
            engine.stop()

    outs, metrics = run(main())
    assert _summary(outs) == reference
    assert metrics["kv_cache_usage_perc"] == 0.0 and metrics["num_requests_running"] == 0


def test_bad_requests_raise_and_others_continue(tiny_llama_dir):
    async def main():
        engine = _async_llm(tiny_llama_dir, engine_core="thread")
        engine.start()
        try:
            params = SamplingParams(temperature=0.0, max_tokens=4)
            with pytest.raises(ValueError, match="prompt must not be empty"):
                await engine.add_request("a", [], params)
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await engine.add_request("b", [1, 10**9], params)
            good = await engine.add_request("c", [5, 6, 7], params)
            with pytest.raises(ValueError, match="already in use"):
                await engine.add_request("c", [5, 6, 7], params)
            outs = [o async for o in good]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
        finally:
            engine.stop()

    run(main())


def test_queue_full_is_refused_only_when_the_request_would_wait(tiny_llama_dir):
    """max_waiting=0: a request that finds a free slot runs; one that would wait is refused
    (QueueFullError, nothing left queued)."""
    async def main():
        engine = AsyncLLM.from_engine_args(EngineArgs(model=tiny_llama_dir, **{
            **ENGINE, "max_num_seqs": 1}), engine_core="thread", max_waiting=0)
        engine.start()
        try:
            held = await engine.add_request("held", [5, 6], SamplingParams(
                max_tokens=400, ignore_eos=True))
            with pytest.raises(QueueFullError, match=r"0 requests wait \(max_waiting=0\)"):
                await engine.add_request("refused", [5, 6], SamplingParams(max_tokens=2))
            assert "refused" not in engine._streams
            held.close()
            m = await _idle_core(engine)
            assert m["num_requests_refused_total"] == 1 and m["kv_cache_usage_perc"] == 0
            ok = await engine.add_request("after", [5, 6], SamplingParams(max_tokens=2))
            assert [o async for o in ok][-1].finished
        finally:
            engine.stop()

    run(main())


def _children_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, merely not reaped yet
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_dead_or_hung_core_fails_every_stream_within_seconds(tiny_llama_dir, how):
    async def main():
        engine = _async_llm(tiny_llama_dir, engine_timeout_s=3.0)
        engine.start()
        pid = engine.client.handle.pid
        params = SamplingParams(temperature=0.0, max_tokens=100000 // 200, ignore_eos=True)
        streams = [await engine.add_request(f"r{i}", list(range(10, 30)), params)
                   for i in range(4)]
        for _ in range(4):  # the core is decoding (its first decode loads the CPU kernel)
            await streams[0].__anext__()
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()

        async def drain(stream):
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
        await asyncio.gather(*(drain(s) for s in streams))
        elapsed = time.monotonic() - t0
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", [5, 6], params)
        engine.stop()
        return elapsed, pid

    elapsed, pid = run(main(), timeout=60)
    assert elapsed < (2.0 if how == "kill" else 6.0)
    deadline = time.monotonic() + 5
    while _children_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children_alive(pid), "the hung core was left running"
