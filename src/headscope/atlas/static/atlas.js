/* headscope head atlas — plain JavaScript, no build step.
 *
 * Data pages are JS files (data/<key>.js) calling window.__atlas_page(key, data), so the site works
 * from file:// as well as from `headscope atlas serve`. Every string from the data is put into the
 * page with textContent / createTextNode: nothing from the data is ever parsed as HTML.
 */
"use strict";

const A = { index: null, pages: {}, waiting: {}, live: false, liveInfo: null };

window.__atlas_page = function (key, data) {
  A.pages[key] = data;
  const w = A.waiting[key];
  delete A.waiting[key];
  if (key === "index") { A.index = data; boot(); }
  (w || []).forEach((r) => r.resolve(data));
};

function load(key) {
  if (A.pages[key] !== undefined) return Promise.resolve(A.pages[key]);
  return new Promise((resolve, reject) => {
    const first = !A.waiting[key];
    (A.waiting[key] = A.waiting[key] || []).push({ resolve, reject });
    if (!first) return;
    const s = document.createElement("script");
    s.src = "data/" + key.split("/").map(encodeURIComponent).join("/") + ".js";
    s.onerror = () => {
      const w = A.waiting[key] || [];
      delete A.waiting[key];
      s.remove();
      w.forEach((r) => r.reject(new Error("missing data page " + key)));
    };
    document.head.appendChild(s);
  });
}

/* ---------- DOM helpers (text only) ---------- */
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = String(v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") Object.assign(el.style, v);
    else if (k === "href") el.setAttribute("href", safeHref(v));
    else el.setAttribute(k, String(v));
  }
  for (const kid of kids.flat(3)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
function safeHref(v) { const s = String(v); return s.startsWith("#") ? s : "#/"; }
function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }
function fmt(v, d = 3) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toFixed(d);
}
function tokText(t) {
  return String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/^ /, "␣");
}
function tok(t, extra) { return h("span", Object.assign({ class: "tok", title: JSON.stringify(String(t)) }, extra || {}), tokText(t)); }
function isNum(v) { return typeof v === "number" && isFinite(v); }
function section(title, ...kids) { return h("section", { class: "card" }, h("h2", { text: title }), ...kids); }
function headLink(k) { return h("a", { href: "#/head/" + k, class: "headlink" }, k); }

/* colour scales */
function seqColor(x) { // 0..1 → white..deep blue
  x = Math.max(0, Math.min(1, x));
  const r = Math.round(247 - x * (247 - 8)), g = Math.round(251 - x * (251 - 69)), b = Math.round(255 - x * (255 - 148));
  return `rgb(${r},${g},${b})`;
}
function divColor(x) { // -1..1 → red..white..blue
  x = Math.max(-1, Math.min(1, x));
  if (x >= 0) return seqColor(x);
  const y = -x;
  return `rgb(${Math.round(255 - y * 75)},${Math.round(247 - y * 200)},${Math.round(245 - y * 210)})`;
}
function actColor(x) { // 0..1 → white..orange
  x = Math.max(0, Math.min(1, x));
  return `rgba(255,${Math.round(140 - 40 * x)},0,${(0.08 + 0.8 * x).toFixed(3)})`;
}
function textOn(x) { return x > 0.55 ? "#fff" : "#111"; }

/* ---------- boot and routing ---------- */
function boot() {
  const ix = A.index;
  const m = ix.model || {};
  document.getElementById("model").textContent =
    `${m.model || "model"} · ${ix.n_layers} layers × ${ix.n_heads} heads`;
  if (location.protocol.startsWith("http")) {
    fetch("api/info").then((r) => (r.ok ? r.json() : null)).then((j) => {
      if (j && j.live) { A.live = true; A.liveInfo = j; nav(); if (location.hash.startsWith("#/live") || location.hash.startsWith("#/head/")) route(); }
    }).catch(() => {});
  }
  nav();
  window.addEventListener("hashchange", route);
  route();
}

function nav() {
  const n = clear(document.getElementById("nav"));
  n.appendChild(h("a", { href: "#/" }, "Grid"));
  for (const [i, c] of A.index.collections.entries()) n.appendChild(h("a", { href: "#/list/" + i }, collLabel(c)));
  if (A.live) n.appendChild(h("a", { href: "#/live", id: "nav-live" }, "Live prompt"));
}
function collLabel(c) {
  const k = c.key.startsWith("features_") ? `SAE ${c.key.slice(9)} features` : c.key.replace(/_/g, " ");
  return `${k} (${c.n})`;
}

function route() {
  const main = clear(document.getElementById("main"));
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  window.scrollTo(0, 0);
  try {
    if (parts[0] === "head" && parts[1]) return headPage(main, parts[1]);
    if (parts[0] === "list" && parts[1] !== undefined) return listPage(main, +parts[1]);
    if (parts[0] === "item" && parts[2] !== undefined) return itemPage(main, +parts[1], parts.slice(2).join("/"));
    if (parts[0] === "live") return livePage(main);
    return gridPage(main);
  } catch (e) { main.appendChild(h("p", { class: "error" }, "Error: " + e.message)); }
}

/* ---------- grid ---------- */
const GRID = { measure: null, hits: null };

function gridPage(main) {
  const ix = A.index;
  const ms = ix.measures;
  if (ix.role_grid && GRID.measure === null) GRID.measure = ROLE_MEASURE;   // the verdicts first, when the run has them
  if (GRID.measure === null && ms.length) {
    const pref = ["heads.induction", "heads.prev_token"];
    GRID.measure = (ms.find((m) => pref.includes(m.id)) || ms[0]).id;
  }
  const opts = (ix.role_grid ? [{ id: ROLE_MEASURE, label: "confirmed role (heads/roles.json)" }] : []).concat(ms);
  const select = h("select", { id: "measure", onchange: (e) => { GRID.measure = e.target.value; drawGrid(); } },
    opts.map((m) => h("option", { value: m.id, selected: m.id === GRID.measure ? "selected" : null }, m.label)));
  const search = h("input", { id: "search", type: "search", placeholder: "search heads, features, neurons by token or explanation", size: 40 });
  const hitsBox = h("div", { id: "hits", class: "muted" });
  search.addEventListener("keydown", (e) => { if (e.key === "Enter") doSearch(search.value, hitsBox); });
  const controls = h("div", { class: "controls" },
    opts.length ? h("label", {}, "colour by ", select) : h("span", { class: "muted" }, "No per-head measures in this run yet."),
    h("label", {}, search, h("button", { onclick: () => doSearch(search.value, hitsBox) }, "search")));
  const grid = h("div", { id: "grid-wrap" });
  const side = h("div", { id: "side" });
  main.appendChild(h("div", { class: "gridpage" },
    h("div", {}, startCard(), section("Layer × head grid", controls, hitsBox, grid, h("div", { id: "legend" })), sourcesCard(), lensAppsCard(), summariesCard()),
    side));
  drawGrid();
}

function cellFmt(v) {
  if (!isNum(v)) return "";
  const a = Math.abs(v);
  if (a >= 99.5) return a >= 1e4 ? v.toExponential(0) : String(Math.round(v));
  if (a >= 9.95) return v.toFixed(0);
  return v.toFixed(2).replace(/^0\./, ".").replace(/^-0\./, "-.").replace(/^-\.00$/, ".00");
}
function measureById(id) { return A.index.measures.find((m) => m.id === id); }

/* the grid coloured by each head's strongest confirmed role (heads/roles.json): one colour per role */
const ROLE_MEASURE = "__roles";
const ROLE_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
function roleColor(rid) { const ids = Object.keys(A.index.roles || {}); return ROLE_COLORS[Math.max(0, ids.indexOf(rid)) % ROLE_COLORS.length]; }
function roleTitle(rid) { return (A.index.roles || {})[rid] || rid; }
function drawRoleGrid(wrap) {
  const ix = A.index, L = ix.n_layers, H = ix.n_heads, g = ix.role_grid;
  const table = h("table", { class: "grid", id: "grid" });
  const hr = h("tr", {}, h("th", { class: "corner" }, "L \\ H"));
  for (let j = 0; j < H; j++) hr.appendChild(h("th", {}, String(j)));
  table.appendChild(hr);
  const count = {};
  for (let i = 0; i < L; i++) {
    const tr = h("tr", {}, h("th", {}, String(i)));
    for (let j = 0; j < H; j++) {
      const rid = g[i][j], key = `${i}.${j}`, hit = GRID.hits && GRID.hits.has(key);
      if (rid) count[rid] = (count[rid] || 0) + 1;
      tr.appendChild(h("td", { class: "cell" + (hit ? " hit" : "") + (GRID.hits && !hit ? " dim" : ""), "data-head": key, "data-role": rid || "",
        title: `head ${key} · ` + (rid ? `confirmed: ${roleTitle(rid)}` : "no role confirmed"),
        style: { background: rid ? roleColor(rid) : "#f3f3f3", color: "#fff" }, onclick: () => { location.hash = "#/head/" + key; } },
        rid ? roleTitle(rid).slice(0, 3) : ""));
    }
    table.appendChild(tr);
  }
  wrap.appendChild(table);
  const legend = document.getElementById("legend");
  if (legend) {
    clear(legend);
    legend.appendChild(h("div", { class: "rolelegend" }, Object.keys(ix.roles || {}).map((rid) => h("span", { class: "rolekey" },
      h("span", { class: "swatch", style: { background: roleColor(rid) } }), ` ${roleTitle(rid)} (${count[rid] || 0})  `)),
      h("span", { class: "muted" }, " · grey: no role confirmed · a head's strongest confirmed role (score beat its control and ablation had the predicted effect, both BH) · click a head to open its page")));
  }
  const side = document.getElementById("side");
  if (side) {
    clear(side);
    side.appendChild(section("Heads confirmed per role", h("table", { class: "kv" }, Object.keys(ix.roles || {}).map((rid) =>
      h("tr", {}, h("td", {}, h("span", { class: "swatch", style: { background: roleColor(rid) } }), " ", roleTitle(rid)), h("td", { class: "num" }, String(count[rid] || 0)))))));
  }
}

