"""The simulated executor's cost model: how long one engine step takes on a device profile.

A step is summarized by its shape (StepShape: tokens, sequences, sampled rows, attention work,
K/V read, blocks moved), computed from the scheduler's plan alone, and priced as

  t = combine(weight bytes / bandwidth, linear FLOPs / linear peak)      the GEMMs
    + combine(K/V bytes / bandwidth,    attention FLOPs / attention peak) attention
    + tensor parallel: 2 all-reduces per layer (latency + ring traffic / link bandwidth)
    + swap: blocks moved / host link bandwidth (+ a fixed cost per step that swaps)
    + host: per step + per sequence + per token overheads (scheduling, inputs, sampling),
      and per sequence of a step that prefills: the attention path that serves any mix of
      chunks (on a CPU the PyTorch twin, one gather and SDPA call per sequence and layer;
      zero where one kernel launch serves the whole batch)

  combine(a, b) = max(a, b) + (1 - overlap) * min(a, b)
    overlap = 1: a roofline (memory and compute overlap fully, as on a GPU)
    overlap = 0: they add up (a CPU core waits for memory between its FMAs)

The constants live in profiles.json beside this file (GB/s and TFLOPS are what kernels
achieve, not datasheet peaks); `benchmarks/paper/calibrate_profile.py` fits a profile (the
CPU's; a GPU's the same way) to step times measured on the real engine. No torch here: the
clock must be exact and cheap.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

PROFILES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles.json")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Families whose MLP has two matrices (up, down); the rest gate it (gate, up, down).
_UNGATED_MLP = ("opt", "gpt2", "gpt_neox", "gptj", "bloom", "falcon")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    dtype: str  # what the device runs ("auto" resolves to it)
    memory_gib: float | None  # per device; None: the KV budget is cpu_kv_cache_gib (a CPU)
    activation_reserve_gib: float  # kept beside the weights and KV cache for activations
    mem_bw_gbps: float  # achieved memory bandwidth
    linear_tflops: float  # achieved dense GEMM throughput at this dtype
    attn_tflops: float  # achieved attention throughput
    overlap: float  # see combine() in the module docstring
    step_overhead_us: float
    seq_overhead_us: float
    token_overhead_us: float
    mixed_seq_overhead_us: float  # per sequence, in steps with a prefill chunk
    link_bw_gbps: float  # tensor-parallel all-reduce bus bandwidth (NVLink)
    allreduce_latency_us: float
    swap_bw_gbps: float  # host <-> device copies (PCIe)
    swap_overhead_us: float  # per step that swaps (one gather and one copy each way)
    measured: bool  # False: datasheet x assumed efficiency, a placeholder until measured
    source: str


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by name from profiles.json, or a JSON file with the same fields."""
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            data = json.load(f)
    else:
        with open(PROFILES_PATH) as f:
            profiles = json.load(f)["profiles"]
        if name_or_path not in profiles:
            raise ValueError(f"unknown simulator profile {name_or_path!r}; known: "
                             f"{', '.join(sorted(profiles))} (or a path to a JSON file)")
        data = {"name": name_or_path, **profiles[name_or_path]}
    names = {f.name for f in fields(DeviceProfile)}
    missing = names - set(data)
    if missing:
        raise ValueError(f"simulator profile {name_or_path!r} lacks {', '.join(sorted(missing))}")
    return DeviceProfile(**{k: data[k] for k in names})


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a transformer (read from its HF config)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    learned_positions: bool  # OPT/GPT-2: a position embedding table

    @classmethod
    def from_hf_config(cls, c) -> ModelShape:
        heads = c.num_attention_heads
        model_type = getattr(c, "model_type", "")
        return cls(
            num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate_size=getattr(c, "intermediate_size", None) or c.ffn_dim,
            vocab_size=c.vocab_size, gated_mlp=model_type not in _UNGATED_MLP,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            max_position_embeddings=getattr(c, "max_position_embeddings", 0) or 0,
            learned_positions=model_type in ("opt", "gpt2"))

    @property
    def layer_params(self) -> int:
        """Weights of one layer's GEMMs (q, k, v, o and the MLP); norms and biases left out."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return h * q + 2 * h * kv + q * h + mlp

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        positions = self.max_position_embeddings * self.hidden_size if self.learned_positions else 0
        return self.num_layers * self.layer_params + embed * (1 if self.tie_word_embeddings
                                                              else 2) + positions

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class StepShape:
    num_tokens: int
    num_seqs: int
    num_sampled: int
    attn_pairs: int  # (query, key) pairs: each new token attends to every earlier one
    kv_read_tokens: int  # each sequence reads its whole context's K/V once
    num_swapped_blocks: int  # in + out
    num_copied_blocks: int  # copy-on-write

    @classmethod
    def of(cls, chunks: list[tuple[int, int]], num_sampled: int, num_swapped_blocks: int = 0,
           num_copied_blocks: int = 0) -> StepShape:
        """chunks: (new tokens, context length after the step) per scheduled sequence."""
        pairs = sum(n * (c - n) + n * (n + 1) // 2 for n, c in chunks)
        return cls(sum(n for n, _ in chunks), len(chunks), num_sampled, pairs,
                   sum(c for _, c in chunks), num_swapped_blocks, num_copied_blocks)

    @classmethod
    def of_plan(cls, out, num_sampled: int) -> StepShape:
        """The shape of a SchedulerOutput, read before the step advances num_computed_tokens."""
        chunks = [(e.num_new_tokens, e.seq.num_computed_tokens + e.num_new_tokens)
                  for e in out.scheduled]
        return cls.of(chunks, num_sampled,
                      len(out.blocks_to_swap_in) + len(out.blocks_to_swap_out),
                      len(out.blocks_to_copy))


def combine(memory_s: float, compute_s: float, overlap: float) -> float:
    return max(memory_s, compute_s) + (1.0 - overlap) * min(memory_s, compute_s)


class CostModel:
    """Seconds per step for one model on one device profile (per rank at tp > 1)."""

    def __init__(self, model: ModelShape, profile: DeviceProfile, dtype: str,
                 tensor_parallel_size: int = 1, block_size: int = 16) -> None:
        self.model, self.profile, self.tp = model, profile, tensor_parallel_size
        self.dtype_bytes = DTYPE_BYTES[dtype]
        self.block_size = block_size
        m, tp = model, tensor_parallel_size
        self.layer_weight_bytes = m.num_layers * m.layer_params * self.dtype_bytes / tp
        self.lm_head_params = m.vocab_size * m.hidden_size / tp
        self.kv_token_bytes = m.kv_bytes_per_token(self.dtype_bytes) / tp
        self.attn_flops_per_pair = 4 * m.num_heads * m.head_dim * m.num_layers / tp

    def weight_bytes(self) -> float:
        """Bytes of weights one rank holds (what the KV cache cannot have)."""
        return self.model.num_params * self.dtype_bytes / self.tp

    def block_bytes(self) -> int:
        return int(self.kv_token_bytes * self.block_size)

    def terms(self, s: StepShape) -> dict[str, float]:
        """The step's raw quantities (bytes, FLOPs, counts), before the profile prices them."""
        m = self.model
        return {
            "weight_bytes": self.layer_weight_bytes + (
                self.lm_head_params * self.dtype_bytes if s.num_sampled else 0.0),
            "linear_flops": 2.0 * s.num_tokens * self.layer_weight_bytes / self.dtype_bytes
            + 2.0 * s.num_sampled * self.lm_head_params,
            "kv_bytes": (s.kv_read_tokens + s.num_tokens) * self.kv_token_bytes,
            "attn_flops": s.attn_pairs * self.attn_flops_per_pair,
            "allreduce_bytes": 2 * (self.tp - 1) / self.tp * s.num_tokens * m.hidden_size
            * self.dtype_bytes,
        }

    def step_time(self, s: StepShape) -> float:
        p = self.profile
        t = p.step_overhead_us * 1e-6
        if s.num_swapped_blocks:
            t += p.swap_overhead_us * 1e-6 + s.num_swapped_blocks * self.block_bytes() / (
                p.swap_bw_gbps * 1e9)
        t += 2 * s.num_copied_blocks * self.block_bytes() / (p.mem_bw_gbps * 1e9)
        if not s.num_tokens:
            return t
        x = self.terms(s)
        bw = p.mem_bw_gbps * 1e9
        t += combine(x["weight_bytes"] / bw, x["linear_flops"] / (p.linear_tflops * 1e12),
                     p.overlap)
        t += combine(x["kv_bytes"] / bw, x["attn_flops"] / (p.attn_tflops * 1e12), p.overlap)
        t += (p.seq_overhead_us * s.num_seqs + p.token_overhead_us * s.num_tokens) * 1e-6
        if s.num_tokens > s.num_seqs:  # some sequence prefills a chunk
            t += p.mixed_seq_overhead_us * s.num_seqs * 1e-6
        if self.tp > 1:
            t += 2 * self.model.num_layers * (p.allreduce_latency_us * 1e-6
                                              + x["allreduce_bytes"] / (p.link_bw_gbps * 1e9))
        return t
