"""EngineArgs: the user-facing knobs (LLM(...) keyword arguments and CLI flags) -> EngineConfig."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass

from pagedllm.config import (
    KV_ALLOCATORS, KV_CACHE_DTYPES, CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
    SchedulerConfig,
)
from pagedllm.logger import log_phase

logger = logging.getLogger("pagedllm")

_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "simulate")
# The default token budget of a step on a CPU (8,192 elsewhere); see create_engine_config.
CPU_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_SIM_PROFILE = "a100-40gb"  # the paper's GPU
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EngineArgs:
    model: str | None = None  # a path, a Hub id (ORG/NAME), or None: the default SmolLM2 GGUF
    revision: str | None = None  # of a Hub id
    download_dir: str | None = None  # the Hub cache to look in / download to (else HF_HOME's)
    trust_remote_code: bool = False  # refused: pagedllm runs no code from a checkpoint
    generation_config: str = "auto"  # sampling defaults: model's file | "vllm" (none) | folder
    dtype: str = "auto"
    seed: int = 0
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool | None = None  # None: on for kv_allocator="paged", else off
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4.0
    cpu_kv_cache_gib: float | None = None
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8 | fp8_e5m2 | int8
    preemption_mode: str | None = None
    scheduling_policy: str = "fcfs"  # fcfs | priority | sjf | fair (core/policy.py)
    length_predictor: str | None = None  # sjf: online (default) | oracle
    sjf_aging_rate: float | None = None  # sjf: predicted tokens forgiven per step waited
    fair_weights: tuple[float, float] | None = None  # fair: (prefill, decode) token weights
    load_format: str = "auto"
    device: str = "auto"
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # uni | mp | ray; None: uni at tp=1, else mp
    enforce_eager: bool = False
    async_scheduling: bool | None = None  # None: on for CUDA, off for CPU
    cpu_threads: int | None = None  # None: see EngineConfig.cpu_threads
    batch_invariant: bool | None = None  # None: see EngineConfig.batch_invariant
    kv_allocator: str = "paged"  # or the paper's baselines: orca-max | orca-pow2 | orca-oracle
    sim_profile: str | None = None  # load_format="simulate": None means DEFAULT_SIM_PROFILE
    quantization: str | None = None  # CPU weight-only: q8_0 | q4_1 (ops/quant_linear.py)

    def create_engine_config(self) -> EngineConfig:
        from pagedllm.loader import default_model_path, load_model_config
        from pagedllm.loader.hub import is_hub_id, resolve_model

        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format == "simulate" and self.kv_cache_dtype != "auto":
            raise ValueError("load_format='simulate' prices the KV cache in the model dtype: "
                             "kv_cache_dtype must be 'auto' there")
        if self.trust_remote_code:
            raise ValueError("trust_remote_code: pagedllm never runs code from a checkpoint; "
                             "its model classes are its own (see supported architectures). "
                             "Drop --trust-remote-code")
        if self.model is None:
            model = default_model_path()
            logger.info("model: %s (the default; --model picks another)", model)
        elif is_hub_id(self.model):  # the cache first, then maybe the network
            with log_phase(logger, "resolving %s on the Hugging Face Hub", self.model):
                model = resolve_model(self.model, self.revision, self.download_dir)
        else:
            model = resolve_model(self.model, self.revision, self.download_dir)
        load_format = self.load_format
        if load_format == "auto":
            load_format = "gguf" if model.endswith(".gguf") else "safetensors"
        with log_phase(logger, "reading the model config of %s",
                       os.path.basename(os.path.normpath(model))):
            hf_config = load_model_config(model, load_format)
        simulate = load_format == "simulate"
        sim_profile = None
        device = self.device
        if simulate:
            from pagedllm.sim.cost_model import load_profile

            # The engine's own tensors (sampling metadata) stay on the host; the device that
            # runs the model is the profile's.
            if device == "cuda":
                raise ValueError("load_format='simulate' runs on the host: the simulated "
                                 "device is chosen with sim_profile, not device")
            device = "cpu"
            sim_profile = self.sim_profile or DEFAULT_SIM_PROFILE
            profile_dtype = load_profile(sim_profile).dtype
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        # CPUs run fp32 (bf16 matmuls are slow there); GPUs run bf16.
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        if simulate and self.dtype == "auto":
            dtype = profile_dtype
        self._check_quantization(device, load_format)
        prefix_caching = self.enable_prefix_caching
        if prefix_caching is None:  # Orca's regions share nothing
            prefix_caching = self.kv_allocator == "paged"

        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        max_model_len = self.max_model_len or limit
        if max_model_len > limit:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the model's maximum context "
                f"length ({limit})")
        # A CPU's prompt GEMMs slow down past ~2,048 rows (2-core EPYC: 371 GFLOP/s at 2,048,
        # 314 at 4,608), and smaller chunks let running requests' decode tokens share the
        # prompt steps: the README's random set runs ~1.15x faster than with 8,192.
        budget = CPU_MAX_NUM_BATCHED_TOKENS if device == "cpu" and not simulate else 8192
        max_batched = self.max_num_batched_tokens or (
            max(budget, max_model_len) if not self.enable_chunked_prefill else budget)
        cache_kwargs = {}
        if self.cpu_kv_cache_gib is not None:
            cache_kwargs["cpu_kv_cache_gib"] = self.cpu_kv_cache_gib
        return EngineConfig(
            model=ModelConfig(model=model, load_format=load_format, dtype=dtype,
                              max_model_len=max_model_len, hf_config=hf_config, seed=self.seed,
                              generation_config=self.generation_config,
                              quantization=self.quantization),
            cache=CacheConfig(
                block_size=self.block_size, gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override, swap_space=self.swap_space,
                enable_prefix_caching=prefix_caching, kv_allocator=self.kv_allocator,
                cache_dtype=self.kv_cache_dtype, **cache_kwargs),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs, max_num_batched_tokens=max_batched,
                max_model_len=max_model_len, enable_chunked_prefill=self.enable_chunked_prefill,
                policy=self.scheduling_policy, preemption_mode=self.preemption_mode,
                length_predictor=self.length_predictor, aging_rate=self.sjf_aging_rate,
                fair_weights=tuple(self.fair_weights) if self.fair_weights else None),
            parallel=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                distributed_executor_backend=self.distributed_executor_backend),
            device=device,
            enforce_eager=self.enforce_eager,
            async_scheduling=(device == "cuda" if self.async_scheduling is None
                              else self.async_scheduling),
            cpu_threads=self.cpu_threads,
            batch_invariant=self.batch_invariant,
            sim_profile=sim_profile,
        )

    def _check_quantization(self, device: str, load_format: str) -> None:
        from pagedllm.ops.quant_linear import METHODS

        if self.quantization is None:
            return
        if self.quantization not in METHODS:
            raise ValueError(f"quantization must be one of {METHODS} (CPU weight-only), got "
                             f"{self.quantization!r}")
        if device != "cpu" or load_format == "simulate":
            raise ValueError(f"quantization={self.quantization!r} is a CPU kernel; on "
                             f"{'a simulated device' if load_format == 'simulate' else device} "
                             "it is not implemented: drop --quantization")

    # ---- CLI ---------------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineArgs()
        parser.add_argument("--model", default=None,
                            help="HF directory, .gguf file or Hub id ORG/NAME (from the Hugging "
                            "Face cache, else downloaded; default: SmolLM2-135M-Instruct)")
        parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub id")
        parser.add_argument("--download-dir", default=None,
                            help="Hugging Face cache directory (default: HF_HOME's)")
        parser.add_argument("--generation-config", default=d.generation_config,
                            help="request sampling defaults: 'auto' (the model's "
                            "generation_config.json), 'vllm' (none), or a folder holding one")
        parser.add_argument("--trust-remote-code", action="store_true",
                            help="refused with an error: pagedllm runs no checkpoint code")
        parser.add_argument("--dtype", default=d.dtype, choices=_DTYPES)
        parser.add_argument("--load-format", default=d.load_format, choices=_LOAD_FORMATS)
        parser.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
        parser.add_argument("--seed", type=int, default=d.seed)
        parser.add_argument("--block-size", type=int, default=d.block_size)
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                            help=f"tokens per step (default: {CPU_MAX_NUM_BATCHED_TOKENS} on a "
                                 "CPU, 8192 on a GPU; at least max-model-len without chunked "
                                 "prefill)")
        parser.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill",
                            action="store_false")
        parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                            default=None, help="share the KV blocks of common prompt prefixes "
                            "(default: on, except with an Orca --kv-allocator)")
        parser.add_argument("--kv-allocator", default=d.kv_allocator, choices=KV_ALLOCATORS,
                            help="paged: PagedAttention blocks (default); orca-max / orca-pow2 "
                            "/ orca-oracle: the paper's baselines, one contiguous region per "
                            "request reserved for max_model_len / prompt + the output length "
                            "rounded up to a power of two / prompt + max_tokens (no prefix "
                            "caching, n > 1, beam search or swap)")
        parser.add_argument("--sim-profile", default=None,
                            help="with --load-format simulate: the device the cost model "
                            f"prices steps on ({DEFAULT_SIM_PROFILE} by default; h100-80gb, "
                            "h200, cpu, or a JSON file; see pagedllm/sim/profiles.json)")
        parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
        parser.add_argument("--gpu-memory-utilization", type=float,
                            default=d.gpu_memory_utilization)
        parser.add_argument("--swap-space", type=float, default=d.swap_space, help="GiB")
        parser.add_argument("--cpu-kv-cache-gib", type=float, default=None)
        parser.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                            help="KV-cache element type: auto (the model dtype), fp8 "
                            "(float8_e4m3fn), fp8_e5m2, or int8 (with per-token, per-head scales)")
        parser.add_argument("--preemption-mode", default=None, choices=("recompute", "swap"))
        parser.add_argument("--scheduling-policy", default=d.scheduling_policy,
                            choices=("fcfs", "priority", "sjf", "fair"),
                            help="admission and preemption order: fcfs; priority (the "
                            "request's `priority`, smaller first, preempting larger); sjf "
                            "(shortest predicted output first, with ageing); fair (per `user`, "
                            "the least-served client first: virtual token counters)")
        parser.add_argument("--length-predictor", default=None, choices=("online", "oracle"),
                            help="sjf: online (mean output length of finished requests of "
                            "similar prompt length; the default) or oracle (max_tokens)")
        parser.add_argument("--sjf-aging-rate", type=float, default=None,
                            help="sjf: predicted output tokens forgiven per step a request "
                            "waits (default 0.5), so long requests do not starve")
        parser.add_argument("--fair-weights", type=float, nargs=2, default=None,
                            metavar=("PREFILL", "DECODE"),
                            help="fair: the cost of a prompt token and of a generated token "
                            "(default 1 2)")
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        parser.add_argument("--distributed-executor-backend", default=None,
                            choices=("uni", "mp", "ray"),
                            help="how tensor-parallel ranks run: uni (one process, tp=1), mp "
                            "(spawned processes; the default at tp>1) or ray (Ray actors)")
        parser.add_argument("--enforce-eager", action="store_true")
        parser.add_argument("--cpu-threads", type=int, default=None,
                            help="CPU threads for model steps, all TP ranks together (default: "
                            "the cores this process may use, less one for the server's "
                            "frontend when the engine core has its own process)")
        parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                            default=None, help="plan the next step while the device runs this "
                            "one (default: on for CUDA)")
        parser.add_argument("--quantization", "-q", default=None, choices=("q8_0", "q4_1"),
                            help="CPU: quantize the linear layers' weights after loading, in "
                            "GGUF's blocks of 32 (q8_0: int8; q4_1: 4 bits with a minimum); "
                            "batch-1 decode reads 3.6-5.3x fewer bytes")
        parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction,
                            default=None, help="CPU: bitwise-identical logprobs for a request "
                            "whatever batch, chunking, prefix cache or concurrency it runs in "
                            "(default: on for CPU fp32 where this machine can honour it)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
