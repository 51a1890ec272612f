// Usage and billing: balance, tokens and cost per day (chart), per model and per key, the
// recent requests (paged) and a CSV export. The operator's "all usage" page reuses the parts.
import { allPages, api, session } from "../api.js";
import { barChart, legend } from "../chart.js";
import { t } from "../i18n.js";
import { badge, busy, dateTime, fill, h, money, nextId, notice, num, table } from "../dom.js";

const PAGE_SIZE = 20;

/** ISO start of the UTC day `days - 1` days ago, and the list of those days ("YYYY-MM-DD"). */
export function lastDays(days) {
  const today = new Date();
  const start = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - (days - 1)));
  const labels = [];
  for (let i = 0; i < days; i++) {
    labels.push(new Date(start.getTime() + i * 86_400_000).toISOString().slice(0, 10));
  }
  return { since: start.toISOString(), labels };
}

const compact = (n) => (n >= 1e6 ? `${+(n / 1e6).toFixed(1)}M` : n >= 1e3 ? `${+(n / 1e3).toFixed(1)}k` : String(+n.toFixed(2)));

/** The two per-day charts (tokens in/out stacked; cost) with a data table for screen readers. */
export function dailyCharts(groups, labels, currency, width) {
  const byDay = new Map(groups.map((g) => [g.group, g]));
  const get = (d, f) => byDay.get(d)?.[f] || 0;
  const tokenSeries = [
    { name: t("usage.tokens_in"), cls: "s-in", values: labels.map((d) => get(d, "prompt_tokens")) },
    { name: t("usage.tokens_out"), cls: "s-out", values: labels.map((d) => get(d, "completion_tokens")) },
  ];
  const costSeries = [
    { name: t("usage.cost"), cls: "s-cost", values: labels.map((d) => get(d, "cost_micros") / 1e6) },
  ];
  // Side by side from 900px on (see console.css), else one above the other.
  const w = window.matchMedia("(min-width: 900px)").matches ? (width - 16) / 2 : width;
  const fmtCost = (v) => String(+v.toFixed(6)); // micro-units are the resolution
  return h("div", { class: "charts" },
    h("figure", { class: "chart-box" },
      h("figcaption", {}, t("usage.tokens_per_day")),
      barChart({ labels, series: tokenSeries, format: compact, label: t("usage.tokens_per_day"), width: w }),
      legend(tokenSeries)),
    h("figure", { class: "chart-box" },
      h("figcaption", {}, `${t("usage.cost_per_day")} (${currency})`),
      barChart({ labels, series: costSeries, format: fmtCost, label: t("usage.cost_per_day"), width: w }),
      legend(costSeries)),
    h("details", { class: "chart-data" }, h("summary", {}, t("usage.chart_data")),
      table(t("usage.per_day"), [
        { label: t("usage.day"), cell: (d) => d },
        { label: t("usage.requests"), num: true, cell: (d) => num(get(d, "requests")) },
        { label: t("usage.tokens_in"), num: true, cell: (d) => num(get(d, "prompt_tokens")) },
        { label: t("usage.tokens_out"), num: true, cell: (d) => num(get(d, "completion_tokens")) },
        { label: t("usage.cost"), num: true, cell: (d) => money(get(d, "cost_micros"), currency) },
      ], labels.filter((d) => byDay.has(d)))));
}

/** A totals table (per model, per key, per account): `name(group)` names each row. */
export function totalsTable(caption, firstLabel, groups, name, currency) {
  return table(caption, [
    { label: firstLabel, cell: (g) => name(g.group) },
    { label: t("usage.requests"), num: true, cell: (g) => num(g.requests) },
    { label: t("usage.tokens_in"), num: true, cell: (g) => num(g.prompt_tokens) },
    { label: t("usage.tokens_out"), num: true, cell: (g) => num(g.completion_tokens) },
    { label: t("usage.cost"), num: true, cell: (g) => money(g.cost_micros, currency) },
  ], groups, t("usage.no_usage"));
}

