"""KV-cache dtype at a memory-bound setting: blocks and offline throughput, auto vs fp8 vs int8.

Workload (seeded): N prompts of random token ids with lengths uniform in [min_len, max_len],
`output_len` new tokens each, EOS ignored, greedy, all submitted at once (LLM.generate). The KV
budget (`--cpu-kv-cache-gib`, default 0.05 GiB) holds only a handful of these sequences in the
model dtype, so the engine preempts (recompute) and runs small batches; a quantized cache holds
~4x the tokens (fp32 model on a CPU), so the batches grow and preemptions vanish.

    python benchmarks/kv_cache_dtype.py                   # the README rows (CPU, default model)
    python benchmarks/kv_cache_dtype.py --dtypes auto int8 --num-prompts 16

Model: the default SmolLM2-135M-Instruct (fp32 on a CPU, 30 layers, 3 KV heads of 64).
Prints one markdown table row per cache dtype.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time


def make_workload(num_prompts: int, min_len: int, max_len: int, vocab_size: int, seed: int):
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(num_prompts)]


def run(args, cache_dtype: str) -> dict:
    from pagedllm import LLM, SamplingParams

    llm = LLM(args.model, kv_cache_dtype=cache_dtype, cpu_kv_cache_gib=args.cpu_kv_cache_gib,
              swap_space=0, seed=args.seed, cpu_threads=args.threads,
              preemption_mode="recompute")
    prompts = make_workload(args.num_prompts, args.min_len, args.max_len,
                            llm.llm_engine.config.model.hf_config.vocab_size, args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                 SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    before = llm.get_metrics()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    m = llm.get_metrics()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == args.num_prompts * args.output_len
    return {
        "blocks": m["num_gpu_blocks"],
        "tokens": m["num_gpu_blocks"] * llm.llm_engine.config.cache.block_size,
        "preemptions": m["num_preemptions_total"] - before["num_preemptions_total"],
        "seconds": elapsed,
        "out_tok_s": generated / elapsed,
        "total_tok_s": (generated + sum(map(len, prompts))) / elapsed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (GGUF)")
    p.add_argument("--dtypes", nargs="+", default=["auto", "fp8", "int8"])
    p.add_argument("--cpu-kv-cache-gib", type=float, default=0.05)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"{args.threads} threads; {args.num_prompts} prompts of {args.min_len}-{args.max_len} "
          f"tokens, {args.output_len} out; KV budget {args.cpu_kv_cache_gib} GiB")
    print("| kv_cache_dtype | blocks | KV tokens | preemptions | time (s) | output tok/s "
          "| total tok/s |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        r = run(args, dtype)
        print(f"| {dtype} | {r['blocks']} | {r['tokens']} | {r['preemptions']} | "
              f"{r['seconds']:.1f} | {r['out_tok_s']:.1f} | {r['total_tok_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
