"""The dashboard's frontend half without a model: DashboardHub shares one core snapshot among
its readers and asks for none while nobody reads; the routes serve the packaged page and the
snapshot as JSON. The engine here is a stand-in whose `get_kv_snapshot` builds a real
snapshot of a real scheduler (engine/kv_snapshot.py), as the core's utility call does."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import time
from types import SimpleNamespace

import pytest

from pagedllm.config import SchedulerConfig
from pagedllm.core.block_manager import BlockManager
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.sequence import Sequence, SequenceGroup
from pagedllm.engine.kv_snapshot import build_kv_snapshot

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from pagedllm.entrypoints.openai.dashboard import (
    DashboardHub,
    _event_stream,
    percentiles,
    register_dashboard,
)


class CoreStandIn:
    """What the hub uses of AsyncLLM: the utility call, the output processor's request
    timestamps and the recent latencies."""

    def __init__(self) -> None:
        bm = BlockManager(8, 4, enable_caching=True, num_cpu_blocks=4)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                                   max_model_len=32), bm)
        group = SequenceGroup("r1", [Sequence(0, list(range(6)))], None,
                              arrival_time=time.monotonic() - 2.0)
        self.requests = {"r1": group}
        self.scheduler.add(group)
        self.scheduler.update_from_output(self.scheduler.schedule())
        self.calls = 0
        self.is_draining = False
        self.output_processor = SimpleNamespace(requests={"r1": SimpleNamespace(
            arrival_time=group.arrival_time, first_token_time=group.arrival_time + 0.5)})
        now = time.monotonic()
        self.metrics = SimpleNamespace(recent_latencies=collections.deque(
            [(now - 1, 0.1, 0.01), (now - 2, 0.3, None), (now - 500, 9.0, 9.0)]))

    async def get_kv_snapshot(self) -> dict:
        self.calls += 1
        await asyncio.sleep(0.01)  # a round trip to the core
        return build_kv_snapshot(self.scheduler, self.requests, {})


def test_percentiles_are_nearest_rank():
    assert percentiles([]) == {}
    assert percentiles([3.0, 1.0, 2.0]) == {"p50": 2.0, "p90": 3.0, "p99": 3.0}
    assert percentiles([float(i) for i in range(1, 101)]) == {"p50": 50.0, "p90": 90.0,
                                                               "p99": 99.0}


def test_hub_shares_one_fetch_per_interval_and_adds_the_frontend_view():
    core = CoreStandIn()
    hub = DashboardHub(core, "m", min_interval_s=0.2)

    async def run():
        assert core.calls == 0  # nobody read yet: the core built nothing
        many = await asyncio.gather(*(hub.latest() for _ in range(5)))
        assert core.calls == 1 and all(s is many[0] for s in many)
        assert await hub.latest() is many[0] and core.calls == 1  # within the interval
        await asyncio.sleep(0.25)
        fresh = await hub.latest()
        assert core.calls == 2 and fresh is not many[0]
        return fresh

    snap = asyncio.run(run())
    (row,) = snap["requests"]
    assert row["request_id"] == "r1" and row["state"] == "running"
    assert row["ttft_s"] == pytest.approx(0.5) and row["age_s"] >= 2.0
    assert snap["latency"]["num_requests"] == 2  # the 500 s old one is out of the window
    assert snap["latency"]["ttft_s"] == {"p50": 0.1, "p90": 0.3, "p99": 0.3}
    assert snap["latency"]["tpot_s"] == {"p50": 0.01, "p90": 0.01, "p99": 0.01}
    assert snap["model"] == "m" and snap["interval_s"] == 0.2


def test_hub_spaces_reads_by_the_build_cost():
    core = CoreStandIn()
    real = core.get_kv_snapshot

    async def slow_build():
        snap = await real()
        snap["build_s"] = 0.02  # a 100k-block pool
        return snap

    core.get_kv_snapshot = slow_build
    hub = DashboardHub(core, "m")
    asyncio.run(hub.latest())
    assert hub.interval_s == pytest.approx(2.0)  # 1% of the core's time at most


def test_routes_serve_the_page_and_the_snapshot_as_json():
    core = CoreStandIn()
    app = fastapi.FastAPI()
    register_dashboard(app, core, "m")
    with TestClient(app) as http:
        page = http.get("/dashboard")
        assert page.status_code == 200 and "/dashboard/static/dashboard.js" in page.text
        js = http.get("/dashboard/static/dashboard.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert http.get("/dashboard/static/secret.py").status_code == 404
        kv = http.get("/debug/kv").json()
    bm = core.scheduler.block_manager
    cells = base64.b64decode(kv["device"]["cells"])
    assert list(cells) == [2 if b.ref_cnt else int(b.block_hash is not None)
                           for b in bm.pool.blocks]
    assert kv["device"]["counts"] == {"free": 6, "cached": 0, "in_use": 2, "shared": 0}
    assert kv["requests"][0]["seqs"][0]["block_table"] == bm.get_block_ids(0)
    assert "/dashboard" not in app.openapi()["paths"]


def test_no_dashboard_flag_and_the_api_key():
    """`--no-dashboard` leaves the routes out; with --api-key they need it like the API."""
    import argparse

    from pagedllm.entrypoints.openai.api_server import add_serve_args, build_app

    parse = add_serve_args(argparse.ArgumentParser()).parse_args
    assert parse([]).dashboard is True and parse(["--no-dashboard"]).dashboard is False
    # What build_app reads of the engine before it starts (no lifespan runs here).
    engine = SimpleNamespace(tokenizer=None, max_model_len=1024, config=SimpleNamespace(
        model=SimpleNamespace(model="m", generation_config="vllm")))
    for dashboard in (True, False):
        http = TestClient(build_app(engine, "m", "m", api_key="k", dashboard=dashboard))
        assert http.get("/dashboard").status_code == 401
        page = http.get("/dashboard", headers={"Authorization": "Bearer k"})
        assert page.status_code == (200 if dashboard else 404)


def test_event_stream_sends_snapshots_and_ends_when_the_server_drains():
    core = CoreStandIn()
    hub = DashboardHub(core, "m", min_interval_s=0.01)

    async def run():
        events = _event_stream(hub)
        assert await anext(events) == b"retry: 2000\n\n"
        first = await anext(events)
        assert first.startswith(b"data: ") and first.endswith(b"\n\n")
        snap = json.loads(first[len(b"data: "):])
        assert snap["requests"][0]["request_id"] == "r1" and snap["device"]["num_blocks"] == 8
        core.is_draining = True
        last = await anext(events)
        assert last.startswith(b"event: engine-error\n") and b"shutting down" in last
        with pytest.raises(StopAsyncIteration):
            await anext(events)

    asyncio.run(run())