function endState(r) {
  if (r.status === "open") return badge(t("usage.in_progress"), "warn");
  const state = r.end_state || "";
  const label = t(`usage.end.${state}`, {}, state);
  const why = r.finish_reasons.length ? ` (${r.finish_reasons.join(", ")})` : "";
  const kind = state === "completed" ? "ok" : state === "rejected" || state === "error" ? "bad" : "warn";
  return badge(label + why, kind);
}

/** The recent-requests table with previous/next paging. */
export function requestsSection({ endpoint, params = {}, keyName, accountName, currency }) {
  const holder = h("div", {});
  const pageLabel = h("span", { class: "page-label", "aria-live": "polite" });
  const prev = h("button", { type: "button" }, t("usage.prev"));
  const next = h("button", { type: "button" }, t("usage.next"));
  let offset = 0;
  const columns = [
    { label: t("usage.time"), cell: (r) => dateTime(r.started_at) },
    ...(accountName ? [{ label: t("usage.account"), cell: (r) => accountName(r.account_id) }] : []),
    { label: t("usage.model"), cell: (r) => r.model },
    { label: t("usage.key"), cell: (r) => h("code", {}, keyName(r.key_id)) },
    { label: t("usage.prompt_tokens"), num: true, cell: (r) => num(r.prompt_tokens) },
    { label: t("usage.completion_tokens"), num: true, cell: (r) => num(r.completion_tokens) },
    { label: t("usage.cost"), num: true, cell: (r) => money(r.cost_micros, currency) },
    { label: t("usage.end_state"), cell: endState },
  ];
  const load = async () => {
    const q = new URLSearchParams({ ...params, limit: PAGE_SIZE, offset });
    const rows = (await api(`${endpoint}?${q}`)).data;
    fill(holder, table(t("usage.recent"), columns, rows, t("usage.no_requests")));
    prev.disabled = offset === 0;
    next.disabled = rows.length < PAGE_SIZE;
    pageLabel.textContent = t("usage.page", { n: offset / PAGE_SIZE + 1 });
  };
  const turn = async (delta) => {
    const was = offset;
    prev.disabled = next.disabled = true; // load() sets them again
    offset = Math.max(0, offset + delta);
    try {
      await load();
    } catch (err) {
      offset = was;
      prev.disabled = offset === 0;
      next.disabled = false;
      notice(holder, err.message);
    }
  };
  prev.addEventListener("click", () => turn(-PAGE_SIZE));
  next.addEventListener("click", () => turn(PAGE_SIZE));
  const section = h("div", { class: "requests" }, holder,
    h("div", { class: "pager" }, prev, pageLabel, next));
  return { section, load };
}

