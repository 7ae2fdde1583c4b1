"""Where a CPU engine step's time goes: the per-step breakdown of issue 13.

Default model (SmolLM2-135M-Instruct), decode steps only (the prompts are prefilled before the
clock starts), greedy. Timers wrap the engine's own doors (monkeypatched module attributes, a
perf_counter pair each, ~1 us):

    step        LLMEngine.step: everything, as the caller sees it
    forward     ModelRunner.run_plan: the model's forward pass and the LM head
    GEMM        ops.gemm.linear (every linear layer and the LM head)
    attention   the paged decode kernel and the KV-cache write (ops.backend)
    stack       the C++ decoder stack (ops/cpu_decoder.py), which runs every layer's GEMMs,
                attention and layer ops in one call, less the GEMMs it calls back into
                Python for (fp32/bf16 weights: those stay under GEMM; quantized weights'
                matmuls run in C++ and are counted here; the LM head is under GEMM)
    other ops   forward - GEMM - attention - stack: RMSNorm, rotary, SiLU-mul, embedding, and the
                Python that calls them
    engine      step - forward: scheduling, input preparation, the sampler, detokenization,
                output processing

Beside the GEMM time: the bandwidth floor of reading every weight once per step at the copy
rate measured in the same run (batch 1 is bandwidth-bound).

    python benchmarks/profile_cpu.py                        # fp32 (the default), batch 1 and 32
    python benchmarks/profile_cpu.py --dtype bfloat16 --no-batch-invariant
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch
from cpu_floor import read_bandwidth_gbs  # benchmarks/ is on sys.path when run as a script


class Timers:
    """Time per label; a label timed inside another (the stack's GEMM callbacks) is also
    added to "<label> in <outer>"."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.on = False
        self.active: list[str] = []

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            outer = list(self.active)
            self.active.append(label)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t
                self.active.pop()
                self.total[label] += spent
                for o in outer:
                    self.total[f"{label} in {o}"] += spent

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--quantization", default=None, choices=("q8_0", "q4_1"))
    args = ap.parse_args()

    from pagedllm import LLM, SamplingParams
    from pagedllm.ops import backend, cpu_decoder, gemm
    from pagedllm.ops.quant_linear import QuantizedWeight
    from pagedllm.worker import model_runner

    timers = Timers()
    timers.wrap(gemm, "linear", "GEMM")
    timers.wrap(backend, "paged_decode_attention", "attention")
    timers.wrap(backend, "reshape_and_cache", "attention")
    timers.wrap(cpu_decoder.DecoderStack, "__call__", "stack")
    timers.wrap(model_runner.ModelRunner, "run_plan", "forward")
    llm = LLM(seed=0, dtype=args.dtype, batch_invariant=args.batch_invariant,
              quantization=args.quantization)
    engine = llm.llm_engine
    cfg = engine.config.model.hf_config
    runner = engine.engine_core.executor.runner
    # every weight but the embedding table (one row per token), plus the LM head (tied or not)
    weight_params = sum(p.numel() for n, p in runner.model.named_parameters()
                        if "embed" not in n and "lm_head" not in n) + cfg.vocab_size * cfg.hidden_size
    weight_bytes = weight_params * torch.finfo(getattr(torch, args.dtype)).bits // 8
    if args.quantization is not None:  # every matmul reads its blocks instead
        weight_bytes = sum(m.packed_weight.nbytes for m in runner.model.modules()
                           if isinstance(getattr(m, "packed_weight", None), QuantizedWeight))
    gbs = read_bandwidth_gbs()
    floor_ms = weight_bytes / (gbs * 1e9) * 1e3
    print(f"# default model, {args.dtype}, quantization {args.quantization}, batch-invariant "
          f"{runner.batch_invariant}; {weight_params / 1e6:.0f}M weights read per step "
          f"({weight_bytes / 1e6:.0f} MB); read bandwidth {gbs:.1f} GB/s -> {floor_ms:.1f} ms "
          "per step at the floor")
    print("| batch | step ms | forward | GEMM | attention | stack | other ops | engine "
          "| GEMM GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = random.Random(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for i in range(batch):
            prompt = [rng.randrange(100, cfg.vocab_size) for _ in range(args.prompt_len)]
            engine.add_request(f"b{batch}-{i}", None,
                               SamplingParams(temperature=0.0, max_tokens=args.steps + 8,
                                              ignore_eos=True), prompt_token_ids=prompt)
        for _ in range(-(-batch * args.prompt_len // 2048) + 4):  # prefill and warm-up steps
            engine.step()
        timers.total.clear()
        timers.on = True
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall = time.perf_counter() - t
        timers.on = False
        while engine.has_unfinished_requests():
            engine.step()
        per = defaultdict(float, {k: 1e3 * v / args.steps for k, v in timers.total.items()})
        step = 1e3 * wall / args.steps
        stack = per["stack"] - per["GEMM in stack"]
        other = per["forward"] - per["GEMM"] - per["attention"] - stack
        # quantized weights in the stack: the layers' matmuls run in C++, no rate of their own
        rate = "-" if stack > 0.1 * per["forward"] and args.quantization else \
            f"{weight_bytes / (per['GEMM'] * 1e6):.1f}"
        print(f"| {batch} | {step:.1f} | {per['forward']:.1f} | {per['GEMM']:.1f} "
              f"| {per['attention']:.1f} | {stack:.1f} | {other:.1f} "
              f"| {step - per['forward']:.1f} | {rate} |", flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
