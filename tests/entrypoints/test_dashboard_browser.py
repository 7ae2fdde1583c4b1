"""The live dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright; no browser is downloaded) against a real `pagedllm serve` on loopback with a
48-block KV pool and a 29-block CPU swap pool.

Every assertion reads what the page drew from its snapshots (window.pagedllmDashboard.rendered,
the request rows' data attributes, the hover tooltip), never the server's JSON. Screenshots
go to test-artifacts/dashboard/ (git-ignored).

    R2   n=1, 256-token prompt, 120 tokens       arrives first
    R1   n=4, another 256-token prompt, 128 tok  its 16 prompt blocks shared by 4 (ref 4);
                                                 the latest arrival: swapped out when the pool
                                                 runs out, back in when R2 ends; then its
                                                 stream is closed and its blocks turn free
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from tests.entrypoints.test_openai_server import API_KEY, MODEL, ROOT, serving

httpx = pytest.importorskip("httpx")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow  # loads the default model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
ARTIFACTS = os.path.join(ROOT, "test-artifacts", "dashboard")
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WAIT_MS = 90_000

if not shutil.which(CHROMIUM):
    pytest.skip(f"no {CHROMIUM} (apt-get install chromium; .ci/run does)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    yield from serving("--num-gpu-blocks-override", "48", "--swap-space", "0.02",
                       "--preemption-mode", "swap", "--block-size", "16")


@pytest.fixture(scope="module")
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # The page and its event stream carry the API key like any other client.
        context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                      extra_http_headers=AUTH)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{server.url}/dashboard")
        page.wait_for_function("window.pagedllmDashboard.rendered !== null", timeout=WAIT_MS)
        yield page
        assert not errors, errors
        browser.close()


class Stream:
    """A streaming completion read on a thread until it ends or close() drops it."""

    def __init__(self, server, prompt: list[int], n: int, max_tokens: int) -> None:
        self.body = {"model": MODEL, "prompt": prompt, "n": n, "max_tokens": max_tokens,
                     "ignore_eos": True, "stream": True, "temperature": 1.0, "seed": 0}
        self.url, self.stop, self.events = f"{server.url}/v1/completions", threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, headers=AUTH, timeout=120) as resp:
            assert resp.status_code == 200, resp.read()
            for line in resp.iter_lines():
                self.events += line.startswith("data: ")
                if self.stop.is_set():
                    return  # leaving the block closes the connection: the server aborts

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def rendered(page) -> dict:
    return page.evaluate("window.pagedllmDashboard.rendered")


def wait_for(page, condition: str, what: str) -> dict:
    """Wait until `condition` (JS over `r`, the last rendered snapshot) holds."""
    try:
        page.wait_for_function(
            f"(r => !!r && ({condition}))(window.pagedllmDashboard.rendered)", timeout=WAIT_MS)
    except playwright.TimeoutError:
        shot(page, f"timeout-{what.replace(' ', '-')}.png")
        pytest.fail(f"the page never showed {what}; last drawn: {rendered(page)}")
    return rendered(page)


def shot(page, name: str) -> None:
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, name), full_page=True)


def group_of_4(r: dict) -> tuple[str, dict]:
    (found,) = [(rid, row) for rid, row in r["requests"].items() if row["num_seqs"] == 4]
    return found


def test_dashboard_needs_the_api_key(server):
    for path in ("/dashboard", "/dashboard/events", "/debug/kv",
                 "/dashboard/static/dashboard.js"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401
    assert httpx.get(server.url + "/dashboard/static/nope.js", headers=AUTH,
                     timeout=10).status_code == 404


def test_sharing_swapping_and_abort_as_the_page_draws_them(server, page):
    r = wait_for(page, "r.device.num_blocks === 48 && r.cpu.num_blocks === 29 "
                 "&& r.device.counts.free + r.device.counts.cached === 48", "an idle pool")
    first = Stream(server, list(range(2000, 2256)), n=1, max_tokens=120)  # R2
    wait_for(page, "Object.values(r.requests).some(q => q.state === 'running' "
             "&& q.ttft_s !== null)", "R2 decoding")
    group = Stream(server, list(range(1000, 1256)), n=4, max_tokens=128)  # R1

    # 1. R1's 16 prompt blocks are shared by its 4 sequences: ref count 4, named on hover
    r = wait_for(page, "r.device.max_ref === 4 && r.device.refs[4] >= 16", "ref 4")
    rid, row = group_of_4(r)
    shot(page, "1-shared-ref4.png")
    shared = [b for b in row["blocks"]
              if page.evaluate(f"window.pagedllmDashboard.blockState('device', {b})")
              == "shared"]
    assert len(shared) >= 16
    at = page.evaluate(f"window.pagedllmDashboard.cellCenter('device', {shared[0]})")
    page.mouse.move(at["x"], at["y"])
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    text = tip.inner_text()
    assert f"block {shared[0]} · shared · ref 4" in text, text
    assert sum(line.startswith(f"{rid} seq ") for line in text.splitlines()) == 4, text

    # 2. The pool runs out: R1 (the latest arrival) is swapped out to the CPU pool...
    r = wait_for(page, "r.cpu.counts.swapped > 0 && Object.values(r.requests)"
                 ".some(q => q.num_seqs === 4 && q.state === 'swapped')", "swapped out")
    shot(page, "2-swapped-out.png")
    row = r["requests"][rid]
    assert row["preemptions"] == 1 and row["cpu_blocks"] and not row["blocks"]
    assert r["cpu"]["counts"]["swapped"] == len(row["cpu_blocks"])
    swapped_row = page.locator(f'tr[data-request-id="{rid}"]')
    assert swapped_row.get_attribute("data-state") == "swapped"
    # ...and comes back when R2 ends: no swapped cell left, R1 runs with its ref-4 prefix
    r = wait_for(page, f"r.cpu.counts.swapped === 0 && r.requests['{rid}']?.state === "
                 "'running' && r.device.max_ref === 4", "swapped back in")
    shot(page, "3-swapped-in.png")
    first.thread.join(60)
    assert r["requests"][rid]["preemptions"] == 1

    # 3. Close R1's stream: its blocks turn free (or free-and-cached: revivable prefixes)
    page.locator(f'tr[data-request-id="{rid}"]').click()  # highlight its blocks first
    r = wait_for(page, f"r.requests['{rid}']?.state === 'running'", "R1 selected")
    held = r["requests"][rid]["blocks"]
    assert len(held) >= 16
    group.close()
    r = wait_for(page, f"!('{rid}' in r.requests) && r.device.counts.in_use === 0 "
                 "&& r.device.counts.shared === 0", "R1's blocks freed")
    shot(page, "4-aborted-free.png")
    states = page.evaluate(f"{held}.map(b => window.pagedllmDashboard.blockState('device', b))")
    assert set(states) <= {"free", "cached"}, states
    assert r["device"]["counts"]["free"] + r["device"]["counts"]["cached"] == 48


def test_a_150k_block_pool_is_aggregated_and_drawn_fast(server, page):
    """A GPU-sized pool (150k blocks) from the real snapshot builder, fed to a page whose
    event stream is cut: drawn with several blocks per cell, every block counted, quickly."""
    from pagedllm.config import SchedulerConfig
    from pagedllm.core.block_manager import BlockManager
    from pagedllm.core.scheduler import Scheduler
    from pagedllm.core.sequence import Sequence
    from pagedllm.engine.kv_snapshot import build_kv_snapshot

    bm = BlockManager(150_000, 16, enable_caching=True, num_cpu_blocks=20_000)
    sched = Scheduler(SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192,
                                      max_model_len=1 << 20), bm)
    for i in range(60):  # 60 sequences of 1,000 blocks; every third forked twice (ref 3)
        seq = Sequence(i, list(range(i * 16_000, (i + 1) * 16_000)))
        bm.allocate_slots(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        bm.cache_blocks(seq)
        if i % 3 == 0:
            bm.fork(seq, Sequence(1000 + i, [])), bm.fork(seq, Sequence(2000 + i, []))
        if i % 10 == 9:
            bm.free(seq)  # its blocks stay cached (revivable)
    snapshot = build_kv_snapshot(sched, {}, {
        "kv_cache_usage_perc": bm.usage(), "num_requests_running": 0,
        "num_requests_waiting": 0, "num_requests_swapped": 0, "num_preemptions_total": 0,
        "prefix_cache_queries_total": 0, "prefix_cache_hits_total": 0,
        "prompt_tokens_total": 0, "generation_tokens_total": 0})
    counts = snapshot["device"]["counts"]
    assert counts["shared"] == 20_000 and counts["cached"] == 4_000
    import msgspec

    big = page.context.new_page()
    big.route("**/dashboard/events", lambda route: route.abort())
    big.goto(f"{server.url}/dashboard")
    ms = big.evaluate("""snap => {
        const d = window.pagedllmDashboard, t0 = performance.now();
        d.ingest(snap);
        d.renderNow();
        return performance.now() - t0;
    }""", msgspec.json.decode(msgspec.json.encode(snapshot)))
    r = rendered(big)
    shot(big, "5-150k-blocks.png")
    big.close()
    drawn = r["device"]
    assert drawn["blocks_per_cell"] > 1 and drawn["num_blocks"] == 150_000
    assert {k: drawn["counts"][k] for k in counts} == counts and drawn["max_ref"] == 3
    assert ms < 2000, f"decoding and drawing 150k blocks took {ms:.0f} ms"
