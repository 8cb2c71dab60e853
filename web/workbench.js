// The live workbench's script (web/workbench.html; serve.py serves it). It talks to this server
// only (/api/info, /api/run, /api/ablate, /api/patch, /api/generate) and keeps the view's state
// in the URL's fragment (#text=...&knock=0.1,1.0&mean=&view=0.1&clean=...), so that a link
// reproduces a view.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { text: "", knock: [], mean: "", view: "0.0", clean: "", corrupt: "", answer: "",
                wrong: "" };
let info = null;  // /api/info: the model's layers, heads, title and example
let last = null;  // the latest /api/run or /api/ablate answer
let hover = null;  // the token the large view's pointer is on

// ------------------------------------------------------------------------------------------
// The state in the URL
// ------------------------------------------------------------------------------------------

function readHash() {
  const q = new URLSearchParams(location.hash.slice(1));
  for (const key of Object.keys(state)) {
    if (!q.has(key)) continue;
    state[key] = key === "knock" ? q.get(key).split(",").filter((s) => s) : q.get(key);
  }
}

function writeHash() {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(state)) {
    const v = Array.isArray(value) ? value.join(",") : value;
    if (v) q.set(key, v);
  }
  history.replaceState(null, "", "#" + q.toString());
}

// ------------------------------------------------------------------------------------------
// Talking to the server: one request at a time, in order (the server runs one anyway)
// ------------------------------------------------------------------------------------------

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = kind || "";
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const reply = await fetch(path, init);
  const answer = await reply.json();
  if (!reply.ok) throw new Error(answer.error || `HTTP ${reply.status}`);
  return answer;
}

let pending = 0;  // the number of the latest run asked for: older answers are dropped

async function run() {
  state.text = $("text").value;
  writeHash();
  if (!state.text) return;
  const ticket = ++pending;
  setStatus("working", "busy");
  try {
    const answer = state.knock.length
      ? await api("/api/ablate", { text: state.text, heads: state.knock,
                                   mean: state.mean || false })
      : await api("/api/run", { text: state.text });
    if (ticket !== pending) return;
    if (!last || last.tokens.join("") !== answer.tokens.join("")) scanned = {};
    last = answer;
    showAll();
    setStatus("ready");
  } catch (e) {
    if (ticket === pending) setStatus(e.message, "error");
  }
}

// ------------------------------------------------------------------------------------------
// Tokens, prediction, loss
// ------------------------------------------------------------------------------------------

function showAll() {
  showTokens();
  showNext();
  $("loss").textContent = last.loss === null ? "-" : last.loss.toFixed(4);
  $("knocked").textContent = state.knock.length
    ? "knocked out: " + state.knock.map((h) => "L" + h.replace(".", "H")).join(", ") : "";
  showThumbs();
  showLarge();
  showLens();
}

function showTokens() {
  const box = $("tokens");
  box.replaceChildren();
  last.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.dataset.i = i;
    span.title = `position ${i}, id ${last.ids[i]}`;
    span.textContent = t;
    box.appendChild(span);
  });
}

function showNext() {
  const list = $("next");
  list.replaceChildren();
  for (const n of last.next) {
    const li = document.createElement("li");
    li.className = "next";
    const tok = document.createElement("span");
    tok.className = "ntok";
    tok.textContent = n.token;
    const p = document.createElement("span");
    p.textContent = (100 * n.prob).toFixed(2) + " %";
    li.append(tok, p);
    list.appendChild(li);
  }
}

// ------------------------------------------------------------------------------------------
// Attention: thumbnails of every head, one large map
// ------------------------------------------------------------------------------------------

function blue(p) {  // white 0 to dark blue 1
  const v = Math.max(0, Math.min(1, p));
  const c = (dark) => Math.round(255 - (255 - dark) * v);
  return `rgb(${c(31)},${c(55)},${c(180)})`;
}

function drawMap(canvas, map, cell) {
  const ctx = canvas.getContext("2d");
  const T = map.length;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < T; q++) {
    const row = map[q];
    for (let k = 0; k <= q; k++) {
      if (row[k] <= 0) continue;
      ctx.fillStyle = blue(row[k]);
      ctx.fillRect(k * cell, q * cell, Math.max(cell, 1), Math.max(cell, 1));
    }
  }
}

