"""Paged decode attention on the CPU: the C++ kernel (ops/cpu_kernels.py) vs its PyTorch twin.

Workload (seeded): one decode step's attention layer of SmolLM2-135M (9 query / 3 KV heads,
head_dim 64, block size 16, fp32), batch 32, context lengths uniform in [150, 320] (the shape of
benchmarks/throughput.py's decode steps), block tables shuffled; then a small sweep (batch,
context, a Llama-like 32/8 x 128 layer, bf16). Each timed call reads a different layer's cache,
cycling through enough layers that K/V come from DRAM, as in a real step. Peer: the twin, same
run; GB/s counts the K/V bytes the kernel reads, next to a single large torch.sum's read rate.

    python benchmarks/kernels/cpu_decode_bench.py              # 2 threads (the CI machine)
    python benchmarks/kernels/cpu_decode_bench.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from pagedllm.ops import cpu_kernels, torch_ref

SMOLLM2 = {"num_heads": 9, "num_kv_heads": 3, "head_dim": 64}
LLAMA = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128}
BLOCK_SIZE = 16
DRAM_BYTES = 384 << 20  # cycle through at least this much cache per timing round


def make_layers(batch: int, min_len: int, max_len: int, num_heads: int, num_kv_heads: int,
                head_dim: int, dtype: torch.dtype, seed: int = 0):
    """Inputs for one decode step: the query, seq_lens, block tables, and as many layers'
    (key_cache, value_cache) as it takes to overflow the CPU caches."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(min_len, max_len + 1, (batch,), generator=gen, dtype=torch.int32)
    blocks_per_seq = (max_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq).int()
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    layer_bytes = 2 * num_blocks * BLOCK_SIZE * num_kv_heads * head_dim * dtype.itemsize
    num_layers = max(2, min(30, -(-DRAM_BYTES // layer_bytes)))
    layers = [(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen)
               .to(dtype)) for _ in range(num_layers)]
    query = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    kv_bytes = 2 * int(seq_lens.sum()) * num_kv_heads * head_dim * dtype.itemsize
    return query, seq_lens, tables, layers, kv_bytes


def ms_per_call(fns, query, seq_lens, tables, layers, rounds: int) -> list[float]:
    """For each fn, the median over rounds of one call per layer. Rounds of the fns alternate,
    so that a neighbour's load on a shared machine falls on both sides alike."""
    scale = query.shape[-1] ** -0.5
    max_len = int(seq_lens.max())
    times = [[] for _ in fns]
    for i in range(rounds + 1):  # round 0 warms up
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            for key_cache, value_cache in layers:
                fn(query, key_cache, value_cache, tables, seq_lens, scale, max_len)
            if i:
                fn_times.append((time.perf_counter() - start) / len(layers))
    return [statistics.median(t) * 1e3 for t in times]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def read_gbs() -> float:
    x = torch.randn(64 << 20)  # 256 MiB
    x.sum()
    start = time.perf_counter()
    for _ in range(3):
        x.sum()
    return 3 * x.numel() * 4 / (time.perf_counter() - start) / 1e9


def row(name: str, batch: int, min_len: int, max_len: int, heads: dict, dtype: torch.dtype,
        rounds: int) -> str:
    query, seq_lens, tables, layers, kv_bytes = make_layers(batch, min_len, max_len, **heads,
                                                            dtype=dtype)
    key_cache, value_cache = layers[0]
    scale = query.shape[-1] ** -0.5
    out = cpu_kernels.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens,
                                             scale)
    ref = torch_ref.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens, scale)
    err = (out.float() - ref.float()).abs().max().item()
    twin, kernel = ms_per_call(
        [torch_ref.paged_decode_attention, cpu_kernels.paged_decode_attention],
        query, seq_lens, tables, layers, rounds)
    context = f"{min_len}-{max_len}" if min_len != max_len else f"{max_len}"
    shape = f"{heads['num_heads']}/{heads['num_kv_heads']} x {heads['head_dim']}"
    return (f"| {name} | {shape} | {str(dtype)[6:]} | {batch} | {context} | {twin:.3f} | "
            f"{kernel:.3f} | {twin / kernel:.1f}x | {kv_bytes / kernel / 1e6:.1f} | {err:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not cpu_kernels.load():
        raise SystemExit(f"CPU kernel not available: {cpu_kernels.load_error()}")
    build_s = time.perf_counter() - start
    print(f"# {cpu_name()}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}; kernel build/load {build_s:.1f} s; "
          f"torch.sum reads {read_gbs():.1f} GB/s")
    print("| workload | heads x dim | dtype | batch | context | twin ms | kernel ms | speedup "
          "| kernel GB/s | max abs err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    f32, bf16 = torch.float32, torch.bfloat16
    rows = [
        ("SmolLM2-135M step", 32, 150, 320, SMOLLM2, f32),
        ("sweep", 1, 300, 300, SMOLLM2, f32),
        ("sweep", 8, 1024, 1024, SMOLLM2, f32),
        ("sweep", 64, 150, 320, SMOLLM2, f32),
        ("sweep", 32, 2048, 2048, SMOLLM2, f32),
        ("sweep", 8, 512, 1024, LLAMA, f32),
        ("sweep", 32, 150, 320, SMOLLM2, bf16),
    ]
    for name, batch, lo, hi, heads, dtype in rows:
        print(row(name, batch, lo, hi, heads, dtype, args.rounds), flush=True)


if __name__ == "__main__":
    main()