function drawGrid() {
  const ix = A.index, wrap = document.getElementById("grid-wrap");
  if (!wrap) return;
  clear(wrap);
  if (GRID.measure === ROLE_MEASURE && ix.role_grid) return drawRoleGrid(wrap);
  const m = measureById(GRID.measure);
  const L = ix.n_layers, H = ix.n_heads;
  const table = h("table", { class: "grid", id: "grid" });
  const hr = h("tr", {}, h("th", { class: "corner" }, "L \\ H"));
  for (let j = 0; j < H; j++) hr.appendChild(h("th", {}, String(j)));
  table.appendChild(hr);
  const diverging = m && m.min < 0 && m.max > 0;
  const scale = m ? (diverging ? Math.max(-m.min, m.max) : (m.max - m.min) || 1) : 1;
  for (let i = 0; i < L; i++) {
    const tr = h("tr", {}, h("th", {}, String(i)));
    for (let j = 0; j < H; j++) {
      const v = m ? m.values[i][j] : null;
      let bg = "#f3f3f3", x = 0;
      if (isNum(v)) {
        x = diverging ? v / scale : (v - m.min) / scale;
        bg = diverging ? divColor(x) : seqColor(x);
      }
      const key = `${i}.${j}`;
      const hit = GRID.hits && GRID.hits.has(key);
      const cell = h("td", { class: "cell" + (hit ? " hit" : "") + (GRID.hits && !hit ? " dim" : ""), "data-head": key,
        title: `head ${key}` + (m ? ` · ${m.label}: ${fmt(v)}` : ""), style: { background: bg, color: textOn(Math.abs(x)) },
        onclick: () => { location.hash = "#/head/" + key; } }, cellFmt(v));
      tr.appendChild(cell);
    }
    table.appendChild(tr);
  }
  wrap.appendChild(table);
  const legend = document.getElementById("legend");
  if (legend) {
    clear(legend);
    if (m) legend.appendChild(h("span", { class: "muted" }, `${m.label}: min ${fmt(m.min)} · max ${fmt(m.max)} ` +
      (diverging ? "(red < 0 < blue)" : "(white → blue)") + " · click a head to open its page"));
  }
  const side = document.getElementById("side");
  if (side && m) {
    clear(side);
    const flat = [];
    for (let i = 0; i < L; i++) for (let j = 0; j < H; j++) if (isNum(m.values[i][j])) flat.push([`${i}.${j}`, m.values[i][j]]);
    flat.sort((a, b) => b[1] - a[1]);
    side.appendChild(section(`Top heads · ${m.label}`,
      h("table", { class: "kv" }, flat.slice(0, 15).map(([k, v]) => h("tr", {}, h("td", {}, headLink(k)), h("td", { class: "num" }, fmt(v)))))));
    if (flat.length > 15) side.appendChild(section("Bottom heads",
      h("table", { class: "kv" }, flat.slice(-5).reverse().map(([k, v]) => h("tr", {}, h("td", {}, headLink(k)), h("td", { class: "num" }, fmt(v)))))));
  }
}

function startCard() { // the heads with the strongest findings (atlas/highlights.py), nothing when none
  const hl = A.index.highlights || [];
  if (!hl.length) return null;
  const label = { heads: "head scores", roles: "confirmed role", lens: "lens", sae: "SAE", neurons: "neurons" };
  return h("section", { class: "card start", id: "start-here" }, h("h2", {}, "Start here"),
    h("p", { class: "muted small" }, "The heads with the strongest findings in this run, each with its reason:"),
    h("ol", { class: "starthere" }, hl.map((x) => h("li", {},
      h("a", { href: "#/head/" + x.head, class: "headlink" }, x.head), " ",
      h("span", { class: "src" }, label[x.source] || x.source), " ", h("span", {}, x.reason),
      (x.also || []).length ? h("div", { class: "muted small" }, "also: " + x.also.join(" · ")) : null))));
}

function sourcesCard() {
  const ix = A.index;
  const all = ["heads", "lens", "sae", "neurons", "explain"];
  const label = { heads: "head scores", lens: "lenses", sae: "attention SAE", neurons: "next-token neurons", explain: "explanations" };
  const rows = all.map((s) => h("tr", {},
    h("td", {}, label[s]),
    h("td", { class: ix.sources.includes(s) ? "ok" : (ix.errors[s] ? "error" : "muted") },
      ix.sources.includes(s) ? "in this run" : (ix.errors[s] ? "failed: " + ix.errors[s] : "not in this run"))));
  const stages = Object.keys(ix.stages || {}).filter((k) => !k.startsWith("study."));
  return section("What this run holds", h("table", { class: "kv" }, rows),
    stages.length ? h("p", { class: "muted" }, "finished stages: " + stages.join(", ")) : null,
    h("p", { class: "muted" }, `built ${new Date(ix.built * 1000).toLocaleString()}`));
}

function summariesCard() {
  const g = A.index.globals || {};
  const label = { heads: "Head scores", lens: "Lenses", sae: "Attention SAEs", neurons: "Next-token neurons", explain: "Explanation scores" };
  const parts = [];
  for (const [src, obj] of Object.entries(g)) {
    const keep = Object.entries(obj).filter(([k]) => !/^heatmap|^config$|^options$|^transfer/.test(k) && !(src === "lens" && k === "steer_eval"))
      .map(([k, v]) => (src === "lens" && k === "scan" && v && typeof v === "object") ? [k, Object.fromEntries(Object.entries(v).filter(([kk]) => !["classifier", "localisation"].includes(kk)))] : [k, v]); // shown by lensAppsCard
    if (!keep.length) continue;
    parts.push(h("div", { class: "kvblock" }, h("h3", {}, label[src] || src),
      keep.map(([k, v]) => (v !== null && typeof v === "object") ? renderKV(k, dropHeavy(v)) : h("div", { class: "kvline" }, h("span", { class: "k" }, k.replace(/_/g, " ") + ": "), renderAny(v, 1, k)))));
  }
  return parts.length ? section("Run summaries", parts) : h("span");
}
function dropHeavy(v) {
  if (Array.isArray(v)) return v.map(dropHeavy);
  if (v === null || typeof v !== "object") return v;
  const o = {};
  for (const [k, x] of Object.entries(v)) if (!/^heatmap|^options$|^config$|^density_hist$/.test(k)) o[k] = dropHeavy(x);
  return o;
}

async function doSearch(q, box) {
  clear(box);
  const norm = String(q).replace(/[Ġ▁]/g, " ").trim().toLowerCase();
  if (!norm) { GRID.hits = null; drawGrid(); return; }
  const c = /^[a-z0-9]/.test(norm) ? norm[0] : "_";
  let page = { tokens: {} }, docs = { docs: [] };
  try {
    if (A.index.search_shards.includes(c)) page = await load("search/" + c);
    if (A.index.search_docs) docs = await load("search/docs");
  } catch (e) { box.appendChild(h("span", { class: "error" }, e.message)); return; }
  const exact = page.tokens[norm] || [];
  const prefix = Object.keys(page.tokens).filter((t) => t !== norm && t.startsWith(norm)).slice(0, 20);
  const heads = new Set(exact);
  prefix.forEach((t) => page.tokens[t].forEach((k) => heads.add(k)));
  // explanation text and tokens of heads, features and neurons: every word of the query must occur
  const words = norm.split(/\s+/).filter(Boolean);
  const found = { head: [], feature: [], neuron: [] };
  for (const d of docs.docs) {
    if (words.every((w) => d[4].includes(w)) && found[d[0]]) found[d[0]].push(d);
  }
  found.head.forEach((d) => heads.add(d[1]));
  GRID.hits = heads;
  drawGrid();
  box.appendChild(h("div", {}, heads.size ? `${heads.size} head(s) match “` : "No head matches “", tokText(norm),
    "” (top tokens, labels, explanations)" + (prefix.length ? ` (tokens also matching: ${prefix.slice(0, 8).map(tokText).join(", ")})` : "") + " ",
    h("a", { href: "#/", onclick: () => { GRID.hits = null; drawGrid(); clear(box); } }, "clear")));
  const list = (kind, label) => {
    const xs = kind === "head" ? [...heads].map((k) => (found.head.find((d) => d[1] === k) || ["head", k, "#/head/" + k, "", ""])) : found[kind];
    if (!xs.length) return null;
    return h("div", { class: "hits-" + kind }, h("b", {}, `${label} (${xs.length})`),
      h("ul", { class: "hitlist" }, xs.slice(0, 30).map((d) => h("li", {}, h("a", { href: safeHref(d[2]), class: "hit-" + kind }, d[1]),
        d[3] ? h("span", { class: "muted small" }, " " + d[3]) : null))),
      xs.length > 30 ? h("span", { class: "muted small" }, `… and ${xs.length - 30} more`) : null);
  };
  box.appendChild(h("div", { class: "hits" }, list("head", "heads"), list("feature", "SAE features"), list("neuron", "neurons")));
}

/* ---------- head page ---------- */
async function headPage(main, key) {
  const ix = A.index;
  const m = /^(\d+)\.(\d+)$/.exec(key);
  if (!m || +m[1] >= ix.n_layers || +m[2] >= ix.n_heads) { main.appendChild(h("p", { class: "error" }, "No head " + key)); return; }
  const L = +m[1], H = +m[2];
  const prev = H > 0 ? `${L}.${H - 1}` : (L > 0 ? `${L - 1}.${ix.n_heads - 1}` : null);
  const next = H < ix.n_heads - 1 ? `${L}.${H + 1}` : (L < ix.n_layers - 1 ? `${L + 1}.0` : null);
  main.appendChild(h("div", { class: "headtitle" },
    h("h1", { id: "head-title" }, `Head ${key}`),
    h("span", { class: "muted" }, `layer ${L}, head ${H}`),
    prev ? h("a", { href: "#/head/" + prev }, "← " + prev) : null,
    next ? h("a", { href: "#/head/" + next }, next + " →") : null,
    h("a", { href: "#/" }, "grid")));
  let page;
  try { page = await load("layer/" + L); } catch (e) { main.appendChild(h("p", { class: "error" }, e.message)); return; }
  const data = page.heads[String(H)] || {};
  const verdict = data.heads && data.heads.roles;
  if (verdict) main.appendChild(verdictCard(verdict));
  if (data.explain && data.explain.label) main.appendChild(labelCard(data.explain.label, !!verdict));
  main.appendChild(measuresCard(L, H));
  const order = ["heads", "lens", "sae", "neurons", "explain"].concat(Object.keys(data));
  const done = new Set();
  for (const src of order) {
    if (done.has(src) || data[src] === undefined) continue;
    done.add(src);
    const r = RENDER[src] || renderGeneric;
    const card = r(data[src], src, key);
    if (card && card.tagName === "SECTION" && !card.id) card.id = "src-" + src;   // evidence anchors
    main.appendChild(card);
  }
  main.appendChild(patternCard(page, L, H));
}

