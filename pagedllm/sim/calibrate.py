"""Fit a device profile's constants to step times measured on the real engine.

    with recorded_steps(engine_core) as steps:   # [(StepShape, seconds of EngineCore.step)]
        ... run a workload ...
    profile = fit_profile(steps, cost_model_of_that_engine, base_profile)

A step's measured time is the whole EngineCore.step() (scheduling, inputs, forward, sampling,
output processing), since that is what a request's latency is made of. On a CPU it is read as
the process's CPU time with one thread (`clock=time.process_time`): that is the step's time on
an idle core, and it stays put when other processes load the machine, where wall time with
OpenMP threads that spin at barriers can grow twentyfold. The fit searches a
log-spaced grid of bandwidth, linear and attention throughput and overlap; for each point the
host overheads (per step, per sequence, per token) are a weighted least-squares solve, and the
point with the smallest mean squared relative error wins. numpy only; no torch here either.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from pagedllm.sim.cost_model import CostModel, DeviceProfile, StepShape


@contextmanager
def recorded_steps(core, clock=time.perf_counter) -> Iterator[list[tuple[StepShape, float]]]:
    """Record (shape, seconds on `clock`) of every EngineCore.step() that ran a model step."""
    records: list[tuple[StepShape, float]] = []
    shapes: list[StepShape] = []
    execute, step = core.executor.execute_model, core.step

    def execute_model(out, sampling, sample_from, *args, **kwargs):
        shapes.append(StepShape.of_plan(out, len(sample_from)))
        return execute(out, sampling, sample_from, *args, **kwargs)

    def timed_step():
        n = len(shapes)
        start = clock()
        result = step()
        elapsed = clock() - start
        if len(shapes) == n + 1:
            records.append((shapes[-1], elapsed))
        return result

    core.executor.execute_model, core.step = execute_model, timed_step
    try:
        yield records
    finally:  # the instance attributes shadowed the methods; removing them restores those
        del core.executor.execute_model, core.step


def _features(steps: list[tuple[StepShape, float]], cost: CostModel) -> dict[str, np.ndarray]:
    rows = [cost.terms(s) for s, _ in steps]
    out = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out["num_seqs"] = np.array([s.num_seqs for s, _ in steps], dtype=float)
    out["num_tokens"] = np.array([s.num_tokens for s, _ in steps], dtype=float)
    out["mixed_seqs"] = np.array([s.num_seqs * (s.num_tokens > s.num_seqs) for s, _ in steps],
                                 dtype=float)
    out["seconds"] = np.array([t for _, t in steps])
    return out


def fit_profile(steps: list[tuple[StepShape, float]], cost: CostModel, base: DeviceProfile,
                source: str) -> tuple[DeviceProfile, float]:
    """(the fitted profile, its root-mean-square relative error on these steps)."""
    f = _features(steps, cost)
    t = f["seconds"]
    w = 1.0 / t  # relative error: every step counts alike, short or long
    design = np.stack([np.ones_like(t), f["num_seqs"], f["num_tokens"], f["mixed_seqs"]],
                      axis=1) * w[:, None]
    pinv = np.linalg.pinv(design)
    def search(overlap, bws, lins, attns):
        best = None
        attn = attns[:, None]
        for bw in bws:
            kv_s = f["kv_bytes"][None, :] / bw
            for lin in lins:
                w_s, f_s = f["weight_bytes"] / bw, f["linear_flops"] / lin
                lin_t = np.maximum(w_s, f_s) + (1 - overlap) * np.minimum(w_s, f_s)
                attn_s = f["attn_flops"][None, :] / attn
                attn_t = np.maximum(kv_s, attn_s) + (1 - overlap) * np.minimum(kv_s, attn_s)
                resid = (t[None, :] - lin_t[None, :] - attn_t) * w[None, :]  # [attn, steps]
                coef = np.clip(resid @ pinv.T, 0.0, None)  # [attn, 4] overheads, never negative
                score = np.sqrt(np.mean((resid - coef @ design.T) ** 2, axis=1))
                i = int(np.argmin(score))
                if best is None or score[i] < best[0]:
                    best = (score[i], overlap, bw, lin, float(attns[i]), coef[i])
        return best

    # From a CPU core to a GPU in one grid (1 GB/s - 10 TB/s, 1 GFLOP/s - 2 PFLOP/s), then two
    # finer grids around the best point.
    best = None
    for overlap in (0.0, 0.5, 1.0):
        point = search(overlap, np.geomspace(1e9, 1e13, 25), np.geomspace(1e9, 2e15, 25),
                       np.geomspace(1e9, 2e15, 25))
        for ratio in (1.5, 1.15):
            _, _, bw, lin, attn, _ = point
            grid = np.geomspace(1 / ratio ** 2, ratio ** 2, 9)
            point = min(point, search(overlap, bw * grid, lin * grid, attn * grid),
                        key=lambda p: p[0])
        if best is None or point[0] < best[0]:
            best = point
    score, overlap, bw, lin, attn = (float(x) for x in best[:5])
    o_step, o_seq, o_tok, o_mixed = (float(x) for x in best[5])
    profile = dataclasses.replace(
        base, mem_bw_gbps=round(bw / 1e9, 3), linear_tflops=round(lin / 1e12, 5),
        attn_tflops=round(attn / 1e12, 5), overlap=overlap,
        step_overhead_us=round(o_step * 1e6, 1), seq_overhead_us=round(o_seq * 1e6, 1),
        token_overhead_us=round(o_tok * 1e6, 2), mixed_seq_overhead_us=round(o_mixed * 1e6, 1),
        measured=True, source=source)
    return profile, score


# ---- the two workloads: one to fit the constants, another to check them ----------------------
@dataclasses.dataclass(frozen=True)
class Workload:
    """Prompts of random ids, greedy outputs of fixed lengths (EOS ignored), all at t = 0."""

    prompt_lens: list[int]
    output_lens: list[int]
    max_num_seqs: int
    max_num_batched_tokens: int
    seed: int

    def prompts(self, vocab_size: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed)
        return [rng.integers(100, vocab_size // 2, n).tolist() for n in self.prompt_lens]


def calibration_workload(scale: int = 1) -> Workload:
    """Decode batches of 1 to 8 and prefill chunks up to 256 tokens (small: a 2-core CPU
    prefills a few hundred tokens a second); `scale` multiplies the requests, the batch and
    the budget (a GPU: 32)."""
    rng = np.random.default_rng(1)
    return Workload(rng.integers(16, 160, 24 * scale).tolist(),
                    rng.integers(4, 40, 24 * scale).tolist(), max_num_seqs=8 * scale,
                    max_num_batched_tokens=256 * scale, seed=1)


def validation_workload(scale: int = 1) -> Workload:
    """Another mix: longer prompts in smaller chunks, smaller batches, other lengths."""
    rng = np.random.default_rng(2)
    return Workload(rng.integers(40, 240, 10 * scale).tolist(),
                    rng.integers(8, 32, 10 * scale).tolist(), max_num_seqs=4 * scale,
                    max_num_batched_tokens=128 * scale, seed=2)


def save_steps(path: str, steps: list[tuple[StepShape, float]]) -> None:
    import json

    with open(path, "w") as f:
        json.dump([[dataclasses.astuple(s), t] for s, t in steps], f)


def load_steps(path: str) -> list[tuple[StepShape, float]]:
    import json

    with open(path) as f:
        return [(StepShape(*s), t) for s, t in json.load(f)]


def measure(workload: Workload, threads: int | None = 2, clock=time.perf_counter,
            profile: str = "cpu", **engine_kwargs) -> tuple[list[tuple[StepShape, float]],
                                                         CostModel]:
    """Run a workload on the real engine core (by default the default model, SmolLM2-135M,
    fp32 on the CPU; `engine_kwargs` go to EngineArgs: model, load_format="dummy", dtype,
    device); returns its steps timed on `clock` and a cost model of that engine priced on
    `profile`. Steps are synchronous (no async scheduling), so each one's time is its own;
    token ids go straight to the core, so a config without a tokenizer will do.

    The workload runs twice and the second run is timed: the first meets every batch shape
    for the first time, and on a CPU a new number of rows costs oneDNN a JIT-compiled GEMM
    per weight (about 3 s a step here), a one-time cost the cost model leaves out."""
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.engine.core import EngineCore
    from pagedllm.sampling_params import SamplingParams
    from pagedllm.sim.cost_model import ModelShape, load_profile

    engine_kwargs = {"cpu_kv_cache_gib": 0.25, "swap_space": 0.01, **engine_kwargs}
    args = EngineArgs(seed=0, max_num_seqs=workload.max_num_seqs, enable_prefix_caching=False,
                      max_num_batched_tokens=workload.max_num_batched_tokens,
                      cpu_threads=threads, async_scheduling=False, **engine_kwargs)
    core = EngineCore(args.create_engine_config(), set())
    try:
        config = core.config
        prompts = workload.prompts(config.model.hf_config.vocab_size)
        requests = [(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                       detokenize=False))
                    for p, n in zip(prompts, workload.output_lens)]
        _run(core, requests, "warm-up")  # kernel builds, GEMM primitives, allocator caches
        with recorded_steps(core, clock) as steps:
            _run(core, requests, "timed")
        cost = CostModel(ModelShape.from_hf_config(config.model.hf_config),
                         load_profile(profile), config.model.dtype,
                         config.parallel.tensor_parallel_size, config.cache.block_size)
    finally:
        core.shutdown()
        # The core holds reference cycles (its isolation helper points back at it): collect
        # them now, so a second engine in this process finds the device memory free.
        core = None
        import gc

        gc.collect()
        _empty_device_cache()
    return steps, cost


def _run(core, requests: list, tag: str) -> None:
    """Queue every request at once and step the core until all are done."""
    from pagedllm.engine.protocol import EngineCoreRequest

    for i, (prompt, params) in enumerate(requests):
        core.add_request(EngineCoreRequest(f"{tag}-{i}", prompt, params, arrival_time=1.0 + i))
    while core.has_unfinished_requests():
        for out in core.step():
            assert out.error is None, out.error


def _empty_device_cache() -> None:
    import sys

    torch = sys.modules.get("torch")  # loaded by the engine; never imported here first
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(steps: list[tuple[StepShape, float]], cost: CostModel) -> dict[str, float]:
    """predicted / measured, summed over all steps, decode-only steps and steps that prefill."""
    predicted = [cost.step_time(s) for s, _ in steps]
    kinds = {"total": range(len(steps)),
             "decode": [i for i, (s, _) in enumerate(steps) if s.num_tokens == s.num_seqs],
             "prefill": [i for i, (s, _) in enumerate(steps) if s.num_tokens > s.num_seqs]}
    return {k: sum(predicted[i] for i in idx) / sum(steps[i][1] for i in idx)
            for k, idx in kinds.items() if idx}
