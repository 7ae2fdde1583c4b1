"""The floor of a CPU workload on this machine: the least time any engine could take, from
rates measured here in the same run. benchmarks/cpu_peers.py prints each engine's share of it.

The FLOP roofline (cpu_peers.workload_gflop, `% of roofline`) prices every FLOP at
the best GEMM rate; but a decode step multiplies a few rows by every weight, which no GEMM does
at that rate, and reads every weight and every running request's KV cache from memory. The
floor prices the work as this machine runs it:

  prompts  every prompt token through the model's projections at the time measured for them at
           M = 512 rows (a prompt chunk's best), and its attention's FLOPs at those
           projections' FLOP rate;
  decode   step s (one token for each of the b_s requests still running) takes at least
           max(its projections and LM head at M = b_s rows, every weight read once) plus its
           KV reads (K and V of every running request's context, every layer), reads at the
           measured read bandwidth.

The GEMMs are timed on warm weights (they sit in the cache between repeats), so they are faster
than any engine's, and nothing is charged for norms, rotary, sampling, scheduling or Python: a
floor no engine reaches, to say how far each one is from this machine's limit.
"""

from __future__ import annotations

import time

import torch

M_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def read_bandwidth_gbs() -> float:
    """Read bandwidth: sum() over 256 MB, best of 5."""
    x = torch.ones(64 * 1024 * 1024)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def _best_linear_s(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    """The faster of oneDNN's packed GEMM and F.linear (MKL) for [m, k] x [n, k]^T, best of 3."""
    from pagedllm.ops import gemm

    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    packed = gemm.prepack(w)
    kernels = [lambda: torch.nn.functional.linear(x, w)]
    if packed is not None:
        kernels.append(lambda: gemm._packed_linear(x, packed, None))
    best = float("inf")
    for kernel in kernels:
        kernel()
        for _ in range(3):
            t = time.perf_counter()
            kernel()
            best = min(best, time.perf_counter() - t)
    return best


def layer_shapes(cfg) -> list[tuple[int, int]]:
    """A decoder layer's projections (K, N): qkv, o, gate_up, down."""
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    return [(h, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd),
            (cfg.num_attention_heads * hd, h), (h, 2 * cfg.intermediate_size),
            (cfg.intermediate_size, h)]


class FloorModel:
    """The model's projection times at every M of M_GRID and at 512, and the read bandwidth,
    measured once (~10 s)."""

    def __init__(self, cfg, threads: int, dtype: str = "float32") -> None:
        torch.set_num_threads(threads)
        dt = getattr(torch, dtype)
        self.cfg, self.hd = cfg, cfg.hidden_size // cfg.num_attention_heads
        size = torch.finfo(dt).bits // 8
        shapes = layer_shapes(cfg)
        self.layer_s = {m: cfg.num_hidden_layers * sum(_best_linear_s(m, k, n, dt)
                                                       for k, n in shapes)
                        for m in (*M_GRID, 512)}
        self.head_s = {m: _best_linear_s(m, cfg.hidden_size, cfg.vocab_size, dt) for m in M_GRID}
        # FLOP/s of the layers' projections at M = 512: what prompt attention is priced at
        self.prompt_rate = (2 * 512 * cfg.num_hidden_layers * sum(k * n for k, n in shapes)
                            / self.layer_s[512])
        self.weight_bytes = size * (cfg.num_hidden_layers * sum(k * n for k, n in shapes)
                                    + cfg.hidden_size * cfg.vocab_size)
        self.kv_bytes = size * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * self.hd
        self.gbs = read_bandwidth_gbs()

    @staticmethod
    def _at(table: dict[int, float], m: int) -> float:
        """Linear between the grid's neighbours; past the grid, scaled from its top."""
        grid = sorted(table)
        if m >= grid[-1]:
            return table[grid[-1]] * m / grid[-1]
        hi = next(g for g in grid if g >= m)
        lo = max(g for g in grid if g <= m)
        if hi == lo:
            return table[hi]
        return table[lo] + (table[hi] - table[lo]) * (m - lo) / (hi - lo)

    def seconds(self, work: list[tuple[list[int], int]]) -> dict[str, float]:
        """The floor's parts, in seconds, for (prompt ids, output length) requests submitted
        at once; their sum is the floor."""
        cfg = self.cfg
        read_s = 1 / (self.gbs * 1e9)  # per byte
        prompts = (sum(len(p) for p, _ in work) * self.layer_s[512] / 512
                   + self._at(self.head_s, len(work)))
        attn_flop = sum(4 * self.hd * cfg.num_attention_heads * cfg.num_hidden_layers
                        * len(p) * (len(p) + 1) / 2 for p, _ in work)
        decode = kv = 0.0
        for s in range(1, max(n for _, n in work)):  # the first token comes with the prompt
            running = [len(p) + s for p, n in work if n > s]
            compute = self._at(self.layer_s, len(running)) + self._at(self.head_s, len(running))
            decode += max(compute, self.weight_bytes * read_s)
            kv += sum(running) * self.kv_bytes * read_s
        return {"prompts": prompts, "prompt attention": attn_flop / self.prompt_rate,
                "decode": decode, "KV reads": kv}