function headScores(map) {  // previous-token and first-token attention, as heads.py's scores
  const T = map.length;
  let prev = 0, first = 0;
  for (let t = 1; t < T; t++) { prev += map[t][t - 1]; first += map[t][0]; }
  return T > 1 ? { prev: prev / (T - 1), first: first / (T - 1) } : { prev: 0, first: 0 };
}

function showThumbs() {
  const box = $("thumbs");
  box.replaceChildren();
  const L = last.attention.length, H = last.attention[0].length, T = last.tokens.length;
  box.style.gridTemplateColumns = `repeat(${H}, auto)`;
  const size = 64;
  for (let l = 0; l < L; l++) {
    for (let h = 0; h < H; h++) {
      const name = `${l}.${h}`;
      const cell = document.createElement("div");
      cell.className = "cell";
      const canvas = document.createElement("canvas");
      canvas.className = "thumb" + (state.knock.includes(name) ? " knocked" : "") +
                         (state.view === name ? " shown" : "");
      canvas.dataset.head = name;
      canvas.width = canvas.height = size;
      const s = headScores(last.attention[l][h]);
      canvas.title = `layer ${l}, head ${h}: previous-token ${s.prev.toFixed(2)}, ` +
                     `first-token ${s.first.toFixed(2)}; click to knock out or restore`;
      drawMap(canvas, last.attention[l][h], size / T);
      canvas.addEventListener("click", () => toggleHead(name));
      const label = document.createElement("button");
      label.textContent = `L${l}H${h}` + (name in scanned
        ? ` ${scanned[name] >= 0 ? "+" : ""}${scanned[name].toFixed(3)}` : "");
      label.title = "draw this head large";
      label.addEventListener("click", () => { state.view = name; writeHash(); showThumbs();
                                              showLarge(); });
      cell.append(canvas, label);
      box.appendChild(cell);
    }
  }
}

function toggleHead(name) {
  const i = state.knock.indexOf(name);
  if (i >= 0) state.knock.splice(i, 1); else state.knock.push(name);
  run();
}

const MARGIN = 90;  // room for the token labels of the large map

function viewHead() {
  const L = last.attention.length, H = last.attention[0].length;
  let [l, h] = state.view.split(".").map(Number);
  if (!(l >= 0 && l < L && h >= 0 && h < H)) { l = 0; h = 0; state.view = "0.0"; }
  return [l, h];
}

