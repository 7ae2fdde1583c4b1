"""The live dashboard of `pagedllm serve` (off with --no-dashboard; same API key as the API):

    GET /dashboard           one page: HTML, JS and canvas served from this package (static/),
                             no build step, no CDN
    GET /dashboard/events    Server-Sent Events: one snapshot per interval while it is open
    GET /debug/kv            the same snapshot as JSON, for scripts

    page ◀── SSE ──┐
    page ◀── SSE ──┼── DashboardHub.latest() ── `kv_snapshot` utility call ──▶ engine core
    script ── GET ─┘   (one fetch per interval,      (built between two steps,
                        shared by every reader)       engine/kv_snapshot.py)

The core builds a snapshot only when the hub asks, and the hub asks only for a reader, at
most every MIN_INTERVAL_S and never more often than keeps the build under MAX_BUILD_SHARE of
the core's time (a 100k-block pool takes ~20 ms): a closed dashboard costs the step loop
nothing. JSON carries each pool's cells (one byte per block) as base64.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import math
import time

import msgspec
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from pagedllm.engine.async_engine import AsyncLLM

MIN_INTERVAL_S = 0.25
MAX_BUILD_SHARE = 0.01
LATENCY_WINDOW_S = 60.0  # TTFT / TPOT percentiles over requests finished this recently
_STATIC = {"dashboard.html": "text/html; charset=utf-8",
           "dashboard.js": "text/javascript; charset=utf-8",
           "dashboard-charts.js": "text/javascript; charset=utf-8",
           "dashboard.css": "text/css; charset=utf-8"}


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles ({} for no values)."""
    if not values:
        return {}
    values = sorted(values)
    return {f"p{q}": values[max(0, math.ceil(q / 100 * len(values)) - 1)] for q in qs}


class DashboardHub:
    """Fetches snapshots from the core for every reader: one fetch per interval, however
    many pages are open; none while nobody reads."""

    def __init__(self, engine: AsyncLLM, model_name: str,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.engine, self.model_name = engine, model_name
        self.min_interval_s = self.interval_s = min_interval_s
        self._latest: dict | None = None
        self._at = -math.inf
        self._fetch: asyncio.Future | None = None

    async def latest(self) -> dict:
        """A snapshot at most `interval_s` old (raises if the core cannot give one)."""
        if self._latest is not None and time.monotonic() - self._at < self.interval_s:
            return self._latest
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.ensure_future(self._refresh())
        # shield: a reader that goes away does not cancel the fetch the others wait on
        return await asyncio.shield(self._fetch)

    async def _refresh(self) -> dict:
        snapshot = await self.engine.get_kv_snapshot()
        self._add_frontend_view(snapshot)
        self._latest, self._at = snapshot, time.monotonic()
        self.interval_s = max(self.min_interval_s, snapshot["build_s"] / MAX_BUILD_SHARE)
        snapshot["interval_s"] = self.interval_s
        return snapshot

    def _add_frontend_view(self, snapshot: dict) -> None:
        """What only the frontend knows: each request's time to first token (the
        OutputProcessor stamps tokens as they reach this process) and recent latencies."""
        now = time.monotonic()
        snapshot["model"] = self.model_name
        states = self.engine.output_processor.requests
        for row in snapshot["requests"]:
            state = states.get(row["request_id"])
            first = state.first_token_time if state is not None else None
            row["ttft_s"] = first - state.arrival_time if first is not None else None
            row["age_s"] = now - row["arrival_time"]
        recent = [(ttft, tpot) for t, ttft, tpot in self.engine.metrics.recent_latencies
                  if now - t <= LATENCY_WINDOW_S]
        snapshot["latency"] = {
            "window_s": LATENCY_WINDOW_S, "num_requests": len(recent),
            "ttft_s": percentiles([ttft for ttft, _ in recent]),
            "tpot_s": percentiles([tpot for _, tpot in recent if tpot is not None])}


def _read_static() -> dict[str, bytes]:
    root = importlib.resources.files("pagedllm.entrypoints.openai") / "static"
    return {name: (root / name).read_bytes() for name in _STATIC}


def register_dashboard(app: FastAPI, engine: AsyncLLM, model_name: str) -> DashboardHub:
    """Add the dashboard's routes (not in /openapi.json: the event stream never ends)."""
    hub = DashboardHub(engine, model_name)
    files = _read_static()

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(files["dashboard.html"])

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, f"no dashboard file {name!r}")
        return Response(files[name], media_type=_STATIC[name],
                        headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/events", include_in_schema=False)
    async def events() -> StreamingResponse:
        return StreamingResponse(_event_stream(hub), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.get("/debug/kv", include_in_schema=False)
    async def debug_kv() -> Response:
        return Response(msgspec.json.encode(await hub.latest()),
                        media_type="application/json")

    return hub


async def _event_stream(hub: DashboardHub):
    """One `data:` event per interval; an `engine-error` event (and the end) if the core is
    gone or the server shuts down (an open page must not hold up the drain). Starlette
    cancels this generator when the page goes away."""
    yield b"retry: 2000\n\n"
    while True:
        try:
            if hub.engine.is_draining:
                raise RuntimeError("the server is shutting down")
            snapshot = await hub.latest()
        except Exception as exc:  # noqa: BLE001 - the core is dead, stopped or failed the call
            error = msgspec.json.encode({"message": str(exc)})
            yield b"event: engine-error\ndata: " + error + b"\n\n"
            return
        yield b"data: " + msgspec.json.encode(snapshot) + b"\n\n"
        await asyncio.sleep(hub.interval_s)
