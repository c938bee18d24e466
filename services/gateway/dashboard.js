// Fairway dashboard: polls /dashboard/data with the admin key and draws canvas charts.
// Every number comes from the JSON; the page only keeps a short history to draw lines
// and to turn cumulative served tokens into a rate. Text from the server is set with
// textContent only (tenant names and error messages are client-controlled).
"use strict";

const POLL_MS = 1000;
const HISTORY_S = 300;
const RATE_WINDOW_S = 5;
const STORAGE_KEY = "fairway.adminKey";
const PALETTE = ["#2e90fa", "#f79009", "#12b76a", "#ee46bc", "#7a5af8", "#f04438", "#15b79e", "#667085"];

const $ = (id) => document.getElementById(id);
const timeline = []; // {t, served: {tenant: v}, vtc, queued, rate, dispatched: {pool: n}}
let timer = null;

// --- formatting -------------------------------------------------------------------------

function colorOf(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

function fmt(value, digits = 0) {
  if (value === null || value === undefined || !isFinite(value)) return "–";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

// What is left of a tenant's rate limits: "requests left / limit · tokens left / limit".
function rateLeft(limits) {
  if (!limits) return "none";
  const part = (left, limit, unit) => limit ? fmt(left) + " / " + fmt(limit) + " " + unit : null;
  return [part(limits.requests_left, limits.requests_per_minute, "req"),
    part(limits.tokens_left, limits.tokens_per_minute, "tok")].filter(Boolean).join(" · ");
}

function pct(value) { return fmt(100 * value, 0) + " %"; }

function clock(t) { return new Date(t * 1000).toLocaleTimeString("en-GB"); }

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function bar(fraction, label) {
  const td = document.createElement("td");
  const outer = document.createElement("span");
  outer.className = "bar";
  const inner = document.createElement("i");
  inner.style.width = Math.max(0, Math.min(1, fraction)) * 100 + "%";
  outer.appendChild(inner);
  td.append(outer, label);
  return td;
}

function fillTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rows);
}

// --- charts -----------------------------------------------------------------------------

function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

function setupCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, w, h };
}

// Axes with 4 y ticks; returns the plot box {x0, y0, x1, y1} and scale functions.
function axes(ctx, w, h, xMin, xMax, yMax, xLabel) {
  const box = { x0: 52, y0: 8, x1: w - 8, y1: h - 22 };
  const sx = (x) => box.x0 + ((x - xMin) / (xMax - xMin || 1)) * (box.x1 - box.x0);
  const sy = (y) => box.y1 - (y / yMax) * (box.y1 - box.y0);
  ctx.strokeStyle = "#e3e6eb";
  ctx.fillStyle = "#6b7280";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4, y = sy(v);
    ctx.beginPath(); ctx.moveTo(box.x0, y); ctx.lineTo(box.x1, y); ctx.stroke();
    ctx.fillText(fmt(v, v % 1 === 0 ? 0 : (v * 10) % 1 === 0 ? 1 : 2), box.x0 - 6, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let i = 0; i <= 5; i++) {
    const v = xMin + ((xMax - xMin) * i) / 5;
    ctx.textAlign = i === 5 ? "right" : "center"; // keep the last label inside the canvas
    ctx.fillText(xLabel(v), i === 5 ? box.x1 : sx(v), box.y1 + 6);
  }
  return { box, sx, sy };
}

function legend(ctx, box, names) {
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let x = box.x0 + 8;
  for (const name of names) {
    ctx.fillStyle = colorOf(name);
    ctx.fillRect(x, box.y0 + 6, 10, 10);
    ctx.fillStyle = "#1d2330";
    ctx.fillText(name, x + 14, box.y0 + 11);
    x += 24 + ctx.measureText(name).width;
  }
}

// series: [{name, points: [[t, v], ...]}] up to `now`; the time axis grows from 60 s to
// HISTORY_S as the page collects history.
function lineChart(canvas, series, now) {
  const { ctx, w, h } = setupCanvas(canvas);
  let yMax = 0, first = now;
  for (const s of series) {
    for (const [t, v] of s.points) {
      if (v > yMax) yMax = v;
      if (t < first) first = t;
    }
  }
  yMax = niceMax(yMax);
  const span = Math.min(HISTORY_S, Math.max(60, Math.ceil((now - first) / 60) * 60));
  const { box, sx, sy } = axes(ctx, w, h, now - span, now, yMax,
    (t) => (t >= now ? "now" : "-" + Math.round(now - t) + " s"));
  ctx.save();
  ctx.beginPath(); ctx.rect(box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0); ctx.clip();
  ctx.lineWidth = 2;
  for (const s of series) {
    ctx.strokeStyle = colorOf(s.name);
    ctx.beginPath();
    let pen = false;
    for (const [t, v] of s.points) {
      if (v === null || v === undefined) { pen = false; continue; }
      if (pen) ctx.lineTo(sx(t), sy(v)); else ctx.moveTo(sx(t), sy(v));
      pen = true;
    }
    ctx.stroke();
  }
  ctx.restore();
  legend(ctx, box, series.map((s) => s.name));
  canvas.dataset.series = String(series.length);
}

