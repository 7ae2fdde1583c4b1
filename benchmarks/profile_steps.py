"""Where an engine step's GPU time goes, kernel by kernel (torch.profiler), on the
Llama-3-8B-shaped dummy model (`.devdata/llama3-8b`, bf16, CUDA graphs unless --enforce-eager).

Workloads (random prompt tokens, seed 0, greedy, EOS ignored); the profiler runs over a few
steps of one kind only (decode steps start after every prompt is prefilled):

    decode-1     1 request, 32 prompt tokens: batch-1 decode steps
    decode-64    64 requests, 512 prompt tokens each
    decode-256   256 requests, 256 prompt tokens each
    prefill      8 requests of 1024 prompt tokens: one 8192-token prefill step
    mixed        192 requests decoding (256 prompt tokens), then 8 prompts of 1024 arrive:
                 one step of 192 decode rows + 8000 prefill tokens (above the largest CUDA
                 graph: eager, unpadded, unless --max-graph-tokens 8192)
    mixed-small  253 requests decoding (256 prompt tokens), then 1 prompt of 300 arrives:
                 the common mixed step of a ShareGPT run (3 steps: the first two warm up)

For each: GPU kernel time per step (sum of kernels) beside the step's wall time, and the
kernels that take most of it.

    python benchmarks/profile_steps.py [--workloads decode-1,prefill] [--top 12]
        [--max-graph-tokens 8192]   # capture mixed-step graphs up to 8192 tokens (default 2048)
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

import gpu_utils
import torch

WORKLOADS = {  # name: (requests, prompt tokens, profiled steps, decode first, late prompts)
    "decode-1": (1, 32, 32, True, []),
    "decode-64": (64, 512, 8, True, []),
    "decode-256": (256, 256, 8, True, []),
    "prefill": (8, 1024, 1, False, []),
    "mixed": (192, 256, 1, True, [1024] * 8),
    "mixed-small": (253, 256, 1, True, [300]),
}


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """name -> (total device ms, calls) over the CUDA kernels the profiler saw."""
    out: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        out[evt.name][0] += evt.time_range.elapsed_us() / 1e3
        out[evt.name][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def profile(engine, name: str, top: int, seed: int) -> None:
    from pagedllm import SamplingParams

    num, prompt_len, steps, decode, late = WORKLOADS[name]
    rng = random.Random(seed)
    vocab = engine.config.model.hf_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True,
                            detokenize=False)
    for i in range(num):
        engine.add_request(f"{name}-{i}", None, params,
                           prompt_token_ids=[rng.randrange(100, vocab) for _ in range(prompt_len)])
    if decode:
        while engine.engine_core.scheduler.waiting or any(
                s.num_computed_tokens < s.num_prompt_tokens
                for g in engine.engine_core.scheduler.running for s in g.seqs):
            engine.step()
    if name == "mixed-small":  # the same shape twice first: compiles and warms up
        for rep in range(2):
            for n in late:
                engine.add_request(f"{name}-warm-{rep}", None, params, prompt_token_ids=[
                    rng.randrange(100, vocab) for _ in range(n)])
            engine.step()
    for i, n in enumerate(late):
        engine.add_request(f"{name}-late-{i}", None, params,
                           prompt_token_ids=[rng.randrange(100, vocab) for _ in range(n)])
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            engine.step()
        end.record()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    times = kernel_times(prof)
    total = sum(t for t, _ in times.values())
    wall = start.elapsed_time(end)
    print(f"\n## {name}: {num} requests x {prompt_len} prompt tokens; {steps} steps profiled")
    print(f"GPU kernels {total / steps:.3f} ms per step, wall {wall / steps:.3f} ms per step "
          f"({100 * total / wall:.0f}% of the wall time in kernels)")
    print("| kernel | ms / step | calls / step | share |\n|---|---:|---:|---:|")
    for k, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {k[:90]} | {t / steps:.3f} | {n / steps:.0f} | {100 * t / total:.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".devdata/llama3-8b")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--max-graph-tokens", type=int, default=None,
                    help="largest mixed step run as a CUDA graph (worker/cuda_graph.py)")
    args = ap.parse_args()
    import logging

    from pagedllm import LLM
    from pagedllm.worker import cuda_graph

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # memory and capture lines
    if args.max_graph_tokens is not None:
        cuda_graph.MAX_GRAPH_TOKENS = args.max_graph_tokens

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_num_seqs=256,
              enforce_eager=args.enforce_eager)
    print(f"# {gpu_utils.device_line()}; "
          f"{'eager' if args.enforce_eager else 'CUDA graphs'} up to "
          f"{cuda_graph.MAX_GRAPH_TOKENS} tokens")
    for name in args.workloads.split(","):
        profile(llm.llm_engine, name, args.top, args.seed)


if __name__ == "__main__":
    main()
