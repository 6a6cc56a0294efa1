// The visionloop dashboard: plain DOM and SVG over the API's JSON endpoints and its event stream.
// Every value from the API goes in through textContent, never innerHTML.
"use strict";

const STAGES = ["export", "train", "evaluate", "promote", "report", "notify"];
const FEED_MAX = 150;
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { training: null, cpu: [], events: 0, timers: {} };

// --- helpers ---------------------------------------------------------------------------------

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  if (typeof value === "boolean") return value ? "yes" : "no";
  return String(value);
}

function pct(value) { return value === null || value === undefined ? "–" : (value * 100).toFixed(1) + "%"; }

function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i++; }
  return value.toFixed(value < 10 && i ? 1 : 0) + " " + units[i];
}

function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function clock(iso) { return new Date(iso).toLocaleTimeString([], { hour12: false }); }

function token() { return $("token").value.trim(); }

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (options.auth && token()) headers.Authorization = "Bearer " + token();
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET", headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(body && body.detail ? body.detail : response.status + " " + response.statusText);
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return body;
}

// A burst of events (an ingest of thousands of files) must not become a burst of requests.
function soon(name, fn, delay = 400) {
  clearTimeout(state.timers[name]);
  state.timers[name] = setTimeout(fn, delay);
}

function badge(node, text) {
  node.textContent = text;
  node.className = "badge " + text;
}

// --- retraining and conditions --------------------------------------------------------------

function runFields(run) {
  const fields = [
    ["run", "#" + run.id + " (" + run.trigger + ")"],
    ["status", run.status],
    ["reason", run.reason || "–"],
    ["started", when(run.started_at || run.created_at)],
  ];
  if (run.finished_at) fields.push(["finished", when(run.finished_at)]);
  if (run.model_version) fields.push(["challenger", "version " + run.model_version]);
  if (run.promoted !== null) fields.push(["promoted", fmt(run.promoted)]);
  if (run.error) fields.push(["error", run.error]);
  if (run.decision_reasons && run.decision_reasons.length) fields.push(["why", run.decision_reasons.join(" ")]);
  if (run.report_url) {
    const link = el("a", { href: "#", class: "run-report", "data-url": run.report_url + "?format=html", "data-type": "text/html" }, "report");
    link.addEventListener("click", openReport);
    fields.push(["report", link]);
  }
  return fields;
}

