"""benchmarks/cpu_floor.py's arithmetic on a made-up machine: the floor is what the README's CPU
peer table divides by, so its parts are checked against hand-worked sums (no timing here)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from cpu_floor import M_GRID, FloorModel  # noqa: E402


def machine(layer_s: dict[int, float], head_s: dict[int, float]) -> FloorModel:
    """A FloorModel with its measurements given, not taken: 2 layers of hidden 8, 2 heads of
    4 (1 KV head), 100 GB/s; weights 1,000 bytes, KV 16 bytes per token."""
    floor = FloorModel.__new__(FloorModel)
    floor.cfg = SimpleNamespace(num_hidden_layers=2, num_attention_heads=2, hidden_size=8)
    floor.hd = 4
    floor.layer_s, floor.head_s = layer_s, head_s
    floor.prompt_rate = 1e9  # FLOP/s
    floor.weight_bytes, floor.kv_bytes, floor.gbs = 1000, 16, 100.0
    return floor


def test_parts_are_the_hand_worked_sums():
    layer = {m: m * 1e-3 for m in (*M_GRID, 512)}  # 1 ms a row
    head = {m: m * 1e-4 for m in M_GRID}
    floor = machine(layer, head)
    # Two requests: prompts of 3 and 1 tokens, outputs of 3 and 1 tokens.
    parts = floor.seconds([([1, 2, 3], 3), ([4], 1)])
    assert parts["prompts"] == pytest.approx(4 * 1e-3 + 2 * 1e-4)  # 4 tokens, 2 last rows
    # 4 * head_dim * heads * layers * p (p + 1) / 2 FLOPs per prompt: 64 * (6 + 1)
    assert parts["prompt attention"] == pytest.approx(64 * 7 / 1e9)
    # Decode steps 1 and 2 run only the first request (its tokens 2 and 3), one row each:
    # max(1.1 ms of GEMMs, 1,000 bytes at 100 GB/s) = 1.1 ms each.
    assert parts["decode"] == pytest.approx(2 * 1.1e-3)
    # ... reading its context of 4 then 5 tokens, 16 bytes each.
    assert parts["KV reads"] == pytest.approx((4 + 5) * 16 / 100e9)


def test_a_step_is_never_faster_than_reading_the_weights_and_rows_interpolate():
    tiny = {m: 1e-9 for m in (*M_GRID, 512)}
    floor = machine(tiny, {m: 1e-9 for m in M_GRID})
    parts = floor.seconds([([1], 2)])
    assert parts["decode"] == pytest.approx(1000 / 100e9)  # the weight read, not the GEMMs
    linear = {m: float(m) for m in (*M_GRID, 512)}
    assert FloorModel._at(linear, 3) == pytest.approx(3.0)  # between 2 and 4
    assert FloorModel._at(linear, 48) == pytest.approx(48.0)  # between 32 and 64
    assert FloorModel._at({1: 1.0, 256: 256.0}, 512) == pytest.approx(512.0)  # past the grid
