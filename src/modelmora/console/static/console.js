// ModelMora console: polls the server's own API (status, catalog, stats, jobs) and draws it.
// No framework and no build step: the DOM is built with createElement/textContent (never
// innerHTML with server data), charts are uPlot (static/vendor, MIT). docs/console.md.
"use strict";

const POLL_MS = 2000;
const CATALOG_EVERY = 5; // the catalog (a database read) every fifth poll
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

const state = {
  session: null,
  window: 300,
  polls: 0,
  catalog: [],
  status: null,
  charts: {},
  chartKey: "",
  busy: new Set(),
  timer: null,
  generation: 0,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// -- talking to the server ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error_code;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && state.session && state.session.csrf) headers["X-CSRF-Token"] = state.session.csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function notice(message, bad) {
  const box = $("notice");
  box.textContent = message || "";
  box.className = bad ? "bad" : "";
  box.hidden = !message;
}

// -- formatting ----------------------------------------------------------------------------

function bytes(value) {
  if (!value) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = value;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
}

function bar(used, total) {
  if (!total) return null;
  const ratio = Math.min(1, used / total);
  const fill = el("span");
  fill.style.width = `${(ratio * 100).toFixed(1)}%`;
  return el("div", { class: ratio > 0.9 ? "bar high" : "bar", title: `${bytes(used)} of ${bytes(total)}` }, fill);
}

function badge(text) {
  return el("span", { class: `badge ${text}` }, text);
}

// -- the models table ------------------------------------------------------------------------

function modelRows() {
  // The catalog lists every installed model; the status adds what the server holds live.
  const live = new Map(((state.status && state.status.models) || []).map((m) => [m.name, m]));
  const rows = state.catalog.map((record) => ({ record, live: live.get(record.name) }));
  for (const [name, m] of live) {
    if (!state.catalog.some((r) => r.name === name)) rows.push({ record: { name, task_type: m.task_type }, live: m });
  }
  return rows.sort((a, b) => a.record.name.localeCompare(b.record.name));
}

function action(label, name, verb, secondary) {
  const key = `${verb}:${name}`;
  return el(
    "button",
    {
      type: "button",
      class: secondary ? "secondary" : null,
      "data-action": verb,
      "data-model": name,
      disabled: state.busy.has(key),
      onclick: () => runAction(verb, name),
    },
    label,
  );
}

async function runAction(verb, name) {
  const key = `${verb}:${name}`;
  state.busy.add(key);
  renderModels();
  notice(`${verb} ${name}…`);
  try {
    await api("POST", `/api/v1/models/${encodeURIComponent(name)}/${verb}`);
    notice("");
  } catch (err) {
    notice(`${verb} ${name}: ${err.code || ""} ${err.message}`, true);
  } finally {
    state.busy.delete(key);
    await poll();
  }
}

function renderModels() {
  const memory = (state.status && state.status.memory) || {};
  const budget = memory.budget_ram_bytes;
  const admin = state.session && state.session.admin;
  const tbody = $("models").tBodies[0];
  const rows = modelRows().map(({ record, live }) => {
    const name = record.name;
    const current = (live && live.state) || record.state || "registered";
    const mem = (live && live.memory) || {};
    const loaded = live && live.pid;
    const gpuBudget = live && live.device && memory.budget_gpu_bytes ? memory.budget_gpu_bytes[live.device] : null;
    const memoryCell = el(
      "td",
      { class: "num", "data-label": "memory" },
      loaded ? `RSS ${bytes(mem.rss_bytes)}` : "-",
      loaded ? bar(mem.rss_bytes || 0, budget) : null,
      mem.gpu_bytes ? el("div", {}, `VRAM ${bytes(mem.gpu_bytes)}`) : null,
      mem.gpu_bytes ? bar(mem.gpu_bytes, gpuBudget) : null,
    );
    const actions = admin
      ? el(
          "td",
          { class: "actions" },
          loaded ? action("Unload", name, "unload", true) : action("Load", name, "load"),
          action("Warm up", name, "warmup", true),
        )
      : el("td", { class: "muted" }, "-");
    return el(
      "tr",
      { "data-model": name, "data-state": current },
      el("td", { class: "name", title: live && live.error ? live.error : null }, name),
      el("td", { "data-label": "state" }, badge(current)),
      el("td", { class: "wide" }, (live && live.version) || record.active_version || "-"),
      el("td", { class: "wide" }, record.task_type || "-"),
      el("td", { "data-label": "device" }, (live && live.device) || "-"),
      memoryCell,
      el("td", { class: "num", "data-label": "queue" }, live ? live.queued : 0),
      el("td", { class: "num", "data-label": "in flight" }, live ? live.in_flight : 0),
      actions,
    );
  });
  tbody.replaceChildren(...rows);
  document.querySelectorAll(".actions-col").forEach((th) => (th.hidden = !admin));
  tbody.querySelectorAll("td.actions, td.muted").forEach((td) => (td.hidden = !admin));
}

