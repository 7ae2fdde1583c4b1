"""The paper's Fig. 12/13: normalized latency against request rate, and the batch it buys.

OPT-13B on one A100-40GB by default (simulated: profile a100-40gb, the paper's 15.7K KV token
slots, block size 16). Requests arrive by a Poisson process on the simulator's virtual clock
and run to their output length. For each KV allocator and rate:
  normalized latency  mean over requests of (finish - arrival) / output tokens, s/token
  mean batch          sequences per step
The sustainable rate of an allocator is where its normalized latency crosses the knee
threshold (interpolated between swept rates); the curves rise so steeply there that knees of
0.1, 0.2 and 0.4 s/token give nearly the same rates (all three are printed; a sweep stops two
rates past the largest). Fig. 13 is the mean batch at the paper's rates (ShareGPT 2 req/s,
Alpaca 30 req/s) and at the paged allocator's own sustainable rate, since pagedllm's simulated
steps are faster than the paper's measured ones (docs/paper/README.md says why).

    python benchmarks/paper/rate_sweep.py                    # ~15 min on 2 cores
    python benchmarks/paper/rate_sweep.py --model opt-175b --datasets sharegpt
"""

from __future__ import annotations

import argparse
import json
import os

from replay import ALLOCATORS, LABELS, MODELS, NUM_REQUESTS, make_core, replay, workload

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "docs", "paper")
RATES = {"sharegpt": [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7, 8, 9, 10, 12, 14, 16, 20,
                      24, 28],
         "alpaca": [2, 4, 6, 8, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 120, 140, 160, 200,
                    240]}
FIG13_RATE = {"sharegpt": 2.0, "alpaca": 30.0}  # the paper's
KNEES = (0.1, 0.2, 0.4)  # s/token: the sustainable rate at each, to show it hardly moves


def sustainable_rate(points: list[tuple[float, float]], knee: float) -> float | None:
    """The rate where the latency curve first crosses `knee` (linear between points); the
    last rate if it never does (a lower bound), None if even the first is past it."""
    if points[0][1] > knee:
        return None
    for (r0, l0), (r1, l1) in zip(points, points[1:]):
        if l1 > knee:
            return r0 + (r1 - r0) * (knee - l0) / (l1 - l0)
    return points[-1][0]


