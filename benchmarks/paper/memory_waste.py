"""The paper's Fig. 2: where the KV cache's memory goes, for paged blocks and Orca's baselines.

OPT-13B on one A100-40GB, simulated (load_format="simulate", profile a100-40gb, the paper's
15.7K KV token slots, block size 16). Every request of a workload arrives at once, so memory
is the bottleneck from the first step to the last admission; each allocator runs the same
requests through the same scheduler. At every step the pool is split into token states,
reserved slots, internal and external fragmentation (core/kv_accounting.py); the bars are the
step averages of those shares of the memory in use or lost (free memory while no request
waited for it is left out).

    python benchmarks/paper/memory_waste.py                # ~3 min; table + docs/paper PNG
    python benchmarks/paper/memory_waste.py --num-requests 200 --no-plot
"""

from __future__ import annotations

import argparse
import os

from replay import ALLOCATORS, LABELS, NUM_REQUESTS, PAPER_MEANS, make_core, replay, workload

CATEGORIES = ("token_states", "reserved", "internal_frag", "external_frag")
NAMES = {"token_states": "token states", "reserved": "reserved",
         "internal_frag": "internal frag.", "external_frag": "external frag. & others"}
# The paper's Fig. 2 (OPT-13B, ShareGPT-like): token states / reserved / internal / external.
PAPER = {"orca-max": (20.4, 13.3, 57.3, 8.9), "orca-pow2": (26.8, 17.9, 13.6, 41.6),
         "orca-oracle": (38.2, 25.2, 0.0, 36.6), "paged": (96.3, 0.0, 3.7, 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=None,
                    help="default: 1000 ShareGPT, 4000 Alpaca")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()

    results = {}
    for dataset in ("sharegpt", "alpaca"):
        lengths = workload(dataset, args.num_requests or NUM_REQUESTS[dataset], args.seed)
        mean_in = sum(p for p, _ in lengths) / len(lengths)
        mean_out = sum(o for _, o in lengths) / len(lengths)
        print(f"\n{dataset}: {len(lengths)} requests, mean input {mean_in:.1f} / output "
              f"{mean_out:.1f} tokens (paper: {PAPER_MEANS[dataset][0]} / "
              f"{PAPER_MEANS[dataset][1]})\n")
        print("| allocator | token states | reserved | internal frag. | external frag. & others "
              "| mean batch | simulated s | wall s |")
        print("|---|---|---|---|---|---|---|---|")
        for allocator in ALLOCATORS:
            r = replay(make_core("opt-13b", allocator, seed=args.seed), lengths, rate=None,
                       seed=args.seed)
            results[dataset, allocator] = r
            cells = " | ".join(f"{100 * r.memory[c]:.1f}%" for c in CATEGORIES)
            print(f"| {LABELS[allocator]} | {cells} | {r.mean_batched:.1f} | "
                  f"{r.sim_seconds:.0f} | {r.wall_seconds:.0f} |", flush=True)
    if not args.no_plot:
        plot(results)


def plot(results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"token_states": "#4c72b0", "reserved": "#dd8452", "internal_frag": "#c44e52",
              "external_frag": "#8c8c8c"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    columns = [("the paper (Fig. 2)", {a: dict(zip(CATEGORIES, PAPER[a])) for a in ALLOCATORS})]
    for dataset in ("sharegpt", "alpaca"):
        columns.append((f"pagedllm, {dataset} (simulated)",
                        {a: {c: 100 * results[dataset, a].memory[c] for c in CATEGORIES}
                         for a in ALLOCATORS}))
    order = ("orca-max", "orca-pow2", "orca-oracle", "paged")
    for ax, (title, data) in zip(axes, columns):
        bottom = [0.0] * len(order)
        for c in CATEGORIES:
            values = [data[a][c] for a in order]
            ax.bar(range(len(order)), values, bottom=bottom, color=colors[c], label=NAMES[c])
            for i, (v, b) in enumerate(zip(values, bottom)):
                if v >= 6:
                    ax.text(i, b + v / 2, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="white")
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xticks(range(len(order)), [LABELS[a].replace(" (paged)", "") for a in order],
                      rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("KV cache memory in use or lost (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    fig.suptitle("Fig. 2: KV cache memory by use, OPT-13B on A100-40GB (15.7K token slots)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "docs", "paper", "memory_waste.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
