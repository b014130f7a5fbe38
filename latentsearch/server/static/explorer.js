// latentsearch explorer: sliders for z, the decoded image of z and the nearest items, all from this
// server's HTTP API (/api/v1, see /openapi.json). No library, nothing loaded from other hosts.
"use strict";

const API = "/api/v1";
const DEBOUNCE_MS = 40;
const DEFAULT_RANGE = [-5, 5]; // slider range when the index has no latent diagnostics
const state = { info: null, names: [], sliders: [], items: new Map(), token: sessionStorage.getItem("latentsearch-token") || "" };
const $ = (id) => document.getElementById(id);

class HttpError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error ? body.error.code : "";
  }
}

async function call(path, { body, png = false } = {}) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const reply = await fetch(API + path, { method: body === undefined ? "GET" : "POST", headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!reply.ok) {
    const err = new HttpError(reply.status, await reply.json().catch(() => null));
    if (reply.status === 401) $("token-form").hidden = false;
    throw err;
  }
  return png ? reply.blob() : reply.json();
}

// One widget's updates: debounced, and never more than one request in flight; changes made while
// one runs are answered by one more run with the latest z when it ends.
class Widget {
  constructor(run) { this.run = run; this.timer = 0; this.busy = false; this.again = false; }
  request() { clearTimeout(this.timer); this.timer = setTimeout(() => this.fire(), DEBOUNCE_MS); }
  async fire() {
    if (this.busy) { this.again = true; return; }
    this.busy = true;
    try { await this.run(); setStatus(""); } catch (err) { setStatus(err.message); }
    finally {
      this.busy = false;
      if (this.again) { this.again = false; this.fire(); }
    }
  }
}

function setStatus(text) { $("status").textContent = text; }
function currentZ() { return state.sliders.map((s) => parseFloat(s.value)); }
function selectedLabels() {
  const box = $("labels");
  const text = box.querySelector("input[type=text]");
  if (text) return text.value.split(/[ ,]+/).filter(Boolean).map(Number);
  return [...box.querySelectorAll("input:checked")].map((c) => Number(c.value));
}
function labelName(label) {
  if (label === undefined || label === null) return "";
  return state.names[label] !== undefined ? state.names[label] : `label ${label}`;
}

// -- sliders ----------------------------------------------------------------------------------
function buildSliders(info) {
  const d = info.latent_dim;
  const diag = info.diagnostics;
  const hasRanges = diag && diag.mean_p01 && diag.mean_p01.length === d;
  const box = $("sliders");
  box.textContent = "";
  state.sliders = [];
  for (let i = 0; i < d; i++) {
    let [lo, hi] = DEFAULT_RANGE;
    if (hasRanges) {
      const pad = Math.max(0.1 * (diag.mean_p99[i] - diag.mean_p01[i]), 0.25);
      lo = diag.mean_p01[i] - pad; hi = diag.mean_p99[i] + pad;
    }
    const row = document.createElement("div");
    row.className = "dim";
    const input = Object.assign(document.createElement("input"), { type: "range", min: String(lo), max: String(hi), step: "any", id: `z-${i}` });
    input.className = "zslider";
    input.dataset.dim = String(i);
    input.value = String(Math.min(hi, Math.max(lo, 0)));
    const label = Object.assign(document.createElement("label"), { htmlFor: input.id, textContent: `z${i}` });
    const out = document.createElement("output");
    row.append(label, input, out);
    if (diag && diag.active && diag.active.length === d && !diag.active[i]) {
      row.classList.add("collapsed");
      const note = Object.assign(document.createElement("span"), { className: "badge", textContent: `collapsed: KL ${diag.kl[i].toFixed(3)} nats` });
      row.title = "this dimension carries almost no information about the items";
      row.append(note);
    }
    input.addEventListener("input", () => { showValues(); update(); });
    box.append(row);
    state.sliders.push(input);
  }
  showValues();
}

function showValues() {
  for (const s of state.sliders) s.parentElement.querySelector("output").textContent = parseFloat(s.value).toFixed(2);
}

function setZ(values) {
  state.sliders.forEach((s, i) => { s.value = String(values[i]); }); // the browser clamps to the range
  showValues();
  update();
}

// -- widgets ----------------------------------------------------------------------------------
const image = new Widget(async () => {
  const z = currentZ();
  const img = $("decoded");
  try {
    const blob = await call("/decode?format=png", { body: { z }, png: true });
    const old = img.src;
    img.src = URL.createObjectURL(blob);
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
    img.dataset.z = JSON.stringify(z);
    $("decode-note").hidden = true;
  } catch (err) {
    if (err.code !== "FAILED_PRECONDITION") throw err;
    img.removeAttribute("src");
    Object.assign($("decode-note"), { hidden: false, textContent: err.message });
  }
});

