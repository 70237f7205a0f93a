// The router's web console: one page per #hash, each reading the admin API with the session
// cookie (and its CSRF token on state-changing calls). No framework, no build step.
"use strict";

const state = { csrf: null, page: null, timer: null, logOffset: 0, logTotal: 0, config: null };
const PAGE_SIZE = 50;
const $ = (selector) => document.querySelector(selector);

// ---- the admin API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function errorText(body, status) {
  const error = body && body.error;
  if (error && typeof error === "object" && error.message) return error.message;
  return `HTTP ${status}`;
}

async function api(path, { method = "GET", json } = {}) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (method !== "GET") options.headers["X-CSRF-Token"] = state.csrf || "";
  if (json !== undefined) {
    options.body = JSON.stringify(json);
    options.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (response.status === 401 && path !== "/ui/login") {
    showLogin(errorText(body, 401));
  }
  if (!response.ok) throw new ApiError(response.status, errorText(body, response.status));
  return body;
}

function showBanner(message) {
  const banner = $("#banner");
  banner.textContent = message || "";
  banner.hidden = !message;
}

// ---- formatting ------------------------------------------------------------------------------

const fmtNum = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));
const fmtMs = (ms) => (ms === null || ms === undefined ? "–" : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`);
const fmtCost = (c) => (c === null || c === undefined ? "–" : `$${Number(c).toFixed(4)}`);

// A client's spend against each budget it has ("$0.0012 / $5.0000 today"), from GET /admin/spend.
function budgetText(entry) {
  const parts = [];
  for (const [period, label] of [["today", "today"], ["this_month", "this month"]]) {
    const spent = entry && entry[period];
    for (const unit of Object.keys((spent && spent.budget) || {})) {
      const fmt = unit === "usd" ? fmtCost : fmtNum;
      parts.push(`${fmt(spent[unit])} / ${fmt(spent.budget[unit])} ${label}`);
    }
  }
  return parts.length ? parts.join(", ") : "none";
}
const fmtTime = (ts) => new Date(ts * 1000).toLocaleTimeString("en-GB");

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined || text === "" ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

function fillTable(selector, rows, toCells, emptyText) {
  const body = $(`${selector} tbody`);
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.append(...toCells(row));
    body.append(tr);
  }
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(emptyText || "Nothing yet.");
    td.colSpan = $(`${selector} thead tr`).children.length;
    tr.append(td);
    body.append(tr);
  }
}

// The provider that answered, after the ones tried before it (retries and fallbacks).
function route(r) {
  return r.attempts.includes(",") ? r.attempts.split(",").join(" → ") : r.provider;
}

function statusClass(status) {
  return status >= 400 ? "num status-err" : "num";
}

// ---- charts (inline SVG) ---------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

// lines: [{values: [number|null], color}]; draws each as a polyline over a shared scale.
function lineChart(container, lines, label) {
  const width = 300, height = 120, pad = 4;
  const all = lines.flatMap((l) => l.values.filter((v) => v !== null));
  const max = Math.max(1e-9, ...all);
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height + 14}`, role: "img", "aria-label": label });
  svg.append(svgEl("line", { x1: 0, y1: height, x2: width, y2: height, stroke: "#d9dde4" }));
  for (const line of lines) {
    const n = line.values.length;
    const points = line.values
      .map((v, i) => (v === null ? null : `${(i / Math.max(1, n - 1)) * width},${height - pad - (v / max) * (height - 2 * pad)}`))
      .filter(Boolean)
      .join(" ");
    svg.append(svgEl("polyline", { points, fill: "none", stroke: line.color, "stroke-width": 2 }));
    // Dots for a series with gaps (latency of empty buckets): a lone point draws no line.
    if (!line.values.includes(null)) continue;
    for (const point of points.split(" ").filter(Boolean)) {
      const [cx, cy] = point.split(",");
      svg.append(svgEl("circle", { cx, cy, r: 2.5, fill: line.color }));
    }
  }
  const text = svgEl("text", { x: 2, y: height + 12, "font-size": 10, fill: "#5b6575" });
  text.textContent = `max ${max < 10 ? max.toFixed(2) : Math.round(max)}`;
  svg.append(text);
  container.replaceChildren(svg);
}

