// The demo page: run a strategy, follow its agents live, show the result.
// Query parameters: ?transport=auto|websocket|sse  ?session=<id>[&token=<t>] (watch an
// existing session).
import { OrchestratorStream } from "./client.js";
import { renderChart } from "./chart.js";

const AGENTS = ["extraction", "demand", "inventory", "pricing"];
const AGENT_STATE_LABEL = {
  waiting: "Waiting", running: "Running", done: "Done", failed: "Failed", stopped: "Stopped",
};
const TRANSPORT_LABEL = { websocket: "WebSocket", sse: "SSE" };
const OPEN_WAIT_MS = 3000; // start the workflow even if the stream is slow to open

const $ = (selector, root = document) => root.querySelector(selector);
const params = new URLSearchParams(location.search);
const transport = ["websocket", "sse", "auto"].includes(params.get("transport"))
  ? params.get("transport")
  : "auto";

// What the tests (and a curious developer) can read: every event the page handled.
const debug = (window.__stream = {
  sessionId: null,
  events: [],
  heard: 0, // stored events handled, over every stream the page opened
  seqCounts: {},
  replayGaps: 0,
  state: "idle",
  transport: null,
  reconnects: 0,
  finished: false,
  run: "idle",
});

let stream = null;
// The run this page started, once the server took it: what Cancel cancels.
let started = null; // { sessionId, token }

// --- helpers ------------------------------------------------------------------------------

export function newSessionId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
const money = new Intl.NumberFormat(undefined, { style: "currency", currency: "USD" });
const moneyWhole = new Intl.NumberFormat(undefined, {
  style: "currency", currency: "USD", maximumFractionDigits: 0,
});
const fmt = {
  int: (v) => (Number.isFinite(v) ? integer.format(v) : "—"),
  dec: (v) => (Number.isFinite(v) ? decimal.format(v) : "—"),
  money: (v) => (Number.isFinite(v) ? money.format(v) : "—"),
  moneyWhole: (v) => (Number.isFinite(v) ? moneyWhole.format(v) : "—"),
  change: (v) => (Number.isFinite(v) ? `${v > 0 ? "+" : ""}${v.toFixed(1)} %` : "—"),
  pct: (v, digits = 1) => (Number.isFinite(v) ? `${v.toFixed(digits)} %` : "—"),
  signedPct: (v) => (Number.isFinite(v) ? `${v > 0 ? "+" : ""}${decimal.format(v)} %` : "—"),
};

function setBar(bar, value) {
  const pct = Math.max(0, Math.min(100, Math.round(value)));
  bar.setAttribute("aria-valuenow", String(pct));
  bar.firstElementChild.style.width = `${pct}%`;
}

function setRun(state) {
  debug.run = state;
  document.body.dataset.run = state;
  $("#run").disabled = state === "running";
  $("#run").textContent = state === "running" ? "Running…" : "Run forecast";
  if (state !== "running") started = null;
  showCancel();
}

function showCancel(cancelling = false) {
  const cancel = $("#cancel");
  cancel.hidden = started === null;
  cancel.disabled = cancelling;
  cancel.textContent = cancelling ? "Cancelling…" : "Cancel";
  if (cancel.hidden || cancelling) showCancelError("");
}

// Why a cancel did not go through, next to the button: the run goes on, so this is not
// the banner's "we could not finish this forecast".
function showCancelError(text) {
  $("#cancel-error").textContent = text;
  $("#cancel-error").hidden = !text;
}

// --- connection indicator -----------------------------------------------------------------

function showConnection(info) {
  debug.state = info.state;
  debug.transport = info.transport;
  debug.reconnects = info.reconnects;
  const box = $("#connection");
  box.dataset.state = info.state;
  box.dataset.transport = info.transport || "";
  box.dataset.reconnects = String(info.reconnects);
  const name = TRANSPORT_LABEL[info.transport] || "Stream";
  const words = {
    connecting: "connecting…",
    open: "live",
    reconnecting: "reconnecting…",
    closed: info.closeReason === "final" ? "finished" : "closed",
  };
  let text = `${name} · ${words[info.state] || info.state}`;
  if (info.reconnects) text += ` · ${info.reconnects} reconnect${info.reconnects === 1 ? "" : "s"}`;
  $("#connection-text").textContent = text;
}