function measuresCard(L, H) {
  const ms = A.index.measures;
  if (!ms.length) return h("span");
  const have = ms.filter((m) => isNum(m.values[L][H]));
  const none = ms.filter((m) => !isNum(m.values[L][H]));
  const rows = have.map((m) => {
    const v = m.values[L][H];
    const col = m.values[L].filter(isNum);
    const all = m.values.flat().filter(isNum);
    const rank = isNum(v) ? all.filter((x) => x > v).length + 1 : null;
    const lrank = isNum(v) ? col.filter((x) => x > v).length + 1 : null;
    const frac = isNum(v) && m.max > m.min ? (v - m.min) / (m.max - m.min) : 0;
    return h("tr", {}, h("td", {}, m.label), h("td", { class: "num" }, fmt(v)),
      h("td", {}, h("div", { class: "bar" }, h("div", { style: { width: (100 * frac).toFixed(1) + "%" } }))),
      h("td", { class: "muted" }, rank ? `#${rank} of ${all.length} heads · #${lrank} in layer` : ""));
  });
  return section("Measures", h("table", { class: "kv measures" }, rows),
    none.length ? h("p", { class: "muted small" }, "no value for this head: " + none.map((m) => m.label).join(", ")) : null);
}

function patternCard(page, L, H) {
  const card = section("Read in context: where it looks, what it writes");
  card.id = "in-context";
  const body = h("div", { id: "pattern-body" });
  const ex = A.index.examples || [];
  const pats = page.patterns || [];
  if (ex.length && pats.length) {
    const sel = h("select", { id: "pattern-prompt", onchange: () => show(+sel.value) },
      ex.map((e, i) => h("option", { value: i }, e.text.slice(0, 80))));
    card.appendChild(h("div", { class: "controls" }, h("label", {}, "example prompt ", sel)));
    const ctxEx = (page.in_context || {})[String(H)] || [];
    const show = (i) => {
      clear(body);
      const rc = ctxEx.find((x) => x.prompt === i);
      if (rc) body.appendChild(contextPositions(ex[i].tokens, rc));
      const p = pats.find((x) => x.prompt === i);
      if (p) body.appendChild(h("div", {}, h("h3", {}, "Attention pattern (rows: destination, columns: source)"), patternView(ex[i].tokens, p.heads[String(H)])));
    };
    card.appendChild(body);
    show(0);
  } else {
    card.appendChild(h("p", { class: "muted" }, "No example patterns in this build (built without the model)."));
    card.appendChild(body);
  }
  if (A.live) {
    const input = h("input", { id: "head-prompt", type: "text", size: 60, placeholder: "type any prompt and press Enter" });
    const run = async () => {
      clear(body).appendChild(h("p", { class: "muted" }, "running the model…"));
      try {
        const res = await livePost({ prompt: input.value, heads: [`${L}.${H}`] });
        const d = res.heads[`${L}.${H}`];
        clear(body);
        if (d.in_context) body.appendChild(contextPositions(res.tokens, d.in_context));
        else if (d.lens) body.appendChild(lensPositions(res.tokens, d.lens));
        body.appendChild(h("div", {}, h("h3", {}, "Attention pattern"), patternView(res.tokens, d.pattern)));
      } catch (e) { clear(body).appendChild(h("p", { class: "error" }, e.message)); }
    };
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") run(); });
    card.insertBefore(h("div", { class: "controls" }, input, h("button", { onclick: run }, "show pattern")), body);
  }
  return card;
}

/* pattern [dest][src] as a heat table; hover a row to see where that token looks */
function patternView(tokens, pat) {
  if (!pat) return h("p", { class: "muted" }, "no pattern");
  const S = tokens.length;
  const wrap = h("div", { class: "pattern" });
  const focus = h("div", { class: "focus" }, h("span", { class: "muted" }, "hover a row (destination token) to read its attention"));
  const t = h("table", { class: "pat" });
  const hr = h("tr", {}, h("th", {}, ""));
  for (let s = 0; s < S; s++) hr.appendChild(h("th", { class: "src" }, h("div", {}, tokText(tokens[s]))));
  t.appendChild(hr);
  for (let d = 0; d < S; d++) {
    const tr = h("tr", { onmouseenter: () => showFocus(d) }, h("th", { class: "dst" }, tokText(tokens[d])));
    for (let s = 0; s < S; s++) {
      const v = s <= d ? pat[d][s] : null;
      tr.appendChild(h("td", { title: isNum(v) ? `${tokText(tokens[d])} → ${tokText(tokens[s])}: ${fmt(v)}` : "",
        style: { background: isNum(v) ? seqColor(Math.sqrt(v)) : "#fafafa" } }));
    }
    t.appendChild(tr);
  }
  function showFocus(d) {
    clear(focus);
    focus.appendChild(h("div", {}, "from ", tok(tokens[d]), " (position " + d + ") attention goes to:"));
    focus.appendChild(h("div", { class: "toks" }, tokens.slice(0, d + 1).map((x, s) =>
      tok(x, { style: { background: actColor(pat[d][s]) }, title: fmt(pat[d][s]) }))));
  }
  wrap.appendChild(h("div", { class: "patscroll" }, t));
  wrap.appendChild(focus);
  return wrap;
}

/* ---------- renderers per source ---------- */
const RENDER = {};

RENDER.heads = function (d, src) { // the verdict ("roles") has its own card at the top
  const keys = Object.keys(d).filter((k) => k !== "roles");
  if (!keys.length) return h("span");
  const card = section("Head scores");
  const scal = Object.entries(d).filter(([, v]) => isNum(v) || v === null);
  card.appendChild(h("table", { class: "kv" }, scal.map(([k, v]) => h("tr", {}, h("td", {}, k.replace(/_/g, " ")), h("td", { class: "num" }, fmt(v))))));
  if (d.prefix_induction) {
    const p = d.prefix_induction;
    card.appendChild(h("div", {}, h("span", { class: "muted" }, "prefix induction by prefix length "), sparkline(p.scores, p.prefix_lengths)));
  }
  for (const [k, v] of Object.entries(d)) if (!isNum(v) && v !== null && k !== "prefix_induction" && k !== "roles") card.appendChild(renderKV(k, v));
  return card;
};

function sparkline(ys, xs) {
  const W = 220, Hh = 60, n = ys.length;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", Hh + 16); svg.setAttribute("class", "spark");
  const vals = ys.filter(isNum);
  const lo = Math.min(0, ...vals), hi = Math.max(1e-9, ...vals);
  let dstr = "";
  ys.forEach((y, i) => {
    if (!isNum(y)) return;
    const x = 10 + (i * (W - 20)) / Math.max(1, n - 1), yy = 4 + (Hh - 8) * (1 - (y - lo) / (hi - lo));
    dstr += (dstr ? "L" : "M") + x.toFixed(1) + "," + yy.toFixed(1);
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", x); c.setAttribute("cy", yy); c.setAttribute("r", 2.5);
    const t = document.createElementNS(ns, "title"); t.textContent = `${xs ? xs[i] : i}: ${fmt(y)}`; c.appendChild(t);
    svg.appendChild(c);
  });
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", dstr); svg.insertBefore(path, svg.firstChild);
  const lab = document.createElementNS(ns, "text");
  lab.setAttribute("x", 4); lab.setAttribute("y", Hh + 13);
  lab.textContent = `${xs ? xs[0] : 0}…${xs ? xs[n - 1] : n - 1}   max ${fmt(hi)}`;
  svg.appendChild(lab);
  return svg;
}

/* generic: any JSON value as readable HTML (tokens as chips, token/activation pairs shaded) */
function renderGeneric(d, src) { return section(titleOf(src), renderAny(d, 0)); }
function titleOf(src) { return ({ lens: "Lens", sae: "Attention SAE features", neurons: "Next-token neurons it drives", explain: "Explanations" })[src] || src; }

function renderKV(k, v) { return h("div", { class: "kvblock" }, h("h3", {}, k.replace(/_/g, " ")), renderAny(v, 1, k)); }

function tokenAct(obj) {
  // an object with a token list and a same-length number list → [tokens, values, valueKey]
  const tk = Object.keys(obj).find((k) => /tok/i.test(k) && Array.isArray(obj[k]) && obj[k].length && obj[k].every((x) => typeof x === "string"));
  if (!tk) return null;
  const vk = Object.keys(obj).find((k) => k !== tk && Array.isArray(obj[k]) && obj[k].length === obj[tk].length && obj[k].every((x) => isNum(x) || x === null));
  return vk ? [obj[tk], obj[vk], vk, tk] : null;
}

function shadedTokens(tokens, vals, label, maxAbs) {
  const mx = maxAbs || Math.max(1e-9, ...vals.filter(isNum).map(Math.abs));
  return h("div", { class: "toks shaded" }, tokens.map((t, i) =>
    tok(t, { style: { background: isNum(vals[i]) ? actColor(Math.abs(vals[i]) / mx) : "transparent" }, title: `${JSON.stringify(String(t))} ${label}: ${fmt(vals[i])}` })));
}