function fillList(node, fields) {
  node.replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

async function loadStatus() {
  const status = await api("/api/retraining/status");
  badge($("retrain-state"), status.state);
  // A manual retrain is always allowed (it overrides the label and cooldown blockers), so the
  // button stays usable; it says whether the conditions agree, and waits while one runs.
  const button = $("trigger");
  button.disabled = status.status === "running";
  button.classList.toggle("suggested", status.should_retrain);
  button.dataset.shouldRetrain = String(status.should_retrain);
  button.textContent = status.status === "running" ? "Retraining…"
    : status.should_retrain ? "Retrain now (conditions agree)" : "Retrain now";
  button.title = status.conditions.summary;
  $("champion-version").textContent = status.champion_version || "none";
  fillList($("retrain-current"), status.current ? runFields(status.current) : []);
  fillList($("retrain-last"), status.last_finished ? runFields(status.last_finished) : [["", "none yet"]]);
  if (status.progress) showStage(status.progress.stage);
  renderConditions(status.conditions);
}

function renderConditions(decision) {
  $("conditions-summary").textContent = decision.summary;
  $("conditions-rows").replaceChildren(...decision.conditions.map((c) =>
    el("tr", {},
      el("td", { class: c.fired ? "fired" : "quiet", title: c.fired ? "fired" : "not fired" }, c.fired ? "●" : "○"),
      el("td", {}, c.name.replace(/_/g, " ") + (c.kind === "blocker" ? " (blocker)" : "")),
      el("td", {}, fmt(c.value, 2)),
      el("td", {}, fmt(c.threshold, 2)),
      el("td", {}, c.reason))));
}

async function trigger() {
  const result = $("trigger-result");
  result.className = "note";
  result.textContent = "starting…";
  try {
    const launched = await api("/api/retraining/trigger", { method: "POST", auth: true, body: { reason: "dashboard" } });
    result.textContent = "retraining run #" + launched.retraining_run_id + " started";
    soon("status", loadStatus, 200);
  } catch (error) {
    result.className = "note error";
    result.textContent = error.message;
  }
}

// --- training progress -----------------------------------------------------------------------

function showStage(stage) {
  const at = STAGES.indexOf(stage);
  $("training-stage").replaceChildren(...STAGES.map((name, i) =>
    el("span", { class: i < at ? "done" : i === at ? "now" : "" }, name)));
}

function startSeries(event) {
  state.training = { key: seriesKey(event), epochs: event.payload.epochs || null, points: [], title: event.message };
}

function seriesKey(event) {
  return event.payload.retraining_run_id ?? event.payload.run_id ?? "bootstrap";
}

function addEpoch(event) {
  const p = event.payload;
  if (!state.training || state.training.key !== seriesKey(event) || p.epoch <= 1 && state.training.points.length) {
    startSeries(event);
  }
  state.training.epochs = p.epochs;
  state.training.points = state.training.points.filter((point) => point.epoch !== p.epoch);
  state.training.points.push(p);
  state.training.points.sort((a, b) => a.epoch - b.epoch);
  renderTraining();
}

function renderTraining() {
  const chart = $("training-chart");
  const series = state.training;
  if (!series || !series.points.length) return;
  const last = series.points[series.points.length - 1];
  $("training-epoch").textContent = "epoch " + last.epoch + "/" + series.epochs +
    (last.mAP50 !== undefined ? " · mAP50 " + fmt(last.mAP50) : "");
  const W = 600, H = 200, pad = 24;
  const x = (epoch) => pad + (W - 2 * pad) * (series.epochs > 1 ? (epoch - 1) / (series.epochs - 1) : 0.5);
  const y = (v) => H - pad - (H - 2 * pad) * Math.max(0, Math.min(1, v));
  const children = [];
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    children.push(svg("line", { x1: pad, x2: W - pad, y1: y(v), y2: y(v), stroke: "#e3e6ec" }));
    const label = svg("text", { x: 2, y: y(v) + 4, "font-size": 10, fill: "#6b7385" });
    label.textContent = v.toFixed(2);
    children.push(label);
  }
  const maxLoss = Math.max(...series.points.map((p) => p.box_loss ?? 0), 1e-9);
  const lines = [
    ["mAP50", (p) => p.mAP50, "#3b6fd8"],
    ["mAP50-95", (p) => p["mAP50-95"], "#8a55c9"],
    ["box loss", (p) => (p.box_loss ?? NaN) / maxLoss, "#d69e2e"],
  ];
  for (const [name, value, colour] of lines) {
    const pts = series.points.filter((p) => Number.isFinite(value(p)));
    if (!pts.length) continue;
    children.push(svg("polyline", {
      points: pts.map((p) => x(p.epoch) + "," + y(value(p))).join(" "),
      fill: "none", stroke: colour, "stroke-width": 2, "data-series": name,
    }));
    for (const p of pts) children.push(svg("circle", { cx: x(p.epoch), cy: y(value(p)), r: 2.5, fill: colour }));
  }
  chart.replaceChildren(...children);
}

async function loadTraining() {
  const events = await api("/api/events?kind=training.&limit=300");
  for (const event of events) onTrainingEvent(event);
}

function onTrainingEvent(event) {
  if (event.kind === EventKind.TRAINING_STARTED) { startSeries(event); renderTraining(); }
  else if (event.kind === EventKind.TRAINING_EPOCH) addEpoch(event);
}

// --- drift -------------------------------------------------------------------------------------