const neighbours = new Widget(async () => {
  const z = currentZ();
  const labels = selectedLabels();
  const k = Number($("k").value);
  const answer = await call("/nearest", { body: { z, k, labels, with_probability: true } });
  if (state.info && answer.index_version !== state.info.index_version) await loadInfo(false);
  const list = $("neighbours");
  const rows = await Promise.all(answer.neighbors.map((n) => neighbourRow(n, answer.index_version)));
  list.replaceChildren(...rows);
  // Typicality is of z itself, against every item (the server gives none under a label filter).
  const whole = labels.length ? await call("/nearest", { body: { z, k: 1, with_probability: true } }) : answer;
  list.dataset.z = JSON.stringify(z);
  list.dataset.version = answer.index_version;
  showTypicality(whole);
});

function update() { image.request(); neighbours.request(); }

async function item(id, version) {
  const key = `${version}\u0000${id}`;
  if (!state.items.has(key)) state.items.set(key, call(`/item?id=${encodeURIComponent(id)}`).catch((err) => { state.items.delete(key); throw err; }));
  return state.items.get(key);
}

async function neighbourRow(n, version) {
  const li = document.createElement("li");
  li.dataset.id = n.id;
  const data = await item(n.id, version).catch(() => null);
  let thumb;
  if (data && data.thumbnail_png) {
    thumb = Object.assign(document.createElement("img"), { src: `data:image/png;base64,${data.thumbnail_png}`, alt: n.id });
  } else {
    thumb = Object.assign(document.createElement("div"), { className: "nothumb" });
  }
  const who = document.createElement("div");
  who.className = "who";
  const name = n.label_name !== undefined ? n.label_name : labelName(n.label);
  who.append(name || "item", Object.assign(document.createElement("span"), { className: "id", textContent: n.id }));
  const score = document.createElement("div");
  score.className = "score";
  const p = n.probability === undefined ? null : Number(n.probability);
  score.textContent = `log q(z|x) ${Number(n.log_likelihood).toFixed(2)}` + (p === null ? "" : `  ·  p(i|z) ${formatP(p)}`);
  const bar = Object.assign(document.createElement("div"), { className: "prob", title: "match probability p(i|z)" });
  bar.style.width = p === null ? "0" : `${Math.max(0.5, 100 * p).toFixed(1)}%`;
  li.dataset.logLikelihood = String(n.log_likelihood);
  if (p !== null) li.dataset.probability = String(p);
  li.append(thumb, who, score, bar);
  li.addEventListener("click", async () => {
    try { setZ((await item(n.id, version)).mean); } catch (err) { setStatus(err.message); }
  });
  return li;
}

function formatP(p) { return p >= 0.001 ? p.toFixed(3) : p.toExponential(1); }

function showTypicality(answer) {
  const t = answer.typicality === undefined ? null : Number(answer.typicality);
  const logq = answer.log_qz === undefined ? "" : `log q(z) = ${Number(answer.log_qz).toFixed(2)}`;
  $("typicality-bar").style.left = t === null ? "0" : `calc(${(100 * t).toFixed(1)}% - 1px)`;
  $("typicality-bar").hidden = t === null;
  const verdict = t === null ? "typicality n/a" : `typicality ${(100 * t).toFixed(1)}%` + (t < 0.01 ? ": far from every item" : "");
  $("typicality").textContent = [verdict, logq].filter(Boolean).join("  ·  ");
  $("gauge").dataset.typicality = t === null ? "" : String(t);
}

// -- buttons, filter, token -----------------------------------------------------------------------
function gaussian() {
  let u = 0;
  while (u === 0) u = Math.random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * Math.random());
}

function buildFilter(info) {
  const box = $("labels");
  box.textContent = "";
  if (state.names.length) {
    state.names.forEach((name, i) => {
      const label = document.createElement("label");
      const check = Object.assign(document.createElement("input"), { type: "checkbox", value: String(i) });
      check.addEventListener("change", () => neighbours.request());
      label.append(check, ` ${name}`);
      box.append(label);
    });
  } else {
    const text = Object.assign(document.createElement("input"), { type: "text", placeholder: "labels, e.g. 3,4 (empty: all)" });
    text.addEventListener("change", () => neighbours.request());
    box.append(text);
  }
}

async function loadInfo(rebuild) {
  const info = await call("/info");
  state.info = info;
  state.names = info.label_names || [];
  state.items.clear();
  $("version").textContent = `version ${info.index_version}`;
  $("version").dataset.version = info.index_version;
  $("items").textContent = `${info.item_count} items · d = ${info.latent_dim}`;
  if (rebuild || state.sliders.length !== info.latent_dim) { buildSliders(info); buildFilter(info); }
}

async function start() {
  try {
    await loadInfo(true);
    update();
  } catch (err) { setStatus(err.message); }
}

$("random-item").addEventListener("click", async () => {
  const labels = selectedLabels();
  try { setZ((await call(`/item/random${labels.length ? `?labels=${labels.join(",")}` : ""}`)).mean); } catch (err) { setStatus(err.message); }
});
$("random-prior").addEventListener("click", () => setZ(state.sliders.map(() => gaussian())));
$("zero").addEventListener("click", () => setZ(state.sliders.map(() => 0)));
$("k").addEventListener("change", () => neighbours.request());
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value;
  sessionStorage.setItem("latentsearch-token", state.token);
  $("token-form").hidden = true;
  start();
});
start();