function renderAny(v, depth, key) {
  if (v === null || v === undefined) return h("span", { class: "muted" }, "—");
  if (typeof v === "number") return h("span", { class: "num" }, fmt(v));
  if (typeof v === "boolean") return h("span", {}, v ? "yes" : "no");
  if (typeof v === "string") {
    if (key && /^heads?$/.test(key) && /^\d+\.\d+$/.test(v)) return headLink(v);
    return key && /tok/i.test(key) ? tok(v) : h("span", { class: "str" }, v);
  }
  if (Array.isArray(v)) {
    if (!v.length) return h("span", { class: "muted" }, "(none)");
    if (v.every((x) => typeof x === "string")) {
      if (key && /^heads?$/.test(key)) return h("span", {}, v.map((x) => [/^\d+\.\d+$/.test(x) ? headLink(x) : x, " "]));
      return h("div", { class: "toks" }, v.slice(0, 200).map((x) => tok(x)));
    }
    if (v.every((x) => isNum(x) || x === null)) {
      return v.length > 12 ? sparkline(v) : h("span", { class: "nums" }, v.map((x) => fmt(x)).join("  "));
    }
    if (v.every((x) => x && typeof x === "object" && !Array.isArray(x))) return renderTable(v, depth, key);
    if (v.every((x) => Array.isArray(x))) return h("div", {}, v.slice(0, 50).map((x) => h("div", {}, renderAny(x, depth + 1, key))));
    return h("span", {}, v.slice(0, 100).map((x) => [renderAny(x, depth + 1, key), " "]));
  }
  if (typeof v === "object") {
    const ta = tokenAct(v);
    const dl = h("div", { class: "obj" });
    if (ta) dl.appendChild(shadedTokens(ta[0], ta[1], ta[2]));
    for (const [k, x] of Object.entries(v)) {
      if (ta && (k === ta[3] || k === ta[2])) continue;
      if (x !== null && typeof x === "object" && depth < 4) dl.appendChild(renderKV(k, x));
      else dl.appendChild(h("div", { class: "kvline" }, h("span", { class: "k" }, k.replace(/_/g, " ") + ": "), renderAny(x, depth + 1, k)));
    }
    return dl;
  }
  return h("span", {}, String(v));
}

function renderTable(rows, depth, key) {
  const first = rows[0];
  const ta = tokenAct(first);
  if (ta) { // examples with per-token values
    const mx = Math.max(1e-9, ...rows.flatMap((r) => (tokenAct(r) || [[], []])[1].filter(isNum).map(Math.abs)));
    return h("div", { class: "examples" }, rows.slice(0, 40).map((r) => {
      const t = tokenAct(r);
      const extra = Object.entries(r).filter(([k, x]) => t && k !== t[2] && k !== t[3] && (isNum(x) || typeof x === "string"));
      return h("div", { class: "example" }, t ? shadedTokens(t[0], t[1], t[2], mx) : null,
        extra.length ? h("span", { class: "muted small" }, extra.map(([k, x]) => `${k}: ${fmt(x)}`).join(" · ")) : null);
    }));
  }
  const cols = [];
  for (const r of rows.slice(0, 50)) for (const k of Object.keys(r)) if (!cols.includes(k) && cols.length < 10) cols.push(k);
  const t = h("table", { class: "data" }, h("tr", {}, cols.map((c) => h("th", {}, c.replace(/_/g, " ")))));
  for (const r of rows.slice(0, 100)) {
    t.appendChild(h("tr", {}, cols.map((c) => h("td", {}, cellValue(r, c, depth)))));
  }
  return h("div", { class: "tablewrap" }, t, rows.length > 100 ? h("p", { class: "muted" }, `${rows.length - 100} more rows not shown`) : null);
}

function cellValue(r, c, depth) {
  const v = r[c];
  const link = itemLink(c, v, r);
  if (link) return link;
  if (v !== null && typeof v === "object" && depth > 3) return h("span", { class: "muted" }, "…");
  return renderAny(v, depth + 1, c);
}

/* links from a row to collection items: {"feature": 12} → the feature page; {"neuron": "5.123"} → neuron page */
function itemLink(col, v, row) {
  if (v === null || v === undefined || typeof v === "object") return null;
  const colls = A.index.collections;
  for (const [i, c] of colls.entries()) {
    const singular = c.key.replace(/s$/, "");
    if (col === singular || col === singular + "_id") {
      return h("a", { href: `#/item/${i}/${encodeURIComponent(String(v))}` }, String(v));
    }
  }
  if ((col === "head" || col === "heads") && /^\d+\.\d+$/.test(String(v))) return headLink(String(v));
  return null;
}

/* ---------- collections (features, neurons) ---------- */
const LIST = {};
async function listPage(main, ci) {
  const c = A.index.collections[ci];
  if (!c) { main.appendChild(h("p", { class: "error" }, "No such list")); return; }
  main.appendChild(h("h1", {}, `${c.source}: ${c.key.replace(/_/g, " ")}`));
  let ids;
  try { ids = await load(c.base + "/ids"); } catch (e) { main.appendChild(h("p", { class: "error" }, e.message)); return; }
  const st = LIST[ci] = LIST[ci] || { sort: null, desc: true, page: 0, q: "" };
  const cols = [];
  for (const [, s] of ids.summary.slice(0, 200)) for (const k of Object.keys(s)) if (!cols.includes(k) && cols.length < 9 && !["sae", "layer", "feature", "neuron"].includes(k)) cols.push(k);
  const box = h("div", {});
  const filter = h("input", { type: "search", placeholder: "filter (text in any column)", value: st.q });
  filter.addEventListener("input", () => { st.q = filter.value; st.page = 0; draw(); });
  main.appendChild(section(`${c.n} items`, h("div", { class: "controls" }, filter), box));
  function draw() {
    clear(box);
    let rows = ids.summary;
    if (st.q) { const q = st.q.toLowerCase(); rows = rows.filter(([id, s]) => (id + " " + Object.values(s).flat().join(" ")).toLowerCase().includes(q)); }
    if (st.sort) rows = rows.slice().sort((a, b) => cmp(a[1][st.sort], b[1][st.sort]) * (st.desc ? -1 : 1));
    const per = 100, pages = Math.max(1, Math.ceil(rows.length / per));
    const t = h("table", { class: "data" }, h("tr", {}, h("th", {}, "id"), cols.map((k) => h("th", { class: "sortable",
      onclick: () => { st.desc = st.sort === k ? !st.desc : true; st.sort = k; draw(); } }, k.replace(/_/g, " ") + (st.sort === k ? (st.desc ? " ▾" : " ▴") : "")))));
    for (const [id, s] of rows.slice(st.page * per, (st.page + 1) * per)) {
      t.appendChild(h("tr", {}, h("td", {}, h("a", { href: `#/item/${ci}/${encodeURIComponent(id)}` }, id)),
        cols.map((k) => h("td", { class: isNum(s[k]) ? "num" : "" }, /tok/i.test(k) && typeof s[k] === "string" ? tok(s[k])
          : Array.isArray(s[k]) ? h("span", { class: "toks" }, s[k].map((x) => tok(x))) : fmt(s[k])))));
    }
    box.appendChild(h("div", { class: "tablewrap" }, t));
    box.appendChild(h("div", { class: "controls" },
      h("button", { onclick: () => { if (st.page > 0) { st.page--; draw(); } } }, "‹ prev"),
      h("span", {}, ` page ${st.page + 1} / ${pages} (${rows.length} rows) `),
      h("button", { onclick: () => { if (st.page < pages - 1) { st.page++; draw(); } } }, "next ›")));
  }
  draw();
}
function cmp(a, b) {
  if (a === b) return 0; if (a === undefined || a === null) return -1; if (b === undefined || b === null) return 1;
  return isNum(a) && isNum(b) ? a - b : String(a).localeCompare(String(b));
}

async function itemPage(main, ci, id) {
  const c = A.index.collections[ci];
  if (!c) { main.appendChild(h("p", { class: "error" }, "No such list")); return; }
  main.appendChild(h("div", { class: "headtitle" }, h("h1", { id: "item-title" }, `${c.key.replace(/s$/, "").replace(/_/g, " ")} ${id}`),
    h("a", { href: "#/list/" + ci }, "all " + c.key.replace(/_/g, " "))));
  let ids;
  try { ids = await load(c.base + "/ids"); } catch (e) { main.appendChild(h("p", { class: "error" }, e.message)); return; }
  const pos = ids.ids.indexOf(id);
  if (pos < 0) { main.appendChild(h("p", { class: "error" }, `No item ${id} in ${c.key}`)); return; }
  const chunk = await load(`${c.base}/${Math.floor(pos / c.chunk)}`);
  const item = chunk.items[id];
  let r = ITEM_RENDER[c.source + "." + c.key] || null;
  for (const [pre, fn] of ITEM_RENDER.__prefix || []) if (!r && (c.source + "." + c.key).startsWith(pre)) r = fn;
  main.appendChild(r ? r(item, c, id) : section(`${c.source} · ${c.key}`, renderAny(item, 0)));
}
const ITEM_RENDER = {};