// Reports are data-bearing: a plain link cannot send the token, so the page fetches the
// report with it and opens what came back.
async function openReport(event) {
  event.preventDefault();
  const url = event.currentTarget.dataset.url;
  const type = event.currentTarget.dataset.type || "text/html";  // read now: gone after an await
  if (!url) return;
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const response = await fetch(url, { headers });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    alert(body && body.detail ? body.detail : response.status + " " + response.statusText);
    return;
  }
  const html = await response.blob();
  window.open(URL.createObjectURL(new Blob([html], { type })), "_blank", "noopener");
}

async function loadDrift() {
  const history = await api("/api/metrics/drift/history?limit=200");
  renderDriftChart(history);
  if (!history.points.length) return;  // not measured yet: there is no latest result
  const latest = await api("/api/metrics/drift");
  badge($("drift-level"), latest.level);
  $("drift-score").textContent = "score " + fmt(latest.drift_score, 2) + " · drift share " + pct(latest.drift_share) +
    (latest.p_value !== null ? " · p " + latest.p_value.toExponential(1) : "") + " · " + latest.stat_test;
  const report = $("drift-report");
  report.hidden = !latest.report_url;
  report.dataset.url = latest.report_url || "";
  $("drift-features").replaceChildren(...latest.features.slice(0, 5).map((f) =>
    el("li", {}, f.name + ": severity " + fmt(f.severity, 2) + (f.drifted ? " (drifted)" : ""))));
}

function renderDriftChart(history) {
  const W = 600, H = 160, pad = 8;
  const y = (v) => H - pad - (H - 2 * pad) * Math.max(0, Math.min(1, v));
  const bands = [
    [0, history.yellow, "#e9f7ef"], [history.yellow, history.red, "#fdf5e2"], [history.red, 1, "#fbe7e7"],
  ].map(([lo, hi, fill]) => svg("rect", { x: 0, width: W, y: y(hi), height: y(lo) - y(hi), fill }));
  const pts = history.points;
  const x = (i) => pad + (W - 2 * pad) * (pts.length > 1 ? i / (pts.length - 1) : 0.5);
  const colours = { green: "#1f9d55", yellow: "#d69e2e", red: "#d64545" };
  const marks = pts.map((p, i) => {
    const dot = svg("circle", { cx: x(i), cy: y(p.drift_score), r: 3.5, fill: colours[p.level] });
    const title = svg("title");
    title.textContent = when(p.created_at) + ": " + p.level + " " + fmt(p.drift_score, 2);
    dot.append(title);
    return dot;
  });
  if (!pts.length) {
    const empty = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "font-size": 13, fill: "#6b7385" });
    empty.textContent = "no drift measurements yet";
    bands.push(empty);
  }
  const line = pts.length > 1
    ? [svg("polyline", { points: pts.map((p, i) => x(i) + "," + y(p.drift_score)).join(" "), fill: "none", stroke: "#98a0b3" })]
    : [];
  $("drift-chart").replaceChildren(...bands, ...line, ...marks);
}

// --- queue and models ----------------------------------------------------------------------

async function loadQueue() {
  const stats = await api("/api/labeling/stats");
  $("queue-pending").textContent = stats.pending;
  $("queue-labeled").textContent = stats.labeled;
  $("queue-approved").textContent = stats.approved;
  $("queue-agreement").textContent = pct(stats.agreement);
  const reasons = Object.entries(stats.by_reason);
  $("queue-reasons").replaceChildren(...(reasons.length ? reasons.map(([reason, counts]) =>
    el("li", {}, reason + ": " + Object.entries(counts).map(([s, n]) => n + " " + s).join(", ")))
    : [el("li", {}, "nothing queued yet")]));
  $("queue-classes").replaceChildren(...stats.classes.map((c) =>
    el("tr", {}, el("td", {}, c.name), el("td", {}, c.predicted), el("td", {}, c.reviewed),
      el("td", {}, c.false_positives), el("td", {}, c.missed), el("td", {}, pct(c.error_rate)))));
}

// The label-savings ledger: is selection worth more than random picks, per cycle and overall?
function fixed(value, digits = 2) { return value === null || value === undefined ? "–" : value.toFixed(digits); }

function interval(range, digits = 2) {
  return range ? fixed(range.low, digits) + " to " + fixed(range.high, digits) : "–";
}

