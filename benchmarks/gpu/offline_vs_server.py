"""Offline vs server output throughput: the same requests, the same engine arguments, one run.

Model: Llama-3-8B shape with dummy bf16 weights (`.devdata/llama3-8b`, written by
`python benchmarks/gpu_utils.py`). Workload: the first --num-prompts requests of a
benchmarks/sharegpt.py file (default `.devdata/sharegpt_1000.json`), greedy, EOS ignored, each
emitting exactly its dataset output length, all submitted at once.

  offline   LLM.generate over every request (engine core in process)
  serve     `pagedllm serve` (--engine-core process, then thread), a client streaming every
            request to /v1/completions at once (token-id prompts, benchmarks/serving.py's send)

Output tok/s = output tokens / seconds from the first submission to the last token. Each phase
runs in its own process (it takes 0.9 of the GPU's memory) and first warms up on 64 random-token
prompts, which share no prefix with the workload (the prefix cache cannot help the timed run).
A phase is skipped when the time left (--deadline-s) is shorter than the longest phase so far
(or --min-phase-s); --state keeps finished phases in a file, so that a later call on the same
machine runs only the others and prints one table of all.

    python benchmarks/gpu/offline_vs_server.py --num-prompts 1000 --log-dir /tmp/logs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)  # benchmarks/ is not a package: sharegpt.py, serving.py by path
from server_proc import served  # noqa: E402

WARMUP_PROMPTS, WARMUP_OUTPUT = 64, 16


def warmup_requests(vocab_size: int, seed: int = 123) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(1000, vocab_size)
                                  for _ in range(rng.randint(16, 600))],
             "output_len": WARMUP_OUTPUT} for _ in range(WARMUP_PROMPTS)]


def workload(args) -> list[dict]:
    from sharegpt import load_requests

    reqs = load_requests(args.dataset_file)[:args.num_prompts]
    assert len(reqs) == args.num_prompts, f"{args.dataset_file} has only {len(reqs)} requests"
    return reqs


def engine_args(args) -> list[str]:
    """The engine's CLI arguments, shared by both sides (LLM gets them parsed the same way)."""
    return ["--model", args.model, "--load-format", "dummy", "--dtype", "bfloat16",
            "--device", args.device, "--seed", "0", "--max-num-seqs", str(args.max_num_seqs),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization)]


# ---- offline -------------------------------------------------------------------------------
def run_offline(args) -> dict:
    from pagedllm import LLM, SamplingParams
    from pagedllm.engine.arg_utils import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    eargs = EngineArgs.from_cli_args(parser.parse_args(engine_args(args)))
    t0 = time.perf_counter()
    llm = LLM(**{k: v for k, v in vars(eargs).items() if v is not None})  # core in process
    startup = time.perf_counter() - t0
    config = llm.llm_engine.config

    def generate(reqs):
        params = [SamplingParams(temperature=0.0, max_tokens=r["output_len"], ignore_eos=True)
                  for r in reqs]
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs], params,
                            use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

    generate(warmup_requests(config.model.hf_config.vocab_size))
    reqs = workload(args)
    seconds, tokens = generate(reqs)
    assert tokens == sum(r["output_len"] for r in reqs), "a request stopped early"
    return {"phase": "offline (LLM.generate)", "seconds": seconds, "output_tokens": tokens,
            "startup_s": startup, "async_scheduling": config.async_scheduling,
            "enforce_eager": config.enforce_eager,
            "num_gpu_blocks": llm.get_metrics().get("num_gpu_blocks")}


# ---- server --------------------------------------------------------------------------------
async def send_all(url: str, model: str, reqs: list[dict]) -> tuple[float, list]:
    import httpx
    from serving import send

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits,
                                 timeout=httpx.Timeout(900.0)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(send(client, model, r, 1 << 20) for r in reqs))
        return time.perf_counter() - start, results