function showLarge() {
  const [l, h] = viewHead();
  const map = last.attention[l][h], T = map.length;
  const cell = Math.max(1, Math.min(28, Math.floor(600 / T)));
  const canvas = $("matrix");
  canvas.width = canvas.height = MARGIN + cell * T;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.save();
  ctx.translate(MARGIN, MARGIN);
  drawMap({ getContext: () => ctx, width: cell * T, height: cell * T }, map, cell);
  ctx.restore();
  if (cell >= 8) {  // labels where they fit; otherwise the hover names the tokens
    ctx.fillStyle = "#333";
    ctx.font = `${Math.min(12, cell)}px ui-monospace, monospace`;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    last.tokens.forEach((t, i) => {
      ctx.fillText(t.slice(0, 10), MARGIN - 4, MARGIN + (i + 0.5) * cell);
      ctx.save();
      ctx.translate(MARGIN + (i + 0.5) * cell, MARGIN - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(t.slice(0, 10), 0, 0);
      ctx.restore();
    });
  }
  if (hover !== null && hover < T) {  // the hovered token's row and column
    ctx.strokeStyle = "#d62728";
    ctx.strokeRect(MARGIN, MARGIN + hover * cell, cell * T, cell);
    ctx.strokeRect(MARGIN + hover * cell, MARGIN, cell, cell * T);
  }
  const knocked = state.knock.includes(state.view) ? " (knocked out)" : "";
  const sc = headScores(map);
  $("caption").textContent = `layer ${l}, head ${h}${knocked}: row = query, column = key; ` +
    `previous-token score ${sc.prev.toFixed(2)}, first-token ${sc.first.toFixed(2)}`;
  canvas.onmousemove = (e) => {
    const r = canvas.getBoundingClientRect();
    const x = e.clientX - r.left - MARGIN, y = e.clientY - r.top - MARGIN;
    const t = Math.floor(Math.max(x, y) / cell);
    if (x < 0 && y < 0) return;
    const q = y >= 0 ? Math.floor(y / cell) : t;
    if (q < 0 || q >= T || q === hover) return;
    hover = q;
    describe(map, q);
    showLarge();
  };
}

function describe(map, q) {
  const top = (pairs) => pairs.sort((a, b) => b[1] - a[1]).slice(0, 3)
    .map(([i, p]) => `${last.tokens[i]}[${i}] ${p.toFixed(2)}`).join(", ");
  const looks = map[q].map((p, k) => [k, p]).filter(([k]) => k <= q);
  const seen = map.map((row, t) => [t, row[q]]).filter(([t]) => t >= q);
  $("detail").textContent = `${last.tokens[q]}[${q}] looks at: ${top(looks)}\n` +
                            `looked at by: ${top(seen)}`;
  document.querySelectorAll(".tok").forEach((s) => s.classList.toggle("hl", +s.dataset.i === q));
}

// ------------------------------------------------------------------------------------------
// The ablation scan: each head alone (with those already knocked out), one request at a time
// ------------------------------------------------------------------------------------------

let scanning = false;
let scanned = {};  // head -> the loss with it knocked out, minus the loss without

async function scan() {
  if (!last || scanning) return;
  scanning = true;
  $("scan-stop").disabled = false;
  const L = last.attention.length, H = last.attention[0].length, base = last.loss;
  const text = state.text, mean = state.mean || false;
  scanned = {};
  try {
    for (let l = 0; l < L && scanning; l++) {
      for (let h = 0; h < H && scanning; h++) {
        const name = `${l}.${h}`;
        $("scan-status").textContent = `head ${l * H + h + 1} of ${L * H}`;
        const heads = state.knock.includes(name) ? state.knock : [...state.knock, name];
        const got = await api("/api/ablate", { text, heads, mean, views: false });
        scanned[name] = got.loss - base;
        showThumbs();
      }
    }
    $("scan-status").textContent = scanning ? "change in loss under each head's label"
                                            : "cancelled";
  } catch (e) {
    $("scan-status").textContent = e.message;
  }
  scanning = false;
  $("scan-stop").disabled = true;
}

// ------------------------------------------------------------------------------------------
// The logit lens
// ------------------------------------------------------------------------------------------

function green(p) {  // white 0 to dark green 1
  const v = Math.max(0, Math.min(1, p));
  const c = (dark) => Math.round(255 - (255 - dark) * v);
  return `rgb(${c(44)},${c(160)},${c(44)})`;
}

function showLens() {
  const table = $("lens");
  table.replaceChildren();
  const lens = last.lens, T = last.tokens.length;
  const head = document.createElement("tr");
  head.appendChild(document.createElement("th"));
  last.tokens.forEach((t) => {
    const th = document.createElement("th");
    th.textContent = t;
    head.appendChild(th);
  });
  table.appendChild(head);
  lens.tokens.forEach((row, r) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = r === 0 ? "embed" : `block ${r - 1}`;
    tr.appendChild(th);
    for (let t = 0; t < T; t++) {
      const td = document.createElement("td");
      const hit = t + 1 < T && lens.ids[r][t] === last.ids[t + 1];
      td.className = "lens-cell" + (hit ? " hit" : "");
      td.textContent = row[t];
      const p = lens.probs[r][t];
      td.title = `top ${row[t]} ${(100 * p).toFixed(1)} %` + (lens.next_prob[r][t] === null ? ""
        : `; the actual next token ${(100 * lens.next_prob[r][t]).toFixed(1)} %`);
      td.style.background = green(p);
      td.style.color = p > 0.6 ? "#fff" : "#000";
      tr.appendChild(td);
    }
    table.appendChild(tr);
  });
}

// ------------------------------------------------------------------------------------------
// Generation
// ------------------------------------------------------------------------------------------