function perImage(arm) {
  return fixed(arm.errors_per_image) + " (" + arm.reviewed + " of " + arm.queued + " reviewed)";
}

async function loadLedger() {
  const ledger = await api("/api/labeling/ledger?cycles=20");
  const cycles = ledger.cycles;
  $("ledger-summary").textContent = cycles.length
    ? "Over " + cycles.length + (cycles.length === 1 ? " cycle: " : " cycles: ") + ledger.cumulative.summary
    : "no selection cycles yet";
  $("ledger-rows").replaceChildren(...cycles.slice().reverse().map((c) =>
    el("tr", { "data-cycle": c.cycle, class: c.enough ? "" : "muted" },
      el("td", { title: c.cycle }, c.cycle.slice(0, 8)),
      el("td", {}, when(c.started_at)),
      el("td", {}, perImage(c.selected)),
      el("td", {}, perImage(c.control)),
      el("td", {}, c.ratio === null ? "–" : fixed(c.ratio) + "x" +
        (c.ratio_interval ? " (" + interval(c.ratio_interval, 1) + ")" : "")),
      el("td", {}, c.difference === null ? "–" : fixed(c.difference) + " (" + interval(c.difference_interval) + ")"),
      el("td", { class: "words" }, c.summary))));
  renderLedgerChart(ledger);
}

function renderLedgerChart(ledger) {
  const W = 600, H = 160, pad = 18;
  const shown = ledger.cycles.map((c, i) => [c, i]).filter(([c]) => c.enough);
  const total = ledger.cumulative;
  const values = [0, ...shown.flatMap(([c]) => [c.difference_interval.low, c.difference_interval.high])];
  if (total.enough) values.push(total.difference);
  const lo = Math.min(...values), hi = Math.max(...values);
  const span = hi - lo || 1;
  const y = (v) => H - pad - (H - 2 * pad) * (v - lo) / span;
  const n = ledger.cycles.length;
  const x = (i) => pad + (W - 2 * pad) * (n > 1 ? i / (n - 1) : 0.5);
  const children = [svg("line", { x1: 0, x2: W, y1: y(0), y2: y(0), stroke: "#98a0b3", "stroke-dasharray": "2 3", "data-series": "zero" })];
  if (total.enough) {
    children.push(svg("line", { x1: 0, x2: W, y1: y(total.difference), y2: y(total.difference), stroke: "#8a55c9", "stroke-width": 1.5, "data-series": "cumulative" }));
  }
  for (const [c, i] of shown) {
    const r = c.difference_interval;
    const mark = svg("g", { "data-cycle": c.cycle });
    mark.append(svg("line", { x1: x(i), x2: x(i), y1: y(r.low), y2: y(r.high), stroke: "#3b6fd8", "stroke-width": 2 }));
    mark.append(svg("circle", { cx: x(i), cy: y(c.difference), r: 4, fill: "#3b6fd8" }));
    const title = svg("title");
    title.textContent = c.cycle.slice(0, 8) + ": " + c.summary;
    mark.append(title);
    children.push(mark);
  }
  if (!shown.length) {
    const empty = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "font-size": 13, fill: "#6b7385" });
    empty.textContent = n ? "not enough reviewed controls yet" : "no selection cycles yet";
    children.push(empty);
  }
  $("ledger-chart").replaceChildren(...children);
}

async function loadModels() {
  const models = await api("/api/models?limit=10");
  $("champion-version").textContent = models.champion || "none";
  $("model-rows").replaceChildren(...models.versions.map((v) =>
    el("tr", {},
      el("td", {}, v.version),
      el("td", {}, v.aliases.join(", ")),
      el("td", {}, fmt(v.metrics.mAP50)),
      el("td", { title: v.snapshot_hash || "" }, v.snapshot_hash ? v.snapshot_hash.slice(0, 10) : "–"),
      el("td", {}, when(v.created_at)),
      el("td", {}, v.aliases.includes("champion") ? "" :
        el("button", { class: "small secondary", type: "button", onclick: () => promote(v.version) }, "promote")))));
}

