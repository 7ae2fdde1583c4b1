"""The paper's Fig. 19: recovering preempted requests by swapping vs by recomputing.

OPT-13B on one A100-40GB (simulated: profile a100-40gb, 15.7K KV token slots, 4 GiB of CPU swap
space, vLLM's default).
  (a) the cost model's price of one 1,024-token sequence: swapped out and back in (its blocks
      over PCIe) against recomputed (a prefill of its tokens), for each block size;
  (b) end to end: ShareGPT at --rate req/s (past the paged allocator's knee, so that memory
      runs out and requests are preempted), preemption_mode recompute vs swap, normalized
      latency for each block size.

pagedllm gathers all the blocks a step swaps into one copy each way (worker/cache_engine.py),
so a swap costs the same at every block size; the paper's vLLM issued one copy per block,
which made small blocks slow to swap. The cost model prices pagedllm's mechanism.

    python benchmarks/paper/swap_vs_recompute.py          # ~3-5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os

from replay import make_core, replay, workload

from pagedllm.sim.cost_model import StepShape

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "docs", "paper")
BLOCK_SIZES = (8, 16, 32, 64, 128)


def microbenchmark(num_tokens: int) -> list[dict]:
    rows = []
    for bs in BLOCK_SIZES:
        cost = make_core("opt-13b", "paged", block_size=bs).executor.cost
        blocks = -(-num_tokens // bs)
        swap_one_way = cost.step_time(StepShape.of([], 0, num_swapped_blocks=blocks)) \
            - cost.step_time(StepShape.of([], 0))
        recompute = cost.step_time(StepShape.of([(num_tokens, num_tokens)], 1)) \
            - cost.step_time(StepShape.of([], 0))
        rows.append({"block_size": bs, "swap_in_ms": 1e3 * swap_one_way,
                     "swap_out_ms": 1e3 * swap_one_way, "swap_in_out_ms": 2e3 * swap_one_way,
                     "recompute_ms": 1e3 * recompute})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--num-tokens", type=int, default=1024)
    ap.add_argument("--rate", type=float, default=5.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()

    micro = microbenchmark(args.num_tokens)
    print(f"(a) one {args.num_tokens}-token sequence, cost model (a100-40gb)\n")
    print("| block size | swap out (ms) | swap in (ms) | swap in + out (ms) | recompute (ms) |")
    print("|---|---|---|---|---|")
    for r in micro:
        print(f"| {r['block_size']} | {r['swap_out_ms']:.1f} | {r['swap_in_ms']:.1f} | "
              f"{r['swap_in_out_ms']:.1f} | {r['recompute_ms']:.1f} |")

    lengths = workload("sharegpt", args.num_requests, args.seed)
    print(f"\n(b) ShareGPT, {args.num_requests} requests at {args.rate:g} req/s\n")
    print("| block size | mode | normalized latency (s/token) | preemptions | mean batch "
          "| wall s |")
    print("|---|---|---|---|---|---|")
    e2e = []
    for bs in BLOCK_SIZES:
        for mode in ("recompute", "swap"):
            r = replay(make_core("opt-13b", "paged", block_size=bs, seed=args.seed,
                                 preemption_mode=mode), lengths, args.rate, seed=args.seed)
            e2e.append({"block_size": bs, "mode": mode, "normalized_latency":
                        r.normalized_latency, "preemptions": r.num_preemptions,
                        "mean_batched": r.mean_batched})
            print(f"| {bs} | {mode} | {r.normalized_latency:.3f} | {r.num_preemptions} | "
                  f"{r.mean_batched:.1f} | {r.wall_seconds:.0f} |", flush=True)
    os.makedirs(DOCS, exist_ok=True)
    with open(os.path.join(DOCS, "swap_vs_recompute.json"), "w") as f:
        json.dump({"num_tokens": args.num_tokens, "rate": args.rate, "microbenchmark": micro,
                   "end_to_end": e2e}, f, indent=1)
    if not args.no_plot:
        plot(micro, e2e, args)


def plot(micro, e2e, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["block_size"] for r in micro]
    for key, label in (("swap_out_ms", "swap out"), ("swap_in_out_ms", "swap in + out"),
                       ("recompute_ms", "recompute")):
        a.plot(x, [r[key] for r in micro], marker="o", label=label)
    a.set_title(f"(a) one {args.num_tokens}-token sequence (cost model)", fontsize=10)
    a.set_ylabel("time (ms)")
    for mode in ("recompute", "swap"):
        pts = [r for r in e2e if r["mode"] == mode]
        b.plot([r["block_size"] for r in pts], [r["normalized_latency"] for r in pts],
               marker="o", label=mode)
    b.set_title(f"(b) ShareGPT at {args.rate:g} req/s", fontsize=10)
    b.set_ylabel("normalized latency (s/token)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(BLOCK_SIZES, [str(s) for s in BLOCK_SIZES])
        ax.set_xlabel("block size (tokens)")
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 19: swap vs recompute, OPT-13B on A100-40GB (simulated)")
    fig.tight_layout()
    out = os.path.join(DOCS, "swap_vs_recompute.png")
    fig.savefig(out, dpi=120)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