async function generate() {
  setStatus("generating", "busy");
  try {
    const answer = await api("/api/generate", {
      text: $("text").value, n: +$("gen-n").value, temperature: +$("gen-t").value,
      seed: +$("gen-seed").value });
    $("generated").textContent = answer.text;
    setStatus("ready");
  } catch (e) {
    setStatus(e.message, "error");
  }
}

// ------------------------------------------------------------------------------------------
// Patching
// ------------------------------------------------------------------------------------------

function redBlue(v) {  // the share recovered: blue below 0, white 0, red 1 and above
  const a = Math.max(-1, Math.min(1, v));
  return a >= 0 ? `rgb(255,${Math.round(255 - 200 * a)},${Math.round(255 - 200 * a)})`
                : `rgb(${Math.round(255 + 200 * a)},${Math.round(255 + 200 * a)},255)`;
}

function gridTable(grid, rows, cols, clean, corrupt, other) {
  const table = document.createElement("table");
  const head = document.createElement("tr");
  head.appendChild(document.createElement("th"));
  cols.forEach((c) => { const th = document.createElement("th"); th.textContent = c;
                        head.appendChild(th); });
  table.appendChild(head);
  grid.forEach((row, i) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = rows[i];
    tr.appendChild(th);
    row.forEach((value, j) => {
      const share = (value - corrupt) / (clean - corrupt);
      const guess = (other[i][j] - corrupt) / (clean - corrupt);
      const td = document.createElement("td");
      td.textContent = share.toFixed(2);
      td.style.background = redBlue(share);
      if (Math.abs(share - guess) > 0.1) td.className = "off";
      td.title = `${rows[i]}, ${cols[j]}: ${share.toFixed(3)} (the other: ${guess.toFixed(3)})`;
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
  return table;
}

// The scan's answer arrives as JSON lines (POST /api/patch with "progress": true): one per
// patched batch, then the answer; Cancel asks the server to stop it (POST /api/patch/cancel)
async function patchLines(body, onProgress) {
  const reply = await fetch("/api/patch", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, progress: true }) });
  if (!reply.ok) {
    const answer = await reply.json();
    throw new Error(answer.error || `HTTP ${reply.status}`);
  }
  const reader = reply.body.getReader(), decoder = new TextDecoder();
  let buffered = "", last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffered.indexOf("\n")) >= 0) {
      const line = JSON.parse(buffered.slice(0, cut));
      buffered = buffered.slice(cut + 1);
      if ("done" in line) onProgress(line);
      else last = line;
    }
  }
  if (last === null) throw new Error("the scan ended without an answer");
  if (last.error) throw new Error(last.error);
  return last;
}

async function patch() {
  for (const key of ["clean", "corrupt", "answer", "wrong"]) state[key] = $(key).value;
  writeHash();
  $("patch-status").textContent = "patching every activation...";
  $("patch-status").className = "";
  $("patch-cancel").hidden = false;
  try {
    const got = await patchLines({ clean: state.clean, corrupt: state.corrupt,
                                   answer: state.answer, wrong: state.wrong },
      (p) => { $("patch-status").textContent = `patching: ${p.done} of ${p.total} (${p.step})`; });
    if (got.cancelled) {
      $("patch-status").textContent = "cancelled";
      return;
    }
    lastPatch = got;
    showPatch(got);
    $("patch-status").textContent = `logit difference: clean ${got.patching.clean_logit_diff
      .toFixed(3)}, corrupted ${got.patching.corrupt_logit_diff.toFixed(3)}; ` +
      `${got.disagreements.length} cells where the estimate is off by more than 0.1`;
  } catch (e) {
    $("patch-status").textContent = e.message;
    $("patch-status").className = "error";
  } finally {
    $("patch-cancel").hidden = true;
  }
}

