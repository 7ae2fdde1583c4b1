// pagedllm's live KV-cache dashboard: snapshots from /dashboard/events (Server-Sent Events),
// drawn on canvases (one cell per physical block; cells are aggregated when a pool does not
// fit, so a 100k-block pool costs a few thousand rectangles, never one DOM node per block).
//
// A pool's cells are one byte per block (engine/kv_snapshot.py):
//   0 free, empty   1 free, cached (revivable prefix block)   k >= 2 in use, ref_cnt = k - 1
// In the CPU swap pool every in-use block is a swapped-out block.
//
// What was drawn is kept in window.pagedllmDashboard.rendered (tests and scripts read it).
// The charts are in dashboard-charts.js (loaded first).
"use strict";

const COLORS = { free: "#e5e7eb", cached: "#93c5fd", in_use: "#22c55e", shared: "#f59e0b",
                 swapped: "#a855f7" };
const LEGEND = [["free", "free"], ["cached", "free, cached (revivable prefix)"],
                ["in_use", "in use (ref 1)"], ["shared", "shared (ref > 1)"],
                ["swapped", "swapped out (CPU pool)"]];
const MAX_GRID_HEIGHT = { device: 340, cpu: 340 };
const CELL_SIZES = [14, 11, 8, 6, 4, 3, 2];

const state = {
  snapshot: null, prev: null, history: [], selected: null,
  layouts: {}, holders: {}, codes: {},
  rendered: null, // what the last draw showed (see render())
};
window.pagedllmDashboard = state;

