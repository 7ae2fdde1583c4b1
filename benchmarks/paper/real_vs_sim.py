"""Issue 16, run 3: the paper replay checked against real steps on a GPU.

The same ShareGPT trace (lengths, Poisson arrivals) runs twice per rate and allocator:
  real       the engine core on the GPU (dummy weights of the model's shape, the paper's KV
             token slots), requests added when the wall clock passes their arrival
  simulated  the same engine core on the simulated executor (a fitted profile, e.g. h200),
             the clock advanced by the cost model
and both report normalized latency (mean of (finish - arrival) / output tokens) and the mean
batch (sequences per step). The error of the simulator's prediction is printed per point.

    python benchmarks/paper/real_vs_sim.py --rates 2,4,6 --num-requests 300 \
        --profile h200 --device cuda            # OPT-13B, fp16 dummy weights, 15.7K slots
    python benchmarks/paper/real_vs_sim.py --model-dir tests/... --device cpu  # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from replay import HERE, MODELS, RunResult, make_core, replay, workload

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core import EngineCore
from pagedllm.engine.protocol import EngineCoreRequest
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


def arrivals_of(num: int, rate: float, seed: int) -> list[float]:
    """The arrival times replay() draws for the same seed (kept in step with it)."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(num):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def real_core(model_dir: str, allocator: str, slots: int, device: str, dtype: str,
              seed: int) -> EngineCore:
    args = EngineArgs(model=model_dir, load_format="dummy", dtype=dtype, device=device,
                      kv_allocator=allocator, block_size=16, seed=seed,
                      num_gpu_blocks_override=slots // 16, enable_prefix_caching=False)
    return EngineCore(args.create_engine_config(), set())


def replay_real(core: EngineCore, lengths: list[tuple[int, int]], rate: float,
                seed: int) -> RunResult:
    """replay() on the wall clock: a request is added once its arrival time has passed."""
    arrivals = arrivals_of(len(lengths), rate, seed)
    batch = {"steps": 0, "seqs": 0}
    schedule = core._schedule  # count each plan's sequences, as the simulator does

    def counting_schedule():
        out = schedule()
        if out.scheduled:
            batch["steps"] += 1
            batch["seqs"] += len(out.scheduled)
        return out
    core._schedule = counting_schedule
    finished: dict[str, float] = {}
    p0 = core.get_metrics()["num_preemptions_total"]
    start, i = time.perf_counter(), 0
    while len(finished) < len(lengths):
        now = time.perf_counter() - start
        while i < len(lengths) and arrivals[i] <= now:
            prompt, out = lengths[i]
            params = SamplingParams(max_tokens=out, ignore_eos=True, detokenize=False,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            core.add_request(EngineCoreRequest(str(i), [100 + (i + j) % 1000 for j in
                                                        range(prompt)], params,
                                               arrival_time=time.time()))
            i += 1
        if not core.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
            continue
        for o in core.step():
            if o.finished:
                assert o.error is None, o.error
                finished[o.request_id] = time.perf_counter() - start
    core._schedule = schedule
    wall = time.perf_counter() - start
    norm = sum((finished[str(k)] - arrivals[k]) / lengths[k][1] for k in range(len(lengths)))
    m = core.get_metrics()
    return RunResult(
        normalized_latency=norm / len(lengths), mean_batched=batch["seqs"] / max(batch["steps"], 1),
        throughput=len(lengths) / wall, sim_seconds=wall, wall_seconds=wall,
        num_preemptions=m["num_preemptions_total"] - p0, memory={})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-13b", choices=sorted(MODELS))
    ap.add_argument("--model-dir", default=None, help="default: benchmarks/paper/models/MODEL")
    ap.add_argument("--profile", default="h200", help="the simulator's device profile")
    ap.add_argument("--rates", default="2,4,6")
    ap.add_argument("--allocators", default="paged")
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--slots", type=int, default=None, help="default: the paper's for MODEL")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip the real runs that would start after this many seconds")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args()
    t0 = time.perf_counter()
    slots = a.slots or MODELS[a.model][3]
    model_dir = a.model_dir or os.path.join(HERE, "models", a.model)
    lengths = workload("sharegpt", a.num_requests, a.seed)
    print(f"# {a.model} ({model_dir}), {slots} KV token slots, {len(lengths)} ShareGPT requests "
          f"(mean prompt {sum(p for p, _ in lengths) / len(lengths):.0f}, output "
          f"{sum(o for _, o in lengths) / len(lengths):.0f} tokens), simulator profile "
          f"{a.profile}", flush=True)
    rows = []
    for allocator in a.allocators.split(","):
        core = None
        for rate in [float(r) for r in a.rates.split(",")]:
            sim = replay(make_core(a.model, allocator, num_slots=slots, sim_profile=a.profile,
                                   seed=a.seed), lengths, rate, a.seed)
            if a.deadline_s is not None and time.perf_counter() - t0 > a.deadline_s:
                print(f"# deadline: real run skipped at {allocator} {rate}", flush=True)
                continue
            core = core or real_core(model_dir, allocator, slots, a.device, a.dtype, a.seed)
            real = replay_real(core, lengths, rate, a.seed)
            row = {"allocator": allocator, "rate": rate,
                   "real_norm_latency": real.normalized_latency,
                   "sim_norm_latency": sim.normalized_latency,
                   "real_mean_batch": real.mean_batched, "sim_mean_batch": sim.mean_batched,
                   "real_preemptions": real.num_preemptions,
                   "sim_preemptions": sim.num_preemptions, "real_wall_s": real.wall_seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if core is not None:
            core.shutdown()
    print("| allocator | rate (req/s) | norm. latency real (s/token) | simulated | error | "
          "mean batch real | simulated | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        el = r["sim_norm_latency"] / r["real_norm_latency"] - 1
        eb = r["sim_mean_batch"] / r["real_mean_batch"] - 1
        print(f"| {r['allocator']} | {r['rate']:g} | {r['real_norm_latency']:.4f} | "
              f"{r['sim_norm_latency']:.4f} | {el:+.0%} | {r['real_mean_batch']:.1f} | "
              f"{r['sim_mean_batch']:.1f} | {eb:+.0%} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