async function moveChampion(path, body) {
  const result = $("model-result");
  result.className = "note";
  try {
    const change = await api(path, { method: "POST", auth: true, body });
    result.textContent = "champion is version " + change.champion + (change.changed ? "" : " (unchanged)");
    soon("models", loadModels, 100);
  } catch (error) {
    result.className = "note error";
    result.textContent = error.message;
  }
}

function promote(version) { return moveChampion("/api/models/" + encodeURIComponent(version) + "/promote", { reason: "dashboard" }); }

// --- queue gallery -------------------------------------------------------------------------------

const GALLERY_SIZE = 12;
const previews = new Map();  // queue item id -> object URL: an item's preview never changes

async function previewUrl(id) {
  if (previews.has(id)) return previews.get(id);
  const response = await fetch("/api/labeling/queue/" + id + "/preview", { headers: { Authorization: "Bearer " + token() } });
  if (!response.ok) throw new Error(response.status + " " + response.statusText);
  const url = URL.createObjectURL(await response.blob());
  previews.set(id, url);
  return url;
}

function why(item) {
  const parts = Object.entries(item.score_parts || {}).filter(([, v]) => v).sort((a, b) => b[1] - a[1]).slice(0, 2);
  return parts.map(([k, v]) => k + " " + fmt(v, 2)).join(" · ");
}

function reviewButtons(item) {
  if (item.status !== "labeled" && item.status !== "approved") return [];
  const buttons = [el("br")];
  if (item.status === "labeled") {
    buttons.push(el("button", { class: "small", type: "button", "data-action": "approve",
      onclick: () => review(item, "approve", {}) }, "approve"), " ");
  }
  buttons.push(el("button", { class: "small secondary", type: "button", "data-action": "reject",
    onclick: () => {
      const reason = window.prompt("Why is this label sent back? Its reviewer sees this in Label Studio.");
      if (reason) review(item, "reject", { reason });
    } }, "send back"));
  return buttons;
}

async function review(item, action, body) {
  const result = $("gallery-result");
  result.className = "note";
  const reviewer = $("gallery-reviewer").value.trim();
  if (!reviewer) {
    result.className = "note error";
    result.textContent = "enter your name first: a label is approved by someone other than its reviewer";
    return;
  }
  try {
    const change = await api("/api/labeling/queue/" + item.id + "/" + action, { method: "POST", auth: true, body: { ...body, reviewer } });
    result.textContent = "item " + item.id + " is " + change.item.status + (change.changed ? "" : " (unchanged)");
    soon("gallery", loadGallery, 100); soon("queue", loadQueue, 100);
  } catch (error) {
    result.className = "note error";
    result.textContent = error.message;
  }
}

async function loadGallery() {
  const page = await api("/api/labeling/queue?limit=" + GALLERY_SIZE);
  $("gallery-note").textContent = page.total
    ? page.total + " queued images; " + (token() ? "the champion's boxes as the reviewer first sees them" : "enter the API token to see the images")
    : "nothing queued yet";
  const figures = page.items.map((item) => {
    const picture = el("div", { class: "missing" }, token() ? "…" : "token needed");
    const figure = el("figure", { "data-item": item.id, "data-status": item.status },
      picture,
      el("figcaption", {},
        el("span", { class: "badge " + item.status }, item.status), " ",
        el("b", {}, item.flagged_reason), " (" + item.arm + ")",
        el("br"), why(item) || "–",
        ...reviewButtons(item)));
    if (token()) {
      previewUrl(item.id).then((url) => {
        picture.replaceWith(el("img", { src: url, alt: "queue item " + item.id + " with the champion's boxes" }));
      }).catch((error) => { picture.textContent = error.message; });
    }
    return figure;
  });
  $("gallery-items").replaceChildren(...figures);
}

// --- dataset profile -----------------------------------------------------------------------------