function scatterChart(canvas, points) {
  const { ctx, w, h } = setupCanvas(canvas);
  let max = 0;
  for (const p of points) max = Math.max(max, p.predicted, p.actual, p.p90 || 0);
  max = niceMax(max);
  const { box, sx, sy } = axes(ctx, w, h, 0, max, max, (v) => fmt(v));
  ctx.save();
  ctx.beginPath(); ctx.rect(box.x0, box.y0, box.x1 - box.x0, box.y1 - box.y0); ctx.clip();
  ctx.strokeStyle = "#98a2b3";
  ctx.setLineDash([4, 4]);
  ctx.beginPath(); ctx.moveTo(sx(0), sy(0)); ctx.lineTo(sx(max), sy(max)); ctx.stroke();
  ctx.setLineDash([]);
  for (const p of points.slice().reverse()) { // oldest first, newest drawn on top
    const x = sx(p.predicted), y = sy(p.actual), color = colorOf(p.tenant);
    if (p.p10 !== null && p.p90 !== null) {
      ctx.strokeStyle = color; ctx.globalAlpha = 0.25; ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(sx(p.p10), y); ctx.lineTo(sx(p.p90), y); ctx.stroke();
    }
    ctx.globalAlpha = 0.85;
    ctx.beginPath(); ctx.arc(x, y, 3.5, 0, 2 * Math.PI);
    if (p.finish_reason === "length") { ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.stroke(); }
    else { ctx.fillStyle = color; ctx.fill(); }
  }
  ctx.globalAlpha = 1;
  ctx.restore();
  ctx.fillStyle = "#6b7280";
  ctx.textAlign = "left";
  ctx.fillText("x: predicted p50 (bar: p10–p90) · y: actual · hollow: hit max_tokens", box.x0 + 6, box.y0 + 4);
  legend(ctx, { x0: box.x0, y0: box.y0 + 14 }, [...new Set(points.map((p) => p.tenant))].sort());
  canvas.dataset.points = String(points.length);
}

// --- state and rendering ----------------------------------------------------------------

function remember(data) {
  const point = { t: data.now, served: {}, vtc: {}, queued: {}, rate: {}, dispatched: {} };
  for (const t of data.tenants) {
    point.served[t.name] = t.served_tokens;
    point.vtc[t.name] = t.vtc;
    point.queued[t.name] = t.queued;
  }
  for (const p of data.pools) point.dispatched[p.name] = p.dispatched;
  // Rate over RATE_WINDOW_S: compare with the oldest point inside the window.
  let base = null;
  for (const old of timeline) if (data.now - old.t <= RATE_WINDOW_S && old.t < data.now) { base = old; break; }
  for (const name of Object.keys(point.served)) {
    const before = base ? base.served[name] : undefined;
    const delta = before === undefined ? null : point.served[name] - before;
    point.rate[name] = delta === null || delta < 0 ? null : delta / (data.now - base.t);
  }
  if (timeline.length && timeline[timeline.length - 1].t >= data.now) return timeline[timeline.length - 1];
  timeline.push(point);
  while (timeline.length && data.now - timeline[0].t > HISTORY_S) timeline.shift();
  return point;
}

function seriesOf(field, names) {
  return names.map((name) => ({
    name, points: timeline.map((p) => [p.t, p[field][name] === undefined ? null : p[field][name]]),
  }));
}