/* ---------- live prompt ---------- */
async function livePost(body) {
  const r = await fetch("api/prompt", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  let j = null;
  try { j = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error((j && j.error) || `server answered ${r.status}`);
  return j;
}

const LIVE = { prompt: "The cat sat on the mat. The cat sat on the", heads: "" };
function livePage(main) {
  if (!A.live) { main.appendChild(h("p", { class: "muted" }, "The live prompt box needs `headscope atlas serve RUN_DIR` (it runs the model).")); return; }
  const info = A.liveInfo || {};
  if (!LIVE.heads) LIVE.heads = (info.default_heads || []).join(", ");
  const ta = h("textarea", { id: "live-prompt", rows: 3, cols: 80 });
  ta.value = LIVE.prompt;
  const heads = h("input", { id: "live-heads", type: "text", size: 40, value: LIVE.heads, placeholder: "heads, e.g. 3.1, 5.4" });
  const out = h("div", { id: "live-out" });
  const go = h("button", { id: "live-run", onclick: run }, "Run");
  main.appendChild(section("Explore any prompt",
    h("p", { class: "muted" }, `Runs ${info.model || "the model"} in the server. Views: ` + (info.views || []).join(", ") + `. At most ${info.max_tokens} tokens, ${info.max_heads} heads.`),
    ta, h("div", { class: "controls" }, h("label", {}, "heads ", heads), go), out));
  async function run() {
    LIVE.prompt = ta.value; LIVE.heads = heads.value;
    clear(out).appendChild(h("p", { class: "muted", id: "live-wait" }, "running the model…"));
    const hs = heads.value.split(/[\s,]+/).filter(Boolean);
    try {
      const res = await livePost({ prompt: ta.value, heads: hs });
      clear(out);
      renderLive(out, res);
    } catch (e) { clear(out).appendChild(h("p", { class: "error", id: "live-error" }, e.message)); }
  }
}

function renderLive(out, res) {
  out.appendChild(h("div", { class: "toks", id: "live-tokens" }, res.tokens.map((t) => tok(t))));
  for (const [k, d] of Object.entries(res.heads || {})) {
    const card = section(`Head ${k}`);
    card.querySelector("h2").appendChild(h("span", {}, " ", headLink(k)));
    if (d.lens) card.appendChild(lensPositions(res.tokens, d.lens));
    if (d.in_context) card.appendChild(contextPositions(res.tokens, d.in_context));
    if (d.pattern) card.appendChild(patternView(res.tokens, d.pattern));
    for (const [kk, v] of Object.entries(d)) if (!["pattern", "lens", "in_context"].includes(kk)) card.appendChild(renderKV(kk, v));
    out.appendChild(card);
  }
  for (const [k, v] of Object.entries(res.views || {})) {
    if (k === "sae") renderLiveSae(res.tokens, v).forEach((c) => out.appendChild(c));
    else if (k === "neurons") out.appendChild(renderLiveNeurons(v));
    else out.appendChild(section(k, renderAny(v, 0, k)));
  }
  for (const [k, v] of Object.entries(res.errors || {})) out.appendChild(h("p", { class: "error" }, `${k}: ${v}`));
}

/* lens: {"lens": [S][k] tokens, "lens_prob": [S][k], "unembedding": [S][k], "gain"} → table of positions */
function lensPositions(tokens, lens) {
  // A lens with no information gain over the null lens says nothing: its tokens are not shown as if they did.
  const silent = lens.informative === false || (isNum(lens.gain) && lens.gain <= 0);
  const t = h("table", { class: "data lenspos" }, h("tr", {}, h("th", {}, "position"), h("th", {}, "lens top tokens"), h("th", {}, "unembedding baseline (W_U·N(r_h))")));
  tokens.forEach((x, i) => t.appendChild(h("tr", {}, h("td", {}, tok(x)),
    silent ? h("td", { class: "muted" }, "—") :
    h("td", { class: "lens-tokens" }, (lens.lens[i] || []).map((y, j) => tok(y, { title: lens.lens_prob ? `p = ${fmt(lens.lens_prob[i][j])}` : "" }))),
    h("td", { class: "muted" }, (lens.unembedding && lens.unembedding[i] || []).map((y) => tok(y))))));
  return h("div", {}, h("h3", {}, "Lens: what this head's output says about the next token, per position" + (isNum(lens.gain) ? ` (held-out information gain over the null lens ${fmt(lens.gain)} bits/token)` : "")),
    silent ? h("p", { class: "muted" }, "This lens reads nothing beyond base rates from this head (gain ≤ 0): its tokens are not shown.") : null,
    h("div", { class: "tablewrap" }, t));
}

function renderLiveSae(tokens, views) {
  const out = [];
  for (const [name, v] of Object.entries(views)) {
    const card = section(`SAE ${name} (layer ${v.layer}): features firing at each position, with their DFA`);
    const t = h("table", { class: "data" }, h("tr", {}, h("th", {}, "position"), h("th", {}, "features (activation) · source tokens by DFA · DFA by head")));
    v.positions.forEach((fl, i) => {
      if (!fl.length) return;
      t.appendChild(h("tr", {}, h("td", {}, tok(tokens[i])), h("td", {}, fl.map((f) => {
        const mx = Math.max(1e-9, ...f.dfa_sources.map((s) => Math.abs(s.dfa)));
        const hm = Math.max(1e-9, ...f.dfa_heads.map(Math.abs));
        return h("div", { class: "livefeat" }, featureLink(name, f.feature), h("span", { class: "muted small" }, ` ${fmt(f.act)} `),
          h("span", { class: "toks" }, f.dfa_sources.map((s) => tok(s.token, { style: { background: s.dfa >= 0 ? actColor(Math.abs(s.dfa) / mx) : `rgba(60,120,220,${(0.1 + 0.8 * Math.abs(s.dfa) / mx).toFixed(3)})` }, title: `position ${s.pos}: DFA ${fmt(s.dfa)}` }))),
          h("span", { class: "small" }, " heads: ", f.dfa_heads.map((x, hh) => [h("a", { href: `#/head/${v.layer}.${hh}`, style: { opacity: (0.25 + 0.75 * Math.abs(x) / hm).toFixed(2) }, title: `DFA ${fmt(x)}` }, `${v.layer}.${hh}`), " "])));
      }))));
    });
    card.appendChild(h("div", { class: "tablewrap" }, t));
    out.push(card);
  }
  return out;
}

function renderLiveNeurons(rows) {
  const card = section("Next-token neurons that fire (≥ half their max on mined prompts) and the heads that drive them");
  if (!rows.length) { card.appendChild(h("p", { class: "muted" }, "None of the studied neurons fires on this prompt.")); return card; }
  const t = h("table", { class: "data" }, h("tr", {}, ["neuron", "predicts", "fires at", "activation (of max)", "heads by attribution A (bold: active, A > mean + 2σ)"].map((x) => h("th", {}, x))));
  for (const r of rows) t.appendChild(h("tr", {}, h("td", {}, neuronLink(r.neuron)), h("td", {}, tok(r.token)), h("td", {}, `${r.pos} `, tok(r.at)),
    h("td", { class: "num" }, `${fmt(r.act)} (${Math.round(100 * r.rel_act)} %)`),
    h("td", {}, r.heads.map((x) => [h(x.active ? "b" : "span", {}, headLink(x.head)), h("span", { class: "muted small" }, ` ${fmt(x.A)}  `)]))));
  card.appendChild(h("div", { class: "tablewrap" }, t));
  return card;
}

/* ---------- SAE ---------- */
function featureColl(sae) {
  const i = A.index.collections.findIndex((c) => c.source === "sae" && c.key === "features_" + sae);
  return i < 0 ? null : i;
}
function featureLink(sae, f) {
  const ci = featureColl(sae);
  return ci === null ? h("span", {}, "#" + f) : h("a", { href: `#/item/${ci}/${encodeURIComponent(String(f))}`, class: "featlink" }, "#" + f);
}

RENDER.sae = function (d, src, key) {
  const card = section("Attention-SAE features of this head");
  const recs = d && d.sae ? d.sae : d;
  for (const r of Array.isArray(recs) ? recs : [recs]) {
    card.appendChild(h("p", { class: "sae-verdict" }, h("b", {}, `SAE ${r.sae}`), " · ",
      polyText(r)));
    if (r.power && r.power.how) card.appendChild(h("p", { class: "muted small" }, "power: " + r.power.how));
    const t = h("table", { class: "data feats" }, h("tr", {}, h("th", {}, "feature"), h("th", {}, "weight attribution to this head"), h("th", {}, "top output tokens")));
    for (const f of r.top_features || []) {
      t.appendChild(h("tr", {}, h("td", {}, featureLink(r.sae, f.feature)),
        h("td", {}, h("div", { class: "bar" }, h("div", { style: { width: (100 * Math.max(0, Math.min(1, f.attribution))).toFixed(1) + "%" } })), " ", fmt(f.attribution)),
        h("td", {}, h("div", { class: "toks" }, (f.top_tokens || []).map((x) => tok(x))))));
    }
    card.appendChild(h("div", { class: "tablewrap" }, t));
    if (r.ioi_features && r.ioi_features.length) card.appendChild(renderKV("IOI: features mostly of this head (Δ logit diff when ablated at S2)", r.ioi_features));
    for (const [k, v] of Object.entries(r)) if (!["sae", "top_features", "n_groups", "polysemantic", "ioi_features", "groups", "power", "verdict"].includes(k)) card.appendChild(renderKV(k, v));
  }
  return card;
};

function contextView(ex, maxAct) {
  const mx = maxAct || Math.max(1e-9, ...ex.acts.filter(isNum));
  return h("div", { class: "toks shaded ctx" }, ex.context.map((t, i) =>
    tok(t, { class: "tok" + (i === ex.index ? " here" : ""), style: { background: isNum(ex.acts[i]) ? actColor(ex.acts[i] / mx) : "transparent" }, title: `${JSON.stringify(String(t))} activation ${fmt(ex.acts[i])}` })),
    h("span", { class: "muted small" }, "  act " + fmt(ex.act)));
}

function renderFeature(item, c, id) {
  const wrap = h("div", {});
  if (item.explanations && item.explanations.length) wrap.appendChild(explanationsCard(item.explanations, "Explanations and their scores"));
  const L = item.layer;
  const dens = item.density;
  wrap.appendChild(section("Summary", h("table", { class: "kv" },
    h("tr", {}, h("td", {}, "SAE"), h("td", {}, `${item.sae} (layer ${L})`)),
    h("tr", {}, h("td", {}, "density"), h("td", {}, isNum(dens) ? `${fmt(100 * dens)} % of tokens (log10 ${fmt(Math.log10(Math.max(dens, 1e-12)), 2)})` : "—")),
    h("tr", {}, h("td", {}, "max activation"), h("td", {}, fmt(item.max_act))))));
  if (item.head_attribution) {
    const t = h("table", { class: "kv" }, item.head_attribution.map((w, hh) => h("tr", {},
      h("td", {}, headLink(`${L}.${hh}`)), h("td", {}, h("div", { class: "bar" }, h("div", { style: { width: (100 * w).toFixed(1) + "%" } }))), h("td", { class: "num" }, fmt(w)))));
    wrap.appendChild(section("Weight attribution to heads (‖W_dec[f, head]‖ / Σ)", t));
  }
  if (item.examples) wrap.appendChild(section("Max-activating examples (held-out)", h("div", { class: "examples" },
    item.examples.map((e) => h("div", { class: "example" }, contextView(e, item.max_act))))));
  if (item.dfa) {
    const d = item.dfa;
    const srcMax = Math.max(1e-9, ...d.sources.map((s) => Math.abs(s.dfa)));
    const card = section("Direct feature attribution (top example)",
      h("p", { class: "muted" }, `destination position ${d.dest}; source tokens by |DFA| summed over heads:`),
      h("div", { class: "toks" }, d.sources.map((s) => tok(s.token, { style: { background: s.dfa >= 0 ? actColor(Math.abs(s.dfa) / srcMax) : `rgba(60,120,220,${(0.1 + 0.8 * Math.abs(s.dfa) / srcMax).toFixed(3)})` }, title: `position ${s.pos}: DFA ${fmt(s.dfa)}` }))));
    if (d.per_head) {
      const hm = Math.max(1e-9, ...d.per_head.map(Math.abs));
      card.appendChild(h("h3", {}, "DFA by head"));
      card.appendChild(h("table", { class: "kv" }, d.per_head.map((v, hh) => h("tr", {}, h("td", {}, headLink(`${L}.${hh}`)),
        h("td", {}, h("div", { class: "bar" }, h("div", { style: { width: (100 * Math.abs(v) / hm).toFixed(1) + "%", background: v < 0 ? "#c0392b" : "" } }))), h("td", { class: "num" }, fmt(v))))));
    }
    wrap.appendChild(card);
  }
  if (item.logits) {
    const col = (xs) => h("table", { class: "kv" }, xs.map(([t, v]) => h("tr", {}, h("td", {}, tok(t)), h("td", { class: "num" }, fmt(v)))));
    wrap.appendChild(section("Direct effect on the logits", h("div", { class: "twocol" },
      h("div", {}, h("h3", {}, "top (promoted)"), col(item.logits.top || [])), h("div", {}, h("h3", {}, "bottom (suppressed)"), col(item.logits.bottom || [])))));
  }
  if (item.quantiles) wrap.appendChild(section("Random examples by activation quantile", item.quantiles.slice().reverse().map((q) =>
    h("div", {}, h("h3", {}, `${Math.round(100 * q.range[0])}–${Math.round(100 * q.range[1])} % of max (${q.examples.length})`),
      h("div", { class: "examples" }, q.examples.slice(0, 5).map((e) => h("div", { class: "example" }, contextView(e, item.max_act))))))));
  return wrap;
}
ITEM_RENDER.__prefix = [["sae.features_", renderFeature]];

/* ---------- next-token neurons ---------- */
function neuronLink(k) {
  const ci = A.index.collections.findIndex((c) => c.source === "neurons" && c.key === "neurons");
  return ci < 0 ? h("span", {}, k) : h("a", { href: `#/item/${ci}/${encodeURIComponent(k)}` }, k);
}

RENDER.neurons = function (d) {
  const card = section("Next-token neurons this head drives");
  card.appendChild(h("p", { class: "muted" }, `Active (attribution > mean + 2σ of eligible heads) on 25–75 % of the prompts of ${d.n_neurons} neuron(s); ` +
    (isNum(d.mean_drop_active) ? `ablating the head lowers P(token) by ${fmt(d.mean_drop_active)} on active prompts vs ${fmt(d.mean_drop_inactive)} on inactive ones.` : "no ablation in this run.")));
  const t = h("table", { class: "data" }, h("tr", {}, ["neuron", "predicts", "active (train)", "active (held-out)", "mean A", "ΔP ablated: active", "inactive"].map((x) => h("th", {}, x))));
  for (const n of d.neurons || []) {
    t.appendChild(h("tr", {}, h("td", {}, neuronLink(n.neuron)), h("td", {}, tok(n.token)), h("td", { class: "num" }, fmt(n.frac_train, 2)),
      h("td", { class: "num" }, fmt(n.frac_test, 2)), h("td", { class: "num" }, fmt(n.mean_A)), h("td", { class: "num" }, fmt(n.drop_active)), h("td", { class: "num" }, fmt(n.drop_inactive))));
  }
  if ((d.neurons || []).length) card.appendChild(h("div", { class: "tablewrap" }, t));
  else card.appendChild(h("p", {}, "Not one of the heads active on 25–75 % of a neuron's prompts (the pairs that get explained)."));
  if ((d.also_active || []).length) {
    card.appendChild(h("p", { class: "muted" }, "Active (same rule) on fewer or more of the prompts of these neurons:"));
    const t2 = h("table", { class: "data also-active" }, h("tr", {}, ["neuron", "predicts", "active (train)", "active (held-out)", "mean A"].map((x) => h("th", {}, x))));
    for (const n of d.also_active) t2.appendChild(h("tr", {}, h("td", {}, neuronLink(n.neuron)), h("td", {}, tok(n.token)),
      h("td", { class: "num" }, fmt(n.frac_train, 2)), h("td", { class: "num" }, fmt(n.frac_test, 2)), h("td", { class: "num" }, fmt(n.mean_A))));
    card.appendChild(h("div", { class: "tablewrap" }, t2));
  }
  return card;
};

function labelCard(lab, afterVerdict) {
  // after the verdict card, only the facts the verdict does not already state (and an LLM summary)
  const facts = (lab.facts || []).filter((f) => !(afterVerdict && f.kind === "roles"));
  if (afterVerdict && !facts.length && !lab.summary) return h("span");
  lab = Object.assign({}, lab, { facts });
  const card = h("section", { class: "card label", id: "head-label" }, h("h2", {}, afterVerdict ? "Other facts, with their sources" : "In one line"));
  if (lab.label && !afterVerdict) card.appendChild(h("p", { class: "label-line" }, lab.label));
  if (lab.summary) card.appendChild(h("blockquote", { class: "label-summary" }, lab.summary, h("span", { class: "muted small" }, "  (written by an LLM from the facts below)")));
  if (lab.facts && lab.facts.length) card.appendChild(h("ul", { class: "facts" }, lab.facts.map((f) => h("li", {},
    f.text, h("span", { class: "muted small" }, " — source: "), factLink(f)))));
  return card;
}
function factLink(f) {
  if (f.kind === "sae" && f.feature !== undefined) return h("span", {}, featureLink(f.sae, f.feature), h("span", { class: "muted small" }, " " + f.source));
  return h("code", { class: "small" }, f.source);
}

function scoreLine(s) {
  if (!s) return h("span", { class: "muted small" }, "not scored");
  const part = (k, label) => s[k] ? `${label}: ${fmt(s[k].balanced_accuracy)} (shuffled explanation ${fmt(s[k].shuffled_balanced_accuracy)})` +
    (isNum(s[k].auroc) ? `, AUROC ${fmt(s[k].auroc)} (shuffled ${fmt(s[k].shuffled_auroc)})` : "") : null;
  return h("span", { class: "muted small scores" }, [part("detection", "detection"), part("fuzzing", "fuzzing")].filter(Boolean).join(" · ") + ` · judge ${s.judge}`);
}

function explanationsCard(rows, title) {
  return section(title, rows.map((e) => h("div", { class: "explanation" },
    h("div", {}, h("b", {}, e.backend), " ", e.head ? h("span", {}, "via head ", headLink(e.head), " ") : null,
      e.scores !== undefined ? scoreLine(e.scores) : h("span", { class: "muted small" }, ` E ${fmt(e.E)} · TPR ${fmt(e.TPR)} · TNR ${fmt(e.TNR)}`)),
    h("blockquote", {}, e.explanation || "(no explanation)"))));
}

RENDER.explain = function (d) {
  if (!d.explanations) return h("span");
  const card = section("Explanations: when does this head drive the neuron?");
  card.appendChild(h("p", { class: "muted" }, `${d.n_explained} explained (neuron, head) pair(s); mean score E = (TPR + TNR)/2 on held-out prompts: ${fmt(d.mean_E)}`));
  for (const e of d.explanations || []) {
    card.appendChild(h("div", { class: "explanation" },
      h("div", {}, neuronLink(e.neuron), " → ", tok(e.token), h("span", { class: "muted small" }, ` ${e.backend} · E ${fmt(e.E)} · TPR ${fmt(e.TPR)} · TNR ${fmt(e.TNR)}`)),
      h("blockquote", {}, e.explanation || "(no explanation)")));
  }
  return card;
};

function renderNeuron(n, c, id) {
  const wrap = h("div", {});
  if (n.explanations && n.explanations.length) wrap.appendChild(explanationsCard(n.explanations, "Explanations (when each head drives this neuron) and their scores"));
  wrap.appendChild(section("Neuron", h("table", { class: "kv" },
    h("tr", {}, h("td", {}, "predicts"), h("td", {}, tok(n.token))),
    h("tr", {}, h("td", {}, "congruence W_out·W_U (dot / cos)"), h("td", {}, `${fmt(n.dot)} / ${fmt(n.cos)}`)),
    h("tr", {}, h("td", {}, "kurtosis / skew of its congruence"), h("td", {}, `${fmt(n.kurtosis, 1)} / ${fmt(n.skew, 2)}`)),
    h("tr", {}, h("td", {}, "most congruent tokens"), h("td", {}, h("div", { class: "toks" }, (n.top_tokens || []).map((x) => tok(x))))),
    h("tr", {}, h("td", {}, "prompts (train / held-out)"), h("td", {}, `${n.n_train} / ${n.n_test}`)))));
  const heads = Object.entries(n.heads || {}).sort((a, b) => (b[1].frac_train || 0) - (a[1].frac_train || 0));
  const t = h("table", { class: "data" }, h("tr", {}, ["head", "active (train)", "active (held-out)", "mean A", "explained pair"].map((x) => h("th", {}, x))));
  for (const [k, s] of heads) t.appendChild(h("tr", { class: (n.explain || []).includes(k) ? "hl" : "" }, h("td", {}, headLink(k)),
    h("td", { class: "num" }, fmt(s.frac_train, 2)), h("td", { class: "num" }, fmt(s.frac_test, 2)), h("td", { class: "num" }, fmt(s.mean_A)),
    h("td", {}, (n.explain || []).includes(k) ? "yes (active on 25–75 %)" : "")));
  wrap.appendChild(section("Heads that drive it (active on at least one prompt)", h("div", { class: "tablewrap" }, t)));
  const ps = n.prompts || [];
  const mx = Math.max(1e-9, ...ps.flatMap((p) => p.acts.filter(isNum)));
  wrap.appendChild(section("Max-activating prompts (each ends at the activating token)", h("div", { class: "examples" },
    ps.map((p) => h("div", { class: "example" }, shadedTokens(p.tokens, p.acts, "activation", mx), h("span", { class: "muted small" }, ` ${p.split} · act ${fmt(p.act)}`))))));
  return wrap;
}
ITEM_RENDER["neurons.neurons"] = renderNeuron;

/* ---------- lens ---------- */
RENDER.lens = function (d) {
  const card = section("Lens: this head's output read as next-token predictions");
  const kl = [["lens", d.kl_lens], ["unembedding baseline W_U·N(r_h)", d.kl_unembed], ["unembedding, no final norm", d.kl_unembed_nonorm], ["null (base rates only)", d.kl_null]]
    .filter(([, v]) => v !== undefined && v !== null);
  const mx = Math.max(1e-9, ...kl.map(([, v]) => (isNum(v) ? v : 0)));
  card.appendChild(h("p", { class: "muted" }, "Held-out KL(p_model ‖ q) in bits/token, all positions (lower is better):"));
  card.appendChild(h("table", { class: "kv" }, kl.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, fmt(v)),
    h("td", {}, h("div", { class: "bar" }, h("div", { style: { width: (isNum(v) ? 100 * v / mx : 0).toFixed(1) + "%" } })))))));
  card.appendChild(h("p", {}, `gain over the null lens: ${fmt(d.gain)} ± ${fmt(d.gain_se)} bits/token — `,
    h("b", {}, d.informative ? "informative" : "not informative (one-sided test, Benjamini–Hochberg over heads)"),
    isNum(d.improvement) ? ` · improvement over the unembedding: ${fmt(d.improvement)}` : "",
    isNum(d.top1) ? ` · top-1 agreement with the model: ${fmt(100 * d.top1, 1)} %` + (isNum(d.top1_unembed) ? ` (baseline ${fmt(100 * d.top1_unembed, 1)} %)` : "") : ""));
  if (d.top_tokens && d.top_tokens.length) {
    card.appendChild(h("h3", {}, "Its lens's largest KL(lens ‖ null) terms (held-out average)" + (d.informative ? "" : " — this lens is not informative: read nothing into them")));
    card.appendChild(h("div", { class: "toks lens-tokens" }, d.top_tokens.map((t) => Array.isArray(t) ? tok(t[0], { title: fmt(t[1]) }) : tok(typeof t === "object" && t ? (t.token ?? JSON.stringify(t)) : t))));
  }
  const apps = lensApps(d); // only where measured
  if (apps) card.appendChild(apps);
  for (const [k, v] of Object.entries(d)) if (!["kl_lens", "kl_unembed", "kl_unembed_nonorm", "kl_null", "gain", "gain_se", "informative", "improvement", "top1", "top1_unembed", "top_tokens", "entropy", "steering", "localisation", "applications"].includes(k)) card.appendChild(renderKV(k, v));
  return card;
};