async function loadProfile() {
  const page = await api("/api/labeling/snapshots?limit=1");
  const snapshot = page.items[0];
  if (!snapshot || !snapshot.profile) {
    $("profile-snapshot").textContent = "no snapshot yet";
    return;
  }
  const p = snapshot.profile;
  $("profile-snapshot").textContent = "snapshot #" + snapshot.id + " (" + snapshot.kind + ", " + when(snapshot.created_at) + ")";
  const dup = p.duplicates || {};
  fillList($("profile-facts"), [
    ["images", p.images + " (train " + p.splits.train + " · val " + p.splits.val + " · test " + p.splits.test + ")"],
    ["boxes", p.boxes + " (" + fmt((p.boxes_per_image || {}).mean, 2) + " per image, " + p.background_images + " without)"],
    ["near-duplicates", fmt(dup.near_duplicate_images ?? 0) + " images in " + fmt(dup.near_duplicate_groups ?? 0) + " groups, " + fmt(dup.groups_across_test ?? 0) + " across the test split"],
  ]);
  const classes = Object.entries(p.class_balance || {});
  const W = 300, row = 120 / Math.max(1, classes.length);
  const peak = Math.max(1, ...classes.map(([, c]) => c.boxes));
  $("profile-classes").replaceChildren(...classes.flatMap(([name, c], i) => {
    const label = svg("text", { x: 2, y: i * row + row * 0.7, "font-size": Math.min(12, row * 0.7), fill: "#1d2433" });
    label.textContent = name + " " + c.boxes + " (" + pct(c.share) + ")";
    return [svg("rect", { x: 0, y: i * row + 1, width: W * c.boxes / peak, height: Math.max(1, row - 2), fill: "#dde7fb", "data-class": name, "data-boxes": c.boxes }), label];
  }));
  const sizes = (p.box_sizes || {}).coco_size || {};
  $("profile-sizes").replaceChildren(...Object.entries(sizes).map(([bucket, n]) => el("li", { "data-bucket": bucket }, bucket + ": " + n)));
}

// --- reviewer feedback ---------------------------------------------------------------------------

const VERDICT_COLOURS = { accepted: "#1f9d55", corrected: "#d69e2e", rejected: "#d64545" };

async function loadFeedback() {
  const days = await api("/api/labeling/feedback/trends?days=30");
  const total = days.reduce((n, d) => n + d.reviewed, 0);
  const changed = days.reduce((n, d) => n + d.corrected + d.rejected, 0);
  $("feedback-summary").textContent = total
    ? total + " reviews in 30 days; the reviewer changed the champion's answer on " + pct(changed / total)
    : "no reviews in the last 30 days";
  const W = 600, H = 160, pad = 6;
  const peak = Math.max(1, ...days.map((d) => d.reviewed));
  const step = (W - 2 * pad) / days.length;
  const children = [];
  days.forEach((d, i) => {
    let top = H - pad;
    const bar = svg("g", { "data-day": d.day, "data-reviewed": d.reviewed });
    for (const verdict of ["accepted", "corrected", "rejected"]) {
      const h = (H - 2 * pad) * d[verdict] / peak;
      if (!h) continue;
      top -= h;
      bar.append(svg("rect", { x: pad + i * step + 1, y: top, width: Math.max(1, step - 2), height: h, fill: VERDICT_COLOURS[verdict], "data-verdict": verdict }));
    }
    const title = svg("title");
    title.textContent = d.day + ": " + d.accepted + " accepted, " + d.corrected + " corrected, " + d.rejected + " rejected";
    bar.append(title);
    children.push(bar);
  });
  $("feedback-chart").replaceChildren(...children);
}

// Exports are data-bearing: fetched with the token and handed to the browser as a download.
async function downloadFeedback(event) {
  const button = event.currentTarget;
  const result = $("feedback-result");
  result.className = "note";
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const response = await fetch(button.dataset.url, { headers });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    result.className = "note error";
    result.textContent = body && body.detail ? body.detail : response.status + " " + response.statusText;
    return;
  }
  const blob = await response.blob();
  const link = el("a", { href: URL.createObjectURL(blob), download: button.dataset.url.includes("json") ? "feedback.json" : "feedback.csv" });
  link.click();
  result.textContent = "exported " + bytes(blob.size);
}