function render(data) {
  const point = remember(data);
  $("model").textContent = data.model;
  $("leader").textContent = data.scheduler.leader || "none";
  $("fence").textContent = data.scheduler.fence === null ? "" : "(fence " + data.scheduler.fence + ")";
  $("queued-total").textContent = fmt(data.queue.queued) + (data.queue.complete ? "" : " (partial)");
  $("dispatched-total").textContent = fmt(data.queue.dispatched);

  const names = data.tenants.map((t) => t.name);
  fillTable("tenants", data.tenants.map((t) => {
    const tr = document.createElement("tr");
    const name = cell(t.name);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colorOf(t.name);
    name.prepend(swatch);
    tr.append(name, cell(fmt(t.served_tokens)), cell(fmt(point.rate[t.name], 1)),
      cell(fmt(t.vtc, 1)), cell(fmt(t.queued)), cell(fmt(t.dispatched)), cell(fmt(t.background_responses)),
      cell(fmt(t.answered)), cell(fmt(t.ttft_p50_ms) + " / " + fmt(t.ttft_p90_ms)),
      cell(fmt(t.e2e_p50_ms) + " / " + fmt(t.e2e_p90_ms)),
      cell(fmt(t.tokens_today) + " (" + fmt(t.requests_today) + ")"), cell(rateLeft(t.rate_limits)));
    ["name", "served_tokens", "rate", "vtc", "queued", "dispatched", "background_responses", "answered",
      "ttft_ms", "e2e_ms", "tokens_today", "rate_limits"].forEach((f, i) => {
      tr.children[i].dataset.tenant = t.name;
      tr.children[i].dataset.field = f;
    });
    tr.children[1].dataset.value = String(t.served_tokens);
    tr.children[6].dataset.value = String(t.background_responses);
    tr.children[7].dataset.value = String(t.answered);
    tr.children[10].dataset.value = String(t.tokens_today);
    return tr;
  }));

  lineChart($("chart-rate"), seriesOf("rate", names), data.now);
  lineChart($("chart-served"), seriesOf("served", names), data.now);
  lineChart($("chart-vtc"), seriesOf("vtc", names), data.now);
  const pools = data.pools.map((p) => p.name);
  const queueSeries = seriesOf("queued", names).concat(
    seriesOf("dispatched", pools).map((s) => ({ ...s, name: "pool " + s.name })));
  lineChart($("chart-queue"), queueSeries, data.now);

  fillTable("pools", data.pools.map((p) => {
    const tr = document.createElement("tr");
    tr.dataset.pool = p.name;
    const kv = p.total_kv_tokens ? 1 - p.free_kv_tokens / p.total_kv_tokens : 0;
    tr.append(cell(p.name), cell(fmt(p.workers)), cell(fmt(p.dispatched)),
      bar(p.slots ? p.running / p.slots : 0, fmt(p.running) + " / " + fmt(p.slots)),
      cell(fmt(p.waiting)), cell(pct(kv)), cell(fmt(p.decode_tokens_per_s, 1)));
    return tr;
  }));
  fillTable("workers", data.workers.map((w) => {
    const tr = document.createElement("tr");
    tr.dataset.worker = w.id;
    const state = !w.alive ? ["silent", "stale"] : w.draining ? ["draining", "draining"] : ["alive", "alive"];
    tr.append(cell(w.id), cell(w.pool), cell(state[0], state[1]),
      bar(w.load, fmt(w.running) + " / " + fmt(w.max_running)), cell(fmt(w.waiting)),
      cell(pct(w.kv_used)), cell(fmt(w.decode_tokens_per_s, 1)), cell(fmt(w.prefill_tokens_per_s, 1)),
      cell(fmt(w.decode_step_ms, 1)),
      cell(w.prefix_cache_hit_rate == null ? "–" : pct(w.prefix_cache_hit_rate)),
      cell(fmt(w.age_s, 1) + " s ago"));
    return tr;
  }));

  fillTable("gateways", (data.gateways || []).map((g) => {
    const tr = document.createElement("tr");
    tr.dataset.gateway = g.id;
    tr.append(cell(g.id, "left"), cell(g.alive ? "alive" : "silent", g.alive ? "alive" : "stale"),
      cell(fmt(g.in_flight)), cell(fmt(g.age_s, 1) + " s ago"));
    return tr;
  }));

  fillTable("batches", (data.batches || []).map((b) => {
    const tr = document.createElement("tr");
    tr.dataset.batch = b.id;
    const done = b.completed + b.failed;
    tr.append(cell(b.id, "left"), cell(b.tenant, "left"), cell(b.status, "left"),
      bar(b.total ? done / b.total : 0, `${fmt(done)} (${fmt(b.failed)}) / ${fmt(b.total)}`),
      cell(fmt(Math.max(data.now - b.created_at, 0), 0) + " s ago"));
    return tr;
  }));

  scatterChart($("chart-lengths"), data.lengths);
  const s = data.length_summary;
  $("length-summary").textContent = s.n
    ? `${s.n} finished requests · mean |actual − p50| ${fmt(s.mean_abs_error, 1)} tokens · ` +
      `actual within [p10, p90]: ${s.within_p10_p90 === null ? "–" : pct(s.within_p10_p90)}`
    : "no finished requests yet";

  fillTable("errors", data.errors.map((e) => {
    const tr = document.createElement("tr");
    tr.append(cell(e.t ? clock(e.t) : "–"), cell(e.status === null ? "–" : String(e.status)),
      cell(e.code || "", "left"), cell(e.tenant || "", "left"), cell(e.path, "left"), cell(e.message, "text"));
    return tr;
  }));
}

// --- polling and the key ----------------------------------------------------------------

function setStatus(text, cls) {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + (cls || "");
}

function showLogin(message) {
  clearTimeout(timer);
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("not connected", "down");
  $("admin-key").focus();
}

async function poll() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(STORAGE_KEY);
  if (!key) { showLogin(); return; }
  try {
    const res = await fetch("dashboard/data", {
      headers: { Authorization: "Bearer " + key }, cache: "no-store", credentials: "omit",
    });
    if (res.status === 401 || res.status === 403) {
      const body = await res.json().catch(() => ({}));
      sessionStorage.removeItem(STORAGE_KEY);
      showLogin((body.error && body.error.message) || "HTTP " + res.status);
      return;
    }
    if (!res.ok) throw new Error("HTTP " + res.status);
    const data = await res.json();
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    render(data);
    setStatus("live · " + clock(data.now), "live");
  } catch (err) {
    setStatus("update failed: " + err.message, "down");
  }
  timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("admin-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(STORAGE_KEY, key);
    $("admin-key").value = "";
    poll();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(STORAGE_KEY);
    timeline.length = 0;
    showLogin();
  });
  poll();
});
