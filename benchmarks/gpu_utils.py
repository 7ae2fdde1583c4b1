"""Shared by the GPU benchmarks: measured ceilings, a workload's roofline, per-step profiling,
and the Llama-3-8B-shaped dummy model directory.

Roofline of a workload (a lower bound on its time; it assumes compute and memory traffic
overlap perfectly):

  compute  = (2 * linear params * tokens through the model + attention FLOPs) / measured bf16
             matmul rate
  memory   = (weights read by each forward step * the fewest steps the work needs
              + KV read by every decode token + KV written) / measured copy bandwidth
  fewest steps = max(longest output, total output / max_num_seqs): a sequence gains at most
             one token per step, and a step holds at most max_num_seqs of them
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import torch

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
    bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16", attention_bias=False,
    mlp_bias=False, initializer_range=0.02)


def write_llama3_8b_dir(path: str) -> None:
    """config.json of the Llama-3-8B shape, plus the default model's tokenizer (SmolLM2; no
    Llama tokenizer is available offline) so that the engine can detokenize."""
    from pagedllm.loader import default_model_path, load_tokenizer

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(LLAMA3_8B, f, indent=1)
    load_tokenizer(default_model_path()).save_pretrained(path)


# ---- ceilings ------------------------------------------------------------------------------------
def copy_bandwidth_gbs() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read + written (median of 20)."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_tflops(n: int = 8192) -> float:
    """bf16 TFLOP/s of an n x n x n matmul on random data (median of 20)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = _median_ms(lambda: a @ b, 20)
    return 2 * n**3 / ms / 1e9


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# ---- roofline ------------------------------------------------------------------------------------
def model_numbers(cfg, kv_elt: int = 2) -> dict:
    """Parameter and KV-cache sizes of a Llama-family config (bf16 weights; KV elements of
    `kv_elt` bytes: 2 for bf16, 1 for an fp8 cache)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    per_layer = h * (heads + 2 * kv_heads) * d + heads * d * h + 3 * h * cfg.intermediate_size
    body = layers * per_layer  # linear weights every token goes through
    lm_head = h * cfg.vocab_size
    elt = 2
    return {"body_params": body, "lm_head_params": lm_head, "layers": layers, "heads": heads,
            "head_dim": d, "kv_bytes_per_token": 2 * layers * kv_heads * d * kv_elt,
            # one forward step reads every weight but the embedding table (one row per token)
            "weight_bytes_per_step": (body + lm_head + (2 * layers + 1) * h) * elt}


def roofline(cfg, prompt_lens: list[int], output_lens: list[int], max_num_seqs: int,
             copy_gbs: float, tflops: float, kv_elt: int = 2) -> dict:
    m = model_numbers(cfg, kv_elt)
    tokens = sum(prompt_lens) + sum(output_lens) - len(output_lens)  # the last token is not fed
    attn_ctx = 0  # sum over fed tokens of the context each attends to
    decode_ctx = 0  # sum over decode tokens of the context read from the KV cache
    for p, o in zip(prompt_lens, output_lens):
        attn_ctx += p * (p + 1) // 2
        dec = (p + o - 1) * (p + o) // 2 - p * (p + 1) // 2  # contexts p+1 .. p+o-1
        attn_ctx += dec
        decode_ctx += dec
    flops = (2 * m["body_params"] * tokens + 2 * m["lm_head_params"] * sum(output_lens)
             + 4 * m["layers"] * m["heads"] * m["head_dim"] * attn_ctx)
    steps = max(max(output_lens), -(-sum(output_lens) // max_num_seqs))
    kv = m["kv_bytes_per_token"]
    bytes_ = steps * m["weight_bytes_per_step"] + decode_ctx * kv + (tokens + len(output_lens)) * kv
    compute_s = flops / (tflops * 1e12)
    memory_s = bytes_ / (copy_gbs * 1e9)
    return {"flops": flops, "bytes": bytes_, "min_steps": steps, "compute_s": compute_s,
            "memory_s": memory_s, "floor_s": max(compute_s, memory_s),
            "bound": "compute" if compute_s >= memory_s else "memory"}


def format_roofline(r: dict, seconds: float, output_tokens: int) -> str:
    return (f"roofline: {r['floor_s']:.2f} s ({r['bound']}-bound; compute {r['compute_s']:.2f} s "
            f"= {r['flops'] / 1e15:.2f} PFLOP, memory {r['memory_s']:.2f} s = "
            f"{r['bytes'] / 1e12:.2f} TB over >= {r['min_steps']} steps) -> at most "
            f"{output_tokens / r['floor_s']:.0f} output tok/s; measured {seconds:.2f} s = "
            f"{100 * r['floor_s'] / seconds:.0f}% of the roofline")


# ---- per-step profile ----------------------------------------------------------------------------
class StepProfile:
    """Host time per engine step by phase, and GPU busy/idle time from CUDA events.

    Wraps the engine's methods on the instance (nothing in the engine changes):
      schedule   Scheduler.schedule
      prepare    ModelRunner.plan_step (the flat batch on the host) / CudaGraphRunner.prepare
      execute    synchronous steps: ModelRunner.execute (prepare + forward launch + the
                 sampler's wait for the GPU); async steps: ModelRunner.launch (prepare +
                 launches, no wait) + ModelRunner.collect (the wait for the previous step)
      step       EngineCore.step; step - schedule - execute = token bookkeeping (stop ids,
                 max_tokens, deltas for the frontend) and sampling metadata
    With async scheduling the host's work overlaps the GPU, so host phases no longer add up
    to GPU idle time: the idle share (CUDA events) is what tells whether the GPU waited.
    """

    def __init__(self, engine) -> None:
        from pagedllm.worker.model_runner import StepTimer

        self.engine = engine
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.shapes: list[tuple[int, int]] = []  # (sequences, tokens) of each executed step
        runner = engine.executor.runner
        self._wrap(engine, "step", "step")
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(runner, "execute", "execute", self._record_shape)
        self._wrap(runner, "launch", "launch", self._record_shape)
        self._wrap(runner, "collect", "collect")
        self._wrap(runner, "plan_step", "prepare")
        if runner.graph_runner is not None:
            self._wrap(runner.graph_runner, "prepare", "prepare")
        self.timer = StepTimer() if runner.device.type == "cuda" else None
        runner.step_timer = self.timer

    def _record_shape(self, out, *args, **kwargs) -> None:
        if out.scheduled:  # the runner's StepTimer records exactly these steps
            self.shapes.append((len(out.scheduled), out.num_batched_tokens))

    def _wrap(self, obj, name: str, key: str, before=None) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            if before is not None:
                before(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t0
                self.calls[key] += 1

        setattr(obj, name, timed)

    def close(self) -> None:
        runner = self.engine.executor.runner
        for obj in (self.engine, self.engine.scheduler, runner,
                    runner.graph_runner):
            if obj is not None:
                for name in ("step", "schedule", "execute", "launch", "collect",
                             "plan_step", "prepare"):
                    obj.__dict__.pop(name, None)
        runner.step_timer = None

    def summary(self) -> dict:
        steps = max(1, self.calls["step"])
        ms = {k: 1e3 * v / steps for k, v in self.seconds.items()}
        out = {"steps": self.calls["step"], "step_ms": ms.get("step", 0.0),
               "schedule_ms": ms.get("schedule", 0.0), "prepare_ms": ms.get("prepare", 0.0),
               "execute_ms": ms.get("execute", 0.0) + ms.get("launch", 0.0)
               + ms.get("collect", 0.0), "launch_ms": ms.get("launch", 0.0),
               "collect_ms": ms.get("collect", 0.0)}
        out["output_processing_ms"] = out["step_ms"] - out["schedule_ms"] - out["execute_ms"]
        if self.timer is not None:
            out.update({f"gpu_{k}": v for k, v in self.timer.summary().items()})
            out["by_kind"] = self._by_kind()
        return out

    def _by_kind(self) -> list[tuple[str, int, float, float]]:
        """(kind, steps, GPU ms per step, GPU seconds in all): steps with prefill tokens, and
        decode-only steps by batch size."""
        groups: dict[str, list[float]] = defaultdict(list)
        for (seqs, tokens), (b, e) in zip(self.shapes, self.timer.events):
            if tokens > seqs:
                kind = "prefill/mixed"
            else:
                top = next((t for t in (1, 8, 32, 64, 128, 256) if seqs <= t), None)
                kind = f"decode <= {top}" if top else "decode > 256"
            groups[kind].append(b.elapsed_time(e))
        return [(k, len(v), sum(v) / len(v), sum(v) / 1e3) for k, v in sorted(groups.items())]


def format_profile(s: dict) -> str:
    text = (f"per step ({s['steps']} steps): {s['step_ms']:.2f} ms host = schedule "
            f"{s['schedule_ms']:.2f} + execute {s['execute_ms']:.2f} (input prep "
            f"{s['prepare_ms']:.2f}; async: launch {s['launch_ms']:.2f}, wait for the previous "
            f"step {s['collect_ms']:.2f}) + output processing {s['output_processing_ms']:.2f} ms")
    if "gpu_idle_share" in s:
        text += (f"; GPU busy {s['gpu_gpu_busy_ms_per_step']:.2f} ms, idle "
                 f"{s['gpu_idle_ms_per_step']:.2f} ms -> GPU idle share {100 * s['gpu_idle_share']:.1f}%")
        text += "\n  GPU time by step kind: " + "; ".join(
            f"{k}: {n} steps x {ms:.2f} ms = {sec:.2f} s" for k, n, ms, sec in s["by_kind"])
    return text


def device_line() -> str:
    import triton

    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"triton {triton.__version__}, CUDA {torch.version.cuda}")


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else ".devdata/llama3-8b"
    write_llama3_8b_dir(target)
    print(f"wrote {target}/config.json (Llama-3-8B shape) and the SmolLM2 tokenizer")