// --- flow runs ---------------------------------------------------------------------------------

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 90 ? value.toFixed(1) + " s" : (value / 60).toFixed(1) + " min";
}

async function loadRuns() {
  const runs = await api("/api/runs?limit=15");
  $("run-rows").replaceChildren(...runs.map((r) => {
    const state = el("span", { class: "badge " + r.state_type }, r.state);
    const actions = el("td", {},
      el("button", { class: "small secondary", type: "button", onclick: () => showLog(r) }, "logs"));
    if (!r.final) {
      actions.append(" ", el("button", { class: "small", type: "button", onclick: () => cancelRun(r) }, "cancel"));
    }
    return el("tr", { "data-run": r.id },
      el("td", { title: r.name }, r.flow), el("td", {}, r.deployment || "–"), el("td", {}, state),
      el("td", {}, when(r.start || r.expected_start)), el("td", {}, seconds(r.duration_s)), actions);
  }));
}

async function cancelRun(run) {
  const result = $("run-result");
  result.className = "note";
  try {
    const after = await api("/api/runs/" + run.id + "/cancel", { method: "POST", auth: true });
    result.textContent = run.flow + " run " + run.name + ": " + after.state;
    soon("runs", loadRuns, 100);
  } catch (error) {
    result.className = "note error";
    result.textContent = error.message;
  }
}

// Logs are data-bearing: fetched with the token, like the drift reports.
async function showLog(run) {
  const log = $("run-log");
  const result = $("run-result");
  result.className = "note";
  try {
    const lines = await api("/api/runs/" + run.id + "/logs?limit=1000", { auth: true });
    log.textContent = lines.map((l) => clock(l.timestamp) + " " + l.level + " " + l.message).join("\n") || "(no log lines)";
    log.hidden = false;
    log.dataset.run = run.id;
    result.textContent = run.flow + " run " + run.name + " (" + run.state + ")";
  } catch (error) {
    result.className = "note error";
    result.textContent = error.message;
  }
}

// --- system ------------------------------------------------------------------------------------

async function loadHealth() {
  const health = await api("/api/system/health");
  $("health").replaceChildren(...health.services.map((s) =>
    el("li", { class: s.ok ? "up" : "down", title: s.ok ? s.detail : s.detail + " (check " + s.setting + ")" },
      s.name + " ", el("span", { class: "latency" }, s.latency_ms.toFixed(0) + " ms"))));
}

async function loadResources() {
  const r = await api("/api/system/resources");
  $("cpu").value = r.cpu_percent;
  $("cpu-text").textContent = r.cpu_percent.toFixed(0) + "% of " + r.cpu_count + " cores";
  $("memory").value = r.memory_percent;
  $("memory-text").textContent = bytes(r.memory_used_bytes) + " / " + bytes(r.memory_total_bytes);
  $("disk").value = r.disk_percent;
  $("disk-text").textContent = bytes(r.disk_used_bytes) + " / " + bytes(r.disk_total_bytes);
  $("network-text").textContent = r.network_received_per_s === null ? "–"
    : "↓ " + bytes(r.network_received_per_s) + "/s · ↑ " + bytes(r.network_sent_per_s) + "/s";
  const a = r.api;
  $("api-latency").textContent = a.latency_p50_ms === null ? "–" : a.latency_p50_ms.toFixed(1) + " / " + a.latency_p95_ms.toFixed(1) + " ms";
  $("api-errors").textContent = pct(a.error_rate);
  $("api-predictions").textContent = fmt(a.predictions_per_minute, 1);
  $("api-requests").textContent = fmt(a.requests_per_minute, 1);
  state.cpu.push(r.cpu_percent);
  state.cpu = state.cpu.slice(-60);
  const W = 300, H = 40;
  const points = state.cpu.map((v, i) => (W * i / 59) + "," + (H - H * v / 100)).join(" ");
  $("cpu-chart").replaceChildren(svg("polyline", { points, fill: "none", stroke: "#3b6fd8", "stroke-width": 1.5 }));
}

