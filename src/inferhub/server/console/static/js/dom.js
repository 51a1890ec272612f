// DOM helpers: element building (text only, never HTML strings), formatting, dialogs, alerts.
import { t, lang } from "./i18n.js";

/** h("button", {class: "x", onclick: f}, "text", child, ...): an element; strings become text. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name in el && typeof value !== "string") {
      el[name] = value; // value, checked, disabled, selected ...
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let uid = 0;
export const nextId = (prefix = "f") => `${prefix}-${++uid}`;

// -- numbers, money, time -------------------------------------------------------------------

const MICROS = 1_000_000;

/** 12_500_000 micro-units -> "12.50" (at least 2, at most 6 decimals; exact). */
export function money(micros, currency) {
  const sign = micros < 0 ? "-" : "";
  const abs = Math.abs(micros);
  const whole = Math.floor(abs / MICROS);
  let frac = String(abs % MICROS).padStart(6, "0").replace(/0+$/, "");
  if (frac.length < 2) frac = frac.padEnd(2, "0");
  const text = `${sign}${whole.toLocaleString("en-US")}.${frac}`;
  return currency ? `${text} ${currency}` : text;
}

/** "12.5" currency units -> 12_500_000 micro-units, exactly (string arithmetic, no floats). */
export function parseAmount(text, { allowNegative = false } = {}) {
  const m = /^\s*(-)?(\d+)(?:\.(\d{0,6}))?\s*$/.exec(String(text));
  if (!m || (m[1] && !allowNegative)) throw new Error(t("err.amount"));
  const micros = Number(m[2]) * MICROS + Number((m[3] || "").padEnd(6, "0"));
  if (!Number.isSafeInteger(micros)) throw new Error(t("err.amount"));
  return m[1] ? -micros : micros;
}

/** The cost of a request as the gateway bills it: ceil((p*in + c*out) / 1e6) micro-units. */
export function costMicros(promptTokens, completionTokens, price) {
  if (!price) return null;
  const total =
    BigInt(promptTokens) * BigInt(price.input_micros_per_mtok) +
    BigInt(completionTokens) * BigInt(price.output_micros_per_mtok);
  return Number((total + 999_999n) / 1_000_000n);
}

/** The price that applies to a model: its own, else the default row "*". */
export function priceFor(prices, model) {
  return prices.find((p) => p.model === model) || prices.find((p) => p.model === "*") || null;
}

export const num = (n) => Number(n).toLocaleString(lang() === "zh-CN" ? "zh-CN" : "en-US");

export function dateTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(lang() === "zh-CN" ? "zh-CN" : "en-GB", {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
  });
}

export function dateOnly(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleDateString(lang() === "zh-CN" ? "zh-CN" : "en-GB", {
    year: "numeric", month: "2-digit", day: "2-digit",
  });
}

// -- feedback ---------------------------------------------------------------------------------

/** A message box (role=alert for errors, status otherwise) placed at the top of `where`. */
export function notice(where, message, kind = "error") {
  const box = h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" },
    h("span", {}, message),
    h("button", { type: "button", class: "link", "aria-label": t("close"),
      onclick: () => box.remove() }, "×"));
  where.querySelectorAll(":scope > .notice").forEach((n) => n.remove());
  where.prepend(box);
  return box;
}

/** Run `fn` with `button` disabled, showing an error under `where` if it throws. */
export async function busy(button, where, fn) {
  if (button) button.disabled = true;
  try {
    return await fn();
  } catch (err) {
    notice(where, err.message || String(err));
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

/** A modal <dialog> with a title, a body and buttons; resolves with the button's value. */
export function modal(title, body, buttons) {
  return new Promise((resolve) => {
    const titleId = nextId("dlg");
    const dialog = h("dialog", { class: "dialog", "aria-labelledby": titleId },
      h("h2", { id: titleId }, title),
      h("div", { class: "dialog-body" }, body),
      h("div", { class: "actions" }, buttons.map((b) =>
        h("button", { type: "button", class: b.class || "", value: b.value,
          onclick: async (ev) => {
            if (b.onclick && (await b.onclick(ev, dialog)) === false) return;
            dialog.close(b.value);
          } }, b.label))));
    dialog.addEventListener("close", () => { resolve(dialog.returnValue || "cancel"); dialog.remove(); });
    document.body.append(dialog);
    dialog.showModal();
  });
}

/** A yes/no confirmation; resolves true on yes. */
export async function confirmDialog(title, message, yesLabel, danger = true) {
  const answer = await modal(title, h("p", {}, message), [
    { label: t("cancel"), value: "cancel" },
    { label: yesLabel, value: "yes", class: danger ? "danger" : "primary" },
  ]);
  return answer === "yes";
}

/** Copy text to the clipboard (the Clipboard API, else the selection of a hidden field). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = h("textarea", { class: "offscreen", readonly: true }, text);
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  if (!ok) throw new Error(t("err.copy"));
}

/** A button that copies `getText()` and says so. */
export function copyButton(getText, label = t("copy")) {
  const status = h("span", { class: "copied", role: "status" });
  const btn = h("button", { type: "button", onclick: async () => {
    try {
      await copyText(getText());
      status.textContent = t("copied");
    } catch (err) {
      status.textContent = err.message;
    }
    setTimeout(() => { status.textContent = ""; }, 4000);
  } }, label);
  return h("span", { class: "copy" }, btn, status);
}

// -- forms and tables ---------------------------------------------------------------------------

/** A labelled field: field(label, input, hint). */
export function field(label, input, hint) {
  const id = input.id || (input.id = nextId("in"));
  const hintId = hint ? `${id}-hint` : null;
  if (hintId) input.setAttribute("aria-describedby", hintId);
  return h("div", { class: "field" },
    h("label", { for: id }, label), input, hint ? h("small", { id: hintId }, hint) : null);
}

/** A table in a scrolling box: columns [{label, cell: row => node|string, num?}]. */
export function table(caption, columns, rows, empty) {
  const head = h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : "" }, c.label)));
  const body = rows.length
    ? rows.map((r) => h("tr", {}, columns.map((c, i) =>
        h(i === 0 ? "th" : "td", { scope: i === 0 ? "row" : null, class: c.num ? "num" : "",
          "data-label": c.label }, c.cell(r)))))
    : [h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, empty || t("none")))];
  return h("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": caption },
    h("table", {}, h("caption", { class: "sr-only" }, caption), h("thead", {}, head), h("tbody", {}, body)));
}

export function badge(text, kind) {
  return h("span", { class: `badge ${kind || ""}` }, text);
}
