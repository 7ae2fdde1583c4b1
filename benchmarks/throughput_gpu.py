"""The CUDA half of benchmarks/throughput.py (see its docstring): run `throughput.py --device
cuda ...`, not this file."""

from __future__ import annotations

import gc
import time

import gpu_utils
import torch


def load_requests(args, vocab_size: int) -> tuple[str, list[tuple[list[int], int]]]:
    """(description, [(prompt ids, output length)])."""
    if args.dataset == "sharegpt":
        from sharegpt import load_requests as load_sharegpt

        reqs = [(r["prompt_token_ids"], r["output_len"])
                for r in load_sharegpt(args.dataset_file)]
        if args.num_prompts is not None:
            reqs = reqs[: args.num_prompts]
        return f"ShareGPT ({args.dataset_file})", reqs
    from throughput import make_workload

    prompts = make_workload(args.num_prompts or 32, args.min_len, args.max_len, vocab_size, args.seed)
    lens = (f"{args.min_len}" if args.min_len == args.max_len
            else f"{args.min_len}-{args.max_len}")
    return (f"random (seed {args.seed}), {lens} prompt tokens, {args.output_len} out",
            [(p, args.output_len) for p in prompts])


def timed_run(llm, reqs, detokenize: bool) -> dict:
    from pagedllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True,
                             detokenize=detokenize) for _, o in reqs]
    llm.llm_engine.engine_core.block_manager.reset_prefix_cache()  # every run does all of its prefill
    profile = gpu_utils.StepProfile(llm.llm_engine.engine_core)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in reqs], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    stats = profile.summary()
    profile.close()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == sum(o for _, o in reqs), "a request stopped before its output length"
    metrics = llm.get_metrics()
    return {"seconds": elapsed, "output_tokens": tokens,
            "prompt_tokens": sum(len(p) for p, _ in reqs), "profile": stats,
            "preemptions": metrics.get("num_preemptions_total", 0)}


def run_hf_generate_batch(args, model_path: str, reqs) -> dict:
    """HF transformers continuous batching: the manager behind `generate_batch`, fed one
    request at a time so that each gets its own max_new_tokens; EOS off (-1)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    config = AutoConfig.from_pretrained(model_path)
    if args.load_format == "dummy":
        from pagedllm.loader import initialize_dummy_weights

        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                     attn_implementation="paged|sdpa")
        # The same dummy values as ours: matmul speed depends a little on the data.
        initialize_dummy_weights(model, seed=args.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.bfloat16, attn_implementation="paged|sdpa").cuda()
    model.eval()
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(o for _, o in reqs),
                                  pad_token_id=0)
    hints = WorkloadHints(max_prompt_length=max(len(p) for p, _ in reqs),
                          max_generated_length=max(o for _, o in reqs), num_requests=len(reqs))
    done, tokens, timed_out = 0, 0, False
    with model.continuous_batching_context_manager(generation_config=gen_config, block=True,
                                                   timeout=5, workload_hints=hints) as manager:
        torch.cuda.synchronize()
        start = time.perf_counter()  # after warm-up (graph capture) in the context manager
        for i, (prompt, out_len) in enumerate(reqs):
            manager.add_request(input_ids=prompt, request_id=f"r{i}", max_new_tokens=out_len,
                                eos_token_id=-1)
        while done < len(reqs):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                assert result.error is None, result.error
                done += 1
                tokens += len(result.generated_tokens)
            elif result is None and not manager.is_running():
                raise RuntimeError("HF continuous batching stopped")
            if time.perf_counter() - start > args.hf_timeout:
                timed_out = True
                break
        elapsed = time.perf_counter() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"seconds": elapsed, "output_tokens": tokens, "requests_done": done,
            "timed_out": timed_out}


def _triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache: a compile during a timed run shows up here."""
    import os

    path = os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")
    return len(os.listdir(path)) if os.path.isdir(path) else 0


def release(llm) -> None:
    runner = llm.llm_engine.engine_core.executor.runner
    runner.graph_runner = runner.cache_engine = runner.model = None
    gc.collect()
    torch.cuda.empty_cache()