function barChart(container, values, color, label) {
  const width = 300, height = 120;
  const max = Math.max(1, ...values);
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height + 14}`, role: "img", "aria-label": label });
  const w = width / values.length;
  values.forEach((v, i) => {
    const h = (v / max) * (height - 4);
    svg.append(svgEl("rect", { x: i * w + 1, y: height - h, width: Math.max(1, w - 2), height: h, fill: color }));
  });
  const text = svgEl("text", { x: 2, y: height + 12, "font-size": 10, fill: "#5b6575" });
  text.textContent = `max ${Math.round(max)}`;
  svg.append(text);
  container.replaceChildren(svg);
}

// ---- pages -----------------------------------------------------------------------------------

async function loadConfig() {
  state.config = await api("/admin/config");
  return state.config;
}

async function activeKeys() {
  const { keys } = await api("/admin/keys");
  return `${keys.filter((k) => k.state === "active").length} / ${keys.length}`;
}

const pages = {
  overview: {
    every: 2000,
    async load() {
      $("#t-keys").textContent = await activeKeys();
      const s = await api(`/admin/stats?window_s=${$("#window").value}`);
      const width = s.window_s / s.series.length;
      $("#t-rps").textContent = s.rps.toFixed(2);
      $("#t-errors").textContent = `${fmtNum(s.errors)} of ${fmtNum(s.requests)}`;
      $("#t-p50").textContent = fmtMs(s.latency_ms.p50);
      $("#t-p95").textContent = fmtMs(s.latency_ms.p95);
      $("#t-tokens").textContent = `${fmtNum(s.tokens.input)} / ${fmtNum(s.tokens.output)}`;
      $("#t-spend").textContent = fmtCost(s.cost);
      lineChart($("#chart-requests"), [
        { values: s.series.map((b) => b.requests / width), color: "#2456c7" },
        { values: s.series.map((b) => (b.errors || 0) / width), color: "#b3261e" },
      ], "Requests per second over the window");
      lineChart($("#chart-latency"), [{ values: s.series.map((b) => b.latency_ms), color: "#1d7a3a" }], "Mean latency over the window");
      barChart($("#chart-tokens"), s.series.map((b) => b.tokens || 0), "#7a4cc2", "Tokens over the window");
    },
  },

  providers: {
    every: 1000,
    async load() {
      const { keys } = await api("/admin/keys");
      const body = $("#keys-table tbody");
      const now = Date.now() / 1000;
      for (const key of keys) {
        let row = body.querySelector(`tr[data-id="${CSS.escape(key.id)}"]`);
        if (!row) {
          row = document.createElement("tr");
          row.dataset.id = key.id;
          for (let i = 0; i < 9; i++) row.append(document.createElement("td"));
          body.append(row);
        }
        const cells = row.children;
        cells[0].textContent = key.id;
        cells[1].textContent = key.masked;
        cells[2].replaceChildren(stateBadge(key.state));
        cells[3].textContent = key.reason || "–";
        cells[4].textContent = key.until ? `${Math.max(0, Math.ceil(key.until - now))} s` : "–";
        for (const [i, name] of [[5, "in_flight"], [6, "requests"], [7, "failures"]]) {
          cells[i].textContent = key[name];
          cells[i].className = "num";
        }
        // The action cell is rebuilt only when it changes, so a reason being typed survives.
        const disabled = key.state === "disabled";
        if (row.dataset.disabled !== String(disabled)) {
          row.dataset.disabled = String(disabled);
          cells[8].replaceChildren(keyActions(key, disabled));
        }
      }
    },
  },

  models: {
    every: 5000,
    async load() {
      const config = await loadConfig();
      fillTable("#models-table", Object.entries(config.models), ([alias, targets]) => [
        cell(alias),
        cell(targets.map((t) => `${t.provider}/${t.model}`).join(" → ")),
      ]);
      const stats = await api("/admin/stats?window_s=300");
      fillTable("#routes-table", stats.models, (m) => [
        cell(m.model), cell(m.provider), cell(fmtNum(m.requests), "num"), cell(fmtNum(m.errors), "num"),
        cell(fmtNum(m.input_tokens), "num"), cell(fmtNum(m.output_tokens), "num"),
      ]);
      const { requests } = await api("/admin/requests?limit=15");
      fillTable("#decisions-table", requests, (r) => [
        cell(fmtTime(r.ts)), cell(r.model), cell(r.attempts.split(",").filter(Boolean).join(" → ")),
        cell(r.provider), cell(r.rule), cell(r.status, statusClass(r.status)),
      ]);
    },
  },

  clients: {
    every: 5000,
    async load() {
      const config = await loadConfig();
      const [stats, spend] = await Promise.all([api("/admin/stats?window_s=300"), api("/admin/spend")]);
      const seen = new Map(stats.clients.map((c) => [c.client || "(no key)", c]));
      const rows = config.auth.client_keys.map((c) => ({ name: c.name, models: c.models.join(", "), ...(seen.get(c.name) || {}) }));
      for (const [name, c] of seen) {
        if (!rows.some((r) => r.name === name)) rows.push({ name, models: name === "console" ? "all (admin)" : "–", ...c });
      }
      fillTable("#clients-table", rows, (r) => [
        cell(r.name), cell(r.models), cell(fmtNum(r.requests || 0), "num"), cell(fmtNum(r.errors || 0), "num"),
        cell(fmtNum(r.input_tokens || 0), "num"), cell(fmtNum(r.output_tokens || 0), "num"),
        cell(fmtCost(r.cost), "num"), cell(budgetText(spend.clients[r.name]), "num"),
        cell(r.last_ts ? fmtTime(r.last_ts) : "–"),
      ]);
    },
  },

  requests: {
    async load() {
      const params = new URLSearchParams(new FormData($("#log-filters")));
      for (const [k, v] of [...params]) if (!v) params.delete(k);
      params.set("limit", PAGE_SIZE);
      params.set("offset", state.logOffset);
      const page = await api(`/admin/requests?${params}`);
      state.logTotal = page.total;
      const last = Math.min(page.total, state.logOffset + page.requests.length);
      $("#log-count").textContent = page.total ? `Requests ${state.logOffset + 1}–${last} of ${page.total}` : "No request matches.";
      $("#log-prev").disabled = state.logOffset === 0;
      $("#log-next").disabled = last >= page.total;
      fillTable("#log-table", page.requests, (r) => [
        cell(fmtTime(r.ts)), cell(r.client), cell(r.model), cell(route(r)), cell(r.rule),
        cell(r.status, statusClass(r.status)), cell(fmtMs(r.latency_ms), "num"),
        cell(`${r.input_tokens} / ${r.output_tokens}`, "num"), cell(fmtCost(r.cost), "num"),
        cell(r.error || r.request_id),
      ], "No request matches.");
      $("#log-table tbody").querySelectorAll("tr").forEach((tr, i) => {
        const r = page.requests[i];
        if (!r) return;
        tr.className = "clickable";
        tr.tabIndex = 0;
        tr.setAttribute("aria-label", `Details of request ${r.request_id}`);
        const open = () => showRequest(r.id);
        tr.addEventListener("click", open);
        tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
      });
    },
  },

  playground: {
    async load() {
      const config = await loadConfig();
      const select = $("#chat-model");
      const chosen = select.value;
      select.replaceChildren(...Object.keys(config.models).map((m) => new Option(m, m)));
      if (chosen) select.value = chosen;
    },
  },

  config: {
    async load() {
      $("#config-body").textContent = JSON.stringify(await loadConfig(), null, 2);
    },
  },
};

function stateBadge(name) {
  const span = document.createElement("span");
  span.className = `state state-${name}`;
  span.textContent = name;
  return span;
}

function keyActions(key, disabled) {
  const wrap = document.createElement("div");
  wrap.className = "actions";
  if (disabled) {
    const enable = document.createElement("button");
    enable.type = "button";
    enable.textContent = "Enable";
    enable.setAttribute("aria-label", `Enable ${key.id}`);
    enable.addEventListener("click", () => keyAction(key.id, "enable"));
    wrap.append(enable);
    return wrap;
  }
  const reason = document.createElement("input");
  reason.placeholder = "reason";
  reason.setAttribute("aria-label", `Reason to disable ${key.id}`);
  const disable = document.createElement("button");
  disable.type = "button";
  disable.className = "secondary";
  disable.textContent = "Disable";
  disable.setAttribute("aria-label", `Disable ${key.id}`);
  disable.addEventListener("click", () => keyAction(key.id, "disable", reason.value));
  wrap.append(reason, disable);
  return wrap;
}

async function keyAction(id, action, reason) {
  try {
    await api(`/admin/keys/${encodeURI(id)}/${action}`, { method: "POST", json: action === "disable" ? { reason } : {} });
    await pages.providers.load();
    showBanner("");
  } catch (err) {
    showBanner(err.message);
  }
}

async function showRequest(id) {
  const row = await api(`/admin/requests/${id}`);
  $("#log-detail-id").textContent = row.request_id;
  $("#log-detail-body").textContent = JSON.stringify(row, null, 2);
  $("#log-detail").hidden = false;
  $("#log-detail").scrollIntoView({ block: "nearest" });
}

// ---- the playground --------------------------------------------------------------------------

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function showMeta(entries) {
  const dl = $("#chat-meta");
  dl.replaceChildren();
  for (const [name, value] of entries) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.dataset.field = name;
    dl.append(dt, dd);
  }
}

async function chat(event) {
  event.preventDefault();
  const form = event.target;
  const answer = $("#chat-answer");
  const send = $("#chat-send");
  const prompt = form.prompt.value;
  const file = form.image.files[0];
  const content = file
    ? [{ type: "text", text: prompt }, { type: "image_url", image_url: { url: await readImage(file) } }]
    : prompt;
  answer.textContent = "";
  showMeta([["Status", "sending…"]]);
  send.disabled = true;
  const started = performance.now();
  let firstToken = null;
  try {
    const response = await fetch("/ui/api/chat/completions", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf || "" },
      body: JSON.stringify({ model: form.model.value, stream: true, messages: [{ role: "user", content }] }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new ApiError(response.status, errorText(body, response.status));
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const ev of events) {
        const data = ev.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, errorText(chunk, 500));
        const text = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (text) {
          if (firstToken === null) firstToken = performance.now() - started;
          answer.textContent += text;
        }
      }
    }
    const total = performance.now() - started;
    const meta = [["Time to first token", fmtMs(firstToken)], ["Total", fmtMs(total)]];
    showMeta([["Provider", "…"], ...meta]);
    const logged = await loggedRequest(response.headers.get("x-request-id"));
    showMeta([
      ["Provider", logged ? logged.provider || "–" : "not in the log yet"],
      ["Attempts", logged ? logged.attempts.split(",").join(" → ") || "–" : "–"],
      ...meta,
      ["Router latency", logged ? fmtMs(logged.latency_ms) : "–"],
      ["Tokens in / out", logged ? `${logged.input_tokens} / ${logged.output_tokens}` : "–"],
      ["Request id", response.headers.get("x-request-id") || "–"],
    ]);
  } catch (err) {
    showMeta([["Error", err.message]]);
  } finally {
    send.disabled = false;
  }
}

// The request log has the request once its buffer is flushed (about every half second).
async function loggedRequest(requestId) {
  for (let i = 0; requestId && i < 10; i++) {
    try {
      const { requests } = await api(`/admin/requests?request_id=${encodeURIComponent(requestId)}`);
      if (requests.length) return requests[0];
    } catch (err) {
      return null; // the store is unavailable: the banner of other pages says so
    }
    await new Promise((r) => setTimeout(r, 300));
  }
  return null;
}

// ---- navigation and login --------------------------------------------------------------------

function hidePages() {
  document.querySelectorAll("main > section").forEach((s) => { s.hidden = true; });
  clearInterval(state.timer);
}

function showLogin(message) {
  hidePages();
  state.csrf = null;
  $("#nav").hidden = true;
  $("#page-login").hidden = false;
  $("#login-error").textContent = message && message !== "not logged in" ? message : "";
  $("#admin-key").focus();
}

async function refresh(name) {
  try {
    await pages[name].load();
    showBanner("");
  } catch (err) {
    if (err.status !== 401) showBanner(err.message);
  }
}

function showPage() {
  if (!state.csrf) return;
  const name = (location.hash || "#overview").slice(1);
  const page = pages[name] ? name : "overview";
  hidePages();
  state.page = page;
  $("#nav").hidden = false;
  $("#page-login").hidden = true;
  $(`#page-${page}`).hidden = false;
  document.querySelectorAll("#nav a").forEach((a) => {
    if (a.getAttribute("href") === `#${page}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  refresh(page);
  if (pages[page].every) state.timer = setInterval(() => refresh(page), pages[page].every);
}

async function login(event) {
  event.preventDefault();
  try {
    const session = await api("/ui/login", { method: "POST", json: { admin_key: $("#admin-key").value } });
    state.csrf = session.csrf;
    $("#admin-key").value = "";
    showPage();
    $("#main").focus();
  } catch (err) {
    $("#login-error").textContent = err.message;
  }
}

async function start() {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", async () => {
    await api("/ui/logout", { method: "POST" }).catch(() => {});
    showLogin("");
  });
  $("#log-filters").addEventListener("submit", (e) => {
    e.preventDefault();
    state.logOffset = 0;
    refresh("requests");
  });
  $("#log-prev").addEventListener("click", () => { state.logOffset = Math.max(0, state.logOffset - PAGE_SIZE); refresh("requests"); });
  $("#log-next").addEventListener("click", () => { state.logOffset += PAGE_SIZE; refresh("requests"); });
  $("#chat-form").addEventListener("submit", chat);
  $("#window").addEventListener("change", () => refresh("overview"));
  $("#reload").addEventListener("click", async () => {
    const result = $("#reload-result");
    try {
      const body = await api("/admin/reload", { method: "POST" });
      result.className = "";
      result.textContent = `Reloaded; providers added or rebuilt: ${body.providers_changed.join(", ") || "none"}`;
      await pages.config.load();
    } catch (err) {
      result.className = "error";
      result.textContent = err.message;
    }
  });
  window.addEventListener("hashchange", showPage);
  try {
    state.csrf = (await api("/ui/api/session")).csrf;
    showPage();
  } catch (err) {
    showLogin(err.status === 401 ? "" : err.message);
  }
}

document.addEventListener("DOMContentLoaded", start);