// --- progress and agents ------------------------------------------------------------------

function resetProgress() {
  setBar($("#overall-bar"), 0);
  $("#overall-percent").textContent = "0%";
  $("#overall-status").textContent = "Starting…";
  for (const name of AGENTS) setAgent(name, { state: "waiting", progress: 0, status: "—" });
}

function setOverall(progress, status) {
  setBar($("#overall-bar"), progress);
  $("#overall-percent").textContent = `${Math.round(progress)}%`;
  if (status) $("#overall-status").textContent = status;
}

function setAgent(name, { state, progress, status }) {
  const card = $(`.agent[data-agent="${CSS.escape(name)}"]`);
  if (!card) return; // an agent this page does not show
  if (state) {
    card.dataset.state = state;
    $(".badge", card).textContent = AGENT_STATE_LABEL[state] || state;
  }
  if (progress !== undefined) {
    card.dataset.progress = String(progress);
    setBar($(".bar", card), progress);
  }
  if (status !== undefined) $(".status", card).textContent = status;
}

// The run is over: an agent still shown running will not finish.
function stopRunningAgents() {
  for (const card of document.querySelectorAll('.agent[data-state="running"]')) {
    setAgent(card.dataset.agent, { state: "stopped" });
  }
}

function showError(message, details) {
  $("#error-text").textContent = message;
  $("#error-details").textContent = details || "";
  $("#error-banner").hidden = false;
}

function hideError() {
  $("#error-banner").hidden = true;
}

// --- events -------------------------------------------------------------------------------

function record(event) {
  debug.events.push(event);
  if (Number.isInteger(event.seq)) {
    debug.heard += 1;
    debug.seqCounts[event.seq] = (debug.seqCounts[event.seq] || 0) + 1;
  }
}

const handlers = {
  "*": record,
  progress(event) {
    if (event.agent === "orchestrator") setOverall(event.progress, event.status);
  },
  agent_status(event) {
    setAgent(event.agent, { state: "running", progress: event.progress, status: event.status });
  },
  complete(event) {
    if (event.agent !== "orchestrator") {
      setAgent(event.agent, { state: "done", progress: 100, status: agentSummary(event) });
    } else {
      setOverall(100, event.status || "Complete");
    }
    // A session fed by another service may end with a final event from its own agent.
    if (event.final) {
      setRun("complete");
      renderResult(event.data && event.data.result);
    }
  },
  error(event) {
    if (!event.id) {
      // A control notice for this connection only; the client handles reconnecting.
      if (event.code === "invalid_session_id") showError(event.error, event.details);
      return;
    }
    if (event.agent && event.agent !== "orchestrator") {
      setAgent(event.agent, { state: "failed", status: event.error });
    }
    if (event.final && event.code === "workflow_cancelled") {
      // The user's own doing (here or in another tab): no error banner.
      setRun("cancelled");
      $("#overall-status").textContent = "Cancelled";
      stopRunningAgents();
    } else if (event.final) {
      // Interrupted (server shutdown), or a service's own final error: no agent runs on.
      setRun("failed");
      $("#overall-status").textContent = "Stopped";
      stopRunningAgents();
      showError(event.error, event.details);
    }
  },
};