/* The Attention Lens paper's applications (issue 24), each next to its control and only where measured:
   a test that failed reads "does not beat the control", never a claim. */
const NO_CLAIM = "does not beat the control";
const STEER_DIRS = { unembed: "unembedding row W_U[t]", lens: "lens-derived direction" };
function lensGlobals() { return ((A.index && A.index.globals) || {}).lens || {}; }
function verdictCell(ok, yes) { return h("td", { class: "state " + (ok ? "ok" : "fails") }, ok ? "yes — " + yes : "no — " + NO_CLAIM); }
function signed(v) { return isNum(v) ? (v >= 0 ? "+" : "") + fmt(v) : "—"; }

function lensApps(d) {
  const st = d.steering, loc = d.localisation, apps = d.applications || {};
  if (!st && !loc) return null;
  const box = h("div", { class: "lens-apps", id: "lens-apps" }, h("h3", {}, "Applications (Attention Lens paper), measured"));
  const said = [];
  if (apps.steering !== undefined) said.push(["steering", apps.steering, "steers beyond a random direction of the same norm"]);
  if (apps.localisation !== undefined) said.push(["bias localisation", apps.localisation, "the token list beats its frequency-matched control list"]);
  box.appendChild(h("p", { class: "apps-passed", id: "apps-passed" }, "This head passed: ",
    said.map(([k, ok, yes], i) => [i ? " · " : "", h("b", {}, k), ": ", h("span", { class: ok ? "ok" : "fails" }, ok ? "yes (" + yes + ")" : "no — " + NO_CLAIM)])));
  if (st) {
    const se = lensGlobals().steer_eval || {};
    const cols = ["steering direction", "strength (× head output norm)", "Δ log₂ p(target), bits", "control: random direction, same norm", "difference [95 % CI]", "q (BH)", "passes (BH)", "KL cost, bits", "residual stream at the same KL"];
    const t = h("table", { class: "data steer", id: "steer-table" }, h("tr", {}, cols.map((c) => h("th", {}, c))));
    for (const [dir, r] of Object.entries(st.directions || {})) {
      const resid = dir === "unembed" ? h("span", { class: "muted" }, "the same edit (W_U[t] after the layer's attention)")
        : isNum(r.resid_dlogp_at_same_kl) ? `${signed(r.resid_dlogp_at_same_kl)} (this head's edit ${signed(r.vs_resid)} beside it)` : h("span", { class: "muted" }, "beyond its measured range");
      t.appendChild(h("tr", { class: "steer-row " + (r.passes ? "passes" : "fails"), "data-direction": dir },
        h("td", {}, STEER_DIRS[dir] || dir),
        h("td", { class: "num" }, fmt(r.strength)),
        h("td", { class: "num" }, signed(r.dlogp)),
        h("td", { class: "num steer-control" }, signed(r.dlogp_random)),
        h("td", { class: "num" }, `${signed(r.diff)} ${ciText(r.diff_ci)}`),
        h("td", { class: "num" }, fmt(r.q_value)),
        verdictCell(!!r.passes, "beats the control"),
        h("td", { class: "num" }, fmt(r.kl)),
        h("td", { class: "num" }, resid)));
    }
    box.appendChild(h("div", { class: "tablewrap" }, t));
    box.appendChild(h("p", { class: "muted small" }, "Steering (lens steer-eval): the change in the target token's log₂-probability at the next position when the direction is added to this head's output, averaged over "
      + (Array.isArray(se.tokens) ? `${se.tokens.length} target tokens` : "the target tokens") + (isNum(se.n_prompts) ? ` × ${se.n_prompts} prompts` : "")
      + "; each direction at the strength with the largest difference over the random direction (the passing strength where one passes). CI over tokens; passes: two-sided t test, Benjamini–Hochberg "
      + `(q = ${fmt(isNum(se.q) ? se.q : 0.05)}) over every head, direction and strength tested, with a positive difference. KL cost: KL(clean ‖ steered) of the next-token distribution on unrelated prompts.`));
  }
  if (loc) {
    const g = (lensGlobals().scan || {}).localisation || {};
    const cols = ["bias localisation", "token list in the lens top-k (rate)", "control: frequency-matched list (rate)", "difference ± SE", "q (BH)", "localised"];
    const t = h("table", { class: "data loc", id: "loc-table" }, h("tr", {}, cols.map((c) => h("th", {}, c))),
      h("tr", { class: "loc-row " + (loc.localised ? "passes" : "fails") },
        h("td", {}, "lens scan --token-list"),
        h("td", { class: "num" }, fmt(loc.rate)), h("td", { class: "num loc-control" }, fmt(loc.control_rate)),
        h("td", { class: "num" }, `${signed(loc.diff)} ± ${fmt(loc.se)}`), h("td", { class: "num" }, fmt(loc.q_value)),
        verdictCell(!!loc.localised, "beats the control")));
    box.appendChild(h("div", { class: "tablewrap" }, t));
    box.appendChild(h("p", { class: "muted small" }, "Bias localisation (lens scan --token-list): the fraction of prompt positions where a listed token is among this head's lens top-k, against the same rate for a control list of the same corpus frequency"
      + (isNum(g.n_prompts) ? `, over ${g.n_prompts} prompts` : "") + `; SE over prompts, one-sided test, Benjamini–Hochberg (q = ${fmt(isNum(g.q) ? g.q : 0.05)}) over the scanned heads.`));
  }
  return box;
}

