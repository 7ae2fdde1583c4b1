"""What an open dashboard costs the step loop: generation throughput with it open vs closed.

Model: the default (SmolLM2-135M-Instruct, Q4_1 GGUF), CPU, the engine core in its own
process (as `pagedllm serve` runs it), default KV pool. Workload (seeded): N requests of 64
random prompt token ids, M output tokens each, EOS ignored, greedy, all sent at once through
AsyncLLM; tok/s = output tokens / (last token - first request).

    closed   nobody reads the dashboard: the core builds no snapshot
    open     K readers, each as a /dashboard/events stream does: DashboardHub.latest() and
             the JSON encoding of the snapshot, once per hub interval (>= 0.25 s)

Runs alternate closed / open (--repeats each) on one engine, so drift on a shared machine
hits both alike; the table gives each mode's mean, the per-run spread and the difference.
Beside wall-clock tok/s (noisy when other work shares the cores) it reports the engine-core
process's CPU time per output token (user + system, from /proc via psutil: what the step
loop spent, whoever else ran) and the core's time spent building snapshots.

    python benchmarks/dashboard_overhead.py --num-requests 8 --output-len 128 --repeats 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import time

import msgspec
import psutil

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.async_engine import AsyncLLM
from pagedllm.entrypoints.openai.dashboard import DashboardHub
from pagedllm.sampling_params import SamplingParams


async def one_run(engine: AsyncLLM, prompts: list[list[int]], output_len: int, tag: str
                  ) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()

    async def request(i: int) -> int:
        stream = await engine.add_request(f"{tag}-{i}", prompts[i], params)
        final = None
        async for out in stream:
            final = out
        return len(final.outputs[0].token_ids)

    tokens = sum(await asyncio.gather(*(request(i) for i in range(len(prompts)))))
    assert tokens == len(prompts) * output_len, tokens
    return tokens / (time.perf_counter() - start)


async def reader(hub: DashboardHub, stats: dict) -> None:
    """One open page: what _event_stream does, without the socket."""
    while True:
        snapshot = await hub.latest()
        stats["bytes"] = len(msgspec.json.encode(snapshot))
        stats["reads"] += 1
        stats["built"][snapshot["time"]] = snapshot["build_s"]  # shared reads: one build
        await asyncio.sleep(hub.interval_s)


async def main(args: argparse.Namespace) -> None:
    engine = AsyncLLM.from_engine_args(EngineArgs(seed=args.seed))
    engine.start()
    hub = DashboardHub(engine, "bench")
    rng = random.Random(args.seed)
    vocab = min(engine.vocab_size, 32000)
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)]
               for _ in range(args.num_requests)]
    await one_run(engine, prompts[:2], 8, "warmup")
    results = {"closed": [], "open": []}
    core = psutil.Process(engine.client.handle.pid)
    cpu_ms = {"closed": [], "open": []}  # core CPU ms per output token
    stats = {"built": {}, "reads": 0, "bytes": 0}
    build_share = []  # of each open run's wall time, the core's time building snapshots
    try:
        for r in range(args.repeats):
            for mode in ("closed", "open") if r % 2 == 0 else ("open", "closed"):
                readers = [asyncio.ensure_future(reader(hub, stats))
                           for _ in range(args.readers if mode == "open" else 0)]
                stats["built"], stats["reads"] = {}, 0
                start, cpu0 = time.perf_counter(), sum(core.cpu_times()[:2])
                tps = await one_run(engine, prompts, args.output_len, f"{mode}{r}")
                wall = time.perf_counter() - start
                cpu_ms[mode].append(1e3 * (sum(core.cpu_times()[:2]) - cpu0)
                                    / (args.num_requests * args.output_len))
                for task in readers:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
                results[mode].append(tps)
                builds = list(stats["built"].values())
                if mode == "open":
                    core_cpu_s = cpu_ms[mode][-1] * args.num_requests * args.output_len / 1e3
                    build_share.append((sum(builds) / wall, sum(builds) / core_cpu_s))
                print(f"run {r} {mode:6s}: {tps:7.2f} tok/s, core CPU "
                      f"{cpu_ms[mode][-1]:.2f} ms/token"
                      + (f"  ({stats['reads']} reads, {len(builds)} snapshots built, "
                         f"{1e3 * sum(builds):.1f} ms building)" if mode == "open" else ""),
                      flush=True)
    finally:
        engine.stop()
    closed, opened = statistics.mean(results["closed"]), statistics.mean(results["open"])

    def spread(xs: list[float]) -> str:
        return f"{min(xs):.2f}-{max(xs):.2f} (stdev {statistics.stdev(xs):.2f})" \
            if len(xs) > 1 else f"{xs[0]:.2f}"

    print(f"\nhost: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"(shared with other work: see the spread); {args.num_requests} requests x "
          f"{args.prompt_len} prompt + {args.output_len} output tokens, {args.readers} "
          f"reader(s) when open")
    print("| mode | tok/s (mean) | runs: min-max (stdev) | core CPU ms/token (mean) | runs |")
    print("|---|---|---|---|---|")
    for mode, mean in (("closed", closed), ("open", opened)):
        print(f"| {mode} | {mean:.2f} | {spread(results[mode])} | "
              f"{statistics.mean(cpu_ms[mode]):.2f} | {spread(cpu_ms[mode])} |")
    c_cpu, o_cpu = statistics.mean(cpu_ms["closed"]), statistics.mean(cpu_ms["open"])
    print(f"\ncore CPU per token, open vs closed: {100 * (o_cpu - c_cpu) / c_cpu:+.2f}%")
    # Paired: each repeat's open run against its neighbouring closed run (slow drift of the
    # machine's load cancels; what is left is the per-pair noise).
    for name, xs in (("tok/s", results), ("core CPU ms/token", cpu_ms)):
        diffs = sorted(100 * (o / c - 1) for o, c in zip(xs["open"], xs["closed"]))
        q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
        print(f"paired {name}, open vs closed: median {q[1]:+.2f}% (quartiles {q[0]:+.2f}% "
              f"to {q[2]:+.2f}%, {len(diffs)} pairs)")
    print(f"\nopen vs closed: {100 * (opened - closed) / closed:+.2f}% (noise: the spread "
          f"above); building snapshots took {100 * statistics.mean(s for s, _ in build_share):.2f}%"
          f" of the open runs' wall time, {100 * statistics.mean(c for _, c in build_share):.2f}%"
          f" of the core's CPU time ({stats['bytes']} bytes of JSON each)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
