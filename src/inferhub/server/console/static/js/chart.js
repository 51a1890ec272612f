// A small SVG bar chart (stacked series), drawn by our own code: no library, no network.
const NS = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** A "nice" upper bound and tick step for values up to `max`. */
function niceScale(max, ticks = 4) {
  if (!(max > 0)) return { top: 1, step: 0.25 };
  const raw = max / ticks;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= raw);
  return { top: step * ticks, step };
}

/**
 * barChart({labels, series: [{name, values, cls}], format, label}) -> an <svg> that scales
 * to its container's width: one stacked bar per label, y gridlines, sparse x labels, and a
 * <title> per bar for pointer users; `label` is its accessible name.
 */
export function barChart({ labels, series, format = String, label, width = 720 }) {
  const W = Math.max(280, Math.round(width)), H = 220, left = 64, right = 12, top = 12, bottom = 28;
  const totals = labels.map((_, i) => series.reduce((sum, sr) => sum + (sr.values[i] || 0), 0));
  const { top: ymax, step } = niceScale(Math.max(0, ...totals));
  const plotW = W - left - right, plotH = H - top - bottom;
  const y = (v) => top + plotH - (v / ymax) * plotH;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": label });
  for (let v = 0; v <= ymax + step / 2; v += step) {
    svg.append(s("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(s("text", { x: left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, format(v)));
  }
  const slot = plotW / Math.max(1, labels.length);
  const barW = Math.max(2, Math.min(28, slot * 0.7));
  const every = Math.ceil(labels.length / Math.max(2, Math.floor(plotW / 56)));
  labels.forEach((lab, i) => {
    const x = left + i * slot + (slot - barW) / 2;
    let base = 0;
    const g = s("g", { class: "bar" });
    g.append(s("title", {}, `${lab}\n${series.map((sr) => `${sr.name}: ${format(sr.values[i] || 0)}`).join("\n")}`));
    for (const sr of series) {
      const v = sr.values[i] || 0;
      if (v > 0) {
        g.append(s("rect", { x, width: barW, y: y(base + v), height: Math.max(1, y(base) - y(base + v)), class: sr.cls }));
      }
      base += v;
    }
    svg.append(g);
    if ((labels.length - 1 - i) % every === 0) { // counted back from the last day, always shown
      svg.append(s("text", { x: x + barW / 2, y: H - 8, class: "tick", "text-anchor": "middle" }, lab.slice(5)));
    }
  });
  svg.append(s("line", { x1: left, x2: W - right, y1: y(0), y2: y(0), class: "axis" }));
  return svg;
}

/** A legend for the series of a chart. */
export function legend(series) {
  const ul = document.createElement("ul");
  ul.className = "legend";
  for (const sr of series) {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = `swatch ${sr.cls}`;
    sw.setAttribute("aria-hidden", "true");
    li.append(sw, document.createTextNode(sr.name));
    ul.append(li);
  }
  return ul;
}