async function loadLinks() {
  const info = await api("/api/system/info");
  $("link-prefect").href = info.links.prefect_ui;
  $("link-label-studio").href = info.links.label_studio;
  $("link-mlflow").href = info.links.mlflow;
  $("link-docs").href = info.links.api_docs;
}

// --- live feed -------------------------------------------------------------------------------

function addToFeed(event, fresh) {
  const item = el("li", { class: event.level + (fresh ? " new" : ""), "data-id": event.id, "data-kind": event.kind },
    el("span", { class: "time", title: event.created_at }, clock(event.created_at)),
    el("span", { class: "kind", title: event.kind }, event.kind),
    el("span", { class: "message" }, event.message));
  const feed = $("feed");
  feed.prepend(item);
  while (feed.children.length > FEED_MAX) feed.lastChild.remove();
  state.events += 1;
  $("event-count").textContent = state.events + " events";
}

// Which panels an event makes stale.
function route(event) {
  const kind = event.kind;
  soon("runs", loadRuns, 2000);  // every event comes from a flow run or an API call starting one
  if (kind.startsWith("training.")) onTrainingEvent(event);
  if (kind === EventKind.RETRAIN_STAGE) showStage(event.payload.stage);
  if (kind.startsWith("retrain.") || kind === EventKind.TRAINING_FINISHED) soon("status", loadStatus);
  if (kind.startsWith("drift.")) { soon("drift", loadDrift); soon("status", loadStatus); }
  if (kind.startsWith("queue.") || kind.startsWith("labels.")) {
    soon("queue", loadQueue); soon("ledger", loadLedger); soon("status", loadStatus);
    soon("feedback", loadFeedback); soon("gallery", loadGallery);
  }
  if (kind === EventKind.SNAPSHOT_CREATED) soon("profile", loadProfile);
  if (kind.startsWith("model.") || kind === EventKind.TRAINING_FINISHED) { soon("models", loadModels); soon("status", loadStatus); }
}

// The panels were loaded with everything up to the newest event at start-up: events up to it
// are only shown in the feed (the stream replays them), later ones also update the panels.
async function connect() {
  const newest = await api("/api/events?limit=1").catch(() => []);
  const seen = newest.length ? newest[0].id : 0;
  const source = new EventSource("/api/events/stream?replay=40");
  source.onopen = () => { $("live").className = "live on"; };
  source.onerror = () => { $("live").className = "live off"; };  // EventSource reconnects by itself
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    addToFeed(event, event.id > seen);
    if (event.id > seen) route(event);
  };
}

// --- start -------------------------------------------------------------------------------------

function guarded(fn) {
  return () => fn().catch((error) => console.warn(fn.name, error));
}

function start() {
  $("drift-report").addEventListener("click", openReport);
  const saved = localStorage.getItem("visionloop.token");
  if (saved) $("token").value = saved;
  $("token").addEventListener("change", () => localStorage.setItem("visionloop.token", token()));
  $("trigger").addEventListener("click", trigger);
  $("rollback").addEventListener("click", () => moveChampion("/api/models/rollback", { reason: "dashboard" }));
  $("runs-refresh").addEventListener("click", guarded(loadRuns));
  $("gallery-refresh").addEventListener("click", guarded(loadGallery));
  $("token").addEventListener("change", guarded(loadGallery));
  $("feedback-csv").addEventListener("click", downloadFeedback);
  $("feedback-json").addEventListener("click", downloadFeedback);
  for (const load of [loadLinks, loadStatus, loadTraining, loadDrift, loadQueue, loadGallery, loadFeedback, loadProfile, loadLedger, loadModels, loadRuns, loadHealth, loadResources]) {
    guarded(load)();
  }
  setInterval(guarded(loadResources), 5000);
  setInterval(guarded(loadHealth), 30000);
  setInterval(guarded(loadStatus), 30000);  // condition values (ages, cooldowns) move with time
  setInterval(guarded(loadRuns), 15000);  // run durations grow, scheduled runs start
  guarded(connect)();
}

start();
