"""Frontend overhead: what the server costs on top of the engine, when the model costs nothing.

Model: a tiny random Llama (2 layers, hidden 64, 4 heads, 2 KV heads, a 2,048-token vocabulary
read through SmolLM2's tokenizer, whose first 2,048 ids it uses), dummy weights, fp32 on CPU:
every step is host work (scheduling, sampling, detokenization, HTTP), so this isolates the
frontend. (With SmolLM2's full 49,152-token vocabulary the LM head and argmax alone would
cost ~75 ms a step at 256 rows on one core: the model would not cost "almost nothing".) Workload (seeded): N requests of 64
random prompt token ids, 64 output tokens each, EOS ignored, greedy.

Measured in one run, output tokens per second:
  offline     LLM.generate (the core in this process, no IPC)
  offline-process  LLM(engine_core="process").generate (the core in its own process)
  thread      `pagedllm serve --engine-core thread`: the step loop on a thread of the server's
              process (the one-process design: HTTP, JSON, detokenization and model steps
              share one interpreter)
  process     `pagedllm serve` (default): the engine core in its own process
Each server gets every request at once (streaming /v1/completions); tok/s = output tokens /
(last token - first request sent). The HTTP client runs on the same machine and takes CPU
too: the table says how many cores the host has.

    python benchmarks/frontend_overhead.py --num-requests 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_proc import served  # noqa: E402  (benchmarks/ is not a package)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, vocab_size=2048,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
            tie_word_embeddings=False)


def make_model_dir() -> str:
    import transformers

    from pagedllm.loader import default_model_path, load_tokenizer

    path = tempfile.mkdtemp(prefix="pagedllm-tiny-")
    transformers.LlamaConfig(**TINY).save_pretrained(path)  # config only: dummy weights
    load_tokenizer(default_model_path(), "gguf").save_pretrained(path)
    return path


def workload(n: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY["vocab_size"]) for _ in range(prompt_len)] for _ in range(n)]


def run_offline(path: str, prompts: list[list[int]], output_len: int,
                engine_core: str = "inproc") -> float:
    from pagedllm import LLM, SamplingParams

    llm = LLM(path, load_format="dummy", cpu_kv_cache_gib=0.5, swap_space=0.1,
              engine_core=engine_core)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], params, use_tqdm=False)  # warm-up (kernel load, allocator)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    llm.shutdown()
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


async def _one(host: str, port: int, model: str, prompt: list[int], output_len: int) -> int:
    """One streamed completion over a raw HTTP/1.1 connection; returns its output tokens.

    NOTE: a lean client on purpose. The load generator shares the machine's cores with the
    server, so every microsecond it spends parsing events is taken from the server under
    test; this one reads the stream whole and only parses the final usage event.
    """
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": output_len,
                       "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body)
    await writer.drain()
    raw = await reader.read()  # until the server closes: the whole event stream
    writer.close()
    if not raw.startswith(b"HTTP/1.1 200") or b"data: [DONE]" not in raw:
        raise RuntimeError(f"bad response: {raw[:300]!r}")
    usage = raw[raw.rindex(b'"completion_tokens":') + len(b'"completion_tokens":'):]
    return int(usage[:usage.index(b",")])


async def _saturate(url: str, prompts: list[list[int]], output_len: int) -> float:
    host, port = url.removeprefix("http://").split(":")
    async with httpx.AsyncClient(base_url=url) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
    warm = [_one(host, int(port), model, p, output_len) for p in prompts[:8]]
    await asyncio.gather(*warm)
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(_one(host, int(port), model, p, output_len)
                                    for p in prompts))
    elapsed = time.perf_counter() - t0
    assert sum(counts) == len(prompts) * output_len, counts
    return sum(counts) / elapsed


def run_server(path: str, placement: str, prompts: list[list[int]], output_len: int) -> float:
    args = ["--model", path, "--load-format", "dummy", "--engine-core", placement,
            "--cpu-kv-cache-gib", "0.5", "--swap-space", "0.1"]
    with tempfile.TemporaryFile() as log, served(args, log, cwd=ROOT) as (url, _):
        return asyncio.run(_saturate(url, prompts, output_len))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="offline,offline-process,thread,process")
    args = ap.parse_args()
    path = make_model_dir()
    prompts = workload(args.num_requests, args.prompt_len, args.seed)
    results = {}
    for mode in args.modes.split(","):
        if mode == "offline":
            results[mode] = run_offline(path, prompts, args.output_len)
        elif mode == "offline-process":
            results[mode] = run_offline(path, prompts, args.output_len, "process")
        else:
            results[mode] = run_server(path, mode, prompts, args.output_len)
        print(f"{mode}: {results[mode]:.0f} output tok/s", flush=True)
    base = results.get("offline")
    print(f"\n{args.num_requests} requests x {args.prompt_len} in / {args.output_len} out, tiny "
          f"random Llama (dummy), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print("| mode | output tok/s | vs offline |\n|---|---|---|")
    for mode, tps in results.items():
        ratio = f"{tps / base:.0%}" if base else "-"
        print(f"| {mode} | {tps:,.0f} | {ratio} |")


if __name__ == "__main__":  # the engine core is a spawned process: guard the entry point
    main()
