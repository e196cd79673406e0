// pgml-tuned dashboard: plain JavaScript, no build step. Everything comes from the server's JSON endpoints and
// one server-sent event stream (/api/stream), which the server feeds after each LISTEN wake-up.
"use strict";

const COLORS = { loss: "#1f77b4", eval_loss: "#d62728" };
const METRIC_COLORS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
const KEY_METRICS = ["eval_accuracy", "eval_f1", "eval_loss", "train_loss"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

const state = {
  jobs: [],
  panels: { a: null, b: null },   // model ids shown
  curves: new Map(),              // model id -> {steps: Map(step -> {key: value}), keys: Set, rows: n}
  charts: { a: null, b: null },   // uPlot instances
  chartKeys: { a: "", b: "" },
  shownStatus: { a: null, b: null },
  stream: null,
  chosen: false,
};
window.dashboard = state;  // for the curious (and the browser test)

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function num(x) {
  if (x === null || x === undefined || x === "") return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  return Math.abs(x) >= 1000 ? x.toFixed(0) : x.toPrecision(4);
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

function keyMetric(metrics) {
  // retrieval jobs (text-embedding, text-ranking): their NDCG@10 is the key metric, whatever the evaluator named it
  const ndcg = Object.keys(metrics || {}).find((k) => k.startsWith("eval_") && /ndcg@10$/.test(k));
  for (const k of ndcg ? [ndcg] : KEY_METRICS) {
    if (metrics && typeof metrics[k] === "number") return `${k.replace(/^eval_/, "")} ${num(metrics[k])}`;
  }
  return "–";
}

// The job a link opens (#job=<id>: pgml.tune's NOTICE builds it from pgml.dashboard_url), read before the token
// is taken out of the address bar.
const jobInHash = () => Number(new URLSearchParams(location.hash.slice(1)).get("job")) || null;
let WANTED_JOB = jobInHash();
window.addEventListener("hashchange", () => {
  WANTED_JOB = jobInHash();
  const job = state.jobs.find((j) => j.id === WANTED_JOB);
  if (job) show("a", job.model_id);
});

// The access token: in the URL's fragment (#token=…, never sent to a server), kept in this origin's sessionStorage
// (its port included) and sent as a header; never a cookie, which every service on the host would receive.
const TOKEN = (() => {
  const given = new URLSearchParams(location.hash.slice(1)).get("token")
    || new URLSearchParams(location.search).get("token");
  if (given) {
    sessionStorage.setItem("pgml_tuned_token", given);
    history.replaceState(null, "", location.pathname);  // out of the address bar and the history
  }
  return sessionStorage.getItem("pgml_tuned_token") || "";
})();
const AUTH = { Authorization: `Bearer ${TOKEN}` };

async function getJSON(url, options) {
  const r = await fetch(url, { credentials: "omit", ...options, headers: AUTH });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

// ---- the jobs table ----------------------------------------------------------------------------------------

function renderJobs() {
  const tbody = document.querySelector("#jobs tbody");
  tbody.replaceChildren(...state.jobs.map((j) => {
    const pct = j.progress_pct ?? (j.status === "succeeded" ? 100 : 0);
    const cls = [j.model_id === state.panels.a ? "shown-a" : "", j.model_id === state.panels.b ? "shown-b" : ""];
    return el("tr", { "data-job": j.id, "data-status": j.status, class: cls.join(" ").trim() },
      el("td", { class: "num", title: `submitted by ${j.submitted_by}` }, j.id),
      el("td", {}, j.project),
      el("td", {}, el("span", { class: `kind ${j.kind}` }, j.kind), j.kind === "tune" ? ` ${j.task}` : null),
      el("td", {}, el("span", { class: `status ${j.status}`, title: j.error || "" }, j.status),
        j.attempt > 1 ? el("span", { class: "muted" }, ` try ${j.attempt}`) : null, whyFailed(j)),
      el("td", {}, el("span", { class: "bar" }, el("i", { style: `width:${Math.min(100, pct)}%` })),
        " ", j.step !== null ? `${j.step}/${j.max_steps ?? "?"}` : ""),
      el("td", { class: "num" }, num(j.last_loss)),
      el("td", {}, keyMetric(j.metrics)),
      el("td", { class: "num" }, j.model_id),
      el("td", {}, j.status === "running" ? duration(j.eta_seconds) : "–"),
      el("td", {}, j.kind !== "tune" ? null : [
        el("button", { title: "show in panel A", onclick: () => show("a", j.model_id) }, "A"), " ",
        el("button", { title: "show in panel B", onclick: () => show("b", j.model_id) }, "B")]));
  }));
  document.getElementById("no-jobs").hidden = state.jobs.length > 0;
  for (const slot of ["a", "b"]) renderPicker(slot);
}

// A failed job's error, and each failed attempt's (a job that was retried may have some while it runs or after
// it succeeded): text nodes only, like everything the page shows from the database.
function whyFailed(j) {
  const attempts = (j.errors || []).filter((e) => e.error);
  if (!j.error && !attempts.length) return null;
  return el("div", { class: "why" },
    j.error ? el("div", { class: "error job-error" }, j.error) : null,
    attempts.length ? el("details", { class: "attempt-errors" },
      el("summary", {}, `${attempts.length} failed attempt${attempts.length > 1 ? "s" : ""}`),
      el("ol", {}, attempts.map((e) => el("li", { class: "error" }, `attempt ${e.attempt}: ${e.error}`)))) : null);
}

function renderPicker(slot) {
  const select = document.querySelector(`#panel-${slot} .pick`);
  const options = [el("option", { value: "" }, "—")].concat(state.jobs.filter((j) => j.kind === "tune").map((j) =>
    el("option", { value: j.model_id }, `job ${j.id} · ${j.project} · model ${j.model_id} (${j.status})`)));
  select.replaceChildren(...options);
  select.value = state.panels[slot] === null ? "" : String(state.panels[slot]);
  select.onchange = () => show(slot, select.value === "" ? null : Number(select.value));
}

// ---- curves ------------------------------------------------------------------------------------------------

function curveKey(k, v) {
  if (typeof v !== "number" || !Number.isFinite(v)) return false;
  if (k === "loss" || k === "eval_loss") return true;
  return k.startsWith("eval_") && !/runtime|per_second|steps|epoch/.test(k);
}

function addRows(modelId, rows) {
  let c = state.curves.get(modelId);
  if (!c) { c = { steps: new Map(), keys: new Set(), rows: 0 }; state.curves.set(modelId, c); }
  for (const row of rows) {
    const l = row.logs || {};
    if (typeof l.step !== "number") continue;
    const point = c.steps.get(l.step) || {};
    for (const [k, v] of Object.entries(l)) {
      if (curveKey(k, v)) { point[k] = v; c.keys.add(k); }
    }
    c.steps.set(l.step, point);
    c.rows++;
  }
}

function chartData(c) {
  const steps = [...c.steps.keys()].sort((x, y) => x - y);
  const keys = [...c.keys].sort((x, y) => (x === "loss" ? -1 : y === "loss" ? 1 : x.localeCompare(y)));
  return { keys, data: [steps, ...keys.map((k) => steps.map((s) => c.steps.get(s)[k] ?? null))] };
}

function drawPanel(slot) {
  const panel = document.getElementById(`panel-${slot}`);
  const box = panel.querySelector(".chart");
  const modelId = state.panels[slot];
  const c = modelId === null ? null : state.curves.get(modelId);
  const { keys, data } = c ? chartData(c) : { keys: [], data: [[]] };
  const lossPoints = c ? [...c.steps.values()].filter((p) => "loss" in p).length : 0;
  panel.dataset.model = modelId ?? "";
  panel.dataset.points = String(lossPoints);
  panel.dataset.steps = String(data[0].length);
  const signature = `${modelId}|${keys.join(",")}`;
  if (state.charts[slot] && state.chartKeys[slot] === signature) {
    state.charts[slot].setData(data);
    return;
  }
  if (state.charts[slot]) state.charts[slot].destroy();
  state.charts[slot] = null;
  box.replaceChildren();
  state.chartKeys[slot] = signature;
  if (modelId === null) { box.append(el("p", { class: "muted" }, "Pick a model to show its curves.")); return; }
  let m = 0;
  const series = [{ label: "step" }].concat(keys.map((k) => {
    const metric = !(k in COLORS);
    return {
      label: k, scale: metric ? "metric" : "loss", stroke: metric ? METRIC_COLORS[m++ % METRIC_COLORS.length] : COLORS[k],
      width: 1.5, spanGaps: true, points: { show: k !== "loss" }, value: (u, v) => num(v),
    };
  }));
  const axes = [{ label: "step" }, { scale: "loss", label: "loss" }];
  if (keys.some((k) => !(k in COLORS))) axes.push({ scale: "metric", side: 1, label: "eval metric", grid: { show: false } });
  state.charts[slot] = new uPlot({
    width: Math.max(300, box.clientWidth), height: 260, series, axes,
    scales: { x: { time: false }, metric: { range: (u, lo, hi) => [Math.min(0, lo), Math.max(1, hi)] } },
    legend: { live: true },
  }, data, box);
}

async function loadDetails(slot) {
  const panel = document.getElementById(`panel-${slot}`);
  const box = panel.querySelector(".details");
  const title = panel.querySelector(".title");
  const modelId = state.panels[slot];
  if (modelId === null) { box.replaceChildren(); title.textContent = ""; return; }
  let m;
  try {
    m = await getJSON(`/api/models/${modelId}`);
  } catch (e) {
    box.replaceChildren(el("p", { class: "error" }, e.message));
    return;
  }
  if (state.panels[slot] !== modelId) return;  // changed meanwhile
  title.textContent = `${m.project} · ${m.model_name}${m.base_model ? " on " + m.base_model : ""} · ${m.status}`;
  const metrics = Object.entries(m.metrics || {}).filter(([, v]) => typeof v === "number").sort();
  const files = m.files || [];
  const total = files.reduce((s, f) => s + f.bytes, 0);
  box.replaceChildren(
    el("div", {}, el("h3", {}, "metrics"), metrics.length
      ? el("table", { class: "metrics" }, metrics.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", { class: "num" }, num(v)))))
      : el("p", { class: "muted" }, m.status === "in_progress" ? "when it finishes" : "none")),
    el("div", {}, el("h3", {}, files.length ? `files (${files.length}, ${bytes(total)})` : "files"), files.length
      ? el("table", { class: "files" }, files.map((f) => el("tr", {}, el("td", {}, f.path), el("td", { class: "num" }, bytes(f.bytes)))))
      : el("p", { class: "muted" }, m.status === "in_progress" ? "stored when it finishes" : "none")));
}

// ---- choosing what to show, and the live stream -----------------------------------------------------------

function show(slot, modelId) {
  state.panels[slot] = modelId;
  state.shownStatus[slot] = null;
  renderJobs();
  openStream();
  drawPanel(slot);
  loadDetails(slot);
}

// EventSource sends no header: each connection of the stream gets a single-use ticket (POST /api/ticket), and a
// dropped one opens again with a new ticket
let streamGeneration = 0;

async function openStream() {
  const generation = ++streamGeneration;
  if (state.stream) { state.stream.close(); state.stream = null; }
  const live = document.getElementById("live");
  let ticket;
  try {
    ticket = (await getJSON("/api/ticket", { method: "POST" })).ticket;
  } catch (e) {
    live.textContent = "reconnecting…"; live.classList.add("off");
    setTimeout(() => { if (generation === streamGeneration) openStream(); }, 2000);
    return;
  }
  if (generation !== streamGeneration) return;  // another one was asked for meanwhile
  const models = [...new Set([state.panels.a, state.panels.b].filter((m) => m !== null))];
  for (const m of models) state.curves.delete(m);  // the stream sends every row again
  const es = new EventSource(`/api/stream?models=${models.join(",")}&ticket=${encodeURIComponent(ticket)}`);
  state.stream = es;
  es.onopen = () => { live.textContent = "live"; live.classList.remove("off"); };
  es.onerror = () => {
    live.textContent = "reconnecting…"; live.classList.add("off");
    es.close();  // its own retry would present the spent ticket again
    setTimeout(() => { if (generation === streamGeneration) openStream(); }, 2000);
  };
  es.addEventListener("jobs", (e) => {
    state.jobs = JSON.parse(e.data);
    if (!state.chosen) {
      state.chosen = true;
      const models = state.jobs.filter((j) => j.kind === "tune");
      const first = models.find((j) => j.id === WANTED_JOB)
        || models.find((j) => j.status === "running") || models[0];
      if (first) { show("a", first.model_id); return; }
    }
    renderJobs();
    for (const slot of ["a", "b"]) {
      const job = state.jobs.find((j) => j.model_id === state.panels[slot]);
      if (job && job.status !== state.shownStatus[slot]) {
        state.shownStatus[slot] = job.status;
        loadDetails(slot);
      }
    }
  });
  es.addEventListener("logs", (e) => {
    const { model_id: modelId, rows } = JSON.parse(e.data);
    addRows(modelId, rows);
    for (const slot of ["a", "b"]) if (state.panels[slot] === modelId) drawPanel(slot);
  });
}

window.addEventListener("resize", () => {
  for (const slot of ["a", "b"]) {
    const chart = state.charts[slot];
    if (chart) chart.setSize({ width: Math.max(300, document.querySelector(`#panel-${slot} .chart`).clientWidth), height: 260 });
  }
});

getJSON("/api/whoami").then((w) => { document.getElementById("viewer").textContent = `as ${w.viewer}`; });
drawPanel("a");
drawPanel("b");
openStream();