// One line for a finished agent's card, from the summary in its `complete` event.
function agentSummary(event) {
  const d = event.data || {};
  try {
    switch (event.agent) {
      case "extraction":
        if (d.description) return d.description;
        break;
      case "demand":
        if (Number.isFinite(d.total_units)) {
          const mape = Number.isFinite(d.backtest_mape) ? ` · backtest MAPE ${fmt.pct(d.backtest_mape)}` : "";
          return `${fmt.int(d.total_units)} units over ${d.horizon_weeks} weeks${mape}`;
        }
        break;
      case "inventory":
        if (Number.isFinite(d.total_order_quantity)) {
          const reorder = (d.reorder_now || []).length;
          return `Order ${fmt.int(d.total_order_quantity)} units · ${reorder} of ${d.products} to reorder now`;
        }
        break;
      case "pricing":
        if (d.margin_change_pct !== undefined) {
          return `Margin ${d.margin_change_pct === null ? "unchanged" : fmt.signedPct(d.margin_change_pct)} ` +
            `at the recommended prices`;
        }
        break;
      default:
    }
  } catch (_error) {
    /* an unexpected summary: fall back to the status text */
  }
  return event.status;
}

let starting = false; // between opening the stream and the answer to run-workflow

function watch(sessionId, token) {
  if (stream) stream.close();
  debug.sessionId = sessionId;
  debug.events = [];
  debug.seqCounts = {};
  debug.replayGaps = 0;
  debug.finished = false;
  $("#session-id").textContent = sessionId;
  hideError();
  $("#result").hidden = true;
  resetProgress();
  const current = (stream = new OrchestratorStream(sessionId, {
    transport,
    token: token || undefined,
    onEvent: handlers,
    onStateChange: showConnection,
    onReplayGap() {
      // The server replays what it still has from the start: rebuild the view from it.
      // It may have nothing left (the session expired, or a server that kept it in
      // memory restarted): then nothing more will come, so ask.
      debug.replayGaps += 1;
      resetProgress();
      checkSession(current, sessionId, token);
    },
  }));
  current.done.then((info) => {
    if (current !== stream) return; // replaced by a newer stream
    debug.finished = true;
    // While run-workflow is being answered, a refusal may just mean "token needed".
    if (!starting) streamEnded(info);
  });
  return current;
}