def sweep(model: str, dataset: str, lengths, rates, knee: float, seed: int,
          allocators) -> dict:
    curves = {}
    for allocator in allocators:
        points, past = [], 0
        for rate in rates:
            r = replay(make_core(model, allocator, seed=seed), lengths, rate, seed=seed)
            points.append({"rate": rate, "normalized_latency": r.normalized_latency,
                           "mean_batched": r.mean_batched, "preemptions": r.num_preemptions,
                           "wall_s": r.wall_seconds})
            print(f"  {LABELS[allocator]:18} {rate:6.2f} req/s: {r.normalized_latency:7.3f} "
                  f"s/token, batch {r.mean_batched:6.1f}, preemptions {r.num_preemptions:5d} "
                  f"({r.wall_seconds:.0f} s)", flush=True)
            past += r.normalized_latency > knee
            if past >= 2:
                break
        curves[allocator] = points
    return curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-13b", choices=sorted(MODELS))
    ap.add_argument("--datasets", nargs="+", default=["sharegpt", "alpaca"])
    ap.add_argument("--allocators", nargs="+", default=list(ALLOCATORS))
    ap.add_argument("--num-requests", type=int, default=None,
                    help="per run (default: 1000 ShareGPT, 4000 Alpaca: traces long enough "
                    "for a backlog to build past the knee)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()

    gpus, _, profile, slots = MODELS[args.model]
    print(f"# {args.model} on {gpus} (simulated, profile {profile}), {slots} KV slots, "
          f"block 16")
    results = {}
    for dataset in args.datasets:
        num_requests = args.num_requests or NUM_REQUESTS[dataset]
        lengths = workload(dataset, num_requests, args.seed)
        print(f"\n{dataset}: {num_requests} requests per run")
        curves = sweep(args.model, dataset, lengths, RATES[dataset], max(KNEES), args.seed,
                       args.allocators)
        rates = {knee: {a: sustainable_rate([(p["rate"], p["normalized_latency"]) for p in pts],
                                            knee) for a, pts in curves.items()}
                 for knee in KNEES}
        fig13_rates = [FIG13_RATE[dataset]]
        if rates[0.2].get("paged"):
            fig13_rates.append(round(rates[0.2]["paged"], 2))
        fig13 = {rate: {a: replay(make_core(args.model, a, seed=args.seed), lengths, rate,
                                  seed=args.seed).mean_batched for a in args.allocators}
                 for rate in fig13_rates}
        results[dataset] = {"curves": curves, "sustainable_rate": rates,
                            "fig13_mean_batched": fig13}
        print(f"\n| {dataset} | " + " | ".join(f"rate at {k} s/token | paged / this"
                                               for k in KNEES)
              + " | " + " | ".join(f"mean batch at {r:g} req/s" for r in fig13_rates) + " |")
        print("|---" * (1 + 2 * len(KNEES) + len(fig13_rates)) + "|")
        for a in args.allocators:
            cells = []
            for k in KNEES:
                rate, paged = rates[k][a], rates[k].get("paged")
                cells.append("-" if rate is None else f"{rate:.2f}")
                cells.append(f"{paged / rate:.2f}x" if rate and paged else "-")
            cells += [f"{fig13[r][a]:.1f}" for r in fig13_rates]
            print(f"| {LABELS[a]} | " + " | ".join(cells) + " |")
    os.makedirs(DOCS, exist_ok=True)
    with open(os.path.join(DOCS, f"rate_sweep_{args.model}.json"), "w") as f:
        json.dump({"model": args.model, "knees": KNEES, "results": results}, f, indent=1)
    if not args.no_plot:
        plot(args.model, results, 0.2)


def plot(model: str, results: dict, knee: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results)
    fig, axes = plt.subplots(1, len(datasets) + 1, figsize=(5 * (len(datasets) + 1), 4))
    styles = {"paged": ("#c44e52", "o"), "orca-oracle": ("#4c72b0", "s"),
              "orca-pow2": ("#55a868", "^"), "orca-max": ("#8172b2", "v")}
    for ax, dataset in zip(axes, datasets):
        for allocator, points in results[dataset]["curves"].items():
            color, marker = styles[allocator]
            ax.plot([p["rate"] for p in points], [p["normalized_latency"] for p in points],
                    marker=marker, color=color, label=LABELS[allocator])
        ax.axhline(knee, color="gray", linestyle=":", linewidth=1)
        ax.set_ylim(0, 5 * knee)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("normalized latency (s/token)")
        ax.set_title(f"{dataset} (Fig. 12)")
        ax.legend(fontsize=8)
    ax = axes[-1]
    bars = [(dataset, rate, batch) for dataset in datasets
            for rate, batch in results[dataset]["fig13_mean_batched"].items()]
    width = 0.8 / len(bars)
    for j, (dataset, rate, batch) in enumerate(bars):
        names = list(batch)
        ax.bar([i + j * width for i in range(len(names))], [batch[a] for a in names], width,
               label=f"{dataset} at {rate:g} req/s")
    ax.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(len(names))],
                  [LABELS[a].replace(" (paged)", "") for a in names], rotation=20, fontsize=8)
    ax.set_ylabel("mean batched requests")
    ax.set_title("Fig. 13")
    ax.legend(fontsize=8)
    fig.suptitle(f"{model}, simulated on the paper's GPUs")
    fig.tight_layout()
    out = os.path.join(DOCS, f"rate_sweep_{model}.png")
    fig.savefig(out, dpi=120)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
