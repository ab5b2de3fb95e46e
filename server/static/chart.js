// A small inline-SVG line chart: sales history, forecast and its prediction interval.
// No dependencies, no network: the page works offline.

const SVG = "http://www.w3.org/2000/svg";
const MAX_WIDTH = 960;
const MIN_WIDTH = 340;
const M = { top: 14, right: 18, bottom: 30, left: 50 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Round `max` up to a tidy axis end and pick ~5 ticks. */
export function niceTicks(max, count = 5) {
  if (!(max > 0)) return { max: 1, ticks: [0, 1] };
  const raw = max / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * power).find((s) => s >= raw);
  const top = Math.ceil(max / step) * step;
  const ticks = [];
  for (let v = 0; v <= top + step / 2; v += step) ticks.push(Math.round(v * 1e6) / 1e6);
  return { max: top, ticks };
}

const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const monthFmt = new Intl.DateTimeFormat(undefined, { month: "short", timeZone: "UTC" });
const dayFmt = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", year: "numeric", timeZone: "UTC" });

const parseDay = (text) => new Date(`${text}T00:00:00Z`);

function path(points) {
  return points.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
}

/**
 * Draw `series` into `container` (replacing what was there).
 *
 * series: { historyWeeks: [iso date], history: [n], forecastWeeks: [iso date],
 *           forecast: [n], lower: [n], upper: [n], intervalLevel: 0.9, label: string }
 */
export function renderChart(container, series) {
  // Draw at the size it is shown (within bounds), so text stays legible on a phone;
  // redraw when that size changes.
  if (typeof ResizeObserver === "function" && !container.__chartObserver) {
    let lastWidth = container.clientWidth;
    container.__chartObserver = new ResizeObserver(() => {
      const width = container.clientWidth;
      if (Math.abs(width - lastWidth) < 24 || !container.__chartSeries) return;
      lastWidth = width;
      draw(container, container.__chartSeries);
    });
    container.__chartObserver.observe(container);
  }
  container.__chartSeries = series;
  return draw(container, series);
}

function draw(container, series) {
  const WIDTH = Math.round(Math.max(MIN_WIDTH, Math.min(MAX_WIDTH, container.clientWidth || MAX_WIDTH)));
  const HEIGHT = WIDTH < 600 ? 240 : 320;
  const { historyWeeks, history, forecastWeeks, forecast, lower, upper } = series;
  const weeks = [...historyWeeks, ...forecastWeeks].map(parseDay);
  const n = weeks.length;
  if (n < 2) {
    container.replaceChildren();
    return null;
  }
  const h0 = history.length;
  const values = [...history, ...forecast, ...upper].filter(Number.isFinite);
  const { max, ticks } = niceTicks(Math.max(...values, 1));
  const plotW = WIDTH - M.left - M.right;
  const plotH = HEIGHT - M.top - M.bottom;
  const x = (i) => M.left + (i / (n - 1)) * plotW;
  const y = (v) => M.top + plotH - (Math.max(0, v) / max) * plotH;

  const root = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    id: "forecast-chart",
    "aria-label": series.label || "Weekly units: history and forecast",
    preserveAspectRatio: "xMidYMid meet",
  });

  // Horizontal grid and y axis labels.
  const grid = svg("g", { class: "grid" });
  const axis = svg("g", { class: "axis" });
  for (const tick of ticks) {
    grid.append(svg("line", { x1: M.left, x2: WIDTH - M.right, y1: y(tick), y2: y(tick) }));
    axis.append(svg("text", { x: M.left - 8, y: y(tick) + 4, "text-anchor": "end" },
      tick >= 10000 ? compact.format(tick) : number.format(tick)));
  }
  // Month labels on the x axis, thinned so they never collide.
  const monthStarts = [];
  weeks.forEach((week, i) => {
    if (i === 0 || week.getUTCMonth() !== weeks[i - 1].getUTCMonth()) monthStarts.push(i);
  });
  const every = Math.max(1, Math.ceil(monthStarts.length / Math.floor(plotW / 60)));
  monthStarts.forEach((i, k) => {
    if (k % every !== 0 || i === 0) return;
    const week = weeks[i];
    const label = week.getUTCMonth() === 0
      ? `${monthFmt.format(week)} ${week.getUTCFullYear()}`
      : monthFmt.format(week);
    axis.append(svg("text", { x: x(i), y: HEIGHT - 8, "text-anchor": "middle" }, label));
    grid.append(svg("line", { x1: x(i), x2: x(i), y1: HEIGHT - M.bottom, y2: HEIGHT - M.bottom + 4 }));
  });
  grid.append(svg("line", {
    x1: M.left, x2: WIDTH - M.right, y1: HEIGHT - M.bottom, y2: HEIGHT - M.bottom,
  }));
  root.append(grid, axis);

  // The interval band and the forecast start at the last week of history, so the
  // lines join up.
  const last = h0 - 1;
  const join = [[x(last), y(history[last])]];
  const upperPts = upper.map((v, i) => [x(h0 + i), y(v)]);
  const lowerPts = lower.map((v, i) => [x(h0 + i), y(v)]);
  root.append(svg("path", {
    class: "interval-band",
    d: `${path([...join, ...upperPts, ...lowerPts.reverse(), ...join])}Z`,
  }));
  root.append(svg("line", {
    class: "now-line", x1: x(last), x2: x(last), y1: M.top, y2: HEIGHT - M.bottom,
  }));
  const roomRight = WIDTH - M.right - x(last);
  root.append(roomRight > 80
    ? svg("text", { class: "now-label", x: x(last) + 6, y: M.top + 10 }, "Forecast →")
    : svg("text", { class: "now-label", x: WIDTH - M.right, y: M.top - 2, "text-anchor": "end" }, "Forecast"));
  root.append(svg("path", {
    class: "history-line", d: path(history.map((v, i) => [x(i), y(v)])),
  }));
  root.append(svg("path", {
    class: "forecast-line", d: path([...join, ...forecast.map((v, i) => [x(h0 + i), y(v)])]),
  }));

  // Hover targets: one per forecast week, with the numbers as a tooltip.
  const dots = svg("g", { class: "dots" });
  forecast.forEach((v, i) => {
    const dot = svg("circle", { cx: x(h0 + i), cy: y(v), r: WIDTH < 600 ? 2.4 : 3.2, fill: "var(--forecast)" });
    dot.append(svg("title", {},
      `Week of ${dayFmt.format(weeks[h0 + i])}: ${number.format(v)} units ` +
      `(${number.format(lower[i])}–${number.format(upper[i])})`));
    dots.append(dot);
  });
  root.append(dots);

  container.replaceChildren(root);
  return root;
}