function decodeCells(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function stateOf(pool, code) {
  if (code === 0) return "free";
  if (code === 1) return "cached";
  if (pool === "cpu") return "swapped";
  return code === 2 ? "in_use" : "shared";
}

function cellColor(pool, code) {
  const s = stateOf(pool, code);
  if (s !== "shared") return COLORS[s];
  // deeper orange for more sharers: ref 2 light, ref >= 8 dark
  const t = Math.min(code - 3, 6) / 6;
  return `hsl(${38 - 18 * t}, 92%, ${56 - 18 * t}%)`;
}

// ---- the block grids -----------------------------------------------------------------------
function layoutFor(canvas, pool, n) {
  const width = Math.max(100, canvas.parentElement.clientWidth);
  for (const s of CELL_SIZES) {
    const cols = Math.floor(width / s);
    if (Math.ceil(n / cols) * s <= MAX_GRID_HEIGHT[pool]) {
      return { s, cols, per: 1, cells: n, width };
    }
  }
  const s = 2, cols = Math.floor(width / s), rows = Math.floor(MAX_GRID_HEIGHT[pool] / s);
  const per = Math.ceil(n / (cols * rows)); // blocks per cell
  return { s, cols, per, cells: Math.ceil(n / per), width };
}

function drawGrid(pool, info) {
  const canvas = document.getElementById(pool + "-grid");
  const codes = state.codes[pool];
  const counts = { free: 0, cached: 0, in_use: 0, shared: 0, swapped: 0 };
  const refs = {}; // ref_cnt -> blocks drawn with it
  if (!info) {
    canvas.height = 0;
    state.layouts[pool] = null;
    return { num_blocks: 0, counts, refs, max_ref: 0 };
  }
  const n = info.num_blocks;
  const L = layoutFor(canvas, pool, n);
  const dpr = window.devicePixelRatio || 1;
  const height = Math.ceil(L.cells / L.cols) * L.s;
  canvas.style.height = height + "px";
  canvas.width = Math.round(L.width * dpr);
  canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  const gap = L.s >= 6 ? 1 : 0;
  const selected = selectedBlocks(pool);
  let maxRef = 0;
  for (let c = 0; c < L.cells; c++) {
    // A cell shows its blocks' most common state (one block each unless aggregated).
    const tally = { free: 0, cached: 0, in_use: 0, shared: 0, swapped: 0 };
    let top = 0;
    for (let b = c * L.per; b < Math.min(n, (c + 1) * L.per); b++) {
      const code = codes[b], st = stateOf(pool, code);
      tally[st]++; counts[st]++;
      if (code >= 2) {
        const ref = code - 1;
        refs[ref] = (refs[ref] || 0) + 1;
        if (ref > maxRef) maxRef = ref;
        if (code > top) top = code;
      }
    }
    let best = "free";
    for (const k in tally) if (tally[k] > tally[best]) best = k;
    const code = { free: 0, cached: 1, in_use: 2 }[best] ?? top;
    const x = (c % L.cols) * L.s, y = Math.floor(c / L.cols) * L.s;
    ctx.fillStyle = L.per === 1 ? cellColor(pool, codes[c]) : cellColor(pool, code);
    ctx.fillRect(x, y, L.s - gap, L.s - gap);
    if (selected && cellHasSelected(L, c, n, selected)) {
      ctx.strokeStyle = "#111827";
      ctx.lineWidth = Math.max(1, L.s / 5);
      ctx.strokeRect(x + 0.5, y + 0.5, L.s - gap - 1, L.s - gap - 1);
    }
  }
  state.layouts[pool] = L;
  return { num_blocks: n, counts, refs, max_ref: maxRef, blocks_per_cell: L.per,
           cell_px: L.s };
}

function cellHasSelected(L, c, n, selected) {
  for (let b = c * L.per; b < Math.min(n, (c + 1) * L.per); b++) if (selected.has(b)) return true;
  return false;
}

function selectedBlocks(pool) {
  const row = state.snapshot && state.snapshot.requests.find(r => r.request_id === state.selected);
  if (!row) return null;
  const key = pool === "cpu" ? "cpu_block_table" : "block_table";
  return new Set(row.seqs.flatMap(s => s[key]).filter(b => b >= 0));
}

// block id -> [[request id, sequence index, position in its block table]] for each pool
function buildHolders(snap) {
  const holders = { device: new Map(), cpu: new Map() };
  for (const r of snap.requests) {
    for (const s of r.seqs) {
      for (const [pool, key] of [["device", "block_table"], ["cpu", "cpu_block_table"]]) {
        s[key].forEach((b, pos) => {
          if (b < 0) return;
          if (!holders[pool].has(b)) holders[pool].set(b, []);
          holders[pool].get(b).push([r.request_id, s.index, pos]);
        });
      }
    }
  }
  return holders;
}

// Where block `blockId` of `pool` is drawn, in viewport coordinates (for tests and tooltips).
state.cellCenter = function (pool, blockId) {
  const L = state.layouts[pool];
  if (!L) return null;
  const rect = document.getElementById(pool + "-grid").getBoundingClientRect();
  const c = Math.floor(blockId / L.per);
  return { x: rect.left + (c % L.cols) * L.s + L.s / 2,
           y: rect.top + Math.floor(c / L.cols) * L.s + L.s / 2 };
};

// The state the last draw gave each block: "free" | "cached" | "in_use" | "shared" | "swapped".
state.blockState = function (pool, blockId) {
  const codes = state.codes[pool];
  return codes && blockId < codes.length ? stateOf(pool, codes[blockId]) : null;
};

function describeCell(pool, c) {
  const L = state.layouts[pool], codes = state.codes[pool];
  const lo = c * L.per, hi = Math.min(codes.length, lo + L.per);
  if (lo >= hi) return null;
  if (L.per > 1) {
    const tally = {};
    for (let b = lo; b < hi; b++) {
      const st = stateOf(pool, codes[b]);
      tally[st] = (tally[st] || 0) + 1;
    }
    return `blocks ${lo}–${hi - 1}\n` +
      Object.entries(tally).map(([k, v]) => `${v} ${k.replace("_", " ")}`).join(", ");
  }
  const code = codes[lo], st = stateOf(pool, code);
  let text = `block ${lo} · ${st.replace("_", " ")}`;
  if (code >= 2) text += ` · ref ${code - 1}`;
  const held = state.holders[pool].get(lo) || [];
  for (const [rid, index, pos] of held.slice(0, 12)) {
    text += `\n${rid} seq ${index} · table position ${pos}`;
  }
  if (held.length > 12) text += `\n… and ${held.length - 12} more`;
  return text;
}

function onHover(event) {
  const pool = event.target.dataset.pool, L = state.layouts[pool];
  const tip = document.getElementById("tooltip");
  if (!L) return;
  const rect = event.target.getBoundingClientRect();
  const col = Math.floor((event.clientX - rect.left) / L.s);
  const row = Math.floor((event.clientY - rect.top) / L.s);
  const text = col < L.cols ? describeCell(pool, row * L.cols + col) : null;
  if (!text) { tip.hidden = true; return; }
  tip.textContent = text;
  tip.dataset.pool = pool;
  tip.dataset.cell = String(row * L.cols + col);
  tip.hidden = false;
  tip.style.left = Math.min(event.clientX + 14, window.innerWidth - 300) + "px";
  tip.style.top = event.clientY + 14 + "px";
}

// ---- the requests ---------------------------------------------------------------------------
const MAX_ROWS = 100;

function fmtSeconds(s) {
  if (s === null || s === undefined) return "—";
  return s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`;
}

function drawTable(pool, table, codes) {
  const s = 9, perRow = 64, canvas = document.createElement("canvas");
  const rows = Math.max(1, Math.ceil(table.length / perRow));
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.min(table.length, perRow) * s * dpr || 1;
  canvas.height = rows * s * dpr;
  canvas.style.width = canvas.width / dpr + "px";
  canvas.style.height = rows * s + "px";
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  table.forEach((b, i) => {
    ctx.fillStyle = b < 0 ? "#fff" : cellColor(pool, codes[b]);
    ctx.fillRect((i % perRow) * s, Math.floor(i / perRow) * s, s - 1, s - 1);
  });
  canvas.title = `${pool} blocks: ${table.join(" ")}`;
  return canvas;
}

function renderRequests(snap) {
  const tbody = document.querySelector("#requests tbody");
  const rows = [];
  const shown = {};
  for (const r of snap.requests.slice(0, MAX_ROWS)) {
    const tr = document.createElement("tr");
    const blocks = new Set(), cpuBlocks = new Set();
    for (const s of r.seqs) {
      s.block_table.forEach(b => b >= 0 && blocks.add(b));
      s.cpu_block_table.forEach(b => b >= 0 && cpuBlocks.add(b));
    }
    tr.dataset.requestId = r.request_id;
    tr.dataset.state = r.state;
    tr.dataset.preemptions = String(r.num_preemptions);
    tr.dataset.blocks = [...blocks].join(" ");
    tr.dataset.cpuBlocks = [...cpuBlocks].join(" ");
    if (r.request_id === state.selected) tr.classList.add("selected");
    const seq0 = r.seqs[0];
    const tokens = r.seqs.map(s => `${s.num_computed_tokens} / ${s.num_tokens}` +
                                   ` (max ${s.max_num_tokens})`).join("\n");
    const cells = [r.request_id, null, String(r.num_preemptions), tokens,
                   r.ttft_s !== null && r.ttft_s !== undefined ? fmtSeconds(r.ttft_s)
                     : `waiting ${fmtSeconds(r.age_s)}`];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      if (i === 1) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.dataset.state = r.state;
        badge.textContent = r.state;
        td.appendChild(badge);
      } else {
        td.textContent = text;
        td.style.whiteSpace = "pre";
      }
      tr.appendChild(td);
    });
    const td = document.createElement("td");
    td.className = "tables";
    for (const s of r.seqs) {
      const swapped = s.cpu_block_table.length > 0;
      td.appendChild(swapped ? drawTable("cpu", s.cpu_block_table, state.codes.cpu)
                             : drawTable("device", s.block_table, state.codes.device));
    }
    tr.appendChild(td);
    tr.addEventListener("click", () => {
      state.selected = state.selected === r.request_id ? null : r.request_id;
      render();
    });
    rows.push(tr);
    shown[r.request_id] = { state: r.state, preemptions: r.num_preemptions,
                            blocks: [...blocks], cpu_blocks: [...cpuBlocks],
                            num_seqs: r.seqs.length, ttft_s: r.ttft_s,
                            computed: seq0 ? seq0.num_computed_tokens : 0 };
  }
  tbody.replaceChildren(...rows);
  const more = snap.requests.length - rows.length + (snap.num_requests_omitted || 0);
  document.getElementById("requests-info").textContent =
    `${snap.requests.length + (snap.num_requests_omitted || 0)} open` +
    (more > 0 ? ` (${more} not listed)` : "");
  return shown;
}

// ---- one snapshot ---------------------------------------------------------------------------
function render() {
  const snap = state.snapshot;
  if (!snap) return;
  const rendered = { step: snap.step, time: snap.time, kv_allocator: snap.kv_allocator };
  rendered.device = drawGrid("device", snap.device);
  rendered.cpu = drawGrid("cpu", snap.cpu);
  rendered.requests = renderRequests(snap);
  for (const canvas of document.querySelectorAll("[data-chart]")) {
    const name = canvas.dataset.chart;
    if (name === "memory") drawMemorySplit(canvas, snap.memory_split, snap.metrics);
    else drawChart(canvas, CHARTS[name]);
  }
  const m = snap.metrics, d = rendered.device.counts;
  document.getElementById("model").textContent = snap.model || "";
  document.getElementById("device-info").textContent = snap.device
    ? `${snap.device.num_blocks} blocks of ${snap.block_size} tokens · ${d.free} free, ` +
      `${d.cached} cached, ${d.in_use} in use, ${d.shared} shared` +
      (rendered.device.blocks_per_cell > 1 ? ` · ${rendered.device.blocks_per_cell} blocks per cell` : "")
    : `${snap.kv_allocator}: no block grid`;
  document.getElementById("cpu-info").textContent = snap.cpu
    ? `${snap.cpu.num_blocks} blocks · ${rendered.cpu.counts.swapped} swapped out` : "none";
  document.getElementById("summary").textContent =
    `step ${snap.step} · KV ${(100 * m.kv_cache_usage_perc).toFixed(1)}% · ` +
    `running ${m.num_requests_running} · waiting ${m.num_requests_waiting} · ` +
    `swapped ${m.num_requests_swapped} · preemptions ${m.num_preemptions_total}`;
  state.rendered = rendered;
  document.body.dataset.step = String(snap.step);
  const tip = document.getElementById("tooltip");
  if (!tip.hidden && state.layouts[tip.dataset.pool]) { // what the hovered cell shows now
    const text = describeCell(tip.dataset.pool, Number(tip.dataset.cell));
    text ? (tip.textContent = text) : (tip.hidden = true);
  }
}

function onSnapshot(snap) {
  state.prev = state.snapshot;
  state.snapshot = snap;
  state.codes = { device: snap.device ? decodeCells(snap.device.cells) : new Uint8Array(0),
                  cpu: snap.cpu ? decodeCells(snap.cpu.cells) : new Uint8Array(0) };
  state.holders = buildHolders(snap);
  state.history.push(sample(state.prev, snap));
  while (state.history.length && state.history[0].t < snap.time - HISTORY_S) state.history.shift();
  requestAnimationFrame(render);
}

// For scripts and tests: feed a snapshot by hand, draw now.
state.ingest = onSnapshot;
state.renderNow = render;

function connect() {
  const status = document.getElementById("status");
  const events = new EventSource("/dashboard/events");
  events.onopen = () => { status.textContent = "live"; status.dataset.state = "live"; };
  events.onmessage = e => onSnapshot(JSON.parse(e.data));
  events.addEventListener("engine-error", e => {
    status.textContent = "engine error: " + JSON.parse(e.data).message;
    status.dataset.state = "error";
  });
  events.onerror = () => {
    if (status.dataset.state !== "error") {
      status.textContent = "reconnecting…"; status.dataset.state = "connecting";
    }
  };
}

document.getElementById("legend").replaceChildren(...LEGEND.map(([key, name]) => {
  const li = document.createElement("li");
  li.innerHTML = `<i style="background:${COLORS[key]}"></i>`;
  li.append(name);
  return li;
}));
for (const canvas of document.querySelectorAll("#pools canvas")) {
  canvas.addEventListener("mousemove", onHover);
  canvas.addEventListener("mouseleave", () => { document.getElementById("tooltip").hidden = true; });
}
window.addEventListener("resize", () => requestAnimationFrame(render));
connect();
