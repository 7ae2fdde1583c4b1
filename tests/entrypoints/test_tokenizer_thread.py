"""Tokenizing a large prompt must not stall the event loop (/health, every stream): the server
tokenizes and renders chat templates on its own thread (serving_engine.TokenizerThread)."""

from __future__ import annotations

import asyncio

import pytest

from pagedllm.entrypoints.openai.protocol import APIError
from pagedllm.entrypoints.openai.serving_engine import TokenizerThread

TEXT = "hello world, this is a fairly normal sentence with words. " * 20_000  # 1.2 MB


@pytest.fixture(scope="module")
def tokenizer():
    from pagedllm.loader import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path(), "gguf")


async def ticks_while(work) -> tuple[object, int]:
    """Run `work` and count how often a 5 ms ticker on the same loop ran meanwhile."""
    task = asyncio.ensure_future(work)
    ticks = 0
    while not task.done():
        await asyncio.sleep(0.005)
        ticks += 1
    return task.result(), ticks


def test_encode_runs_beside_the_loop_with_the_same_ids(tokenizer):
    thread = TokenizerThread(tokenizer)

    async def main():
        inline_loop_ticks = await ticks_while(asyncio.sleep(0))  # baseline: done at once
        ids, ticks = await ticks_while(thread.encode(TEXT))
        return inline_loop_ticks, ids, ticks

    try:
        (_, baseline), ids, ticks = asyncio.run(main())
    finally:
        thread.shutdown()
    assert ids == tokenizer.encode(TEXT)
    # Encoding 1.2 MB takes most of a second; the loop kept running all along. On the loop,
    # the ticker would have run once, after the encode.
    assert ticks >= 20 > baseline


def test_chat_template_errors_are_400(tokenizer):
    thread = TokenizerThread(tokenizer)
    try:
        ids = asyncio.run(thread.encode_chat([{"role": "user", "content": "hi"}]))
        assert ids and ids == asyncio.run(thread.encode_chat([{"role": "user",
                                                               "content": "hi"}]))
        with pytest.raises(APIError) as err:
            asyncio.run(thread.encode_chat([{"role": "user", "content": object()}]))
    finally:
        thread.shutdown()
    assert err.value.status == 400
