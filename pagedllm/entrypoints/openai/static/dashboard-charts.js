// pagedllm dashboard: the live charts (loaded before dashboard.js, which calls them with each
// snapshot). Rates come from the differences of the core's counters between two snapshots,
// over the core's own clock (snapshot.time); state.history keeps the last HISTORY_S seconds.
"use strict";

const HISTORY_S = 120;

function sample(prev, snap) {
  const m = snap.metrics, p = prev ? prev.metrics : null;
  const dt = prev ? snap.time - prev.time : 0;
  const rate = key => (p && dt > 0 ? (m[key] - p[key]) / dt : null);
  const dq = p ? m.prefix_cache_queries_total - p.prefix_cache_queries_total : 0;
  const lat = snap.latency || { ttft_s: {}, tpot_s: {} };
  const ms = v => (v === undefined ? null : v * 1000);
  return {
    t: snap.time,
    prompt: rate("prompt_tokens_total"), generation: rate("generation_tokens_total"),
    kv: 100 * m.kv_cache_usage_perc,
    running: m.num_requests_running, waiting: m.num_requests_waiting,
    swapped: m.num_requests_swapped,
    hits: dq > 0 ? 100 * (m.prefix_cache_hits_total - p.prefix_cache_hits_total) / dq : null,
    preemptions: m.num_preemptions_total,
    ttft50: ms(lat.ttft_s.p50), ttft99: ms(lat.ttft_s.p99),
    tpot50: ms(lat.tpot_s.p50), tpot99: ms(lat.tpot_s.p99),
  };
}

const CHARTS = {
  throughput: [["prompt", "#3b82f6"], ["generation", "#16a34a"]],
  kv: [["kv", "#f59e0b"]],
  queues: [["running", "#16a34a"], ["waiting", "#6b7280"], ["swapped", "#9333ea"]],
  hits: [["hits", "#3b82f6"]],
  preemptions: [["preemptions", "#dc2626"]],
  latency: [["ttft50", "#3b82f6"], ["ttft99", "#1e3a8a"], ["tpot50", "#16a34a"],
            ["tpot99", "#14532d"]],
};

function drawChart(canvas, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  const hist = state.history;
  if (hist.length < 1) return;
  const t1 = hist[hist.length - 1].t, t0 = t1 - HISTORY_S;
  let ymax = 0;
  for (const [key] of series) for (const p of hist) if (p[key] > ymax) ymax = p[key];
  ymax = ymax > 0 ? ymax * 1.1 : 1;
  const X = t => ((t - t0) / HISTORY_S) * (w - 8) + 4, Y = v => h - 14 - (v / ymax) * (h - 22);
  ctx.font = "10px system-ui"; ctx.fillStyle = "#9ca3af";
  ctx.fillText(ymax.toPrecision(3), 4, 10);
  let lx = 60;
  for (const [key, color] of series) {
    ctx.strokeStyle = ctx.fillStyle = color; ctx.lineWidth = 1.5; ctx.beginPath();
    let pen = false;
    hist.forEach((p, i) => {
      if (p[key] === null || p[key] === undefined) { pen = false; return; }
      pen ? ctx.lineTo(X(p.t), Y(p[key])) : ctx.moveTo(X(p.t), Y(p[key]));
      const next = hist[i + 1];
      if (!pen && (!next || next[key] === null || next[key] === undefined)) {
        ctx.fillRect(X(p.t) - 1.5, Y(p[key]) - 1.5, 3, 3); // a lone point: a dot
      }
      pen = true;
    });
    ctx.stroke();
    const last = [...hist].reverse().find(p => p[key] !== null && p[key] !== undefined);
    ctx.fillStyle = color;
    const label = `${key} ${last ? (+last[key].toFixed(1)) : "—"}`;
    ctx.fillText(label, lx, h - 3);
    lx += ctx.measureText(label).width + 12;
  }
}

const SPLIT = [["token_states", "#16a34a", "token states"], ["reserved", "#86efac", "reserved"],
               ["internal_frag", "#f97316", "internal frag."],
               ["external_frag", "#dc2626", "external frag."], ["unused", "#e5e7eb", "unused"]];

function drawMemorySplit(canvas, split, metrics) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.font = "11px system-ui";
  if (!split) { ctx.fillStyle = "#6b7280"; ctx.fillText("no step yet", 4, 14); return; }
  const total = SPLIT.reduce((a, [k]) => a + split[k], 0) || 1;
  let x = 0, lx = 4;
  for (const [key, color, name] of SPLIT) {
    const bw = (split[key] / total) * w;
    ctx.fillStyle = color; ctx.fillRect(x, 0, bw, h / 2);
    x += bw;
    const avg = metrics["kv_memory_" + key];
    const label = `${name} ${(100 * split[key] / total).toFixed(1)}%` +
      (avg !== undefined ? ` (run avg ${(100 * avg).toFixed(1)}%)` : "");
    ctx.fillRect(lx, h / 2 + 8, 10, 10);
    ctx.fillStyle = "#374151"; ctx.fillText(label, lx + 14, h / 2 + 17);
    lx += ctx.measureText(label).width + 30;
  }
}