// A session the server no longer has (404 session_not_found): expired, lost in a restart
// of a server that kept it in memory, or never started. false when it cannot say.
async function sessionGone(sessionId, token) {
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  try {
    const response = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}${query}`, {
      cache: "no-store",
    });
    if (response.status !== 404) return false;
    const body = await response.json().catch(() => ({}));
    return body.code === "session_not_found";
  } catch (_error) {
    return false;
  }
}

// How long a session must stay unknown, with no stored event heard meanwhile, before
// the page gives it up: a store that lost its data (Redis restarted empty) knows a running
// session again at its next event, and a followed link may be opened just before the first.
// `?gone_after_ms=` shortens it (the tests do).
const GONE_AFTER_MS = Number(params.get("gone_after_ms")) || 15000;

// Ends the run of `current` if its session is gone (nothing would ever arrive).
async function checkSession(current, sessionId, token) {
  if (!(await sessionGone(sessionId, token))) return;
  const heard = debug.heard;
  await new Promise((resolve) => setTimeout(resolve, GONE_AFTER_MS));
  if (current !== stream || debug.run !== "running" || debug.heard !== heard) return;
  if (await sessionGone(sessionId, token)) sessionLost();
}

function sessionLost() {
  setRun("failed"); // first: the stream's end then needs no other message
  if (stream) stream.close();
  $("#overall-status").textContent = "Not available";
  stopRunningAgents();
  showError("This forecast is no longer available; run it again.",
    "The server no longer has this session: it expired, or the server restarted.");
}

function streamEnded(info) {
  if (info.closeReason === "final" || debug.run !== "running") return;
  setRun("failed");
  if (info.closeReason === "refused") {
    showError("The server refused the progress stream of this session.", "");
  } else {
    showError("The connection to the server was lost.", "Reload the page to try again.");
  }
}

async function run(strategy) {
  setRun("running");
  const sessionId = newSessionId();
  starting = true;
  let current = watch(sessionId);
  try {
    // Listen first, then start: the stream shows everything from the first event.
    let timer;
    await Promise.race([
      current.opened.catch(() => {}),
      new Promise((resolve) => (timer = setTimeout(resolve, OPEN_WAIT_MS))),
    ]);
    clearTimeout(timer);
    let response;
    try {
      response = await fetch("/api/orchestrator/run-workflow", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ strategy_description: strategy, session_id: sessionId }),
      });
    } catch (_error) {
      current.close();
      setRun("failed");
      showError("The server cannot be reached.", "Check your connection and try again.");
      return;
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      current.close();
      setRun("failed");
      showError(body.error || `The server answered ${response.status}.`,
        body.reference ? `Reference ${body.reference}` : "");
      return;
    }
    if (body.token) {
      // This server hands out a stream token with the run, so the stream opened before
      // could not be let in: follow the session with the token (the replay covers all).
      current = watch(sessionId, body.token);
    }
    if (debug.run === "running") {
      started = { sessionId, token: body.token || null };
      showCancel();
    }
  } finally {
    starting = false;
  }
  if (current.state === "closed") streamEnded(current.info);
}

// Cancel: the server stores the session's final event, workflow_cancelled, and the stream
// brings it here like any other (the handler above shows it).
async function cancelRun() {
  if (started === null) return;
  const { sessionId, token } = started;
  showCancel(true);
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  let response;
  try {
    response = await fetch(`/api/sessions/${encodeURIComponent(sessionId)}/cancel${query}`, {
      method: "POST",
    });
  } catch (_error) {
    response = null;
  }
  const body = response ? await response.json().catch(() => ({})) : {};
  // Answered after its run ended (or another began): the stream has said how it ended.
  if (started === null || started.sessionId !== sessionId) return;
  // session_ended: the run ended before the cancel came; its final event says how.
  if (response && (response.ok || body.code === "session_ended")) return;
  // No such session any more: there is no run left to go on.
  if (response && response.status === 404 && body.code === "session_not_found") {
    sessionLost();
    return;
  }
  showCancel();
  if (!response) {
    showCancelError("Could not cancel: the server cannot be reached. The forecast goes on.");
  } else {
    const reference = body.reference ? ` (reference ${body.reference})` : "";
    showCancelError(`Could not cancel: ${body.error || `the server answered ${response.status}.`}` +
      `${reference} The forecast goes on.`);
  }
}

// --- result -------------------------------------------------------------------------------

function renderResult(result) {
  if (!result || typeof result !== "object") return;
  $("#result").hidden = false; // first, so the chart is drawn at its real size
  renderParameters(result.parameters || {}, result.extraction_method);
  renderForecast(result.forecast || {});
  renderInventory(result.inventory || {});
  renderPricing(result.pricing || {});
}

const CATEGORY = {
  outdoor_furniture: "Outdoor furniture",
  garden_tools: "Garden tools",
  grills: "Grills & BBQ",
  heating: "Outdoor heating",
  lighting: "Outdoor lighting",
  all: "All categories",
};

function renderParameters(p, method) {
  const items = [
    ["Category", CATEGORY[p.product_category] || p.product_category],
    ["Horizon", p.horizon_weeks ? `${p.horizon_weeks} weeks` : undefined],
    ["Price change", Number.isFinite(p.price_change_pct) ? fmt.signedPct(p.price_change_pct) : undefined],
    ["Promotion", p.promotion === undefined ? undefined : p.promotion ? "Yes" : "No"],
    ["Channel", p.channel === "all" ? "All channels" : p.channel],
    ["Service level", Number.isFinite(p.service_level) ? fmt.pct(p.service_level * 100, 0) : undefined],
    ["Lead time", p.lead_time_weeks ? `${p.lead_time_weeks} weeks` : "Per product"],
    ["Read by", method === "llm" ? "Language model" : method === "rules" ? "Rules" : method],
  ];
  const list = $("#parameters");
  list.replaceChildren(
    ...items
      .filter(([, value]) => value !== undefined && value !== null && value !== "")
      .map(([label, value]) => el("div", {}, el("dt", {}, label), el("dd", {}, value))),
  );
}

function kpi(label, value, sub) {
  return el("div", { class: "kpi" },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value),
    sub ? el("div", { class: "sub" }, sub) : null);
}

let currentForecast = null;

function seriesOf(forecast, key) {
  const product = (forecast.products || []).find((p) => p.product.product_id === key);
  const series = product ? product.series : forecast.total;
  const name = product ? product.product.name : `All ${forecast.category_name || "products"}`;
  return {
    historyWeeks: forecast.history_weeks || [],
    forecastWeeks: forecast.forecast_weeks || [],
    history: series.history,
    forecast: series.forecast,
    lower: series.lower,
    upper: series.upper,
    label: `${name}: weekly units, last ${series.history.length} weeks and the ` +
      `${series.forecast.length}-week forecast`,
    name,
  };
}

function renderForecast(forecast) {
  currentForecast = forecast;
  if (!forecast.total) return;
  const picker = $("#chart-series");
  picker.replaceChildren(
    el("option", { value: "total" }, `All ${forecast.category_name || "products"}`),
    ...(forecast.products || []).map((p) =>
      el("option", { value: p.product.product_id }, p.product.name)),
  );
  picker.hidden = (forecast.products || []).length < 2;
  drawSeries("total");
  $("#kpis").replaceChildren(...forecastKpis(forecast));
  const level = Math.round((forecast.interval_level || 0.9) * 100);
  $("#band-label").textContent = `${level} % prediction interval`;
}

function drawSeries(key) {
  const forecast = currentForecast;
  const series = seriesOf(forecast, key);
  renderChart($("#chart"), series);
  $("#chart-title").textContent = `Weekly unit sales · ${series.name}`;
  $("#chart-note").textContent = forecast.model
    ? `Model: ${forecast.model}. Units sold ${forecast.channel === "all" ? "online and in store" : forecast.channel}.`
    : "";
}

function forecastKpis(f) {
  const total = f.total;
  const horizon = f.horizon_weeks || total.forecast.length;
  const sum = (values) => values.reduce((a, b) => a + b, 0);
  // Retail is seasonal: compare with the same weeks a year earlier when the history has them.
  const yearAgo = total.history.length >= 52 && horizon <= 52;
  const before = yearAgo
    ? sum(total.history.slice(total.history.length - 52, total.history.length - 52 + horizon))
    : sum(total.history.slice(-horizon));
  const change = before > 0 ? (total.total_units / before - 1) * 100 : NaN;
  const level = Math.round((f.interval_level || 0.9) * 100);
  const bt = f.backtest || {};
  return [
    kpi(`Forecast units, next ${horizon} weeks`, fmt.int(total.total_units),
      `${level} % interval ${fmt.int(total.total_lower)} – ${fmt.int(total.total_upper)}`),
    kpi(yearAgo ? "vs the same weeks last year" : `vs the last ${horizon} weeks`,
      fmt.change(change), `${fmt.int(before)} units sold then`),
    kpi("Backtest error (MAPE)", Number.isFinite(bt.mape) ? fmt.pct(bt.mape) : "—",
      Number.isFinite(bt.naive_mape)
        ? `Seasonal-naive: ${fmt.pct(bt.naive_mape)} · last ${bt.holdout_weeks} weeks`
        : `last ${bt.holdout_weeks} weeks`),
    kpi("Products", fmt.int((f.products || []).length), f.category_name || ""),
  ];
}

function table(columns, rows, footer) {
  const head = el("tr", {}, columns.map((c) => el("th", { class: c.num ? "num" : null }, c.label)));
  const body = rows.map((row) =>
    el("tr", {}, columns.map((c) => el("td", { class: c.num ? "num" : null }, c.value(row)))));
  const foot = footer
    ? el("tfoot", {}, el("tr", {}, columns.map((c, i) =>
        el("td", { class: c.num ? "num" : null }, footer[i] ?? ""))))
    : null;
  return el("table", {}, el("thead", {}, head), el("tbody", {}, body), foot);
}

function tag(text, kind) {
  return el("span", { class: `tag ${kind || ""}`.trim() }, text);
}

function renderInventory(plan) {
  const products = plan.products || [];
  if (!products.length) {
    $("#inventory").replaceChildren(el("p", { class: "muted" }, "No inventory plan."));
    return;
  }
  const columns = [
    { label: "Product", value: (p) => p.product },
    { label: "On hand", num: true, value: (p) => fmt.int(p.on_hand) },
    { label: "Per week", num: true, value: (p) => fmt.dec(p.weekly_demand) },
    { label: "Safety stock", num: true, value: (p) => fmt.int(p.safety_stock) },
    { label: "Reorder at", num: true, value: (p) => fmt.int(p.reorder_point) },
    { label: "Order", num: true, value: (p) => fmt.int(p.order_quantity) },
    { label: "Cover", num: true, value: (p) => (p.weeks_of_cover === null ? "—" : `${fmt.dec(p.weeks_of_cover)} wk`) },
    { label: "", value: (p) => (p.reorder_now ? tag("Reorder now", "warn") : tag("OK", "ok")) },
  ];
  const footer = ["Total", "", "", fmt.int(plan.total_safety_stock), "", fmt.int(plan.total_order_quantity), "", ""];
  const level = Number.isFinite(plan.service_level) ? fmt.pct(plan.service_level * 100, 0) : "—";
  $("#inventory").replaceChildren(
    el("p", { class: "muted small" },
      `${level} service level · ${plan.horizon_weeks}-week horizon · ` +
      `${(plan.reorder_now || []).length} of ${products.length} products to reorder now`),
    table(columns, products, footer),
  );
}

function renderPricing(plan) {
  const products = plan.products || [];
  if (!products.length) {
    $("#pricing").replaceChildren(el("p", { class: "muted" }, "No pricing recommendation."));
    return;
  }
  const change = (v) => (v === null || v === undefined ? "—" : fmt.change(v));
  const columns = [
    { label: "Product", value: (p) => p.product },
    { label: "Planned", num: true, value: (p) => fmt.money(p.planned.price) },
    { label: "Recommended", num: true, value: (p) => fmt.money(p.recommended_price) },
    { label: "Units", num: true, value: (p) => fmt.int(p.recommended.units) },
    { label: "Revenue", num: true, value: (p) => change(p.revenue_change_pct) },
    { label: "Margin", num: true, value: (p) => change(p.margin_change_pct) },
  ];
  const footer = [
    "Total", "", "", fmt.int(plan.recommended.units),
    change(plan.revenue_change_pct), change(plan.margin_change_pct),
  ];
  $("#pricing").replaceChildren(
    el("p", { class: "muted small" },
      `At the recommended prices: margin ${fmt.moneyWhole(plan.recommended.margin)} ` +
      `(${change(plan.margin_change_pct)}), revenue ${fmt.moneyWhole(plan.recommended.revenue)} ` +
      `over ${plan.horizon_weeks} weeks, vs the planned prices.`),
    table(columns, products, footer),
  );
}

// --- start --------------------------------------------------------------------------------

$("#run-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const strategy = $("#strategy").value.trim();
  if (!strategy || debug.run === "running") return;
  run(strategy);
});
$("#cancel").addEventListener("click", cancelRun);
$("#chart-series").addEventListener("change", (event) => drawSeries(event.target.value));
$("#strategy").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.metaKey || event.ctrlKey)) $("#run-form").requestSubmit();
});

const watched = params.get("session");
if (watched && /^[A-Za-z0-9_-]{8,128}$/.test(watched)) {
  setRun("running");
  const token = params.get("token");
  checkSession(watch(watched, token), watched, token);
}
document.documentElement.dataset.ready = "true";