def main_gpu(args) -> None:
    from pagedllm import LLM
    from pagedllm.loader import default_model_path, load_model_config

    torch.manual_seed(args.seed)
    model_path = args.model or default_model_path()
    cfg = load_model_config(model_path, args.load_format)
    desc, reqs = load_requests(args, cfg.vocab_size)
    dtype = "bfloat16" if args.dtype == "float32" else args.dtype  # fp32 is the CPU default
    copy_gbs, tflops = gpu_utils.copy_bandwidth_gbs(), gpu_utils.matmul_tflops()

    engine_kwargs = dict(max_num_seqs=args.max_num_seqs,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         enforce_eager=args.enforce_eager,
                         async_scheduling=args.async_scheduling,
                         kv_cache_dtype=args.kv_cache_dtype)
    for key in ("max_num_batched_tokens", "max_model_len"):
        if getattr(args, key) is not None:
            engine_kwargs[key] = getattr(args, key)
    t0 = time.perf_counter()
    llm = LLM(model_path, load_format=args.load_format, dtype=dtype, device="cuda",
              seed=args.seed, **engine_kwargs)
    startup = time.perf_counter() - t0
    detok = not args.no_detokenize
    # Warm-up on the workload's own first requests (8 tokens each): compiles the kernel
    # variants of its prefill, mixed and decode steps before the clock starts.
    timed_run(llm, [(p, 8) for p, _ in reqs[:64]], detok)
    compiled = _triton_cache_entries()
    for _ in range(args.repeat - 1):  # earlier repeats are warm-up (and printed)
        r = timed_run(llm, reqs, detok)
        print(f"(repeat) {r['seconds']:.2f} s, {r['output_tokens'] / r['seconds']:.1f} tok/s")
    rows = [("pagedllm", len(reqs), timed_run(llm, reqs, detok))]
    compiled = _triton_cache_entries() - compiled
    hf_reqs = reqs[: args.hf_num_prompts]
    if args.hf_backend != "none" and len(hf_reqs) < len(reqs):
        rows.append(("pagedllm (HF's subset)", len(hf_reqs), timed_run(llm, hf_reqs, detok)))
    engine_config = llm.llm_engine.config
    num_blocks = llm.get_metrics()["num_gpu_blocks"]
    release(llm)
    del llm
    hf = None
    if args.hf_backend == "generate_batch":
        try:
            hf = run_hf_generate_batch(args, model_path, hf_reqs)
        except Exception as e:  # report ours even if the peer fails
            print(f"HF generate_batch failed: {type(e).__name__}: {e}")

    sc = engine_config.scheduler
    print(f"# {gpu_utils.device_line()}; copy {copy_gbs:.0f} GB/s, bf16 matmul {tflops:.0f} "
          f"TFLOP/s (measured)")
    print(f"# model {model_path} ({args.load_format}, {dtype}); workload {desc}: {len(reqs)} "
          f"requests, {sum(len(p) for p, _ in reqs)} prompt + {sum(o for _, o in reqs)} output "
          f"tokens, greedy, EOS ignored, detokenize {detok}")
    print(f"# pagedllm: max_num_seqs {sc.max_num_seqs}, max_num_batched_tokens "
          f"{sc.max_num_batched_tokens}, max_model_len {sc.max_model_len}, "
          f"{'eager' if engine_config.enforce_eager else 'CUDA graphs'}, "
          f"{'async' if engine_config.async_scheduling else 'synchronous'} scheduling, "
          f"{num_blocks} KV blocks of {args.kv_cache_dtype} "
          f"(gpu_memory_utilization {engine_config.cache.gpu_memory_utilization}); "
          f"start-up {startup:.1f} s")
    print(f"# Triton kernels compiled during the timed runs: {compiled}")
    for name, n, r in rows:
        sub = reqs[:n]
        roof = gpu_utils.roofline(cfg, [len(p) for p, _ in sub], [o for _, o in sub],
                                  sc.max_num_seqs, copy_gbs, tflops,
                                  kv_elt=1 if args.kv_cache_dtype.startswith("fp8") else 2)
        print(f"{name}: {gpu_utils.format_roofline(roof, r['seconds'], r['output_tokens'])}")
        print(f"{name}: {gpu_utils.format_profile(r['profile'])}; "
              f"{r['preemptions']} preemptions; total (prompt + output) "
              f"{(r['prompt_tokens'] + r['output_tokens']) / r['seconds']:.0f} tok/s")
    print("| engine | requests | output tokens | seconds | output tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    table = [(name, n, r["output_tokens"], r["seconds"]) for name, n, r in rows]
    if hf is not None:
        label = "HF transformers generate_batch (paged|sdpa)"
        if hf["timed_out"]:
            label += f" (stopped at {args.hf_timeout:.0f} s: {hf['requests_done']} requests done)"
        table.append((label, len(hf_reqs), hf["output_tokens"], hf["seconds"]))
    base = table[-1][2] / table[-1][3]
    for name, n, toks, secs in table:
        print(f"| {name} | {n} | {toks} | {secs:.2f} | {toks / secs:.1f} | "
              f"{(toks / secs) / base:.2f}x |")
