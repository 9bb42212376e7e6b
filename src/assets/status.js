// pgrelay's status page: draws /status.json (the sidecar's view of the
// region pairs that touch its region) as a graph and a table, every 2 s.
// No dependencies, nothing loaded from elsewhere; text goes in with
// textContent only.
"use strict";

const REFRESH_MS = 2000;
const STALE_MS = 30000;
const COLOURS = {
  active: "#2ca02c",
  lagging: "#ff7f0e",
  failed: "#d62728",
  frozen: "#1f77b4",
  rebuilding: "#9467bd",
  unknown: "#999999",
};
const SVG = "http://www.w3.org/2000/svg";

// a token given as /#token=SECRET stays in the browser (fragments are not sent)
function token() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

function el(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function colour(state) {
  return COLOURS[state] || COLOURS.unknown;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function num(n, digits) {
  if (n === null || n === undefined) return "-";
  return digits === undefined ? String(n) : Number(n).toFixed(digits);
}

function edgeLabel(p) {
  if (!p) return "not seen from here";
  const parts = [];
  if (p.lag_seconds !== null && p.lag_seconds !== undefined) parts.push("lag " + num(p.lag_seconds, 1) + " s");
  else if (p.lag_bytes !== null && p.lag_bytes !== undefined) parts.push("WAL " + bytes(p.lag_bytes));
  if (p.backlog_records !== null && p.backlog_records !== undefined) parts.push(p.backlog_records + " rec");
  if (p.egress && p.egress.bytes_per_second !== null) parts.push(bytes(p.egress.bytes_per_second) + "/s");
  parts.push(p.state);
  return parts.join(" · ");
}

function drawGraph(view) {
  const svg = document.getElementById("graph");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const defs = el("defs");
  for (const [state, c] of Object.entries(COLOURS)) {
    const m = el("marker", { id: "arrow-" + state, viewBox: "0 0 10 10", refX: 9, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
    m.appendChild(el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: c }));
    defs.appendChild(m);
  }
  svg.appendChild(defs);
  const regions = view.regions || [];
  const cx = 320, cy = 230, radius = regions.length > 1 ? 175 : 0, nodeR = 30;
  const pos = {};
  regions.forEach((r, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / regions.length;
    pos[r] = { x: cx + radius * Math.cos(a), y: cy + radius * Math.sin(a) };
  });
  const byPair = {};
  for (const p of view.pairs || []) byPair[p.source + "->" + p.destination] = p;
  const edges = el("g", { id: "edges" });
  for (const s of regions) {
    for (const d of regions) {
      if (s === d) continue;
      const p = byPair[s + "->" + d];
      const state = p ? p.state : "unknown";
      const known = COLOURS[state] ? state : "unknown";
      const a = pos[s], b = pos[d];
      const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
      const ux = dx / len, uy = dy / len, nx = -uy, ny = ux;
      // the two directions of a pair bend to opposite sides
      const off = 12, bend = 24;
      const x1 = a.x + ux * nodeR + nx * off, y1 = a.y + uy * nodeR + ny * off;
      const x2 = b.x - ux * (nodeR + 4) + nx * off, y2 = b.y - uy * (nodeR + 4) + ny * off;
      const qx = (a.x + b.x) / 2 + nx * (off + bend), qy = (a.y + b.y) / 2 + ny * (off + bend);
      const g = el("g", { class: "edge " + known, "data-pair": s + "->" + d, "data-state": state });
      const id = "edge-" + s + "-" + d;
      g.appendChild(el("title", {}, s + " → " + d + ": " + edgeLabel(p)));
      g.appendChild(el("path", {
        id,
        d: `M ${x1.toFixed(1)} ${y1.toFixed(1)} Q ${qx.toFixed(1)} ${qy.toFixed(1)} ${x2.toFixed(1)} ${y2.toFixed(1)}`,
        stroke: colour(state), "marker-end": "url(#arrow-" + known + ")",
      }));
      // the label runs along its edge, left to right (never upside down),
      // on the outer side of the bend
      const rev = x1 > x2;
      const [ax, ay, bx, by] = rev ? [x2, y2, x1, y1] : [x1, y1, x2, y2];
      defs.appendChild(el("path", {
        id: id + "-label",
        d: `M ${ax.toFixed(1)} ${ay.toFixed(1)} Q ${qx.toFixed(1)} ${qy.toFixed(1)} ${bx.toFixed(1)} ${by.toFixed(1)}`,
      }));
      const outward = qy < (y1 + y2) / 2 ? -6 : 14;
      const text = el("text", { dy: outward, fill: colour(state) });
      text.appendChild(el("textPath", { href: "#" + id + "-label", startOffset: "50%" }, edgeLabel(p)));
      g.appendChild(text);
      edges.appendChild(g);
    }
  }
  svg.appendChild(edges);
  const fenced = new Set(view.fenced || []);
  const nodes = el("g", { id: "nodes" });
  for (const r of regions) {
    const cls = ["node"];
    if (r === view.region) cls.push("self");
    if (fenced.has(r)) cls.push("fenced");
    const g = el("g", { class: cls.join(" "), "data-region": r });
    g.appendChild(el("circle", { cx: pos[r].x.toFixed(1), cy: pos[r].y.toFixed(1), r: nodeR }));
    g.appendChild(el("text", { x: pos[r].x.toFixed(1), y: pos[r].y.toFixed(1) }, r));
    nodes.appendChild(g);
  }
  svg.appendChild(nodes);
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
}

// The destination's last periodic verify of this pair: its differences and
// when it finished; "-" where no sidecar verifies it ([verify] interval).
function verified(p) {
  if (!p.last_verify) return "-";
  const n = p.verify_differences === null || p.verify_differences === undefined ? 0 : p.verify_differences;
  return (n === 0 ? "agree" : n + " differ") + " @ " + p.last_verify;
}

function drawTable(view) {
  const body = document.querySelector("#pairs tbody");
  body.replaceChildren();
  const problems = document.getElementById("problems");
  problems.replaceChildren();
  const cost = (p) => {
    if (!p.egress || p.egress.monthly_cost === null || p.egress.monthly_cost === undefined) return "-";
    return p.egress.monthly_cost.toFixed(2);
  };
  for (const p of view.pairs || []) {
    const tr = document.createElement("tr");
    tr.dataset.pair = p.source + "->" + p.destination;
    cell(tr, p.source + "->" + p.destination + (p.seen_from ? " (" + p.seen_from + " side)" : ""));
    cell(tr, p.state, "state " + p.state);
    cell(tr, p.source_lsn || "-");
    cell(tr, p.confirmed_lsn || "-");
    cell(tr, num(p.lag_bytes));
    cell(tr, num(p.backlog_records));
    cell(tr, num(p.lag_seconds, 1));
    cell(tr, p.watermark_commit_time || "-");
    cell(tr, num(p.dead_letters));
    cell(tr, p.egress && p.egress.bytes_per_second !== null ? bytes(p.egress.bytes_per_second) + "/s" : "-");
    cell(tr, cost(p));
    cell(tr, verified(p), p.last_verify && p.verify_differences > 0 ? "state failed" : "");
    body.appendChild(tr);
    const found = p.last_verify && p.verify_differences > 0
      ? ["verify found " + p.verify_differences + " difference(s) at " + p.last_verify + " (pgrelay verify --show-keys says which)"]
      : [];
    const notes = (p.problems || []).concat(p.held ? [p.held] : [], p.frozen ? [p.frozen] : [], found);
    for (const msg of notes) {
      const li = document.createElement("li");
      li.textContent = p.source + "->" + p.destination + ": " + msg;
      problems.appendChild(li);
    }
  }
}

function drawLists(view) {
  const dl = document.getElementById("dead-letters");
  dl.replaceChildren();
  if (Object.keys(view.dead_letters || {}).length === 0) {
    const li = document.createElement("li");
    li.textContent = "not known right now (see the pairs' problems)";
    dl.appendChild(li);
  }
  for (const [region, n] of Object.entries(view.dead_letters || {})) {
    const li = document.createElement("li");
    li.dataset.region = region;
    li.textContent = region + ": " + n + " parked";
    dl.appendChild(li);
  }
  const fenced = view.fenced || [];
  document.getElementById("fenced-section").hidden = fenced.length === 0;
  const fl = document.getElementById("fenced");
  fl.replaceChildren();
  for (const r of fenced) {
    const li = document.createElement("li");
    li.textContent = r;
    fl.appendChild(li);
  }
  const events = view.events || [];
  document.getElementById("events-section").hidden = events.length === 0;
  const eb = document.querySelector("#events tbody");
  eb.replaceChildren();
  for (const e of events) {
    const tr = document.createElement("tr");
    cell(tr, e.at || "");
    cell(tr, e.region || "");
    cell(tr, e.kind || "");
    cell(tr, e.detail || "");
    eb.appendChild(tr);
  }
}

function draw(view) {
  document.getElementById("region").textContent = "— seen from " + view.region;
  document.title = "pgrelay " + view.region;
  drawGraph(view);
  drawTable(view);
  drawLists(view);
  const age = Date.now() - view.collected_at_ms;
  const updated = document.getElementById("updated");
  updated.textContent = "collected " + new Date(view.collected_at_ms).toISOString() +
    (view.egress_price_per_gb !== null ? " · egress priced at " + view.egress_price_per_gb + " per GB" : "");
  updated.className = age > STALE_MS ? "stale" : "";
  document.body.dataset.loaded = "yes";
}

async function refresh() {
  try {
    const headers = {};
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    const r = await fetch("/status.json", { headers, cache: "no-store" });
    if (!r.ok) throw new Error("/status.json: " + r.status + " " + (await r.text()).trim());
    draw(await r.json());
  } catch (e) {
    const updated = document.getElementById("updated");
    updated.textContent = "cannot refresh: " + e.message;
    updated.className = "stale";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
