"""Tensor parallelism on a CPU: TP=N against TP=1, same tokens, step time.

Model: the default SmolLM2-135M-Instruct (GGUF, de-quantized, fp32). It has 9 attention heads
and 3 KV heads, so it splits 3 ways, not 2: the default compares TP=1 with TP=3. Workload
(seeded): 8 prompts of 64 random token ids, 32 greedy tokens each, EOS ignored.

On one machine the ranks share its cores (each rank gets cores / tp threads), and every layer
adds two all-reduces over gloo (loopback TCP): TP is expected to be slower here. It exists on
a CPU to test the same code that splits a model across GPUs; the figure says what it costs.

    python benchmarks/tp_cpu.py --tp 3
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

from pagedllm import LLM, SamplingParams


def measure(tp: int, prompts: list[dict], params: SamplingParams) -> tuple[list, float, float]:
    llm = LLM(tensor_parallel_size=tp, cpu_kv_cache_gib=0.25, swap_space=0.1)
    try:
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
    finally:
        llm.shutdown()
    num_steps = params.max_tokens  # one prefill step + max_tokens - 1 decode steps
    return [o.outputs[0].token_ids for o in outs], elapsed, 1000 * elapsed / num_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 49152) for _ in range(args.prompt_len)]}
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rows = {tp: measure(tp, prompts, params) for tp in (1, args.tp)}
    same = rows[1][0] == rows[args.tp][0]
    print(f"\nSmolLM2-135M fp32, {args.num_prompts} x {args.prompt_len} in / {args.output_len} "
          f"out, greedy; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"tokens equal: {same}\n")
    print("| TP | seconds | ms per step | output tok/s |\n|---|---|---|---|")
    for tp, (_, elapsed, ms) in rows.items():
        tps = args.num_prompts * args.output_len / elapsed
        print(f"| {tp} | {elapsed:.2f} | {ms:.1f} | {tps:.1f} |")
    if not same:
        raise SystemExit("TP changed the tokens")


if __name__ == "__main__":  # TP ranks are spawned processes: guard the entry point
    main()
