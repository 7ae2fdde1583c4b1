"""Few-row matmuls (decode steps): the Triton skinny GEMM vs cuBLAS (F.linear), as achieved
weight-read bandwidth against a device-to-device copy in the same run.

Workload: the Llama-3-8B shapes a decode step runs (qkv 6144x4096, o 4096x4096, gate_up
28672x4096, down 4096x14336, lm_head 128256x4096), bf16, M = 1..16 rows. Each layer shape is
timed as 32 calls on 32 distinct weight copies inside one CUDA graph, as a step's 32 layers run
them, so no weight is served from L2 and launch gaps count as they do in the model's graph; the
LM head is one call. GB/s counts the bytes of weight + x + y.

    python benchmarks/kernels/skinny_gemm_bench.py            # cuBLAS vs the default configs
    python benchmarks/kernels/skinny_gemm_bench.py --tune     # + a config sweep per (M, shape)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu_utils import copy_bandwidth_gbs  # noqa: E402

from pagedllm.ops.triton.skinny_gemm import default_config, skinny_linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096, 32), "o": (4096, 4096, 32), "gate_up": (28672, 4096, 32),
          "down": (4096, 14336, 32), "lm_head": (128256, 4096, 1)}
DTYPE = torch.bfloat16


def graph_ms(fn, reps: int = 7) -> float:
    """Median ms of one replay of a CUDA graph that calls fn() once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile / pick algorithms outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def configs(m: int):
    if m == 1:
        space = itertools.product((4, 8, 16, 32), (256, 512, 1024), (2, 4, 8), (1,))
    else:
        space = itertools.product((16, 32, 64), (128, 256), (4,), (2, 3, 4))
    for bn, bk, warps, stages in space:
        if bn * bk <= 16384:  # larger fp32 partial tiles spill
            yield {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true", help="sweep block shapes per (M, shape)")
    ap.add_argument("--ms", default="1,2,4,8,16")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"device-to-device copy {copy_gbs:.0f} GB/s (read + write)")
    weights = {name: [torch.empty(n, k, dtype=DTYPE, device="cuda").uniform_(-1e-2, 1e-2)
                      for _ in range(copies)] for name, (n, k, copies) in SHAPES.items()}
    print("| M | shape | cuBLAS us | GB/s | % copy | Triton us | GB/s | % copy | max rel err | config |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in (int(v) for v in args.ms.split(",")):
        step = {"cublas": 0.0, "triton": 0.0}
        for name, (n, k, copies) in SHAPES.items():
            ws = weights[name]
            x = torch.randn(m, k, dtype=DTYPE, device="cuda")
            nbytes = copies * (n * k + m * k + m * n) * 2

            def run(linear, ws=ws, x=x):
                for w in ws:
                    linear(x, w)
            t_cublas = graph_ms(lambda: run(lambda x, w: F.linear(x, w)))
            cfg = default_config(m, n, k)
            if args.tune:
                best = None
                for c in configs(m):
                    try:
                        t = graph_ms(lambda c=c: run(lambda x, w: skinny_linear(x, w, config=c)))
                    except Exception as e:  # a shape the compiler refuses (resources)
                        print(f"  skip {c}: {type(e).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, c)
                t_triton, cfg = best
            else:
                t_triton = graph_ms(lambda: run(lambda x, w: skinny_linear(x, w)))
            ref = x.float() @ ws[0].float().T
            err = ((skinny_linear(x, ws[0], config=cfg).float() - ref).abs().max()
                   / ref.abs().max()).item()
            step["cublas"] += t_cublas
            step["triton"] += t_triton
            gbs = [nbytes / t / 1e6 for t in (t_cublas, t_triton)]
            print(f"| {m} | {name} {n}x{k} x{copies} | {1000 * t_cublas / copies:.1f} | "
                  f"{gbs[0]:.0f} | {100 * gbs[0] / copy_gbs:.1f} | {1000 * t_triton / copies:.1f} "
                  f"| {gbs[1]:.0f} | {100 * gbs[1] / copy_gbs:.1f} | {err:.1e} | {cfg} |")
        print(f"| {m} | **one decode step's matmuls** | {1000 * step['cublas']:.0f} | | | "
              f"{1000 * step['triton']:.0f} | | | | |")


if __name__ == "__main__":
    main()