function renderServer() {
  const s = state.status;
  if (!s) {
    $("server").textContent = state.session && !state.session.admin ? "status needs an admin key" : "";
    $("memory-card").hidden = true;
    return;
  }
  const ready = s.ready ? "ready" : s.draining ? "draining" : "not ready";
  $("server").textContent = `v${s.version} · ${ready} · up ${duration(s.uptime_seconds)} · ${s.in_flight} in flight · ${s.queued} queued`;
  const m = s.memory || {};
  const lines = [
    ["workers' RAM", m.used_ram_bytes, m.budget_ram_bytes],
    ["system available", m.system_available_bytes, null],
  ];
  for (const [device, size] of Object.entries(m.budget_gpu_bytes || {})) {
    const gpu = (s.gpus || []).find((g) => g.device === device);
    lines.push([`GPU ${device}`, gpu ? gpu.used_bytes : 0, size]);
  }
  const box = el("div");
  for (const [label, used, total] of lines) {
    box.append(
      el(
        "div",
        { class: "memline" },
        el("span", { class: "muted" }, label),
        el("span", {}, total ? `${bytes(used)} of ${bytes(total)} budget` : bytes(used), bar(used || 0, total)),
      ),
    );
  }
  $("memory").replaceChildren(box);
  $("memory-card").hidden = false;
}

// -- jobs ------------------------------------------------------------------------------------

function renderJobs(page) {
  const jobs = (page && page.data) || [];
  const rows = jobs.map((j) =>
    el(
      "tr",
      { "data-job": j.job_id },
      el("td", { title: j.job_id }, j.job_id.slice(0, 8)),
      el("td", { class: "name" }, j.model),
      el("td", {}, badge(j.status)),
      el(
        "td",
        {},
        j.progress === null || j.progress === undefined
          ? "-"
          : el("progress", { max: 1, value: j.progress, title: `${Math.round(j.progress * 100)}%` }),
      ),
      el("td", { class: "wide" }, new Date(j.created_at).toLocaleTimeString()),
      el("td", { class: "wide error" }, (j.error && j.error.error_code) || ""),
    ),
  );
  $("jobs").tBodies[0].replaceChildren(...rows);
  $("no-jobs").hidden = rows.length > 0;
}

// -- charts ----------------------------------------------------------------------------------

const CHARTS = [
  // Latency and batch size have gaps (no request in a slot): their points are drawn, so a
  // lone figure between gaps shows.
  { id: "chart-rate", series: [["requests_per_second", "", null]], points: false },
  { id: "chart-latency", series: [["p50_ms", " p50", null], ["p99_ms", " p99", [6, 4]]], points: true },
  { id: "chart-batch", series: [["batch_size", "", null]], points: true },
];

function chartSize(box) {
  return { width: Math.max(240, box.clientWidth), height: 170 };
}

