"""Fit a simulator device profile to step times of the real engine, and check it.

Runs the real engine on the calibration workload (pagedllm/sim/calibrate.py: 24 x scale
requests, prompts 16-160 tokens, outputs 4-40, up to 8 x scale at a time, a 256 x scale token
budget), times every EngineCore.step() (synchronous steps), fits the profile's constants
(bandwidth, GEMM and attention throughput, overlap, host overheads) and checks the fit on the
validation workload (10 x scale requests, prompts 40-240, outputs 8-32, 4 x scale at a time,
128 x scale budget), which tests/engine/test_simulator_calibration.py checks again for the
cpu profile. Step records go to .devdata/<profile>_steps_*.json.

CPU (the `cpu` profile: the default model, SmolLM2-135M fp32, two threads as the tests run it).
Run it on an idle machine: with other processes on the two cores, OpenMP threads that spin at
barriers made steps up to twentyfold slower in wall time here, and even CPU time (--clock cpu,
--threads 1) drifted by 60% between two runs as the load changed.

    python benchmarks/paper/calibrate_profile.py            # print the fit and the check (~30 s)
    python benchmarks/paper/calibrate_profile.py --write    # and store it in profiles.json

GPU (one H200: the OPT-13B shape with dummy fp16 weights, the model the paper replays):

    python benchmarks/paper/calibrate_profile.py --profile h200 --device cuda --scale 32 \\
        --model benchmarks/paper/models/opt-13b --load-format dummy --dtype float16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import torch

from pagedllm.sim.calibrate import (
    calibration_workload, compare, fit_profile, measure, save_steps, validation_workload,
)
from pagedllm.sim.cost_model import PROFILES_PATH, CostModel, load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu", help="the profile to fit (and to write)")
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=int, default=1, help="workload size (a GPU: 32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--write", action="store_true", help="store the fit in profiles.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    engine = {"model": args.model, "load_format": args.load_format, "dtype": args.dtype,
              "device": args.device}
    if args.device == "cuda":
        engine["gpu_memory_utilization"] = 0.9
    device = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.machine()} ({os.cpu_count()} cores, {args.threads} threads)"

    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    steps, cost = measure(calibration_workload(args.scale), args.threads, clock, args.profile,
                          **engine)
    os.makedirs(".devdata", exist_ok=True)
    save_steps(f".devdata/{args.profile}_steps_calibration.json", steps)
    source = (f"fitted by benchmarks/paper/calibrate_profile.py on {device}, {args.clock} "
              f"clock, load {load:.1f}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
              f": {os.path.basename(str(args.model or 'SmolLM2-135M'))} {cost.dtype_bytes * 8}-bit"
              f", {len(steps)} steps")
    profile, rms = fit_profile(steps, cost, load_profile(args.profile), source)
    print(f"fit on {len(steps)} steps ({time.perf_counter() - t0:.0f} s, load {load:.1f}): "
          f"rms relative error {100 * rms:.1f}%")
    print(json.dumps(dataclasses.asdict(profile), indent=2))
    dtype = {4: "float32", 2: "bfloat16"}[cost.dtype_bytes]
    fitted = CostModel(cost.model, profile, dtype, cost.tp, cost.block_size)
    print("calibration workload, predicted / measured:",
          {k: round(v, 3) for k, v in compare(steps, fitted).items()})
    print(f"the stored {args.profile} profile on it:",
          {k: round(v, 3) for k, v in compare(steps, cost).items()})
    val_steps, _ = measure(validation_workload(args.scale), args.threads, clock, args.profile,
                           **engine)
    save_steps(f".devdata/{args.profile}_steps_validation.json", val_steps)
    print(f"validation workload (load {os.getloadavg()[0]:.1f}), predicted / measured:",
          {k: round(v, 3) for k, v in compare(val_steps, fitted).items()})
    if args.write:
        with open(PROFILES_PATH) as f:
            data = json.load(f)
        entry = dataclasses.asdict(profile)
        del entry["name"]
        data["profiles"][args.profile] = entry
        with open(PROFILES_PATH, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        print(f"wrote the {args.profile} profile to {PROFILES_PATH}")


if __name__ == "__main__":
    main()
