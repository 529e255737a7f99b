#include "runtime/dashboard_page.hpp"

namespace petrel {

// The whole page lives in this one raw string so that the gateway needs no files at run time and the
// browser needs no network: inline CSS, inline JS, hand-drawn SVG charts. It polls /dashboard/data
// once a second and derives everything else client-side (see docs/operations.md, "Reading the dashboard"):
//  - rates (tok/s, transfers/s, requests/s) from counter deltas over a trailing 5 s window,
//  - TTFT / ITL percentiles from histogram bucket deltas over the same window (linear within a bucket),
//  - restarts from node/actor epoch, restart count and pid changes between polls (timeline entries),
//  - inferred faults from state changes (unresponsive, failed), ranks_up drops and failed requests.
// Every panel is a <section id="panel-..."> with data-state = loading | waiting | live | stale | error |
// unavailable, plus data-* figures that tests/integration/dashboard_browser/check_dashboard.mjs asserts on.
// The expert-load panel renders {"expert_load": {"before": [[...]], "after": [[...]],
// "balancedness_before": x, "balancedness_after": y}} as two heatmaps (rows layers, columns experts)
// when the data document carries that key, and says so when it does not.
const std::string& dashboard_html() {
  static const std::string page = R"HTML(<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Petrel dashboard</title>
<style>
:root { --bg:#0f141a; --panel:#171e26; --line:#2a3440; --fg:#d8e0e8; --dim:#8796a5;
        --ok:#3fb950; --warn:#d29922; --bad:#f85149; --grey:#6e7681; --info:#58a6ff; --odd:#bc8cff; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--fg); font:13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; }
header { display:flex; align-items:center; gap:16px; padding:8px 16px; border-bottom:1px solid var(--line); background:#121820; }
header h1 { font-size:17px; margin:0; letter-spacing:.5px; }
header .meta { color:var(--dim); }
#conn { padding:2px 8px; border-radius:10px; font-weight:600; }
#conn[data-state=live] { background:#12351e; color:var(--ok); }
#conn[data-state=stale], #conn[data-state=error] { background:#3d1414; color:var(--bad); }
#conn[data-state=loading] { background:#2f2a12; color:var(--warn); }
main { display:grid; grid-template-columns:repeat(2, minmax(0,1fr)); gap:12px; padding:12px 16px; }
section.panel { background:var(--panel); border:1px solid var(--line); border-radius:6px; padding:10px 12px; min-width:0; }
section.panel.wide { grid-column:1 / -1; }
section.panel h2 { font-size:13px; margin:0 0 6px; text-transform:uppercase; letter-spacing:.6px; color:var(--dim);
                   display:flex; justify-content:space-between; }
section.panel h2 .pstate { font-weight:400; text-transform:none; letter-spacing:0; }
section.panel[data-state=stale] { opacity:.6; }
.note { color:var(--dim); font-style:italic; padding:8px 0; }
.row { display:flex; gap:14px; flex-wrap:wrap; }
.kv { color:var(--dim); } .kv b { color:var(--fg); font-weight:600; }
svg.chart { width:100%; height:auto; display:block; }
svg text { fill:var(--dim); font-size:10px; font-family:inherit; }
.legend { display:flex; gap:12px; flex-wrap:wrap; font-size:12px; margin:2px 0 6px; }
.legend i { display:inline-block; width:10px; height:3px; margin-right:4px; vertical-align:middle; }
.groups { display:flex; gap:12px; flex-wrap:wrap; }
.group { border:1px solid var(--line); border-radius:6px; padding:8px; min-width:260px; flex:1; }
.group > .gh { display:flex; justify-content:space-between; margin-bottom:6px; }
.group > .gh b { font-size:14px; }
.node { border-left:4px solid var(--grey); background:#1d252f; border-radius:4px; padding:6px 8px; margin:6px 0; }
.node .nh { display:flex; justify-content:space-between; gap:8px; flex-wrap:wrap; }
.node.flash { box-shadow:0 0 0 2px var(--warn); }
.actor { display:inline-block; margin:4px 4px 0 0; padding:2px 6px; border-radius:4px; background:#222c37;
         border-left:4px solid var(--grey); font-size:12px; }
.actor.flash { box-shadow:0 0 0 2px var(--warn); }
.s-ok { border-left-color:var(--ok) !important; } .s-warn { border-left-color:var(--warn) !important; }
.s-bad { border-left-color:var(--bad) !important; } .s-grey { border-left-color:var(--grey) !important; }
.s-odd { border-left-color:var(--odd) !important; }
.badge { padding:0 6px; border-radius:8px; font-size:11px; font-weight:600; }
.b-ok { background:#12351e; color:var(--ok); } .b-warn { background:#3a2d0c; color:var(--warn); }
.b-bad { background:#3d1414; color:var(--bad); } .b-grey { background:#2a2f35; color:#adb5bd; }
.b-odd { background:#2c1f45; color:var(--odd); }
#timeline-list { max-height:170px; overflow:auto; margin:6px 0 0; padding:0; list-style:none; font-size:12px; }
#timeline-list li { padding:2px 0; border-bottom:1px solid #202a34; }
#timeline-list li time { color:var(--dim); margin-right:8px; font-variant-numeric:tabular-nums; }
.bar { height:12px; background:#222c37; border-radius:3px; overflow:hidden; display:flex; }
.bar > span { display:block; height:100%; }
table.small { border-collapse:collapse; font-size:12px; }
table.small td, table.small th { padding:1px 8px 1px 0; text-align:left; }
table.small th { color:var(--dim); font-weight:400; }
.heat { display:flex; gap:16px; flex-wrap:wrap; }
.heat > div { flex:1; min-width:260px; }
</style></head>
<body data-polls="0">
<header>
  <h1>Petrel</h1>
  <span class="meta">cluster <b id="cluster-name">?</b> · state <b id="cluster-state">?</b></span>
  <span id="conn" data-state="loading">connecting</span>
  <span class="meta" id="updated"></span>
</header>
<main>
  <section class="panel wide" id="panel-topology" data-state="loading">
    <h2>Topology <span class="pstate"></span></h2>
    <div id="topology-body" class="note">waiting for /dashboard/data</div>
  </section>
  <section class="panel wide" id="panel-timeline" data-state="loading" data-events="0">
    <h2>Timeline: restarts, faults, failures <span class="pstate"></span></h2>
    <svg class="chart" id="timeline-svg" viewBox="0 0 1200 56"></svg>
    <ul id="timeline-list"></ul>
  </section>
  <section class="panel" id="panel-throughput" data-state="loading">
    <h2>Throughput (tokens/s) <span class="pstate"></span></h2>
    <div class="legend" id="throughput-legend"></div>
    <svg class="chart" id="throughput-chart" viewBox="0 0 560 170"></svg>
    <div class="row kv" id="throughput-totals"></div>
  </section>
  <section class="panel" id="panel-latency" data-state="loading">
    <h2>Latency percentiles <span class="pstate"></span></h2>
    <div class="legend" id="ttft-legend"></div>
    <svg class="chart" id="ttft-chart" viewBox="0 0 560 130"></svg>
    <div class="legend" id="itl-legend"></div>
    <svg class="chart" id="itl-chart" viewBox="0 0 560 130"></svg>
    <div class="row kv" id="latency-totals"></div>
  </section>
  <section class="panel" id="panel-queues" data-state="loading">
    <h2>Queue depth and running requests <span class="pstate"></span></h2>
    <div class="legend" id="queues-legend"></div>
    <svg class="chart" id="queues-chart" viewBox="0 0 560 170"></svg>
    <div id="queues-table"></div>
  </section>
  <section class="panel" id="panel-kvpool" data-state="loading">
    <h2>KV pool use per group <span class="pstate"></span></h2>
    <div class="legend" id="kvpool-legend"></div>
    <svg class="chart" id="kvpool-chart" viewBox="0 0 560 170"></svg>
    <div id="kvpool-bars"></div>
  </section>
  <section class="panel" id="panel-kv-transfers" data-state="loading">
    <h2>KV transfers <span class="pstate"></span></h2>
    <div class="legend" id="kvrate-legend"></div>
    <svg class="chart" id="kvrate-chart" viewBox="0 0 560 130"></svg>
    <div class="legend" id="kvphase-legend"></div>
    <svg class="chart" id="kvphase-chart" viewBox="0 0 560 130"></svg>
    <div id="kvphase-split"></div>
  </section>
  <section class="panel" id="panel-requests" data-state="loading">
    <h2>Requests by outcome <span class="pstate"></span></h2>
    <div class="legend" id="requests-legend"></div>
    <svg class="chart" id="requests-chart" viewBox="0 0 560 130"></svg>
    <div id="requests-table"></div>
  </section>
  <section class="panel wide" id="panel-expert-load" data-state="loading">
    <h2>Expert load (layers × experts) <span class="pstate"></span></h2>
    <div id="expert-load-body" class="note">waiting for /dashboard/data</div>
  </section>
</main>
<script>
"use strict";
// Petrel dashboard. Polls /dashboard/data once a second and derives every series client-side:
// rates from counter deltas, percentiles from histogram bucket deltas, restarts from epoch changes.
const POLL_MS = 1000;        // poll period
const SPAN_S = 180;          // the charts show the last SPAN_S seconds
const KEEP_S = 600;          // history kept in memory
const WINDOW_S = 5;          // rates and percentiles are computed over this trailing window
const COLORS = ['#58a6ff', '#3fb950', '#d29922', '#f85149', '#bc8cff', '#39c5cf', '#ff9bce', '#a5d6ff'];
const PHASES = ['bootstrap', 'allocation', 'transfer'];
const key = (new URLSearchParams(location.hash.slice(1))).get('key');  // #key=... when the gateway needs an API key

const snaps = [];            // [{t, doc}] oldest first
const series = {};           // name -> [[t, value|null]]
const events = [];           // [{t, kind, target, text}]
let polls = 0, lastOk = 0, prevDoc = null, failStreak = 0;
const flashUntil = {};       // element key -> time until which it is highlighted

// ---- helpers -----------------------------------------------------------------
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
const now = () => Date.now() / 1000;
function push(name, t, v) {
  const s = series[name] || (series[name] = []);
  s.push([t, v]);
  while (s.length && s[0][0] < t - KEEP_S) s.shift();
}
function labelsMatch(labels, want) {
  for (const k in want) if ((labels || {})[k] !== want[k]) return false;
  return true;
}
function samples(doc, name, want = {}) {
  const m = doc && doc.metrics && doc.metrics[name];
  return m ? m.samples.filter((s) => labelsMatch(s.labels, want)) : [];
}
function counter(doc, name, want) { return samples(doc, name, want).reduce((a, s) => a + (s.value || 0), 0); }
function labelValues(doc, name, label) {
  return [...new Set(samples(doc, name).map((s) => (s.labels || {})[label]).filter((v) => v !== undefined))].sort();
}
// Histogram samples merged over label sets: {bounds (finite), cum (with +Inf last), sum, count}.
function hist(doc, name, want) {
  const ss = samples(doc, name, want).filter((s) => s.buckets);
  if (!ss.length) return null;
  const bounds = ss[0].buckets.filter((b) => b[0] !== '+Inf').map((b) => +b[0]);
  const cum = ss[0].buckets.map(() => 0);
  let sum = 0, count = 0;
  for (const s of ss) {
    s.buckets.forEach((b, i) => { if (i < cum.length) cum[i] += b[1]; });
    sum += s.sum || 0; count += s.count || 0;
  }
  return {bounds, cum, sum, count};
}
function histDelta(a, b) {  // b - a; a counter reset (a newer head) falls back to b
  if (!b) return null;
  if (!a || a.cum.length !== b.cum.length || b.count < a.count) return b;
  return {bounds: b.bounds, cum: b.cum.map((c, i) => c - a.cum[i]), sum: b.sum - a.sum, count: b.count - a.count};
}
function quantile(h, q) {
  if (!h || h.count <= 0) return null;
  const total = h.cum[h.cum.length - 1], rank = q * total;
  for (let i = 0; i < h.cum.length; i++) {
    if (h.cum[i] >= rank && h.cum[i] > 0) {
      if (i >= h.bounds.length) return h.bounds.length ? h.bounds[h.bounds.length - 1] : null;  // in +Inf: clamp
      const lo = i === 0 ? 0 : h.bounds[i - 1], hi = h.bounds[i];
      const below = i === 0 ? 0 : h.cum[i - 1], inb = h.cum[i] - below;
      return inb > 0 ? lo + (hi - lo) * (rank - below) / inb : hi;
    }
  }
  return null;
}
function windowBase(t) {  // the snapshot closest to WINDOW_S before t (or the oldest)
  let base = snaps[0];
  for (const s of snaps) { if (s.t <= t - WINDOW_S + 0.05) base = s; else break; }
  return base;
}
function rate(cur, base, fn) {
  const dt = cur.t - base.t;
  if (dt <= 0) return null;
  const a = fn(base.doc), b = fn(cur.doc);
  return Math.max(0, (b >= a ? b - a : b)) / dt;   // a counter that went down was reset
}
function fmt(v, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  if (unit === 's') {
    if (v < 1e-3) return (v * 1e6).toFixed(0) + ' µs';
    if (v < 1) return (v * 1e3).toFixed(v < 0.01 ? 2 : v < 0.1 ? 1 : 0) + ' ms';
    return v.toFixed(2) + ' s';
  }
  if (unit === '%') return (v * 100).toFixed(1) + '%';
  if (unit === 'B') {
    const u = ['B', 'KB', 'MB', 'GB', 'TB']; let i = 0;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return v.toFixed(i ? 1 : 0) + ' ' + u[i];
  }
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(2) + 'M';
  if (a >= 1e4) return (v / 1e3).toFixed(1) + 'k';
  if (a >= 100 || Number.isInteger(v)) return v.toFixed(0);
  return v.toFixed(a >= 10 ? 1 : 2);
}
function niceCeil(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 2.5 ? 2.5 : m <= 5 ? 5 : 10) * p;
}
function stateClass(state) {
  const s = String(state || '');
  if (s === 'running') return 'ok';
  if (s === 'starting' || s === 'restarting' || s === 'stopping') return 'warn';
  if (s === 'failed' || s === 'escalated' || s.startsWith('unresponsive') || s === 'down') return 'bad';
  if (s === 'stopped') return 'grey';
  return 'odd';
}
function setPanel(id, state, attrs = {}) {
  const el = $(id);
  el.dataset.state = state;
  el.dataset.updated = String(polls);
  for (const k in attrs) el.setAttribute('data-' + k, String(attrs[k]));
  const ps = el.querySelector('.pstate');
  if (ps) ps.textContent = state === 'live' ? '' : state;
}

// The time axis grows with the page's age (60 s at first) up to SPAN_S, so a fresh page is not empty.
function span() {
  const age = snaps.length ? now() - snaps[0].t : 0;
  return Math.min(SPAN_S, Math.max(60, Math.ceil(age / 30) * 30));
}
const tickStep = (sp) => sp <= 60 ? 10 : sp <= 120 ? 20 : 30;

// ---- SVG line chart, drawn by hand ---------------------------------------------
// lines: [{name, color, pts: [[t, v|null]], dash}]
function lineChart(svg, legend, lines, unit, opts = {}) {
  const vb = svg.viewBox.baseVal, W = vb.width, H = vb.height;
  const L = 54, R = 8, T = 6, B = 18, w = W - L - R, h = H - T - B;
  const SP = span(), tNow = now(), t0 = tNow - SP;
  let vmax = opts.ymax || 0;
  for (const ln of lines) for (const [t, v] of ln.pts) if (t >= t0 && v !== null && v > vmax) vmax = v;
  vmax = opts.fixedMax || niceCeil(vmax * 1.05);
  const x = (t) => L + (t - t0) / SP * w, y = (v) => T + h - v / vmax * h;
  let out = '';
  for (let i = 0; i <= 4; i++) {
    const v = vmax * i / 4, yy = y(v);
    out += `<line x1="${L}" x2="${W - R}" y1="${yy}" y2="${yy}" stroke="#2a3440" stroke-width="1"/>`;
    if (i % 2 === 0) out += `<text x="${L - 4}" y="${yy + 3}" text-anchor="end">${esc(fmt(v, unit))}</text>`;
  }
  for (let s = 0; s <= SP; s += tickStep(SP)) {
    const xx = x(tNow - s);
    out += `<line x1="${xx}" x2="${xx}" y1="${T}" y2="${T + h}" stroke="#222b35" stroke-width="1"/>`;
    out += `<text x="${xx}" y="${H - 4}" text-anchor="middle">${s ? '-' + s + 's' : 'now'}</text>`;
  }
  for (const ev of events) if (ev.t >= t0 && ev.kind !== 'info') {
    const xx = x(ev.t);
    out += `<line x1="${xx}" x2="${xx}" y1="${T}" y2="${T + h}" stroke="${kindColor(ev.kind)}" stroke-opacity=".5" stroke-dasharray="2,3"/>`;
  }
  for (const ln of lines) {
    let d = '', pen = false;
    for (const [t, v] of ln.pts) {
      if (t < t0 - POLL_MS / 1000 * 2) continue;
      if (v === null || v === undefined) { pen = false; continue; }
      d += (pen ? 'L' : 'M') + x(Math.max(t, t0)).toFixed(1) + ',' + y(Math.min(v, vmax)).toFixed(1);
      pen = true;
    }
    if (d) out += `<path d="${d}" fill="none" stroke="${ln.color}" stroke-width="1.8" stroke-linejoin="round"${ln.dash ? ' stroke-dasharray="4,3"' : ''}/>`;
  }
  svg.innerHTML = out;
  if (legend) {
    legend.innerHTML = lines.map((ln) => {
      const last = [...ln.pts].reverse().find((p) => p[1] !== null && p[1] !== undefined);
      return `<span data-series="${esc(ln.name)}"><i style="background:${ln.color}"></i>${esc(ln.name)} <b>${esc(fmt(last ? last[1] : null, unit))}</b></span>`;
    }).join('');
  }
}
function kindColor(kind) {
  return {restart: '#d29922', 'actor-restart': '#d29922', fault: '#f85149', failure: '#f85149',
          state: '#bc8cff', chaos: '#ff7b72', recovered: '#3fb950', connection: '#8796a5', info: '#58a6ff'}[kind] || '#58a6ff';
}

// ---- change detection: restarts and inferred faults --------------------------------
function addEvent(t, kind, target, text) {
  events.push({t, kind, target, text});
  while (events.length > 500) events.shift();
}
function detectChanges(t, prev, doc) {
  const pc = prev && prev.cluster, dc = doc.cluster;
  if (!dc) return;
  if (!pc) {
    const restarted = (dc.nodes || []).filter((n) => n.restarts > 0);
    addEvent(t, 'info', dc.name, `watching cluster ${dc.name}: ${(dc.nodes || []).length} nodes, state ${dc.state}` +
      (restarted.length ? ` (already restarted: ${restarted.map((n) => n.name + ' ×' + n.restarts).join(', ')})` : ''));
    return;
  }
  if (pc.state !== dc.state)
    addEvent(t, stateClass(dc.state) === 'bad' ? 'fault' : 'state', dc.name, `cluster state ${pc.state} → ${dc.state}`);
  const before = {};
  for (const n of pc.nodes || []) before[n.name] = n;
  for (const n of dc.nodes || []) {
    const p = before[n.name];
    if (!p) { addEvent(t, 'state', n.name, `node ${n.name} appeared (${n.state})`); continue; }
    const restarted = n.epoch !== p.epoch || n.restarts !== p.restarts || (n.pid && p.pid && n.pid !== p.pid);
    if (restarted) {
      addEvent(t, 'restart', n.name, `node ${n.name} restarted: epoch ${p.epoch} → ${n.epoch}, restarts ${p.restarts} → ${n.restarts}` +
        (n.pid !== p.pid ? `, pid ${p.pid} → ${n.pid} (process died or was killed)` : ''));
      flashUntil['n:' + n.name] = t + 30;
    }
    if (n.state !== p.state) {
      const cls = stateClass(n.state);
      const why = String(n.state).startsWith('unresponsive') ? ' (missed heartbeats: stall or partition?)'
                : n.state === 'restarting' ? ' (process lost: kill or crash?)' : '';
      addEvent(t, cls === 'bad' ? 'fault' : cls === 'ok' ? 'recovered' : 'state', n.name,
               `node ${n.name}: ${p.state} → ${n.state}${why}`);
    }
    const pch = {};
    for (const c of p.children || []) pch[c.name] = c;
    if (restarted) continue;  // a new node process: its children are new too
    for (const c of n.children || []) {
      const q = pch[c.name];
      if (!q) continue;
      if (c.epoch !== q.epoch || c.restarts !== q.restarts) {
        addEvent(t, 'actor-restart', n.name + '/' + c.name, `actor ${n.name}/${c.name} restarted: epoch ${epochStr(q.epoch)} → ${epochStr(c.epoch)}, restarts ${q.restarts} → ${c.restarts}`);
        flashUntil['a:' + n.name + '/' + c.name] = t + 30;
      } else if (c.state !== q.state) {
        const cls = stateClass(c.state);
        addEvent(t, cls === 'bad' ? 'fault' : cls === 'ok' ? 'recovered' : 'state', n.name + '/' + c.name,
                 `actor ${n.name}/${c.name}: ${q.state} → ${c.state}${c.detail ? ' (' + c.detail + ')' : ''}`);
      }
    }
  }
  const pg = {};
  for (const g of prev.groups || []) pg[g.group] = g;
  for (const g of doc.groups || []) {
    const q = pg[g.group];
    if (q && g.ranks_up !== q.ranks_up)
      addEvent(t, g.ranks_up < q.ranks_up ? 'fault' : 'recovered', g.group, `group ${g.group}: ranks up ${q.ranks_up} → ${g.ranks_up} of ${g.ranks}`);
  }
  const fPrev = counter(prev, 'petrel_requests_total', {status: 'failed'}), fNow = counter(doc, 'petrel_requests_total', {status: 'failed'});
  if (fNow > fPrev) addEvent(t, 'failure', 'requests', `${fNow - fPrev} request(s) failed (total ${fNow})`);
  for (const st of labelValues(doc, 'petrel_requests_total', 'status')) {
    if (st === 'ok' || st === 'failed') continue;
    const a = counter(prev, 'petrel_requests_total', {status: st}), b = counter(doc, 'petrel_requests_total', {status: st});
    if (b > a && /unavail|overload/.test(st))  // 503s; aborted is the client's choice, invalid its mistake
      addEvent(t, 'failure', 'requests', `${b - a} request(s) ended ${st} (total ${b})`);
  }
}
// Recorded events, when the data document carries them (e.g. the chaos actor's fault history):
// {"events": [{"time": unix seconds, "kind": "fault"|..., "target": "p0", "text": "kill_node p0"}]}.
const seenEvents = new Set();
function importEvents(doc) {
  if (!Array.isArray(doc.events)) return;
  for (const e of doc.events) {
    const id = JSON.stringify([e.time, e.kind, e.target, e.text]);
    if (seenEvents.has(id)) continue;
    seenEvents.add(id);
    addEvent(typeof e.time === 'number' ? e.time : now(), e.kind === 'info' ? 'info' : 'chaos', String(e.target || ''), String(e.text || e.kind || 'event'));
  }
  events.sort((a, b) => a.t - b.t);
}
function epochStr(e) {  // child epochs are (node epoch << 32) | local incarnation, shown as petrel status does: node.local
  if (typeof e !== 'number' || e < 4294967296) return String(e);
  return Math.floor(e / 4294967296) + '.' + (e % 4294967296);
}

// ---- panels -----------------------------------------------------------------------
function renderTopology(doc, t) {
  const c = doc.cluster;
  if (!c) {
    $('topology-body').innerHTML = `<div class="note">no cluster status${doc.error ? ': ' + esc(doc.error) : ''}</div>`;
    setPanel('panel-topology', 'error');
    return;
  }
  $('cluster-name').textContent = c.name; $('cluster-state').textContent = c.state;
  const loads = {};
  for (const g of doc.groups || []) loads[g.group] = g;
  const groups = {};
  for (const n of c.nodes || []) (groups[n.group || '(no group)'] || (groups[n.group || '(no group)'] = [])).push(n);
  let html = '<div class="groups">';
  let restarts = 0;
  for (const gname of Object.keys(groups).sort()) {
    const g = loads[gname];
    const role = /prefill/i.test(gname) ? 'prefill' : /decode/i.test(gname) ? 'decode' : '';
    html += `<div class="group" data-group="${esc(gname)}"><div class="gh"><span><b>${esc(gname)}</b> <span class="kv">${role}</span></span>`;
    if (g) html += `<span class="kv">ranks up <b>${g.ranks_up}/${g.ranks}</b> · queued <b>${g.queued}</b> · running <b>${g.running}</b></span>`;
    html += '</div>';
    for (const n of groups[gname]) {
      restarts += n.restarts;
      const cls = stateClass(n.state), fl = (flashUntil['n:' + n.name] || 0) > t ? ' flash' : '';
      html += `<div class="node s-${cls}${fl}" data-node="${esc(n.name)}" data-state="${esc(n.state)}" data-epoch="${n.epoch}" data-restarts="${n.restarts}" data-pid="${n.pid}">`;
      html += `<div class="nh"><span><b>${esc(n.name)}</b> <span class="badge b-${cls}">${esc(n.state)}</span></span>`;
      html += `<span class="kv">pid <b>${n.pid}</b> · epoch <b class="epoch">${n.epoch}</b> · restarts <b class="restarts">${n.restarts}</b></span></div>`;
      for (const ch of n.children || []) {
        const ccls = stateClass(ch.state), cfl = (flashUntil['a:' + n.name + '/' + ch.name] || 0) > t ? ' flash' : '';
        html += `<span class="actor s-${ccls}${cfl}" data-actor="${esc(n.name + '/' + ch.name)}" data-state="${esc(ch.state)}" data-epoch="${ch.epoch}" data-restarts="${ch.restarts}" title="${esc(ch.detail || '')}">` +
                `${esc(ch.name)} <span class="kv">${esc(ch.state)} · e${esc(epochStr(ch.epoch))} · r${ch.restarts}</span></span>`;
      }
      html += '</div>';
    }
    html += '</div>';
  }
  html += '</div>';
  $('topology-body').className = ''; $('topology-body').innerHTML = html;
  setPanel('panel-topology', 'live', {nodes: (c.nodes || []).length, restarts, 'cluster-state': c.state});
}

function renderTimeline(t) {
  const SP = span(), svg = $('timeline-svg'), W = 1200, L = 10, R = 10, w = W - L - R, t0 = t - SP;
  const x = (tt) => L + (tt - t0) / SP * w;
  let out = `<line x1="${L}" x2="${W - R}" y1="24" y2="24" stroke="#2a3440" stroke-width="2"/>`;
  for (let s = 0; s <= SP; s += tickStep(SP))
    out += `<line x1="${x(t - s)}" x2="${x(t - s)}" y1="19" y2="29" stroke="#2a3440"/><text x="${x(t - s)}" y="48" text-anchor="middle">${s ? '-' + s + 's' : 'now'}</text>`;
  for (const ev of events) if (ev.t >= t0)
    out += `<circle cx="${x(ev.t).toFixed(1)}" cy="24" r="${ev.kind === 'info' ? 3 : 6}" fill="${kindColor(ev.kind)}"><title>${esc(new Date(ev.t * 1000).toLocaleTimeString() + ' ' + ev.text)}</title></circle>`;
  svg.innerHTML = out;
  $('timeline-list').innerHTML = events.slice().reverse().slice(0, 100).map((ev) =>
    `<li class="tl-entry" data-kind="${esc(ev.kind)}" data-target="${esc(ev.target)}"><time>${esc(new Date(ev.t * 1000).toLocaleTimeString())}</time> ` +
    `<span class="badge" style="background:${kindColor(ev.kind)}33;color:${kindColor(ev.kind)}">${esc(ev.kind)}</span> ${esc(ev.text)}</li>`).join('');
  setPanel('panel-timeline', 'live', {events: events.length,
    'restart-events': events.filter((e) => e.kind === 'restart' || e.kind === 'actor-restart').length});
}

function renderSeries(doc, t) {
  const cur = snaps[snaps.length - 1], base = windowBase(t);
  const enough = snaps.length >= 2 && cur !== base;
  const inTot = counter(doc, 'petrel_input_tokens_total'), outTot = counter(doc, 'petrel_output_tokens_total');
  // throughput
  if (enough) {
    push('in_tps', t, rate(cur, base, (d) => counter(d, 'petrel_input_tokens_total')));
    push('out_tps', t, rate(cur, base, (d) => counter(d, 'petrel_output_tokens_total')));
  }
  const peak = (n) => (series[n] || []).reduce((a, p) => Math.max(a, p[1] || 0), 0);
  lineChart($('throughput-chart'), $('throughput-legend'), [
    {name: 'input tok/s', color: COLORS[0], pts: series.in_tps || []},
    {name: 'output tok/s', color: COLORS[1], pts: series.out_tps || []}], '');
  $('throughput-totals').innerHTML = `<span>input total <b>${fmt(inTot)}</b></span><span>output total <b>${fmt(outTot)}</b></span>` +
    `<span>peak in <b>${fmt(peak('in_tps'))}</b>/s</span><span>peak out <b>${fmt(peak('out_tps'))}</b>/s</span>`;
  setPanel('panel-throughput', enough ? 'live' : 'waiting', {'input-total': inTot, 'output-total': outTot,
    'peak-input-tps': peak('in_tps').toFixed(2), 'peak-output-tps': peak('out_tps').toFixed(2), points: (series.out_tps || []).length});

  // TTFT and ITL percentiles over the trailing window (gaps where nothing finished)
  const lat = {};
  for (const [key, metric] of [['ttft', 'petrel_time_to_first_token_seconds'], ['itl', 'petrel_inter_token_latency_seconds'], ['e2e', 'petrel_e2e_request_latency_seconds']]) {
    const all = hist(doc, metric);
    const win = enough ? histDelta(hist(base.doc, metric), all) : null;
    for (const q of [50, 90, 99]) if (enough) push(key + '_p' + q, t, quantile(win, q / 100));
    lat[key] = all;
  }
  for (const key of ['ttft', 'itl'])
    lineChart($(key + '-chart'), $(key + '-legend'), [50, 90, 99].map((q, i) =>
      ({name: key.toUpperCase() + ' p' + q, color: COLORS[[0, 2, 3][i]], pts: series[key + '_p' + q] || []})), 's');
  $('latency-totals').innerHTML = ['ttft', 'itl', 'e2e'].map((k) => lat[k]
    ? `<span>${k.toUpperCase()} since start: p50 <b>${fmt(quantile(lat[k], .5), 's')}</b> p99 <b>${fmt(quantile(lat[k], .99), 's')}</b> (n=${lat[k].count})</span>` : '').join('');
  const ttftN = lat.ttft ? lat.ttft.count : 0, itlN = lat.itl ? lat.itl.count : 0;
  setPanel('panel-latency', enough && ttftN > 0 ? 'live' : 'waiting', {'ttft-count': ttftN, 'itl-count': itlN,
    'ttft-p50': quantile(lat.ttft, .5) ?? '', 'itl-p50': quantile(lat.itl, .5) ?? ''});

  // queue depth and running requests per group
  const qGroups = labelValues(doc, 'petrel_queue_depth', 'group');
  const rGroups = labelValues(doc, 'petrel_running_requests', 'group');
  for (const g of qGroups) push('queue:' + g, t, counter(doc, 'petrel_queue_depth', {group: g}));
  for (const g of rGroups) push('running:' + g, t, counter(doc, 'petrel_running_requests', {group: g}));
  const ql = qGroups.map((g, i) => ({name: 'queued ' + g, color: COLORS[i % COLORS.length], pts: series['queue:' + g]}))
    .concat(rGroups.map((g, i) => ({name: 'running ' + g, color: COLORS[(i + 4) % COLORS.length], pts: series['running:' + g], dash: true})));
  lineChart($('queues-chart'), $('queues-legend'), ql, '', {ymax: 4});
  setPanel('panel-queues', qGroups.length ? 'live' : 'waiting', {groups: qGroups.join(','),
    'queued-total': qGroups.reduce((a, g) => a + counter(doc, 'petrel_queue_depth', {group: g}), 0)});

  // KV pool use per group (router's view of free pages)
  const groups = (doc.groups || []).filter((g) => g.total_pages > 0);
  for (const g of groups) push('kvuse:' + g.group, t, (g.total_pages - g.free_pages) / g.total_pages);
  lineChart($('kvpool-chart'), $('kvpool-legend'), groups.map((g, i) => ({name: g.group, color: COLORS[i % COLORS.length], pts: series['kvuse:' + g.group]})), '%', {fixedMax: 1});
  $('kvpool-bars').innerHTML = groups.map((g, i) => {
    const used = g.total_pages - g.free_pages, f = used / g.total_pages;
    return `<div data-group="${esc(g.group)}" style="margin-top:6px"><span class="kv">${esc(g.group)}: <b>${used}</b> of <b>${g.total_pages}</b> pages used (${fmt(f, '%')})</span>` +
      `<div class="bar"><span style="width:${(f * 100).toFixed(1)}%;background:${COLORS[i % COLORS.length]}"></span></div></div>`;
  }).join('');
  setPanel('panel-kvpool', groups.length ? 'live' : 'waiting', {groups: groups.map((g) => g.group).join(','),
    'total-pages': groups.reduce((a, g) => a + g.total_pages, 0), 'used-pages': groups.reduce((a, g) => a + g.total_pages - g.free_pages, 0)});

  // KV transfers: rate, per-phase latency, failures
  const kvCount = (d) => { const h = hist(d, 'petrel_kv_transfer_seconds', {phase: 'transfer'}); return h ? h.count : 0; };
  const failed = (d) => counter(d, 'petrel_requests_total', {status: 'failed'});
  if (enough) {
    push('kv_rate', t, rate(cur, base, kvCount));
    push('kv_bytes', t, rate(cur, base, (d) => counter(d, 'petrel_kv_transfer_bytes_total')));
    push('failed_rate', t, rate(cur, base, failed));
    for (const ph of PHASES) {
      const w = histDelta(hist(base.doc, 'petrel_kv_transfer_seconds', {phase: ph}), hist(doc, 'petrel_kv_transfer_seconds', {phase: ph}));
      push('kvph:' + ph, t, w && w.count > 0 ? w.sum / w.count : null);
    }
  }
  lineChart($('kvrate-chart'), $('kvrate-legend'), [
    {name: 'transfers/s', color: COLORS[0], pts: series.kv_rate || []},
    {name: 'failed requests/s', color: '#f85149', pts: series.failed_rate || []}], '');
  lineChart($('kvphase-chart'), $('kvphase-legend'), PHASES.map((ph, i) => ({name: 'mean ' + ph, color: COLORS[[5, 4, 2][i]], pts: series['kvph:' + ph] || []})), 's');
  const ph = {};
  let phTotal = 0;
  for (const p of PHASES) { const h = hist(doc, 'petrel_kv_transfer_seconds', {phase: p}); ph[p] = h && h.count ? h.sum / h.count : 0; phTotal += ph[p]; }
  const kvN = kvCount(doc), kvBytes = counter(doc, 'petrel_kv_transfer_bytes_total'), fails = failed(doc);
  const lastBytes = (series.kv_bytes || []).length ? series.kv_bytes[series.kv_bytes.length - 1][1] : null;
  $('kvphase-split').innerHTML = `<div class="kv" style="margin-top:4px">mean split since start (${kvN} transfers, ${fmt(kvBytes, 'B')}, now ${fmt(lastBytes, 'B')}/s; ` +
    `<b style="color:${fails ? '#f85149' : 'inherit'}">${fmt(fails)}</b> failed requests):</div><div class="bar" style="height:16px">` +
    PHASES.map((p, i) => `<span title="${p} ${fmt(ph[p], 's')}" style="width:${phTotal ? (ph[p] / phTotal * 100).toFixed(1) : 0}%;background:${COLORS[[5, 4, 2][i]]}"></span>`).join('') +
    `</div><div class="legend">${PHASES.map((p, i) => `<span><i style="background:${COLORS[[5, 4, 2][i]]}"></i>${p} <b>${fmt(ph[p], 's')}</b></span>`).join('')}</div>`;
  setPanel('panel-kv-transfers', enough && kvN > 0 ? 'live' : 'waiting', {transfers: kvN, bytes: kvBytes, failed: fails,
    'bootstrap-mean': ph.bootstrap, 'allocation-mean': ph.allocation, 'transfer-mean': ph.transfer});

  // requests by outcome
  const statuses = labelValues(doc, 'petrel_requests_total', 'status');
  if (enough) for (const s of statuses) push('req:' + s, t, rate(cur, base, (d) => counter(d, 'petrel_requests_total', {status: s})));
  lineChart($('requests-chart'), $('requests-legend'), statuses.map((s, i) => ({name: s + '/s', color: s === 'ok' ? '#3fb950' : s === 'failed' ? '#f85149' : COLORS[(i + 2) % COLORS.length], pts: series['req:' + s] || []})), '');
  $('requests-table').innerHTML = '<table class="small"><tr><th>outcome</th><th>total</th></tr>' +
    statuses.map((s) => `<tr data-status="${esc(s)}"><td>${esc(s)}</td><td><b>${fmt(counter(doc, 'petrel_requests_total', {status: s}))}</b></td></tr>`).join('') + '</table>';
  setPanel('panel-requests', enough && statuses.length ? 'live' : 'waiting', {statuses: statuses.join(','),
    ok: counter(doc, 'petrel_requests_total', {status: 'ok'}), failed: fails});
}

// Expert load heatmap: {"expert_load": {"before": [[...]], "after": [[...]], "balancedness_before", "balancedness_after"}}
// rows are layers, columns experts (or ranks); one colour scale for both so they compare.
function heatColor(f) {
  const stops = [[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]];
  f = Math.max(0, Math.min(1, f)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(f)), r = f - i;
  return 'rgb(' + stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * r)).join(',') + ')';
}
function heatmap(m, vmax, title) {
  const rows = m.length, cols = rows ? Math.max(...m.map((r) => r.length)) : 0;
  const W = 560, L = 34, T = 4, B = 16, cw = (W - L - 4) / Math.max(cols, 1), ch = Math.max(3, Math.min(14, 220 / Math.max(rows, 1)));
  const H = T + rows * ch + B;
  let out = '';
  m.forEach((row, i) => {
    row.forEach((v, j) => {
      out += `<rect class="cell" x="${(L + j * cw).toFixed(2)}" y="${(T + i * ch).toFixed(2)}" width="${(cw + 0.3).toFixed(2)}" height="${(ch + 0.3).toFixed(2)}" fill="${heatColor(vmax ? v / vmax : 0)}"><title>layer ${i}, expert ${j}: ${fmt(v)}</title></rect>`;
    });
    if (rows <= 16 || i % Math.ceil(rows / 8) === 0) out += `<text x="${L - 4}" y="${T + i * ch + ch / 2 + 3}" text-anchor="end">${i}</text>`;
  });
  out += `<text x="${L}" y="${H - 3}">expert 0</text><text x="${W - 4}" y="${H - 3}" text-anchor="end">${cols - 1}</text>`;
  return `<div><div class="kv">${esc(title)}</div><svg class="chart heatmap" viewBox="0 0 ${W} ${H}">${out}</svg></div>`;
}
function renderExpertLoad(doc) {
  const el = doc.expert_load;
  if (!el) {
    $('expert-load-body').className = 'note';
    $('expert-load-body').textContent = 'no expert-load data (expert parallelism not wired yet)';
    setPanel('panel-expert-load', 'unavailable');
    return;
  }
  const mats = ['before', 'after'].filter((k) => Array.isArray(el[k]) && el[k].length);
  let vmax = 0;
  for (const k of mats) for (const r of el[k]) for (const v of r) if (v > vmax) vmax = v;
  const bal = (v) => typeof v === 'number' ? v.toFixed(3) : '–';
  let html = `<div class="row kv" style="margin-bottom:6px"><span>balancedness before <b>${bal(el.balancedness_before)}</b></span>` +
    `<span>after <b>${bal(el.balancedness_after)}</b></span><span>(mean load / max load; 1.0 is perfect)</span>` +
    `<span>scale 0 <span style="display:inline-block;width:120px;height:10px;vertical-align:middle;background:linear-gradient(90deg,${[0, .25, .5, .75, 1].map(heatColor).join(',')})"></span> ${fmt(vmax)}</span></div><div class="heat">`;
  for (const k of mats) html += heatmap(el[k], vmax, k === 'before' ? 'before the last EPLB rebalance' : 'after the last EPLB rebalance');
  html += '</div>';
  $('expert-load-body').className = ''; $('expert-load-body').innerHTML = html;
  const m0 = el[mats[0]] || [];
  setPanel('panel-expert-load', mats.length ? 'live' : 'waiting', {layers: m0.length, experts: m0.length ? m0[0].length : 0,
    'balancedness-before': el.balancedness_before ?? '', 'balancedness-after': el.balancedness_after ?? ''});
}

// ---- polling ----------------------------------------------------------------------
async function poll() {
  const t = now();
  let doc;
  try {
    const r = await fetch('/dashboard/data', {cache: 'no-store', headers: key ? {Authorization: 'Bearer ' + key} : {}});
    if (r.status === 401) throw new Error('401: the gateway wants an API key; open this page as /dashboard#key=YOUR_KEY');
    if (!r.ok) throw new Error('HTTP ' + r.status);
    doc = await r.json();
  } catch (e) {
    failStreak++;
    if (failStreak === 3) addEvent(t, 'connection', 'gateway', 'lost contact with the gateway: ' + e.message);
    const c = $('conn'); c.dataset.state = 'stale'; c.textContent = 'no data: ' + e.message;
    for (const p of document.querySelectorAll('section.panel')) if (p.dataset.state === 'live') p.dataset.state = 'stale';
    renderTimeline(t);
    return;
  }
  if (failStreak >= 3) addEvent(t, 'recovered', 'gateway', 'gateway reachable again');
  failStreak = 0; polls++; lastOk = t;
  document.body.dataset.polls = String(polls);
  snaps.push({t, doc});
  while (snaps.length && snaps[0].t < t - KEEP_S) snaps.shift();
  detectChanges(t, prevDoc, doc);
  importEvents(doc);
  prevDoc = doc;
  const c = $('conn'); c.dataset.state = 'live'; c.textContent = 'live';
  $('updated').textContent = 'updated ' + new Date(t * 1000).toLocaleTimeString() + ' · every ' + POLL_MS / 1000 + ' s';
  for (const [fn, id] of [[() => renderTopology(doc, t), 'panel-topology'], [() => renderSeries(doc, t), 'panel-throughput'],
                          [() => renderExpertLoad(doc), 'panel-expert-load'], [() => renderTimeline(t), 'panel-timeline']]) {
    try { fn(); } catch (e) { console.error(e); setPanel(id, 'error', {error: e.message}); }
  }
}
async function loop() {
  const start = Date.now();
  await poll();
  setTimeout(loop, Math.max(50, POLL_MS - (Date.now() - start)));
}
loop();
</script>
</body></html>
)HTML";
  return page;
}

} // namespace petrel
