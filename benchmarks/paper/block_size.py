"""The paper's block-size ablation (its Fig. 18b; the brief calls it 18a): normalized latency
against block size at a fixed request rate, ShareGPT and Alpaca.

OPT-13B on one A100-40GB (simulated, the paper's 15.7K KV token slots for every block size),
paged allocator, Poisson arrivals at --sharegpt-rate / --alpaca-rate. pagedllm accepts block
sizes 8 to 128 (CacheConfig), so the paper's 1, 2, 4 and 256 are left out.

What the simulator can and cannot show: larger blocks waste the tail of each sequence's last
block (internal fragmentation), which lowers the batch, and Alpaca's short sequences feel it
first; the paper's other effect, slower attention kernels with small blocks (less parallelism
per block on the GPU), is not in the cost model, whose attention cost depends on the tokens
read, not on how they are cut into blocks.

    python benchmarks/paper/block_size.py        # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os

from replay import NUM_REQUESTS, make_core, replay, workload

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "docs", "paper")
BLOCK_SIZES = (8, 16, 32, 64, 128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=None,
                    help="default: 1000 ShareGPT, 4000 Alpaca")
    # Near the paged allocator's knee (rate_sweep.py), where memory limits the batch.
    ap.add_argument("--sharegpt-rate", type=float, default=5.0)
    ap.add_argument("--alpaca-rate", type=float, default=70.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()

    rates = {"sharegpt": args.sharegpt_rate, "alpaca": args.alpaca_rate}
    results = {}
    print("| dataset | rate (req/s) | block size | normalized latency (s/token) | mean batch | "
          "token states | wall s |\n|---|---|---|---|---|---|---|")
    for dataset, rate in rates.items():
        lengths = workload(dataset, args.num_requests or NUM_REQUESTS[dataset], args.seed)
        for bs in BLOCK_SIZES:
            r = replay(make_core("opt-13b", "paged", block_size=bs, seed=args.seed), lengths,
                       rate, seed=args.seed)
            results.setdefault(dataset, []).append(
                {"block_size": bs, "normalized_latency": r.normalized_latency,
                 "mean_batched": r.mean_batched, "token_states": r.memory["token_states"]})
            print(f"| {dataset} | {rate:g} | {bs} | {r.normalized_latency:.3f} | "
                  f"{r.mean_batched:.1f} | {100 * r.memory['token_states']:.1f}% | "
                  f"{r.wall_seconds:.0f} |", flush=True)
    os.makedirs(DOCS, exist_ok=True)
    with open(os.path.join(DOCS, "block_size.json"), "w") as f:
        json.dump({"rates": rates, "results": results}, f, indent=1)
    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for dataset, points in results.items():
            ax.plot([p["block_size"] for p in points], [p["normalized_latency"] for p in points],
                    marker="o", label=f"{dataset} at {rates[dataset]:g} req/s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(BLOCK_SIZES, [str(b) for b in BLOCK_SIZES])
        ax.set_xlabel("block size (tokens)")
        ax.set_ylabel("normalized latency (s/token)")
        ax.set_title("block size (paper Fig. 18b), OPT-13B / A100 simulated", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = os.path.join(DOCS, "block_size.png")
        fig.savefig(out, dpi=120)
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
