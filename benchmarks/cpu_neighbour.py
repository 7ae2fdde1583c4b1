"""Throughput on a shared CPU: pagedllm and HF transformers, each quiet and then beside CPU-bound
neighbour processes, in the same run; the share of its quiet speed each engine keeps.

Workload: the README's (32 random prompts of 32-256 tokens, 64 new tokens, greedy, EOS ignored;
`cpu_peers.build_workloads`), default model, --dtype (float32). A neighbour is a process
spinning in pure Python (`while True: pass`): one busy core each, from before the engine is
built (so its load, warm-up and first thread sizing see the neighbours too) until the timed
generate call returns; only that call is timed (cpu_peers' runners).
Engines alternate (pagedllm quiet, pagedllm busy, HF quiet, HF busy) `--repeats` times, so
host drift hits both; the table gives each cell's median and range.

    python benchmarks/cpu_neighbour.py                    # 1 neighbour on 2 cores, 3 repeats
    python benchmarks/cpu_neighbour.py --neighbours 2     # one per core
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def neighbours(n: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)  # let them reach full speed before the clock starts
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def timed(engine: str, work, model_path: str, args, busy: int) -> float:
    """Output tok/s of one run, the neighbours spinning around the whole runner (engine
    build, warm-up and the timed generate call; only the call is timed)."""
    import cpu_peers

    with neighbours(busy):
        if engine == "pagedllm":
            secs, toks = cpu_peers.run_pagedllm(work, model_path, args.batch_invariant,
                                                args.dtype)
        else:
            secs, toks = cpu_peers.run_hf(work, model_path, args.threads, dtype=args.dtype)
    return toks / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neighbours", type=int, default=1, help="CPU-bound processes beside")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2, help="HF's torch threads")
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.peer_workloads = "random"

    import torch

    import cpu_peers
    from pagedllm.loader import default_model_path

    torch.set_num_threads(args.threads)
    model_path = default_model_path()
    work = cpu_peers.build_workloads(args, model_path)["random"]
    speeds: dict[tuple[str, int], list[float]] = {}
    for r in range(args.repeats):
        for engine in ("pagedllm", "HF generate (static batch)"):
            for busy in (0, args.neighbours):
                tps = timed("pagedllm" if engine == "pagedllm" else "hf", work, model_path,
                            args, busy)
                speeds.setdefault((engine, busy), []).append(tps)
                print(f"# repeat {r + 1}: {engine}, {busy} neighbour(s): {tps:.1f} tok/s",
                      flush=True)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {args.dtype}; {len(work)} random prompts x 64 new tokens; "
          f"{args.neighbours} spinning neighbour process(es); median (min-max) of "
          f"{args.repeats} alternating repeats")
    print("| engine | quiet tok/s | beside neighbours tok/s | share kept |")
    print("|---|---|---|---|")
    for engine in ("pagedllm", "HF generate (static batch)"):
        quiet, busy = speeds[(engine, 0)], speeds[(engine, args.neighbours)]
        shares = [b / q for q, b in zip(quiet, busy)]
        print(f"| {engine} | {statistics.median(quiet):.1f} ({min(quiet):.1f}-{max(quiet):.1f}) "
              f"| {statistics.median(busy):.1f} ({min(busy):.1f}-{max(busy):.1f}) "
              f"| {100 * statistics.median(shares):.0f}% ({100 * min(shares):.0f}-"
              f"{100 * max(shares):.0f}%) |", flush=True)


if __name__ == "__main__":
    main()