/* The run's lens applications: the classifier against its baselines, the heads that passed steering and localisation. */
function lensAppsCard() {
  const g = lensGlobals(), se = g.steer_eval, sc = g.scan || {}, cl = sc.classifier, loc = sc.localisation;
  if (!se && !cl && !loc) return null;
  const card = h("section", { class: "card", id: "lens-apps-summary" }, h("h2", {}, "Lens applications (Attention Lens paper), measured against their controls"));
  const heads = (xs) => (xs || []).length ? xs.map((k, i) => [i ? ", " : "", /^\d+\.\d+$/.test(k) ? headLink(k) : String(k)]) : h("span", { class: "muted" }, "none");
  if (cl && cl.auroc) {
    const names = { lens: "lens classifier", bag_of_words: "baseline: bag of words (no model)", unembed: "baseline: unembedding W_U·N(r_h), no lens", random_heads: "baseline: lens on random head outputs" };
    const t = h("table", { class: "data classifier", id: "classifier-table" },
      h("tr", {}, ["prompt-set classifier", "held-out AUROC [95 % CI]", "lens − baseline [95 % CI]", "lens beats it"].map((c) => h("th", {}, c))));
    for (const [k, a] of Object.entries(cl.auroc)) {
      const v = (cl.vs_lens || {})[k];
      t.appendChild(h("tr", { class: "clf-row", "data-reader": k }, h("td", {}, k === "lens" ? h("b", {}, names[k]) : (names[k] || k)),
        h("td", { class: "num" }, `${fmt(a.auroc)} ${ciText(a.ci)}`),
        h("td", { class: "num" }, v ? `${signed(v.diff)} ${ciText(v.ci)}` : "—"),
        v ? verdictCell(!!v.lens_better, "beats it") : h("td", {}, "")));
    }
    card.appendChild(h("h3", {}, "Detecting a prompt set from lens outputs (lens scan --contrast)"));
    const lost = Object.entries(cl.vs_lens || {}).filter(([, v]) => !v.lens_better).map(([k]) => names[k] || k);
    card.appendChild(h("p", { class: "clf-verdict", id: "classifier-verdict" }, h("b", {}, cl.beats_baselines ? "The lens classifier beats every baseline." : "The lens classifier " + NO_CLAIM + "."),
      lost.length ? h("span", { class: "muted" }, " It does not beat: " + lost.join("; ") + ".") : null));
    card.appendChild(h("div", { class: "tablewrap" }, t));
    card.appendChild(h("p", { class: "muted small" }, `${fmt(cl.n)} prompts, cross-validated by ${cl.grouped_by || "prompt"} (${fmt(cl.n_groups)} groups, ${fmt(cl.folds)} folds); CIs: bootstrap over ${cl.grouped_by === "source" ? "sources" : "prompts"}. The lens classifier is interesting only where it beats every baseline (difference CI above 0).`));
  }
  if (se) {
    card.appendChild(h("h3", {}, "Steering through a head (lens steer-eval)"));
    card.appendChild(h("p", { id: "steer-passed" }, "Heads that steer beyond a random direction of the same norm (BH): ", heads(se.passed),
      h("span", { class: "muted" }, ` — of ${(se.heads || []).length} tested: `), heads(se.heads),
      (se.passed || []).length < (se.heads || []).length ? h("span", { class: "muted" }, ". Every other tested head " + NO_CLAIM + ".") : "."));
    card.appendChild(h("p", { class: "muted small" }, `${Array.isArray(se.tokens) ? se.tokens.length : "—"} target tokens × ${fmt(se.n_prompts)} prompts; strengths ${(se.strengths || []).map((x) => fmt(x)).join(", ")} × the head's output norm` + (se.clean && isNum(se.clean.ppl) ? `; clean continuation perplexity ${fmt(se.clean.ppl)}` : "") + ". Each head's page shows its rows against the control."));
  }
  if (loc) {
    card.appendChild(h("h3", {}, "Bias localisation (lens scan --token-list)"));
    card.appendChild(h("p", { id: "loc-passed" }, "Heads localised (the token list beats a frequency-matched control list, BH): ", heads(loc.localised),
      isNum(loc.n_localised) && !(loc.localised || []).length ? h("span", { class: "muted" }, ` — every scanned head ${NO_CLAIM}.`) : null));
    if (Array.isArray(loc.control_tokens) && loc.control_tokens.length)
      card.appendChild(h("div", { class: "muted small" }, "control tokens: ", h("span", { class: "toks" }, loc.control_tokens.slice(0, 40).map((x) => tok(x)))));
  }
  return card;
}

