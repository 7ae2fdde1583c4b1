"""Decode latency on CUDA: milliseconds per output token of a small batch, beside its floor.

Model: Llama-3-8B shape (benchmarks/gpu_utils.py LLAMA3_8B; dummy bf16 weights), default
`.devdata/llama3-8b` (write it with `python benchmarks/gpu_utils.py`).
Workload (seeded): `--batch-size` requests of `--input-len` random prompt tokens, greedy,
EOS ignored. Each request runs to `--output-len` tokens and, separately, to 1 token; the
decode latency is the difference over the extra tokens (so prefill is left out):

    ms/token = (t(output_len tokens) - t(1 token)) / (output_len - 1), median of --iters

Floor: the bytes one decode step must read (every weight but the embedding table, plus the
KV cache of the batch at mid-generation) over the device copy bandwidth measured in the
same run. The GPU idle share is measured with CUDA events around every step.

    python benchmarks/latency.py                      # batch 1, 32 in / 128 out
    python benchmarks/latency.py --enforce-eager      # no CUDA graphs
    python benchmarks/latency.py --no-fused-ops       # plain PyTorch norm / rotary / SiLU
    python benchmarks/latency.py --no-skinny-gemm     # cuBLAS for the decode matmuls
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import gpu_utils
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".devdata/llama3-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="default: the engine's (on for CUDA)")
    ap.add_argument("--no-fused-ops", action="store_true")
    ap.add_argument("--no-skinny-gemm", action="store_true",
                    help="cuBLAS for the few-row matmuls too (PAGEDLLM_SKINNY_GEMM=0)")
    ap.add_argument("--blas", choices=("cublas", "cublaslt"), default=None,
                    help="torch.backends.cuda.preferred_blas_library (an experiment knob)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = ap.parse_args()

    from pagedllm import LLM, SamplingParams
    from pagedllm.ops import fused, gemm

    if args.no_fused_ops:
        fused.set_enabled(False)
    if args.no_skinny_gemm:
        gemm.set_skinny_enabled(False)
    if args.blas is not None:
        torch.backends.cuda.preferred_blas_library(args.blas)
    if args.model == ".devdata/llama3-8b" and not os.path.isdir(args.model):
        gpu_utils.write_llama3_8b_dir(args.model)
    copy_gbs = gpu_utils.copy_bandwidth_gbs()
    llm = LLM(args.model, load_format=args.load_format, dtype="bfloat16", seed=args.seed,
              max_num_seqs=args.batch_size, enforce_eager=args.enforce_eager,
              async_scheduling=args.async_scheduling,
              gpu_memory_utilization=args.gpu_memory_utilization)
    cfg = llm.llm_engine.config.model.hf_config
    rng = random.Random(args.seed)
    prompts = [{"prompt_token_ids": [rng.randrange(100, cfg.vocab_size)
                                     for _ in range(args.input_len)]}
               for _ in range(args.batch_size)]

    def run(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.llm_engine.engine_core.block_manager.reset_prefix_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return elapsed

    run(args.output_len)  # warm-up
    first, full = [], []
    for _ in range(args.iters):
        first.append(run(1))
        full.append(run(args.output_len))
    profile = gpu_utils.StepProfile(llm.llm_engine.engine_core)  # one more run, profiled
    run(args.output_len)
    stats = profile.summary()
    profile.close()
    per_token = [(f - o) / (args.output_len - 1) for f, o in zip(full, first)]
    ms = 1e3 * statistics.median(per_token)

    m = gpu_utils.model_numbers(cfg)
    mid_context = args.input_len + args.output_len // 2
    step_bytes = m["weight_bytes_per_step"] + args.batch_size * mid_context * m[
        "kv_bytes_per_token"]
    floor_ms = step_bytes / (copy_gbs * 1e9) * 1e3
    mode = ("eager" if args.enforce_eager else "CUDA graphs") + (
        ", fused ops off" if args.no_fused_ops else ", fused ops") + (
        ", async scheduling" if llm.llm_engine.config.async_scheduling else ", synchronous") + (
        ", cuBLAS matmuls" if args.no_skinny_gemm else ", skinny GEMM") + (
        f", {args.blas}" if args.blas else "")
    print(f"# {gpu_utils.device_line()}")
    print(f"# model {args.model} ({args.load_format}, bf16); batch {args.batch_size}, "
          f"{args.input_len} prompt tokens, {args.output_len} new tokens, greedy, seed "
          f"{args.seed}, median of {args.iters}; {mode}")
    print(f"# copy bandwidth {copy_gbs:.0f} GB/s; one decode step reads {step_bytes / 1e9:.2f} GB"
          f" -> floor {floor_ms:.2f} ms/step")
    print(gpu_utils.format_profile(stats))
    print("| model | batch | in / out | mode | ms / token | floor ms | % of floor | "
          "e2e s | GPU idle |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    print(f"| Llama-3-8B shape (dummy, bf16) | {args.batch_size} | {args.input_len} / "
          f"{args.output_len} | {mode} | {ms:.2f} | {floor_ms:.2f} | "
          f"{100 * floor_ms / ms:.0f}% | {statistics.median(full):.3f} | "
          f"{100 * stats.get('gpu_idle_share', 0):.1f}% |")


if __name__ == "__main__":
    main()