function showPatch(got) {
  const box = $("grids");
  box.replaceChildren();
  const exact = got.patching, guess = got.attribution;
  const clean = exact.clean_logit_diff, corrupt = exact.corrupt_logit_diff;
  for (const key of ["resid_pre", "attn_out", "mlp_out", "z"]) {
    if (!(key in exact)) continue;
    const rows = exact[key].map((_, l) => `layer ${l}`);
    const cols = key === "z" ? exact[key][0].map((_, h) => `H${h}`) : got.tokens;
    const div = document.createElement("div");
    div.className = "grid";
    const title = document.createElement("h3");
    title.textContent = `${key}: patched | attribution patching`;
    const pair = document.createElement("div");
    pair.className = "pair";
    pair.append(gridTable(exact[key], rows, cols, clean, corrupt, guess[key]),
                gridTable(guess[key], rows, cols, clean, corrupt, exact[key]));
    div.append(title, pair);
    box.appendChild(div);
  }
  showDla(got.dla);
}

function showDla(dla) {
  const parts = [["embed", dla.embed], ["pos_embed", dla.pos_embed], ["biases", dla.biases]];
  dla.mlp.forEach((v, l) => parts.push([`mlp ${l}`, v]));
  dla.heads.forEach((row, l) => row.forEach((v, h) => parts.push([`L${l}H${h}`, v])));
  const biggest = Math.max(...parts.map(([, v]) => Math.abs(v)), 1e-9);
  const box = $("dla");
  box.replaceChildren();
  const total = document.createElement("div");
  total.textContent = `the parts add up to the logit difference ${dla.logit_diff.toFixed(4)} ` +
                      "(red: toward the answer, blue: toward the wrong token)";
  box.appendChild(total);
  for (const [name, v] of parts) {
    const row = document.createElement("div");
    row.className = "bar-row";
    const label = document.createElement("span");
    label.className = "bar-name";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "bar-track";
    const bar = document.createElement("span");
    bar.className = "bar " + (v >= 0 ? "pos" : "neg");
    const width = 200 * Math.abs(v) / biggest;
    bar.style.width = width + "px";
    bar.style.left = (v >= 0 ? 200 : 200 - width) + "px";
    track.appendChild(bar);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = v.toFixed(3);
    row.append(label, track, value);
    box.appendChild(row);
  }
}

// ------------------------------------------------------------------------------------------
// Export: the answers behind the view (the run or ablation, the patching) as one JSON file, and
// what the CLI writes for the text (npz, PNG, the static HTML) as a zip from /api/export
// ------------------------------------------------------------------------------------------

let lastPatch = null;

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  URL.revokeObjectURL(a.href);
}

async function exportView() {
  const data = { state, url: location.href, run: last, patch: lastPatch };
  download(new Blob([JSON.stringify(data)], { type: "application/json" }), "workbench.json");
  if (!state.text) return;
  setStatus("exporting the CLI's files...");
  try {
    const reply = await fetch("/api/export", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text: state.text }) });
    if (!reply.ok) throw new Error((await reply.json()).error || `HTTP ${reply.status}`);
    download(await reply.blob(), "workbench.zip");
    setStatus("ready");
  } catch (e) {
    setStatus(e.message, "error");
  }
}

// ------------------------------------------------------------------------------------------
// Start
// ------------------------------------------------------------------------------------------

async function start() {
  readHash();
  try {
    info = await api("/api/info");
  } catch (e) {
    setStatus(e.message, "error");
    return;
  }
  $("title").textContent = info.title;
  document.title = `workbench: ${info.title}`;
  $("text").value = state.text || info.example;
  $("mean").value = state.mean;
  for (const key of ["clean", "corrupt", "answer", "wrong"]) $(key).value = state[key];
  let timer = null;
  $("text").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(run, 400); });
  $("run").addEventListener("click", run);
  $("mean").addEventListener("change", () => { state.mean = $("mean").value; run(); });
  $("clear").addEventListener("click", () => { state.knock = []; run(); });
  $("generate").addEventListener("click", generate);
  $("patch").addEventListener("click", patch);
  $("patch-cancel").addEventListener("click", () => api("/api/patch/cancel", {}));
  $("scan").addEventListener("click", scan);
  $("export").addEventListener("click", exportView);
  $("scan-stop").addEventListener("click", () => { scanning = false; });
  await run();
  if (state.clean && state.corrupt && state.answer && state.wrong) await patch();
}

start();
