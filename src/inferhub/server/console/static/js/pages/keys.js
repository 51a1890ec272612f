// API keys: list, create (the key shown once), revoke, and code snippets to use a key.
import { api, session } from "../api.js";
import { t } from "../i18n.js";
import {
  badge, busy, confirmDialog, copyButton, dateOnly, dateTime, field, fill, h, modal, money,
  nextId, notice, parseAmount, table,
} from "../dom.js";

const DEFAULT_PROMPT = [
  { role: "system", content: "You are a helpful assistant." },
  { role: "user", content: "Hello!" },
];

const shellQuote = (s) => `'${String(s).replace(/'/g, `'\\''`)}'`;

/** curl and Python (openai client) snippets for a key (null: read it from the environment). */
export function snippets(key, model) {
  const base = `${location.origin}/v1`;
  const body = JSON.stringify({ model, messages: DEFAULT_PROMPT });
  const auth = key ? `Bearer ${key}` : "Bearer $INFERHUB_API_KEY";
  const curl = [
    "curl -X POST \\",
    '  -H "Content-Type: application/json" \\',
    `  -H "Authorization: ${auth}" \\`,
    `  -d ${shellQuote(body)} \\`,
    `  ${shellQuote(`${base}/chat/completions`)}`,
  ].join("\n");
  const apiKey = key ? JSON.stringify(key) : 'os.environ["INFERHUB_API_KEY"]';
  const python = [
    ...(key ? [] : ["import os", ""]),
    "from openai import OpenAI",
    "",
    `client = OpenAI(api_key=${apiKey}, base_url=${JSON.stringify(base)})`,
    "",
    "completion = client.chat.completions.create(",
    `    model=${JSON.stringify(model)},`,
    "    messages=[",
    ...DEFAULT_PROMPT.map((m) => `        {"role": "${m.role}", "content": ${JSON.stringify(m.content)}},`),
    "    ],",
    ")",
    "print(completion.choices[0].message.content)",
    "print(completion.usage)",
    "",
    "# streamed",
    "stream = client.chat.completions.create(",
    `    model=${JSON.stringify(model)},`,
    `    messages=[{"role": "user", "content": "Hello!"}],`,
    "    stream=True,",
    ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
  ].join("\n");
  return { curl, python };
}

/** The snippet block: a model picker and the two snippets, each with a copy button. */
export function snippetBlock(key) {
  const models = session.info.models;
  const select = h("select", {}, models.map((m) => h("option", { value: m }, m)));
  const holder = h("div", { class: "snippets" });
  const draw = () => {
    const s = snippets(key, select.value || models[0] || "MODEL");
    fill(holder,
      [["curl", s.curl], ["Python (openai)", s.python]].map(([label, code]) =>
        h("div", { class: "snippet" },
          h("div", { class: "snippet-head" }, h("h3", {}, label),
            copyButton(() => code, `${t("copy")} ${label}`)),
          h("pre", { tabindex: 0, "aria-label": label }, h("code", {}, code)))));
  };
  select.addEventListener("change", draw);
  draw();
  return h("div", {}, field(t("keys.model_for_code"), select), holder);
}

function status(k) {
  if (k.revoked) return badge(t("keys.revoked"), "bad");
  if (k.expires_at && Date.parse(k.expires_at) <= Date.now()) return badge(t("keys.expired"), "warn");
  return badge(t("keys.active"), "ok");
}

const live = (k) => !k.revoked && !(k.expires_at && Date.parse(k.expires_at) <= Date.now());

function limits(k) {
  const l = k.limits;
  if (l.rpm == null && l.tpm == null && l.concurrency == null) return t("keys.unlimited");
  return [
    l.rpm != null ? `${l.rpm} RPM` : null,
    l.tpm != null ? `${l.tpm} TPM` : null,
    l.concurrency != null ? `${l.concurrency} ${t("keys.concurrent")}` : null,
  ].filter(Boolean).join(" · ");
}

function optionalInt(input, name) {
  const v = input.value.trim();
  if (!v) return null;
  if (!/^\d+$/.test(v) || Number(v) < 1) throw new Error(t("err.positive_int", { field: name }));
  return Number(v);
}

async function showCreated(created) {
  const secret = created.secret;
  const keyInput = h("input", { type: "text", readonly: true, value: secret, class: "mono key-secret",
    "aria-label": t("keys.new_key"), onfocus: (ev) => ev.target.select() });
  await modal(t("keys.created_title"), [
    h("p", { class: "warning", role: "alert" }, t("keys.shown_once")),
    h("div", { class: "key-row" }, keyInput, copyButton(() => secret)),
    h("h3", {}, t("keys.code_title")),
    snippetBlock(secret),
  ], [{ label: t("keys.saved_it"), value: "ok", class: "primary" }]);
}

export async function render(main) {
  const models = session.info.models;
  const currency = session.info.currency;
  const listHolder = h("div", {});
  const showAll = h("input", { type: "checkbox", id: nextId("cb") });
  let keys = [];

  const draw = () => {
    const rows = showAll.checked ? keys : keys.filter(live);
    fill(listHolder, table(t("keys.list_title"), [
      { label: t("keys.name"), cell: (k) => k.name },
      { label: t("keys.key"), cell: (k) => h("code", {}, `${k.prefix}…`) },
      { label: t("keys.models"), cell: (k) => k.allowed_models.join(", ") || t("keys.all_models") },
      { label: t("keys.limits"), cell: limits },
      { label: t("keys.spent"), num: true, cell: (k) => k.spend_cap_micros != null
        ? `${money(k.spent_micros)} / ${money(k.spend_cap_micros, currency)}`
        : money(k.spent_micros, currency) },
      { label: t("keys.created"), cell: (k) => dateTime(k.created_at) },
      { label: t("keys.last_used"), cell: (k) => k.last_used_at ? dateTime(k.last_used_at) : t("keys.never") },
      { label: t("keys.expires"), cell: (k) => k.expires_at ? dateOnly(k.expires_at) : t("keys.never") },
      { label: t("keys.status"), cell: status },
      { label: t("actions"), cell: (k) => k.revoked ? "" : h("button", { type: "button", class: "danger small",
        "aria-label": `${t("keys.revoke")} ${k.name} (${k.prefix}…)`,
        onclick: (ev) => revoke(ev.target, k) }, t("keys.revoke")) },
    ], rows, t("keys.none")));
  };

  const load = async () => {
    keys = (await api("/v1/dashboard/keys")).data.slice().reverse(); // newest first
    draw();
  };

  const revoke = async (button, k) => {
    const yes = await confirmDialog(t("keys.revoke_title"),
      t("keys.revoke_confirm", { name: k.name, prefix: `${k.prefix}…` }), t("keys.revoke"));
    if (!yes) return;
    await busy(button, main, async () => {
      await api(`/v1/dashboard/keys/${encodeURIComponent(k.id)}/revoke`, { method: "POST" });
      await load();
      notice(main, t("keys.revoked_done", { name: k.name }), "ok");
    });
  };

  // -- the create form --
  const name = h("input", { type: "text", maxlength: 200, autocomplete: "off", required: true });
  const modelBoxes = models.map((m) => h("input", { type: "checkbox", value: m, id: nextId("m") }));
  const rpm = h("input", { type: "number", min: 1, step: 1, inputmode: "numeric" });
  const tpm = h("input", { type: "number", min: 1, step: 1, inputmode: "numeric" });
  const conc = h("input", { type: "number", min: 1, step: 1, inputmode: "numeric" });
  const cap = h("input", { type: "text", inputmode: "decimal", placeholder: "10.00" });
  const expiry = h("select", {},
    h("option", { value: "" }, t("keys.never")),
    [1, 7, 30, 90, 365].map((d) => h("option", { value: String(d) }, t("keys.days", { n: d }))));
  const createButton = h("button", { type: "submit", class: "primary" }, t("keys.create"));
  const form = h("form", { class: "grid-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    await busy(createButton, form, async () => {
      if (!name.value.trim()) throw new Error(t("err.required", { field: t("keys.name") }));
      const days = Number(expiry.value);
      const body = {
        name: name.value.trim(),
        allowed_models: modelBoxes.filter((b) => b.checked).map((b) => b.value),
        rpm_limit: optionalInt(rpm, "RPM"),
        tpm_limit: optionalInt(tpm, "TPM"),
        concurrency_limit: optionalInt(conc, t("keys.concurrency")),
        spend_cap_micros: cap.value.trim() ? parseAmount(cap.value) : null,
        expires_at: days ? new Date(Date.now() + days * 86_400_000).toISOString() : null,
      };
      const created = await api("/v1/dashboard/keys", { method: "POST", body });
      form.reset();
      await load();
      await showCreated(created);
    });
  } },
    field(t("keys.name"), name, t("keys.name_hint")),
    h("fieldset", { class: "field" }, h("legend", {}, t("keys.models")),
      h("div", { class: "checks" }, modelBoxes.map((b) =>
        h("label", { for: b.id, class: "check" }, b, b.value))),
      h("small", {}, t("keys.models_hint"))),
    field(t("keys.rpm"), rpm, t("keys.blank_unlimited")),
    field(t("keys.tpm"), tpm, t("keys.blank_unlimited")),
    field(t("keys.concurrency"), conc, t("keys.blank_unlimited")),
    field(t("keys.spend_cap", { currency }), cap, t("keys.blank_unlimited")),
    field(t("keys.expires"), expiry),
    h("div", { class: "actions" }, createButton));

  fill(main,
    h("h1", { tabindex: -1 }, t("nav.keys")),
    h("p", { class: "lead" }, t("keys.lead")),
    h("section", { class: "card", "aria-labelledby": "keys-list-h" },
      h("div", { class: "card-head" }, h("h2", { id: "keys-list-h" }, t("keys.list_title")),
        h("label", { class: "check", for: showAll.id }, showAll, t("keys.show_all"))),
      listHolder),
    h("section", { class: "card", "aria-labelledby": "keys-new-h" },
      h("h2", { id: "keys-new-h" }, t("keys.create_title")), form),
    h("section", { class: "card", "aria-labelledby": "keys-code-h" },
      h("h2", { id: "keys-code-h" }, t("keys.code_title")),
      h("p", {}, t("keys.code_lead")), snippetBlock(null)));
  showAll.addEventListener("change", draw);
  await load();
}
