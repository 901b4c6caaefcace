// The bmslink controller page: /api/history once (and again after a reconnect), then one "state"
// event a second from /api/stream (Server-Sent Events). Text is always set with textContent: rack
// reasons and journal texts come from the site and are never parsed as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PLOT_W = 600;
const PLOT_H = 160;
const PAD_L = 44;
const PAD_B = 16;
const PAD_T = 6;
const SERIES = ["ccl_a", "dcl_a", "soc_pct", "temperature_max_c", "temperature_min_c", "temperature_avg_c"];

const history = { t_s: [], capacity: 3600, history_s: 3600 };
for (const name of SERIES) history[name] = [];

function $(id) { return document.getElementById(id); }

function text(id, value) { $(id).textContent = value; }

function fmt(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function clock(unixS) { return new Date(unixS * 1000).toLocaleTimeString(); }

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function replaceRows(tbody, rows) {
  const fragment = document.createDocumentFragment();
  for (const row of rows) fragment.appendChild(row);
  tbody.replaceChildren(fragment);
}

// -- the state ------------------------------------------------------------------------------

function renderBank(bank) {
  $("bank-none").classList.toggle("hidden", bank !== null);
  $("bank").classList.toggle("hidden", bank === null);
  if (bank === null) { text("bank-racks", ""); return; }
  text("bank-racks", `${bank.eligible_racks} of ${bank.roster_size} racks eligible, ${fmt(bank.capacity_ah, 0)} Ah`);
  text("bank-ccl", `${fmt(bank.charge_current_limit_a)} A` + (bank.charge_enabled ? "" : " (charge off)"));
  text("bank-ccl-reason", bank.ccl_reason);
  text("bank-dcl", `${fmt(bank.discharge_current_limit_a)} A` + (bank.discharge_enabled ? "" : " (discharge off)"));
  text("bank-dcl-reason", bank.dcl_reason);
  text("bank-cvl", `${fmt(bank.charge_voltage_limit_v)} V`);
  text("bank-cvl-reason", bank.cvl_reason);
  text("bank-dvl", `${fmt(bank.discharge_voltage_limit_v)} V`);
  text("bank-dvl-reason", bank.dvl_reason);
  text("bank-soc", `${fmt(bank.soc_pct)} %`);
  text("bank-measured", `SOH ${fmt(bank.soh_pct)} %, ${fmt(bank.pack_voltage_v)} V, ${fmt(bank.current_a)} A`);
  text("bank-temp", `${fmt(bank.temperature_min_c)} … ${fmt(bank.temperature_max_c)} °C`);
  text("bank-temp-where", `max at ${bank.temperature_max_location || "?"}, min at ` +
    `${bank.temperature_min_location || "?"}, average ${fmt(bank.temperature_avg_c)} °C`);
  text("bank-cells", `${fmt(bank.cell_voltage_min_v, 3)} … ${fmt(bank.cell_voltage_max_v, 3)} V`);
  text("bank-cells-where", `max at ${bank.cell_voltage_max_location || "?"}, min at ${bank.cell_voltage_min_location || "?"}`);
  const flags = $("bank-flags");
  const spans = [];
  const add = (name, cls) => {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = name;
    spans.push(span);
  };
  for (const name of bank.alarms) add(name, "flag");
  for (const name of bank.cluster_flags) add(name, "flag");
  for (const name of bank.warnings) add(name, "flag warning");
  if (bank.force_charge_request) add("force_charge_request", "flag warning");
  for (const rack of bank.unknown_racks) add(`unknown rack ${rack}`, "flag warning");
  if (spans.length === 0) add("none", "");
  flags.replaceChildren(...spans);
}

function renderRacks(racks) {
  replaceRows($("racks").tBodies[0], racks.map((rack) => {
    const row = document.createElement("tr");
    row.dataset.rack = rack.rack_id;
    if (rack.maintenance) row.className = "maintenance";
    cell(row, rack.rack_id);
    cell(row, rack.state, `state state-${rack.state}`);
    cell(row, rack.eligible ? (rack.share < 1 ? `ramping ${fmt(rack.share * 100, 0)} %` : "yes") : "no", "eligible");
    cell(row, fmt(rack.charge_current_limit_a), "num ccl-value");
    cell(row, fmt(rack.discharge_current_limit_a), "num dcl-value");
    cell(row, rack.maintenance ? "in maintenance" : "", "maint");
    cell(row, rack.reason, "reason");
    return row;
  }));
}

function renderControllers(controllers) {
  const me = controllers.find((c) => c.this);
  if (me) {
    const role = $("role");
    role.textContent = me.role;
    role.className = `role ${me.role}`;
  }
  replaceRows($("controllers").tBodies[0], controllers.map((c) => {
    const row = document.createElement("tr");
    row.dataset.nodeNumber = String(c.node_number);
    row.className = (c.this ? "this" : "") + (c.live ? "" : " not-live");
    cell(row, c.this ? `${c.node_id} (this page)` : `node ${c.node_number}`);
    cell(row, String(c.node_number));
    cell(row, c.role, `role-cell role ${c.role}`);
    cell(row, String(c.epoch));
    cell(row, c.rank === null ? "–" : String(c.rank));
    cell(row, c.heard_s_ago === null ? "–" : `${fmt(c.heard_s_ago, 1)} s ago`);
    cell(row, c.reason, "reason");
    return row;
  }));
}

function renderEvents(events) {
  replaceRows($("events").tBodies[0], events.slice().reverse().map((e) => {
    const row = document.createElement("tr");
    row.dataset.kind = e.kind;
    cell(row, clock(e.timestamp_s), "num");
    cell(row, e.node_id);
    cell(row, e.kind);
    cell(row, e.rack_id);
    cell(row, e.text, "reason");
    return row;
  }));
}

function renderState(doc) {
  text("site", doc.site_id);
  text("node", doc.node_id);
  text("updated", clock(doc.updated_s));
  const links = doc.links;
  const problems = [];
  if (!links.mqtt_connected) problems.push("broker disconnected");
  if (!links.can_healthy) problems.push("CAN failing");
  if (links.foreign_transmitter) problems.push("foreign transmitter on the inverter bus");
  text("links", problems.join(", "));
  renderBank(doc.bank);
  renderRacks(doc.racks);
  renderControllers(doc.controllers);
  renderEvents(doc.events);
  if (doc.sample) addSample(doc.sample, doc.history_s);
  drawPlots(doc.updated_s);
}

// -- the history and the plots ----------------------------------------------------------------

function setHistory(body) {
  history.capacity = body.capacity;
  history.history_s = body.history_s;
  for (const name of ["t_s", ...SERIES]) history[name] = body[name].slice();
  const minutes = Math.round(body.history_s / 60);
  text("history-span", minutes >= 120 ? `${Math.round(minutes / 60)} hours` : `${minutes} minutes`);
}

function addSample(sample, historyS) {
  const times = history.t_s;
  if (times.length && sample.t_s <= times[times.length - 1]) return;
  for (const name of ["t_s", ...SERIES]) history[name].push(sample[name]);
  // Bounded like the server's ring: by time and by count.
  let drop = 0;
  while (drop < times.length && times[drop] < sample.t_s - historyS) drop += 1;
  drop = Math.max(drop, times.length - history.capacity);
  if (drop > 0) for (const name of ["t_s", ...SERIES]) history[name].splice(0, drop);
}

function svgEl(name, attrs) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  return el;
}