/* ---------- verdict, roles table, reading in context ---------- */
function polyText(r) { // the polysemanticity verdict with the test's power beside it; never a monosemanticity claim
  if (r.polysemantic === undefined) return "";
  if (r.polysemantic) return `polysemantic (${r.n_groups} groups among its top features, BH q = ${fmt(r.q_poly)})`;
  const by = r.power && r.power.by_group_size ? Object.entries(r.power.by_group_size)
    .filter(([, x]) => isNum(x.detected) && isNum(x.planted)).sort((a, b) => +a[0] - +b[0]) : [];
  if (!by.length) return "not shown polysemantic; this test's power was not measured (sae analysis --n-planted), so nothing more is claimed";
  return `${r.verdict || "not polysemantic"} — not shown polysemantic; on this head the test detects two planted groups of ${by.map(([g]) => g).join(" / ")} features` +
    ` (pairwise cosine ${fmt(r.power.cos, 2)}) in ${by.map(([, x]) => `${x.detected}/${x.planted}`).join(" / ")} plantings`;
}

function scrollToId(id) { const el = document.getElementById(id); if (el) el.scrollIntoView({ behavior: "instant", block: "start" }); }
function evidenceLink(text, target) {
  return h("a", { href: "javascript:void 0", class: "evidence", "data-target": target, onclick: (e) => { e.preventDefault(); scrollToId(target); } }, text);
}
function ciText(ci) { return Array.isArray(ci) && ci.length === 2 ? `[${fmt(ci[0])}, ${fmt(ci[1])}]` : "—"; }

function verdictCard(v) {
  const card = h("section", { class: "card verdict", id: "head-verdict" }, h("h2", {}, "Verdict"));
  card.appendChild(h("p", { class: "verdict-line", id: "verdict-text" }, v.roles_sentence));
  if ((v.findings || []).length) card.appendChild(h("ul", { class: "facts" }, v.findings.map((f) => h("li", {}, f.text + " ",
    f.anchor ? evidenceLink("evidence", f.anchor) : null, h("span", { class: "muted small" }, " — " + f.source)))));
  const links = (v.links || []).filter((l) => l.target.startsWith("role-"));
  card.appendChild(h("p", { class: "muted small" }, "Evidence: ", links.map((l) => [evidenceLink(l.text, l.target), " · "]),
    evidenceLink("roles table", "roles-table"), " · ", evidenceLink("read in context", "in-context")));
  const cols = ["role", "score", "control", "95 % CI", "q", "causal effect", "95 % CI", "q", "screen (AtP)", "verdict"];
  const t = h("table", { class: "data roles", id: "roles-table" }, h("tr", {}, cols.map((c) => h("th", {}, c))));
  for (const r of v.rows || []) {
    const state = r.confirmed ? "confirmed" : r.shown ? (r.causal ? (isNum(r.effect) ? "shown; causal test not passed" : "shown; not ablated (untested causally)") : "shown; no causal test for this role") : "not shown";
    t.appendChild(h("tr", { id: "role-" + r.role, class: "role-row " + (r.confirmed ? "confirmed" : r.shown ? "shown" : "none"), title: `${r.definition} (${r.source})` },
      h("td", {}, h("b", {}, r.title)),
      h("td", { class: "num" }, `${fmt(r.score)}`, h("span", { class: "muted small" }, " " + r.score_name)),
      h("td", { class: "num" }, `${fmt(r.control)}`, h("span", { class: "muted small" }, " " + r.control_name)),
      h("td", { class: "num" }, ciText(r.ci)), h("td", { class: "num" }, fmt(r.q)),
      h("td", { class: "num" }, r.causal ? fmt(r.effect) : "—", r.causal && r.metric ? h("span", { class: "muted small" }, " " + r.metric) : null),
      h("td", { class: "num" }, ciText(r.effect_ci)), h("td", { class: "num" }, fmt(r.effect_q)),
      h("td", { class: "num" }, fmt(r.screen)), h("td", { class: "state" }, state)));
  }
  card.appendChild(h("div", { class: "tablewrap" }, t));
  card.appendChild(h("p", { class: "muted small" }, "A role is shown when its score beats its control (one-sided test, Benjamini–Hochberg over heads) and confirmed when ablating the head also has the effect the role predicts on the role's own task (expected sign, CI excluding 0, BH). The screen is the attribution-patching estimate of the same effect. Hover a row for the role's definition and source."));
  return card;
}

/* per position: where the head looks (excluding BOS) and the ranks of the attended token and of the token after it */
function rankCell(r, cap) {
  if (!isNum(r)) return h("td", { class: "num muted" }, "—");
  if (isNum(cap) && r >= cap) return h("td", { class: "num rank muted" }, "≥" + cap);
  return h("td", { class: "num rank" + (r === 1 ? " top1" : r <= 5 ? " top5" : "") }, String(r));
}
const MIN_SOURCE_WEIGHT = 0.1; // below this weight on its most-attended non-BOS source, a position's ranks are not shown
function contextPositions(tokens, rc) {
  const hasLens = Array.isArray(rc.lens_rank_src);
  const silent = hasLens && (rc.informative === false || (isNum(rc.gain) && rc.gain <= 0));
  const head = ["position", "attends most to (weight; BOS weight)", "attended token's rank: direct logits", hasLens ? "lens" : null,
    "rank of the token after it: direct logits", hasLens ? "lens" : null, "top direct-logit tokens", hasLens ? "lens tokens (by KL(lens ‖ null) term)" : null].filter(Boolean);
  const t = h("table", { class: "data ctxpos", id: "context-table" }, h("tr", {}, head.map((x) => h("th", {}, x))));
  const nCols = head.length;
  tokens.forEach((x, i) => {
    if (i === 0) return;
    const s = rc.src[i];
    if (isNum(rc.weight[i]) && rc.weight[i] < MIN_SOURCE_WEIGHT) { // it looks (almost) nowhere but BOS: nothing to read
      t.appendChild(h("tr", { class: "bosrow" }, h("td", {}, h("span", { class: "muted small" }, i + " "), tok(x)),
        h("td", { colspan: nCols - 1, class: "muted small" }, `attends to BOS (${fmt(rc.bos[i])}); its largest other weight is ${fmt(rc.weight[i])} (on ${JSON.stringify(String(tokens[s]))}): nothing to read here`)));
      return;
    }
    const cells = [h("td", {}, h("span", { class: "muted small" }, i + " "), tok(x)),
      h("td", {}, isNum(s) ? [h("span", { class: "muted small" }, s + " "), tok(tokens[s]), h("span", { class: "muted small" }, ` ${fmt(rc.weight[i])}; ${fmt(rc.bos[i])}`)] : "—"),
      rankCell(rc.dla_rank_src ? rc.dla_rank_src[i] : null, rc.rank_cap)];
    if (hasLens) cells.push(silent ? h("td", { class: "muted" }, "—") : rankCell(rc.lens_rank_src[i], rc.rank_cap));
    cells.push(rankCell(rc.dla_rank_next ? rc.dla_rank_next[i] : null, rc.rank_cap));
    if (hasLens) cells.push(silent ? h("td", { class: "muted" }, "—") : rankCell(rc.lens_rank_next[i], rc.rank_cap));
    cells.push(h("td", { class: "muted" }, (rc.dla_top && rc.dla_top[i] || []).map((y) => tok(y))));
    if (hasLens) cells.push(silent ? h("td", { class: "muted" }, "—") : h("td", { class: "lens-tokens" }, (rc.lens[i] || []).map((y, j) =>
      tok(y, { title: `p = ${fmt(rc.lens_prob[i][j])}` + (rc.lens_term && isNum(rc.lens_term[i][j]) ? `, KL term ${fmt(rc.lens_term[i][j])} bits` : "") }))));
    t.appendChild(h("tr", {}, cells));
  });
  return h("div", {}, h("h3", {}, "Per position: the source it attends to most (BOS left out), and where that token — and the token after it — ranks among all tokens in what the head writes (its direct logit contribution through the final norm's scale" + (hasLens ? ", and its lens" : "") + "). Rank 1 at the attended token: copying; at the token after it: induction-style prediction. Positions where it puts under " + MIN_SOURCE_WEIGHT + " on every non-BOS token are folded."),
    silent ? h("p", { class: "muted" }, "This lens reads nothing beyond base rates from this head (not informative by its test): its tokens and ranks are not shown.") : null,
    h("div", { class: "tablewrap" }, t));
}
