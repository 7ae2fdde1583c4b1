"""Paged decode attention: achieved memory bandwidth of the Triton kernel vs a device copy.

Workload: Llama-3-8B-like attention layer (32 query / 8 KV heads, head_dim 128, bf16, block size
16), every sequence at the same context length, block tables shuffled (non-contiguous). Bytes
counted = K + V actually read + q + out; the peer is a large device-to-device copy measured in the
same run (bytes read + written). The PyTorch twin (ops/torch_ref.py) is timed as a baseline at a
few points, and one prefill row reports TFLOP/s next to torch SDPA on dense tensors.

    python benchmarks/kernels/paged_decode_bench.py            # table (markdown)
    python benchmarks/kernels/paged_decode_bench.py --tune     # + config sweep, for tuning
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from pagedllm.ops import torch_ref
from pagedllm.ops.triton import paged_decode, paged_prefill

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
BATCHES = (1, 8, 64, 256)
CONTEXTS = (128, 512, 2048, 8192)
TWIN_POINTS = {(8, 512), (64, 2048)}


def bench_ms(fn) -> float:
    # do_bench zeroes a 256 MB buffer before every call, so K/V never sit in L2 between runs.
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read + written."""
    src = torch.randn(1 << 29, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def make_decode_inputs(batch: int, context: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = triton.cdiv(context, BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    value_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    return query, key_cache, value_cache, block_tables, seq_lens


def decode_bytes(batch: int, context: int) -> int:
    elt = torch.tensor([], dtype=DTYPE).element_size()
    kv = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * elt
    return kv + 2 * batch * NUM_HEADS * HEAD_DIM * elt  # + q + out


def graph_us(calls: list) -> float:
    """Time per call as the engine runs decode: every call captured in one CUDA graph (no
    Python or launch overhead); do_bench flushes L2 before each replay and each call has its
    own inputs, so every K/V byte comes from device memory."""
    for call in calls:
        call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return bench_ms(graph.replay) * 1e3 / len(calls)


def decode_row(batch: int, context: int, copy_gbs: float, num_splits: int | None = None,
               **knobs) -> dict:
    scale = HEAD_DIM**-0.5
    splits = num_splits or paged_decode.choose_num_splits(
        batch, NUM_KV_HEADS, context, torch.device("cuda")
    )
    # Small problems: several input sets in one graph amortise the graph launch itself.
    copies = max(1, min(32, (256 << 20) // decode_bytes(batch, context)))
    input_sets = [make_decode_inputs(batch, context, seed) for seed in range(copies)]
    calls = [functools.partial(paged_decode._paged_decode, *inputs, scale, context, splits,
                               **knobs) for inputs in input_sets]
    inputs = input_sets[0]
    err = None
    if batch * context <= 1 << 18:  # the fp32 twin gathers the whole context: keep it small
        ref = torch_ref.paged_decode_attention(
            *[x.float() if x.is_floating_point() else x for x in inputs], scale
        )
        err = ((calls[0]().float() - ref).norm() / ref.norm()).item()
    us = graph_us(calls)
    gbs = decode_bytes(batch, context) / us / 1e3
    eager_us = twin_us = None
    if not knobs:
        eager_us = bench_ms(calls[0]) * 1e3
    if (batch, context) in TWIN_POINTS and not knobs:
        twin_us = bench_ms(lambda: torch_ref.paged_decode_attention(*inputs, scale)) * 1e3
    return {"batch": batch, "context": context, "splits": splits, "us": us, "gbs": gbs,
            "pct": 100 * gbs / copy_gbs, "err": err, "eager_us": eager_us, "twin_us": twin_us}


def prefill_rows(num_seqs: int = 16, prompt: int = 1024) -> list[str]:
    """Whole prompts through the paged prefill kernel, next to SDPA on the same data, dense."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = num_seqs * prompt
    key = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    value = torch.randn_like(key)
    query = torch.randn(tokens, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    # Identity-shuffled paging: block i of sequence s holds tokens of that sequence.
    blocks_per_seq = prompt // BLOCK_SIZE
    perm = torch.randperm(num_seqs * blocks_per_seq, device="cuda", generator=gen)
    block_tables = perm.view(num_seqs, blocks_per_seq).to(torch.int32)
    key_cache = torch.empty(num_seqs * blocks_per_seq, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                            device="cuda", dtype=DTYPE)
    value_cache = torch.empty_like(key_cache)
    pos = torch.arange(prompt, device="cuda")
    slots = (block_tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE).flatten()
    torch_ref.reshape_and_cache(key, value, key_cache, value_cache, slots)
    starts = torch.arange(0, tokens + 1, prompt, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((num_seqs,), prompt, device="cuda", dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    flops = 4 * num_seqs * NUM_HEADS * HEAD_DIM * prompt * (prompt + 1) / 2  # causal QK^T + PV

    def paged():
        return paged_prefill.paged_prefill_attention(
            query, key_cache, value_cache, block_tables, starts, seq_lens, scale
        )

    q = query.view(num_seqs, prompt, NUM_HEADS, HEAD_DIM).transpose(1, 2)
    k = key.view(num_seqs, prompt, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = value.view(num_seqs, prompt, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    err = ((paged().float() - dense().transpose(1, 2).reshape_as(query).float()).norm()
           / dense().float().norm()).item()
    rows = []
    for name, fn in (("triton paged_prefill", paged), ("torch SDPA (dense, no paging)", dense)):
        ms = bench_ms(fn)
        rows.append(f"| {name} | {num_seqs} x {prompt} | {ms * 1e3:.0f} | "
                    f"{flops / ms / 1e9:.1f} |")
    rows.append(f"\nprefill rel. error vs SDPA: {err:.1e}")
    return rows


def report_compiled(jit_fn, out_dir: str | None) -> None:
    """Registers, spills, shared memory and async-copy count of each compiled variant (reads
    Triton's per-device cache; best effort, for tuning only)."""
    try:
        for device_cache in jit_fn.device_caches.values():
            for i, kernel in enumerate(device_cache[0].values()):
                kernel._init_handles()
                ptx = kernel.asm.get("ptx", "")
                print(f"  {jit_fn.__name__}[{i}]: regs {kernel.n_regs} spills {kernel.n_spills} "
                      f"smem {kernel.metadata.shared} cp.async {ptx.count('cp.async.cg')} "
                      f"mma {ptx.count('mma.sync')} wgmma {ptx.count('wgmma.mma_async')}")
                if out_dir and i == 0:
                    with open(f"{out_dir}/{jit_fn.__name__}.ptx", "w") as f:
                        f.write(ptx)
    except Exception as e:  # internals differ across Triton versions
        print(f"  (no compile report: {type(e).__name__}: {e})")


def tune(copy_gbs: float, budget_s: float) -> None:
    """Config sweep at a few points (printed as it goes; stops when the budget is spent)."""
    t0 = time.time()
    print("\n## tuning sweep (graph-timed): batch, context, splits, BLOCK_N, warps, stages")
    sweeps = [
        (64, 2048, (1, 2), (32, 64, 128), (4,), (2, 3)),
        (8, 2048, (2, 4, 8, 16), (64,), (4,), (2,)),
        (1, 8192, (8, 16, 32, 64), (64,), (4,), (2,)),
        (32, 2048, (1, 2, 3, 4), (64,), (4,), (2,)),
        (256, 512, (1,), (64, 128), (4, 8), (2, 3)),
    ]
    for batch, context, *options in sweeps:
        for splits, block_n, warps, stages in itertools.product(*options):
            if time.time() - t0 > budget_s:
                print("(budget spent)")
                return
            try:
                r = decode_row(batch, context, copy_gbs, num_splits=splits, block_n=block_n,
                               num_warps=warps, num_stages=stages)
            except Exception as e:  # e.g. out of shared memory
                print(f"{batch} {context} {splits} {block_n} {warps} {stages}: {type(e).__name__}")
                continue
            print(f"{batch} {context} {splits} {block_n} {warps} {stages} -> "
                  f"{r['us']:.1f} us {r['pct']:.1f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tune-budget-s", type=float, default=90.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth()
    print(f"device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print(f"workload: decode, {NUM_HEADS} q / {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, "
          f"{str(DTYPE)[6:]}, block_size {BLOCK_SIZE}; bytes = K+V read + q + out")
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)\n")

    rows = []
    for batch, context in [(64, 2048), *itertools.product(BATCHES, CONTEXTS)]:
        if (batch, context) != (64, 2048) or not rows:
            rows.append(decode_row(batch, context, copy_gbs))
            torch.cuda.empty_cache()
    print("triton us: one call inside a CUDA graph (as the engine runs decode); eager us: the "
          "same call from Python, launch overhead included; twin: torch_ref, eager.\n")
    print("| batch | context | splits | triton us | GB/s | % of copy | rel. err | eager us "
          "| twin us |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        twin = f"{r['twin_us']:.0f}" if r["twin_us"] is not None else "-"
        err = f"{r['err']:.1e}" if r["err"] is not None else "-"
        print(f"| {r['batch']} | {r['context']} | {r['splits']} | {r['us']:.1f} | "
              f"{r['gbs']:.0f} | {r['pct']:.1f} | {err} | {r['eager_us']:.0f} | {twin} |")

    print("\n| prefill | seqs x prompt | us | TFLOP/s |\n|---|---|---:|---:|")
    print("\n".join(prefill_rows()))
    if args.tune:
        print("\ncompiled variants so far:")
        report_compiled(paged_decode._paged_decode_kernel, os.environ.get("OUT"))
        report_compiled(paged_prefill._paged_prefill_kernel, os.environ.get("OUT"))
        tune(copy_gbs, args.tune_budget_s)


if __name__ == "__main__":
    main()
