"""Engine configuration: frozen, validated dataclasses (no torch import: core/ uses these)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GIB = 2.0  # KV budget on a CPU when num_gpu_blocks_override is not given

# paged: PagedAttention's blocks on demand (core/block_manager.py); orca-*: the paper's baselines,
# one contiguous region per request reserved upfront (core/reservation.py)
KV_ALLOCATORS = ("paged", "orca-max", "orca-pow2", "orca-oracle")
# KV-cache element types (vLLM's --kv-cache-dtype): auto = the model dtype; fp8 = float8_e4m3fn.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e5m2", "int8")


@dataclass(frozen=True)
class ModelConfig:
    model: str
    load_format: str  # safetensors | gguf | dummy
    dtype: str  # float32 | bfloat16 | float16 (resolved from "auto")
    max_model_len: int
    hf_config: Any  # transformers.PretrainedConfig
    seed: int = 0
    # Where request sampling defaults come from (loader/generation_config.py): "auto" (the
    # model's generation_config.json), "vllm" (none), or a folder.
    generation_config: str = "auto"
    # CPU weight-only quantization of the linear layers after loading (ops/quant_linear.py):
    # None, "q8_0" or "q4_1".
    quantization: str | None = None

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def sliding_window(self) -> int | None:
        """W when every layer attends to the last W tokens only and a sequence can outgrow
        them (max_model_len > W): the block manager then frees blocks the window has left.
        None otherwise; a hybrid (Gemma 3: sliding and global layers) needs every block."""
        windows = set(layer_sliding_windows(self.hf_config))
        if len(windows) != 1:
            return None
        (window,) = windows
        return window if window is not None and self.max_model_len > window else None


def layer_sliding_windows(hf_config) -> list[int | None]:
    """Each layer's attention window as HF transformers applies it (None: the whole context).

    A query at position p sees keys p - W < k <= p. `layer_types` says which layers slide
    (Gemma 3, Qwen2/3 with use_sliding_window); without it every layer does (Mistral).
    """
    n = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None) or None  # 0 means none, too
    if getattr(hf_config, "use_sliding_window", True) is False or window is None:
        return [None] * n
    types = getattr(hf_config, "layer_types", None)
    if types is None:
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    swap_space: float = 4.0  # GiB of CPU memory for swapped-out blocks
    enable_prefix_caching: bool = True
    cpu_kv_cache_gib: float = DEFAULT_CPU_KV_CACHE_GIB
    kv_allocator: str = "paged"
    cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES (worker/cache_engine.py: the layout)

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.cache_dtype!r}")
        if self.kv_allocator not in KV_ALLOCATORS:
            raise ValueError(f"kv_allocator must be one of {', '.join(KV_ALLOCATORS)}, "
                             f"got {self.kv_allocator!r}")
        if self.kv_allocator != "paged" and self.enable_prefix_caching:
            raise ValueError(
                f"kv_allocator={self.kv_allocator!r} gives each request its own region, so "
                "prefix caching (shared blocks) needs kv_allocator='paged'; turn it off with "
                "enable_prefix_caching=False (--no-enable-prefix-caching)")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # fcfs | priority | sjf | fair (core/policy.py)
    # Options of one policy each (None: its default); set under another policy: an error.
    length_predictor: str | None = None  # sjf: "online" (default) | "oracle"
    aging_rate: float | None = None  # sjf: predicted tokens forgiven per step waited
    fair_weights: tuple[float, float] | None = None  # fair: (prefill, decode) token weights
    preemption_mode: str | None = None  # None: recompute for 1 live seq, swap for groups
    # Admission control (the server's --max-waiting / --max-queued-tokens): a new request
    # still waiting after the step that first saw it is refused if the waiting queue would
    # then hold more than this many requests / prompt tokens. None: no limit.
    max_waiting: int | None = None
    max_queued_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_waiting", "max_queued_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled")
        from pagedllm.core.policy import check_policy_options

        check_policy_options(self)
        if self.preemption_mode not in (None, "recompute", "swap"):
            raise ValueError(
                f"preemption_mode must be 'recompute', 'swap' or None, got {self.preemption_mode!r}")


EXECUTOR_BACKENDS = ("uni", "mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # uni: the model in the engine-core process; mp: ranks 1.. as spawned processes; ray: as
    # Ray actors. None resolves to "uni" at tp = 1 and "mp" above.
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        tp, backend = self.tensor_parallel_size, self.distributed_executor_backend
        if tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
        if backend is None:
            object.__setattr__(self, "distributed_executor_backend", "uni" if tp == 1 else "mp")
        elif backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of "
                             f"{', '.join(EXECUTOR_BACKENDS)}, got {backend!r}")
        elif backend == "uni" and tp > 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs one process with one model, but "
                f"tensor_parallel_size={tp} needs {tp} ranks; use 'mp' or 'ray'")

    def verify_with_model(self, model: ModelConfig) -> None:
        """Can the model be split tp ways? Checked before any weight or KV memory is taken."""
        tp = self.tensor_parallel_size
        if tp == 1:
            return
        hf = model.hf_config
        heads, kv_heads = hf.num_attention_heads, model.num_kv_heads
        if heads % tp:
            raise ValueError(f"num_attention_heads ({heads}) must be divisible by "
                             f"tensor_parallel_size ({tp})")
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(
                f"num_key_value_heads ({kv_heads}) and tensor_parallel_size ({tp}) must divide "
                f"one another (KV heads are split, or replicated when fewer than ranks)")
        intermediate = getattr(hf, "intermediate_size", None)
        if intermediate is not None and intermediate % tp:
            raise ValueError(f"intermediate_size ({intermediate}) must be divisible by "
                             f"tensor_parallel_size ({tp})")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: str  # cpu | cuda
    enforce_eager: bool = False
    # Plan step N+1 while step N runs on the device (engine/llm_engine.py). On by default on
    # CUDA, where it hides the host's work; a CPU computes synchronously, so there it only
    # exercises the same bookkeeping (tests turn it on).
    async_scheduling: bool = False
    # CPU threads the engine core's model steps may use, all TP ranks together. None: every
    # core this process may run on, less one when the core has its own process (the frontend
    # beside it needs one: OpenMP threads that must wait for a time slice stall every step).
    cpu_threads: int | None = None
    # One reduction order per row whatever shares the step (ops/batch_invariant.py; CPU, fp32).
    # None: on where it can be honoured (CPU, fp32 weights and cache, the C++ kernel), else off.
    batch_invariant: bool | None = None
    # load_format="simulate": the device profile the cost model prices steps on (a name in
    # pagedllm/sim/profiles.json or a JSON file); None otherwise.
    sim_profile: str | None = None

    def __post_init__(self) -> None:
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        self.parallel.verify_with_model(self.model)
        if self.cache.kv_allocator != "paged" and self.scheduler.preemption_mode == "swap":
            raise ValueError(
                f"kv_allocator={self.cache.kv_allocator!r} reserves each request's whole length "
                "upfront, so nothing is ever preempted or swapped; preemption_mode='swap' needs "
                "kv_allocator='paged'")
        window = self.model.sliding_window
        if window is not None and self.cache.enable_prefix_caching:
            # NOTE: every layer slides, so a sequence's blocks behind its window are freed as it
            # grows (core/block_manager.py); a prefix hit would need them all back.
            logger.info("every layer attends to a sliding window of %d tokens: prefix caching "
                        "is off (blocks that leave the window are freed instead)", window)
            object.__setattr__(self, "cache", replace(self.cache, enable_prefix_caching=False))
        if self.parallel.tensor_parallel_size == 1:
            return
        # NOTE: at tp > 1 every rank runs the flat batch rank 0 sends it; a CUDA graph cannot
        # capture the gloo collectives of the CPU path, and rank 0's graph buffers are laid out
        # apart from that batch, so steps stay eager. Async scheduling would feed sampled ids
        # on rank 0's device only; the executor can feed them through the host instead, which
        # is correct but waits for the step, so it would only add bookkeeping.
        if self.device == "cuda" and not self.enforce_eager:
            logger.info("tensor_parallel_size=%d: CUDA graphs are off (enforce_eager): every "
                        "rank runs the flat batch eagerly", self.parallel.tensor_parallel_size)
            object.__setattr__(self, "enforce_eager", True)
        if self.async_scheduling:
            logger.info("tensor_parallel_size=%d: async scheduling is off: sampled ids reach the "
                        "other ranks through the host, so steps cannot overlap",
                        self.parallel.tensor_parallel_size)
            object.__setattr__(self, "async_scheduling", False)


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(config: EngineConfig) -> int:
    """Intra-op threads for one TP rank's model steps on a CPU."""
    total = config.cpu_threads or available_cpus()
    return max(1, total // config.parallel.tensor_parallel_size)


def check_kv_allocator(config: EngineConfig, n: int, beam_search: bool) -> None:
    """Requests whose sequences share blocks (n > 1, beam search) need the paged allocator:
    an Orca baseline gives each sequence a region of its own. Raises ValueError."""
    allocator = config.cache.kv_allocator
    if allocator == "paged" or (n == 1 and not beam_search):
        return
    what = "beam search" if beam_search else f"n={n}"
    raise ValueError(f"{what} shares KV blocks between sequences, which kv_allocator="
                     f"{allocator!r} cannot do (one region per sequence); use "
                     "kv_allocator='paged'")