function plot(svg, series, endS, { floorZero = false, fixed = null } = {}) {
  const startS = endS - history.history_s;
  const times = history.t_s;
  let lo = Infinity;
  let hi = -Infinity;
  for (const { name } of series) {
    for (const v of history[name]) {
      if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
  }
  if (fixed) { lo = Math.min(lo, fixed[0]); hi = Math.max(hi, fixed[1]); }
  if (floorZero) lo = Math.min(lo, 0);
  if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
  if (hi - lo < 1e-9) { hi += 1; lo -= floorZero && lo === 0 ? 0 : 1; }
  const x = (t) => PAD_L + ((t - startS) / (endS - startS)) * (PLOT_W - PAD_L - 2);
  const y = (v) => PAD_T + (1 - (v - lo) / (hi - lo)) * (PLOT_H - PAD_T - PAD_B);
  const parts = [];
  for (const v of [lo, (lo + hi) / 2, hi]) {
    parts.push(svgEl("line", { class: "grid", x1: PAD_L, x2: PLOT_W, y1: y(v), y2: y(v) }));
    const label = svgEl("text", { class: "label", x: PAD_L - 4, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = fmt(v, Math.abs(hi - lo) < 10 ? 1 : 0);
    parts.push(label);
  }
  const left = svgEl("text", { class: "label", x: PAD_L, y: PLOT_H - 3 });
  left.textContent = `−${Math.round(history.history_s / 60)} min`;
  const right = svgEl("text", { class: "label", x: PLOT_W - 2, y: PLOT_H - 3, "text-anchor": "end" });
  right.textContent = "now";
  parts.push(left, right);
  for (const { name, cls } of series) {
    // A gap in the data (null) breaks the line rather than joining across it.
    let points = [];
    const flush = () => {
      if (points.length) parts.push(svgEl("polyline", { class: cls, "data-series": name, points: points.join(" ") }));
      points = [];
    };
    const values = history[name];
    for (let i = 0; i < times.length; i += 1) {
      if (values[i] === null || times[i] < startS) { flush(); continue; }
      points.push(`${x(times[i]).toFixed(1)},${y(values[i]).toFixed(1)}`);
    }
    flush();
  }
  svg.replaceChildren(...parts);
}

function drawPlots(endS) {
  plot($("plot-current"), [{ name: "ccl_a", cls: "ccl" }, { name: "dcl_a", cls: "dcl" }], endS, { floorZero: true });
  plot($("plot-soc"), [{ name: "soc_pct", cls: "soc" }], endS, { fixed: [0, 100] });
  plot($("plot-temp"), [
    { name: "temperature_max_c", cls: "tmax" },
    { name: "temperature_avg_c", cls: "tavg" },
    { name: "temperature_min_c", cls: "tmin" },
  ], endS);
}

// -- the stream -------------------------------------------------------------------------------

async function loadHistory() {
  const response = await fetch("/api/history", { cache: "no-store" });
  if (response.ok) setHistory(await response.json());
}

function setLive(on, why) {
  const live = $("live");
  live.textContent = on ? "live" : why;
  live.className = `live ${on ? "on" : "off"}`;
}

function connect() {
  const source = new EventSource("/api/stream");
  let broken = false;
  source.addEventListener("open", () => {
    setLive(true);
    // After a break the server kept sampling: take its history again to fill the gap.
    if (broken) loadHistory().catch(() => {});
    broken = false;
  });
  source.addEventListener("state", (event) => {
    setLive(true);
    renderState(JSON.parse(event.data));
  });
  source.addEventListener("error", () => {
    broken = true;
    setLive(false, "reconnecting…");
  });
}

loadHistory().catch(() => {}).finally(connect);