function buildCharts(models) {
  for (const spec of CHARTS) {
    const box = $(spec.id);
    if (state.charts[spec.id]) state.charts[spec.id].destroy();
    const series = [{}];
    models.forEach((name, i) => {
      for (const [, suffix, dash] of spec.series) {
        series.push({
          label: name + suffix,
          stroke: COLORS[i % COLORS.length],
          width: 2,
          dash: dash || undefined,
          points: { show: spec.points, size: 4 },
        });
      }
    });
    const opts = { ...chartSize(box), series, legend: { show: true }, scales: { x: { time: true } } };
    state.charts[spec.id] = new uPlot(opts, [[]].concat(series.slice(1).map(() => [])), box);
  }
}

function renderStats(stats) {
  const models = stats.models.map((m) => m.name);
  const key = models.join("\u0000");
  if (key !== state.chartKey || !state.charts[CHARTS[0].id]) {
    buildCharts(models);
    state.chartKey = key;
  }
  for (const spec of CHARTS) {
    const data = [stats.timestamps];
    let points = 0;
    for (const m of stats.models) {
      for (const [field] of spec.series) {
        data.push(m[field]);
        points += m[field].filter((v) => v !== null && v !== 0).length;
      }
    }
    state.charts[spec.id].setData(data);
    $(spec.id).dataset.points = String(points);
  }
  $("no-traffic").hidden = stats.models.length > 0;
}

window.addEventListener("resize", () => {
  for (const spec of CHARTS) {
    const chart = state.charts[spec.id];
    if (chart) chart.setSize(chartSize($(spec.id)));
  }
});

// -- the poll loop ---------------------------------------------------------------------------

async function poll() {
  // A newer call supersedes the loop of an older one: one timer at a time.
  const generation = ++state.generation;
  clearTimeout(state.timer);
  try {
    const admin = state.session && state.session.admin;
    const catalogDue = state.polls % CATALOG_EVERY === 0;
    state.polls += 1;
    // The status first and alone: its `in flight` should not count the console's own calls.
    const status = admin ? await api("GET", "/api/v1/status") : null;
    const [catalog, stats, jobs] = await Promise.all([
      catalogDue ? api("GET", "/api/v1/models?page_size=500") : Promise.resolve(null),
      api("GET", `/api/v1/stats?window=${state.window}`),
      api("GET", "/api/v1/jobs?page_size=10"),
    ]);
    state.status = status;
    if (catalog) state.catalog = catalog.data;
    renderServer();
    renderModels();
    renderStats(stats);
    renderJobs(jobs);
    if (!$("notice").classList.contains("bad")) notice("");
  } catch (err) {
    if (err.status === 401) {
      showLogin("Your session ended; sign in again.");
      return;
    }
    notice(`cannot reach the server: ${err.message}`, true);
  } finally {
    if (generation === state.generation && !$("console-view").hidden) state.timer = setTimeout(poll, POLL_MS);
  }
}

// -- session -----------------------------------------------------------------------------------

function showLogin(message) {
  clearTimeout(state.timer);
  $("console-view").hidden = true;
  $("login-view").hidden = false;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
  $("api-key").focus();
}

function showConsole() {
  const s = state.session;
  $("login-view").hidden = true;
  $("console-view").hidden = false;
  $("logout").hidden = !s.auth;
  $("who").textContent = s.auth ? `${s.name} (${s.admin ? "admin" : "infer"})` : "";
  state.polls = 0;
  poll();
}

async function start() {
  $("window").addEventListener("change", (event) => {
    state.window = Number(event.target.value);
    poll();
  });
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const field = $("api-key");
    try {
      state.session = await api("POST", "/ui/login", { api_key: field.value.trim() });
      field.value = "";
      showConsole();
    } catch (err) {
      showLogin(err.status === 401 || err.status === 422 ? "That API key is not valid." : err.message);
    }
  });
  $("logout").addEventListener("click", async () => {
    try {
      await api("POST", "/ui/logout");
    } finally {
      state.session = await api("GET", "/ui/session");
      showLogin("");
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !$("console-view").hidden) poll();
  });
  try {
    state.session = await api("GET", "/ui/session");
  } catch (err) {
    notice(`cannot reach the server: ${err.message}`, true);
    return;
  }
  if (state.session.auth && !state.session.signed_in) showLogin("");
  else showConsole();
}

document.addEventListener("DOMContentLoaded", start);