def run_server(args, engine_core: str) -> dict:
    import httpx

    log = open(os.path.join(args.log_dir, f"server_{engine_core}.log"), "w")
    serve_args = [*engine_args(args), "--engine-core", engine_core]
    with log, served(serve_args, log) as (url, startup):
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        from pagedllm.loader import load_model_config

        vocab = load_model_config(args.model, "dummy").vocab_size
        _, warm = asyncio.run(send_all(url, model, warmup_requests(vocab)))
        assert all(r.ok for r in warm), next(r.error for r in warm if not r.ok)
        reqs = workload(args)
        seconds, results = asyncio.run(send_all(url, model, reqs))
        failed = [r for r in results if not r.ok]
        tokens = sum(r.output_len for r in results if r.ok)
        ttft = sorted(r.ttft for r in results if r.ok)
        return {"phase": f"pagedllm serve --engine-core {engine_core}", "seconds": seconds,
                "output_tokens": tokens, "startup_s": startup, "failed": len(failed),
                "first_error": failed[0].error if failed else None,
                "expected_tokens": sum(r["output_len"] for r in reqs),
                "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None}


# ---- driver --------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".devdata/llama3-8b")
    ap.add_argument("--dataset-file", default=".devdata/sharegpt_1000.json")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--phases", default="offline,process,thread")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="skip phases past this")
    ap.add_argument("--min-phase-s", type=float, default=150.0)
    ap.add_argument("--state", default=None, help="JSON file of finished phases (read, extended)")
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # a child's one phase
    args = ap.parse_args()
    os.makedirs(args.log_dir, exist_ok=True)

    if args.phase is not None:  # child: run one phase, print its result as JSON
        result = run_offline(args) if args.phase == "offline" else run_server(args, args.phase)
        print("RESULT " + json.dumps(result), flush=True)
        return

    done = {}
    if args.state and os.path.exists(args.state):
        with open(args.state) as f:
            done = json.load(f)
    start, longest = time.perf_counter(), args.min_phase_s
    for phase in args.phases.split(","):
        left = args.deadline_s - (time.perf_counter() - start)
        if phase in done or left < longest * 1.1:
            why = "done earlier" if phase in done else f"{left:.0f} s left, need ~{longest:.0f}"
            print(f"# skipped {phase}: {why}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, *sys.argv, "--phase", phase], text=True,
                                 capture_output=True, timeout=left)
        except subprocess.TimeoutExpired as e:
            print(f"# {phase} ran out of time ({left:.0f} s)")
            out = subprocess.CompletedProcess(e.cmd, -9, e.stdout or "", e.stderr or "")
            if isinstance(out.stdout, bytes):
                out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
        longest = max(longest, time.perf_counter() - t0)
        with open(os.path.join(args.log_dir, f"phase_{phase}.log"), "w") as f:
            f.write(out.stdout + out.stderr)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"# {phase} failed (rc {out.returncode}); its log ends:\n{out.stderr[-3000:]}")
            continue
        done[phase] = json.loads(line[len("RESULT "):])
        print(f"# {phase}: {json.dumps(done[phase])}", flush=True)
        if args.state:
            with open(args.state, "w") as f:
                json.dump(done, f)
    rows = [done[p] for p in ("offline", "process", "thread") if p in done]

    import torch
    import triton

    reqs = workload(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"# {device}; torch {torch.__version__}, triton "
          f"{triton.__version__}; model {args.model} (dummy bf16); {len(reqs)} ShareGPT requests "
          f"({args.dataset_file}), {sum(len(r['prompt_token_ids']) for r in reqs)} prompt + "
          f"{sum(r['output_len'] for r in reqs)} output tokens, all at once, greedy, EOS ignored")
    print("| phase | output tokens | seconds | output tok/s | vs offline | start-up s |")
    print("|---|---|---|---|---|---|")
    base = None
    for r in rows:
        rate = r["output_tokens"] / r["seconds"]
        base = base or (rate if r["phase"].startswith("offline") else None)
        ratio = f"{rate / base:.2f}x" if base else "-"
        print(f"| {r['phase']} | {r['output_tokens']} | {r['seconds']:.2f} | {rate:.1f} | "
              f"{ratio} | {r['startup_s']:.0f} |")


if __name__ == "__main__":
    main()
