// jaxgpt explore: draws what the server computed (one forward pass per request); nothing here
// computes the model. The only arithmetic is the sampling filter on the returned candidates'
// logits (temperature, top-k, top-p, in the order and semantics of jaxgpt/sampling.py).
"use strict";

const $ = (id) => document.getElementById(id);
// One page session: the server keeps this page's sequence and KV cache ("next token" extends it
// by one token) and its chat conversation under this id.
const session = (crypto.randomUUID ? crypto.randomUUID() :
  Array.from({ length: 4 }, () => Math.random().toString(36).slice(2, 10)).join("-"));
const explorer = { info: null, data: null, drawn: null, position: 0, seed: 0, updates: 0, session };
window.explorer = explorer;

// ------------------------------------------------------------------ talking to the server

async function api(path, body) {
  const response = await post(path, body);
  let data;
  try { data = await response.json(); } catch { data = { error: `server answered ${response.status}` }; }
  if (!response.ok) throw new Error(data.error || `server answered ${response.status}`);
  return data;
}

function post(path, body) {  // GET without a body; every POST names the page session
  return fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ session, ...body }),
  });
}

function showError(message) {  // one line for the page; undefined hides it
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function run(task) {
  const started = performance.now();
  document.body.dataset.state = "busy";
  $("status").textContent = "computing…";
  try {
    await task();
    explorer.lastMs = performance.now() - started;  // request, JSON and drawing
    showError();
    document.body.dataset.state = "ready";
    $("status").textContent = "";
  } catch (err) {
    showError(err.message);
    document.body.dataset.state = "error";
    $("status").textContent = "";
  }
}

// ------------------------------------------------------------------ colours

function blues(w) {  // 0 → white, 1 → dark blue
  const t = Math.sqrt(Math.max(0, Math.min(1, w)));
  return `rgb(${Math.round(247 - 239 * t)},${Math.round(251 - 203 * t)},${Math.round(255 - 148 * t)})`;
}
function diverging(v) {  // -1 blue, 0 white, +1 red
  const t = Math.min(1, Math.abs(v));
  const c = Math.round(255 * (1 - t));
  return v >= 0 ? `rgb(255,${c},${c})` : `rgb(${c},${c},255)`;
}

// ------------------------------------------------------------------ 1. tokens

function drawTokens() {
  const { tokens } = explorer.data;
  $("tokens-shape").textContent = `${tokens.length} tokens, ids [1, ${tokens.length}]`;
  const box = $("tokens");
  box.replaceChildren();
  tokens.forEach((tok, i) => {
    const chip = document.createElement("span");
    chip.className = "tok" + (i === explorer.position ? " selected" : "");
    chip.dataset.id = tok.id;
    chip.dataset.pos = i;
    chip.title = `position ${i}\npiece ${tok.piece}\nid ${tok.id}\nbytes ${tok.bytes}`;
    chip.append(tok.piece.slice(1, -1).replace(/\\n/g, "↵") || " ");
    const sub = document.createElement("sub");
    sub.textContent = tok.id;
    chip.append(sub);
    chip.addEventListener("click", () => selectPosition(i));
    box.append(chip);
  });
}

function shadeTokens(weights) {  // weights[j] for keys j; undefined: back to normal
  document.querySelectorAll("#tokens .tok").forEach((chip, j) => {
    chip.style.background = weights && j < weights.length ? blues(weights[j]) : "";
    chip.style.color = weights && weights[j] > 0.5 ? "white" : "";
  });
}

// ------------------------------------------------------------------ 2. embeddings

function drawEmbeddings() {
  const rows = explorer.data.embeddings;
  const canvas = $("embeddings");
  const D = rows[0].length, rowH = 10;
  canvas.width = Math.min(768, D * Math.max(1, Math.floor(768 / D)));
  canvas.height = rows.length * rowH;
  const ctx = canvas.getContext("2d");
  const scale = Math.max(...rows.flat().map(Math.abs)) || 1;
  const colW = canvas.width / D;
  rows.forEach((row, t) => row.forEach((v, d) => {
    ctx.fillStyle = diverging(v / scale);
    ctx.fillRect(d * colW, t * rowH, Math.ceil(colW), rowH - 1);
  }));
  canvas.title = `x_embed [${rows.length}, ${D}]; colour scale ±${scale.toFixed(3)}`;
}

// ------------------------------------------------------------------ 3. attention

function drawAttention(hoverRow) {
  const layer = Number($("layer").value), head = Number($("head").value);
  const rows = explorer.data.attention[layer][head];
  const T = rows.length;
  const canvas = $("attention");
  const cell = Math.max(4, Math.floor(480 / T));
  canvas.width = canvas.height = cell * T;
  const ctx = canvas.getContext("2d");
  for (let i = 0; i < T; i++) {
    for (let j = 0; j < T; j++) {
      ctx.fillStyle = j <= i ? blues(rows[i][j]) : "#e4e4e4";
      ctx.fillRect(j * cell, i * cell, cell, cell);
    }
  }
  if (hoverRow !== undefined) {
    ctx.strokeStyle = "#d60";
    ctx.lineWidth = 2;
    ctx.strokeRect(1, hoverRow * cell + 1, (hoverRow + 1) * cell - 2, cell - 2);
  }
  explorer.drawn = { layer, head, rows };
}

async function loadHead() {  // the selected head's value vectors and outputs (cached pass)
  const layer = Number($("layer").value), head = Number($("head").value);
  explorer.headData = await api("/api/head", { ids: explorer.data.ids, layer, head });
}

// Query i's head output as the sum of w_ij · v_j: one row per key (the 8 largest weights), then
// the sum over all keys j <= i and the captured output it must equal.
function drawWeightedSum(i) {
  const h = explorer.headData, rows = explorer.drawn.rows;
  if (!h || h.layer !== explorer.drawn.layer || h.head !== explorer.drawn.head) return;
  const w = rows[i], K = h.v[0].length;
  const sum = Array.from({ length: K }, (_, k) => w.reduce((acc, wj, j) => acc + wj * h.v[j][k], 0));
  const maxDiff = Math.max(...sum.map((x, k) => Math.abs(x - h.out[i][k])));
  const keys = w.map((wj, j) => [wj, j]).sort((a, b) => b[0] - a[0]).slice(0, 8);
  const lines = keys.map(([wj, j]) => [`${wj.toFixed(3)} × v${j}`, h.v[j].map((x) => wj * x)]);
  lines.push(["Σ over j ≤ " + i, sum], ["captured", h.out[i]]);
  const canvas = $("wsum"), rowH = 14, labelW = 110, colW = Math.max(2, Math.floor(270 / K));
  canvas.width = labelW + colW * K;
  canvas.height = lines.length * rowH;
  const ctx = canvas.getContext("2d");
  const scale = Math.max(...lines.flatMap(([, xs]) => xs.map(Math.abs))) || 1;
  ctx.font = "11px monospace";
  lines.forEach(([label, xs], r) => {
    ctx.fillStyle = "#333";
    ctx.fillText(label, 2, r * rowH + 11);
    xs.forEach((x, k) => {
      ctx.fillStyle = diverging(x / scale);
      ctx.fillRect(labelW + k * colW, r * rowH + 1, colW, rowH - 2);
    });
  });
  explorer.weightedSum = { query: i, layer: h.layer, head: h.head, maxDiff };
  $("wsum-info").textContent = `head ${h.head} of layer ${h.layer}, query ${i}: output = ` +
    `Σ_j w_${i}j · v_j (${K} dims); largest |Σ − captured| = ${maxDiff.toExponential(1)}`;
}

function hoverAttention(event) {
  if (!explorer.data) return;
  const rows = explorer.drawn.rows;
  const cell = $("attention").width / rows.length;
  const i = Math.floor(event.offsetY / cell);
  if (i < 0 || i >= rows.length) return;
  drawAttention(i);
  shadeTokens(rows[i]);
  drawWeightedSum(i);
  const tokens = explorer.data.tokens;
  const top = rows[i].map((w, j) => [w, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  $("attn-info").textContent = `query ${i} ${tokens[i].piece} reads: ` +
    top.map(([w, j]) => `${tokens[j].piece} (${j}) ${w.toFixed(3)}`).join(", ");
}

// ------------------------------------------------------------------ 4. residual stream and lens

function drawLens(lens) {
  const pos = explorer.position, tok = explorer.data.tokens[pos];
  $("lens-position").textContent = `‖x‖ after each stage at position ${pos} ${tok.piece}`;
  const svg = $("norms");
  const norms = explorer.data.norms.map((perPos) => perPos[pos]);
  const max = Math.max(...norms) || 1, barH = Math.min(24, 200 / norms.length);
  svg.setAttribute("height", norms.length * barH + 10);
  svg.innerHTML = norms.map((n, s) => {
    const w = 300 * n / max, y = s * barH;
    const name = s === 0 ? "embed" : `block ${s - 1}`;
    return `<text x="0" y="${y + barH * 0.7}" font-size="11">${name}</text>` +
      `<rect x="62" y="${y + 2}" width="${w}" height="${barH - 4}" fill="#4c72b0"></rect>` +
      `<text x="${66 + w}" y="${y + barH * 0.7}" font-size="11">${n.toFixed(2)}</text>`;
  }).join("");
  const table = $("lens");
  table.replaceChildren();
  const head = table.insertRow();
  head.innerHTML = "<th>stage</th><th>top next tokens (probability)</th>";
  for (const row of lens) {
    const tr = table.insertRow();
    tr.insertCell().textContent = row.stage;
    tr.insertCell().textContent = row.top.map((t) => `${t.piece} ${prob(t.p)}`).join("  ");
  }
}

async function selectPosition(i) {
  explorer.position = i;
  document.querySelectorAll("#tokens .tok").forEach((c, j) => c.classList.toggle("selected", j === i));
  await run(async () => {
    const { lens } = await api("/api/lens", { ids: explorer.data.ids, position: i });
    drawLens(lens);
  });
}

// ------------------------------------------------------------------ 5. the next-token distribution

function settings() {
  const temperature = Number($("temperature").value);
  const k = Math.floor(Number($("top-k").value));
  const p = Number($("top-p").value);
  return { temperature, top_k: k >= 1 ? k : null, top_p: p < 1 ? p : null };
}

// The candidates that survive the filters, with their renormalised probabilities; candidates
// arrive sorted by logit, highest first (ties: lower id first, as argmax picks).
function filterCandidates(cands, { temperature, top_k, top_p }) {
  if (temperature === 0) return [{ ...cands[0], prob: 1 }];
  const z = cands.map((c) => c.logit / temperature);
  let keep = z.map(() => true);
  if (top_k !== null && top_k < z.length) keep = z.map((v) => v >= z[top_k - 1]);
  const softmax = () => {
    const m = Math.max(...z.filter((_, i) => keep[i]));
    const e = z.map((v, i) => (keep[i] ? Math.exp(v - m) : 0));
    const s = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / s);
  };
  if (top_p !== null) {  // drop the least likely tokens whose cumulative mass is <= 1 - p
    const probs = softmax();
    let cumulative = 0;
    for (let i = z.length - 1; i >= 1; i--) {
      cumulative += probs[i];
      if (cumulative <= 1 - top_p) keep[i] = false;
    }
  }
  const probs = softmax();
  return cands.map((c, i) => ({ ...c, prob: probs[i] })).filter((_, i) => keep[i]);
}

function drawDistribution() {
  const s = settings();
  $("temperature-value").textContent = s.temperature.toFixed(2);
  $("top-p-value").textContent = Number($("top-p").value).toFixed(2);
  if (!explorer.data) return;
  const kept = filterCandidates(explorer.data.candidates, s);
  explorer.kept = kept;
  $("candidates-count").textContent = `${kept.length} candidate${kept.length === 1 ? "" : "s"}`;
  $("candidates-count").dataset.count = kept.length;
  const shown = kept.slice(0, 15), barH = 20;
  const svg = $("dist");
  svg.setAttribute("height", shown.length * barH + 6);
  svg.innerHTML = shown.map((c, r) => {
    const w = 420 * c.prob, y = r * barH;
    return `<text x="0" y="${y + 14}" font-size="12" font-family="monospace">${escapeXml(c.piece)} ${c.id}</text>` +
      `<rect x="170" y="${y + 3}" width="${w}" height="${barH - 6}" fill="#dd8452"></rect>` +
      `<text x="${174 + w}" y="${y + 14}" font-size="12">${prob(c.prob)}</text>`;
  }).join("");
  const mass = (100 * explorer.data.candidates_mass).toPrecision(3);
  $("dist-note").textContent = `probabilities among the ${explorer.data.candidates.length} most ` +
    `likely tokens (${mass} % of the mass at temperature 1), after the filters`;
}

function prob(p) {  // tiny probabilities (random weights) keep their digits
  return p >= 1e-3 ? p.toFixed(3) : p.toExponential(1);
}

function escapeXml(s) {
  return s.replace(/[<>&"]/g, (ch) => ({ "<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;" })[ch]);
}

// ------------------------------------------------------------------ everything

function showTiming(data) {
  const how = { prefilled: "a new sequence: prefilled", extended: "one token added with the KV cache",
    reused: "the sequence already computed" }[data.computed] || "";
  $("timing").textContent = `page update ${Math.round(explorer.lastMs)} ms; server ` +
    `${data.server_ms} ms` + (data.sample_ms !== undefined ? ` (sampling ${data.sample_ms} ms)` : "") +
    ` — ${how}`;
}

function show(data) {
  explorer.data = data;
  if (explorer.position >= data.tokens.length) explorer.position = data.position;
  if (data.position !== explorer.position) explorer.position = data.position;
  drawTokens();
  drawEmbeddings();
  drawAttention();
  drawLens(data.lens);
  drawDistribution();
  explorer.headData = null;
  explorer.updates += 1;
}

async function analyze() {
  await run(async () => {
    explorer.position = Infinity;
    show(await api("/api/analyze", { text: $("prompt").value }));
    await loadHead();
  });
  if (explorer.data) showTiming(explorer.data);
}

async function nextToken() {
  if (!explorer.data) return;
  await run(async () => {
    explorer.seed += 1;
    const data = await api("/api/next", { ids: explorer.data.ids, seed: explorer.seed, ...settings() });
    show(data);
    await loadHead();
  });
  showTiming(explorer.data);
}

// ------------------------------------------------------------------ the chat tab

const chat = { state: "idle", events: 0, replies: [] };
explorer.chat = chat;

function showTab(name) {
  $("journey").hidden = name !== "journey";
  $("chat").hidden = name !== "chat";
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("chat-log").append(div);
  return div;
}

function parseEvent(block) {  // one text/event-stream event: its type and JSON data
  let type = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  return { type, data: JSON.parse(data) };
}

// Send the message; the reply streams into its bubble piece by piece as server-sent events.
async function sendChat() {
  const message = $("chat-input").value;
  if (chat.state === "streaming" || !explorer.info || !explorer.info.chat) return;
  chat.state = "streaming";
  chat.events = 0;
  const mine = bubble("user", message);
  const reply = bubble("assistant", "");
  const started = performance.now();
  try {
    const response = await post("/api/chat", {
      message, max_new_tokens: Math.floor(Number($("chat-max").value)), ...settings() });
    if (!response.ok) {
      let data;
      try { data = await response.json(); } catch { data = {}; }
      mine.remove();
      reply.remove();
      throw new Error(data.error || `server answered ${response.status}`);
    }
    $("chat-input").value = "";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", done = null;
    for (;;) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      buffer += value;
      for (let cut; (cut = buffer.indexOf("\n\n")) >= 0; buffer = buffer.slice(cut + 2)) {
        const event = parseEvent(buffer.slice(0, cut));
        chat.events += 1;
        if (event.type === "error") throw new Error(event.data.error);
        if (event.type === "done") done = event.data;
        else reply.textContent += event.data.piece;
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
    }
    if (!done) throw new Error("the reply stopped before its end (is the server still running?)");
    chat.replies.push(reply.textContent);
    const st = done.stats, ms = performance.now() - started;
    $("chat-stats").textContent = `turn ${st.turn}: prefilled ${st.prefilled} tokens (a fresh ` +
      `prefill of the whole conversation: ${st.without_reuse})${st.restarted ? ", context full: " +
      "older turns dropped" : ""}; ${st.generated} tokens in ${Math.round(ms)} ms ` +
      `(${chat.events} events)`;
    showError();
    chat.state = "done";
  } catch (err) {
    showError(err.message);
    chat.state = "error";
  }
}

async function resetChat() {
  try {
    await api("/api/chat/reset", {});
    $("chat-log").replaceChildren();
    $("chat-stats").textContent = "";
    chat.replies = [];
    chat.state = "idle";
    showError();
  } catch (err) { showError(err.message); }
}

function setUpChat(info) {
  $("chat-absent").hidden = info.chat;
  $("chat-box").hidden = !info.chat;
  $("chat-absent").textContent = info.chat ? "" : `${info.chat_absent} The chat tab needs a ` +
    "model fine-tuned on conversations (jaxgpt train chat_sft, docs/chat.md).";
  $("tab-chat").title = info.chat ? "talk to the model" : "not a chat model";
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("chat-send").addEventListener("click", sendChat);
  $("chat-reset").addEventListener("click", resetChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendChat(); }
  });
}

async function start() {
  await run(async () => {
    const info = await api("/api/model");
    explorer.info = info;
    $("model").textContent = `${info.source}: ${info.n_layer} layers, ${info.n_head} heads, ` +
      `width ${info.n_embd}, vocabulary ${info.vocab_size}, context ${info.block_size} ` +
      `(the page shows up to ${info.max_tokens} tokens)`;
    const fill = (select, n) => select.replaceChildren(...Array.from({ length: n }, (_, i) => new Option(i, i)));
    fill($("layer"), info.n_layer);
    fill($("head"), info.n_head);
    setUpChat(info);
  });
  $("run").addEventListener("click", analyze);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) analyze(); });
  $("next").addEventListener("click", nextToken);
  for (const id of ["layer", "head"]) {
    $(id).addEventListener("change", () => { if (explorer.data) { drawAttention(); run(loadHead); } });
  }
  for (const id of ["temperature", "top-k", "top-p"]) $(id).addEventListener("input", drawDistribution);
  $("attention").addEventListener("mousemove", hoverAttention);
  $("attention").addEventListener("mouseleave", () => { if (explorer.data) { drawAttention(); shadeTokens(); } });
}

start();