const csvCell = (v) => {
  let s = v === null || v === undefined ? "" : String(v);
  if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`; // never a formula in a spreadsheet
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
};

const exact = (micros) => {
  const sign = micros < 0 ? "-" : "";
  const a = Math.abs(micros);
  return `${sign}${Math.floor(a / 1e6)}.${String(a % 1e6).padStart(6, "0")}`;
};

/** Download every request row of `endpoint` (with `params`) as a CSV file. */
export async function exportCsv(endpoint, params, { keyName, accountName, currency }) {
  const rows = await allPages(endpoint, params);
  const header = ["started_at", "ended_at", "request_id", "account", "model", "key", "key_id",
    "prompt_tokens", "completion_tokens", "total_tokens", `cost_${currency}`, "cost_micros",
    "status", "end_state", "finish_reasons"];
  const lines = [header, ...rows.map((r) => [r.started_at, r.ended_at, r.request_id,
    accountName ? accountName(r.account_id) : r.account_id, r.model, keyName(r.key_id), r.key_id,
    r.prompt_tokens, r.completion_tokens, r.prompt_tokens + r.completion_tokens, exact(r.cost_micros),
    r.cost_micros, r.status, r.end_state, r.finish_reasons.join(" ")])];
  const csv = lines.map((l) => l.map(csvCell).join(",")).join("\r\n") + "\r\n";
  const url = URL.createObjectURL(new Blob([csv], { type: "text/csv;charset=utf-8" }));
  const a = h("a", { href: url, download: `inferhub-usage-${new Date().toISOString().slice(0, 10)}.csv`, class: "offscreen" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
  return rows.length;
}

export function rangeSelect(value, onchange) {
  const select = h("select", { id: nextId("range"), onchange: () => onchange(Number(select.value)) },
    [7, 30, 90].map((d) => h("option", { value: String(d), selected: d === value }, t("usage.last_days", { n: d }))));
  return h("div", { class: "field inline" }, h("label", { for: select.id }, t("usage.range")), select);
}

function stat(label, value, note) {
  return h("div", { class: "stat" }, h("div", { class: "stat-label" }, label),
    h("div", { class: "stat-value" }, value), note ? h("div", { class: "stat-note" }, note) : null);
}

export async function render(main, state = { days: 30 }) {
  const currency = session.info.currency;
  const { since, labels } = lastDays(state.days);
  const base = "/v1/dashboard/usage";
  const [account, daily, byModel, byKey, keys] = await Promise.all([
    api("/v1/dashboard/account"),
    api(`${base}?${new URLSearchParams({ group_by: "day", since })}`),
    api(`${base}?${new URLSearchParams({ group_by: "model", since })}`),
    api(`${base}?${new URLSearchParams({ group_by: "key", since })}`),
    api("/v1/dashboard/keys"),
  ]);
  const keyMap = new Map(keys.data.map((k) => [k.id, k]));
  const keyName = (id) => (keyMap.has(id) ? `${keyMap.get(id).prefix}…` : id);
  const keyLabel = (id) => (keyMap.has(id)
    ? h("span", {}, keyMap.get(id).name, h("br"), h("code", { class: "muted" }, `${keyMap.get(id).prefix}…`))
    : id);
  const sum = (f) => daily.data.reduce((a, g) => a + g[f], 0);
  const requests = requestsSection({ endpoint: `${base}/requests`, keyName, currency });
  const exportButton = h("button", { type: "button" }, t("usage.export"));
  const exportStatus = h("span", { role: "status", class: "muted" });
  exportButton.addEventListener("click", () => busy(exportButton, main, async () => {
    const n = await exportCsv(`${base}/requests`, {}, { keyName, currency });
    exportStatus.textContent = t("usage.exported", { n });
  }));
  const chartsHolder = h("div", {});
  fill(main,
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, t("nav.usage")),
      rangeSelect(state.days, (d) => { state.days = d; render(main, state); })),
    h("section", { class: "stats", "aria-label": t("usage.summary") },
      stat(t("usage.balance"), money(account.balance_micros, currency),
        t("usage.available_note", { available: money(account.available_micros), reserved: money(account.reserved_micros) })),
      stat(t("usage.spent_range", { n: state.days }), money(sum("cost_micros"), currency)),
      stat(t("usage.tokens_in"), num(sum("prompt_tokens"))),
      stat(t("usage.tokens_out"), num(sum("completion_tokens"))),
      stat(t("usage.requests"), num(sum("requests")))),
    h("section", { class: "card", "aria-labelledby": "u-daily" },
      h("h2", { id: "u-daily" }, t("usage.per_day"), " ", h("small", { class: "muted" }, "(UTC)")), chartsHolder),
    h("div", { class: "two-col" },
      h("section", { class: "card", "aria-labelledby": "u-model" }, h("h2", { id: "u-model" }, t("usage.per_model")),
        totalsTable(t("usage.per_model"), t("usage.model"), byModel.data, (g) => g, currency)),
      h("section", { class: "card", "aria-labelledby": "u-key" }, h("h2", { id: "u-key" }, t("usage.per_key")),
        totalsTable(t("usage.per_key"), t("usage.key"), byKey.data, keyLabel, currency))),
    h("section", { class: "card", "aria-labelledby": "u-recent" },
      h("div", { class: "card-head" }, h("h2", { id: "u-recent" }, t("usage.recent")),
        h("div", { class: "inline-actions" }, exportStatus, exportButton)),
      requests.section));
  fill(chartsHolder, dailyCharts(daily.data, labels, currency, chartsHolder.clientWidth || 700));
  await requests.load();
}
