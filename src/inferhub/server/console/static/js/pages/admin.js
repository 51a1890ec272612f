// Operator pages (admin role): accounts (create, disable/enable, top up, set password),
// prices per model, and the usage of every account.
import { api, session } from "../api.js";
import { t } from "../i18n.js";
import {
  badge, busy, confirmDialog, dateTime, field, fill, h, modal, money, nextId, notice, parseAmount, table,
} from "../dom.js";
import { dailyCharts, exportCsv, lastDays, rangeSelect, requestsSection, totalsTable } from "./usage.js";

const enc = encodeURIComponent;

// -- accounts ---------------------------------------------------------------------------------

async function topUp(main, account, reload) {
  const currency = session.info.currency;
  const amount = h("input", { type: "text", inputmode: "decimal", placeholder: "10.00", required: true });
  const note = h("input", { type: "text", maxlength: 500 });
  const errors = h("div", {});
  await modal(t("acc.topup_title", { name: account.name }), [
    h("p", {}, t("acc.current_balance", { balance: money(account.balance_micros, currency) })),
    errors,
    field(t("acc.amount", { currency }), amount, t("acc.amount_hint")),
    field(t("acc.note"), note),
  ], [
    { label: t("cancel"), value: "cancel" },
    { label: t("acc.topup"), value: "ok", class: "primary", onclick: async (ev) => {
      const ok = await busy(ev.target, errors, async () => {
        const micros = parseAmount(amount.value, { allowNegative: true });
        if (micros === 0) throw new Error(t("err.amount"));
        const entry = await api(`/admin/accounts/${enc(account.id)}/credit`, { method: "POST",
          body: { amount_micros: micros, note: note.value, kind: micros > 0 ? "credit" : "adjustment" } });
        await reload();
        notice(main, t("acc.topped_up", { name: account.name, balance: money(entry.balance_micros, currency) }), "ok");
        return true;
      });
      return ok === true;
    } },
  ]);
}

async function setPassword(main, account) {
  const pw = h("input", { type: "password", autocomplete: "new-password", minlength: 8 });
  const errors = h("div", {});
  await modal(t("acc.password_title", { name: account.name }), [
    errors, field(t("acc.password"), pw, t("acc.password_hint")),
  ], [
    { label: t("cancel"), value: "cancel" },
    { label: t("save"), value: "ok", class: "primary", onclick: async (ev) => {
      const ok = await busy(ev.target, errors, async () => {
        await api(`/admin/accounts/${enc(account.id)}/password`, { method: "PUT", body: { password: pw.value } });
        notice(main, t("acc.password_set", { name: account.name }), "ok");
        return true;
      });
      return ok === true;
    } },
  ]);
}

export async function accountsPage(main) {
  const currency = session.info.currency;
  const holder = h("div", {});
  const load = async () => {
    const accounts = (await api("/admin/accounts")).data;
    fill(holder, table(t("acc.list"), [
      { label: t("acc.name"), cell: (a) => a.name },
      { label: t("acc.email"), cell: (a) => a.email || "—" },
      { label: t("acc.role"), cell: (a) => (a.role === "admin" ? badge(t("acc.admin"), "info") : t("acc.user")) },
      { label: t("acc.balance"), num: true, cell: (a) => money(a.balance_micros, currency) },
      { label: t("acc.available"), num: true, cell: (a) => money(a.available_micros, currency) },
      { label: t("acc.created"), cell: (a) => dateTime(a.created_at) },
      { label: t("acc.status"), cell: (a) => (a.disabled ? badge(t("acc.disabled"), "bad") : badge(t("acc.enabled"), "ok")) },
      { label: t("actions"), cell: (a) => h("div", { class: "row-actions" },
        h("button", { type: "button", class: "small", "aria-label": `${t("acc.topup")}: ${a.name}`,
          onclick: () => topUp(main, a, load) }, t("acc.topup")),
        h("button", { type: "button", class: "small", "aria-label": `${t("acc.set_password")}: ${a.name}`,
          onclick: () => setPassword(main, a) }, t("acc.set_password")),
        a.id === session.info.account.id ? null : h("button", {
          type: "button", class: a.disabled ? "small" : "small danger",
          "aria-label": `${a.disabled ? t("acc.enable") : t("acc.disable")}: ${a.name}`,
          onclick: async (ev) => {
            const action = a.disabled ? "enable" : "disable";
            if (!a.disabled && !(await confirmDialog(t("acc.disable_title"), t("acc.disable_confirm", { name: a.name }), t("acc.disable")))) return;
            await busy(ev.target, main, async () => {
              await api(`/admin/accounts/${enc(a.id)}/${action}`, { method: "POST" });
              await load();
            });
          } }, a.disabled ? t("acc.enable") : t("acc.disable"))) },
    ], accounts));
  };

  const name = h("input", { type: "text", maxlength: 200, required: true, autocomplete: "off" });
  const email = h("input", { type: "email", maxlength: 320, autocomplete: "off" });
  const role = h("select", {}, h("option", { value: "user" }, t("acc.user")), h("option", { value: "admin" }, t("acc.admin")));
  const password = h("input", { type: "password", autocomplete: "new-password", minlength: 8 });
  const credit = h("input", { type: "text", inputmode: "decimal", placeholder: "0.00" });
  const submit = h("button", { type: "submit", class: "primary" }, t("acc.create"));
  const form = h("form", { class: "grid-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    await busy(submit, form, async () => {
      if (!name.value.trim()) throw new Error(t("err.required", { field: t("acc.name") }));
      const body = { name: name.value.trim(), role: role.value };
      if (email.value.trim()) body.email = email.value.trim();
      if (password.value) body.password = password.value;
      if (credit.value.trim()) body.credit_micros = parseAmount(credit.value);
      const created = await api("/admin/accounts", { method: "POST", body });
      form.reset();
      await load();
      notice(main, t("acc.created_done", { name: created.name }), "ok");
    });
  } },
    field(t("acc.name"), name), field(t("acc.email"), email, t("acc.email_hint")), field(t("acc.role"), role),
    field(t("acc.password"), password, t("acc.password_hint")),
    field(t("acc.initial_credit", { currency }), credit),
    h("div", { class: "actions" }, submit));

  fill(main,
    h("h1", { tabindex: -1 }, t("nav.accounts")),
    h("section", { class: "card", "aria-labelledby": "acc-list-h" }, h("h2", { id: "acc-list-h" }, t("acc.list")), holder),
    h("section", { class: "card", "aria-labelledby": "acc-new-h" }, h("h2", { id: "acc-new-h" }, t("acc.create_title")), form));
  await load();
}

// -- prices -----------------------------------------------------------------------------------

export async function pricesPage(main) {
  const currency = session.info.currency;
  const holder = h("div", {});
  const model = h("input", { type: "text", list: "served-models", required: true, autocomplete: "off" });
  const input = h("input", { type: "text", inputmode: "decimal", placeholder: "0.50" });
  const output = h("input", { type: "text", inputmode: "decimal", placeholder: "1.50" });
  const load = async () => {
    const prices = (await api("/admin/prices")).data;
    fill(holder, table(t("price.list"), [
      { label: t("price.model"), cell: (p) => (p.model === "*" ? h("span", {}, h("code", {}, "*"), ` ${t("price.default")}`) : p.model) },
      { label: t("price.input", { currency }), num: true, cell: (p) => money(p.input_micros_per_mtok) },
      { label: t("price.output", { currency }), num: true, cell: (p) => money(p.output_micros_per_mtok) },
      { label: t("price.updated"), cell: (p) => dateTime(p.updated_at) },
      { label: t("actions"), cell: (p) => h("div", { class: "row-actions" },
        h("button", { type: "button", class: "small", "aria-label": `${t("edit")}: ${p.model}`, onclick: () => {
          model.value = p.model; input.value = money(p.input_micros_per_mtok).replace(/,/g, "");
          output.value = money(p.output_micros_per_mtok).replace(/,/g, ""); model.focus();
        } }, t("edit")),
        p.model === "*" ? null : h("button", { type: "button", class: "small danger", "aria-label": `${t("delete")}: ${p.model}`,
          onclick: async (ev) => {
            if (!(await confirmDialog(t("price.delete_title"), t("price.delete_confirm", { model: p.model }), t("delete")))) return;
            await busy(ev.target, main, async () => { await api(`/admin/prices/${p.model.split("/").map(enc).join("/")}`, { method: "DELETE" }); await load(); });
          } }, t("delete"))) },
    ], prices));
  };
  const submit = h("button", { type: "submit", class: "primary" }, t("price.set"));
  const form = h("form", { class: "grid-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    await busy(submit, form, async () => {
      const m = model.value.trim();
      if (!m) throw new Error(t("err.required", { field: t("price.model") }));
      const body = { input_micros_per_mtok: parseAmount(input.value || "0"), output_micros_per_mtok: parseAmount(output.value || "0") };
      await api(`/admin/prices/${m.split("/").map(enc).join("/")}`, { method: "PUT", body });
      form.reset();
      await load();
      notice(main, t("price.saved", { model: m }), "ok");
    });
  } },
    field(t("price.model"), model, t("price.model_hint")),
    h("datalist", { id: "served-models" }, ["*", ...session.info.models].map((m) => h("option", { value: m }))),
    field(t("price.input", { currency }), input),
    field(t("price.output", { currency }), output),
    h("div", { class: "actions" }, submit));
  fill(main,
    h("h1", { tabindex: -1 }, t("nav.prices")),
    h("p", { class: "lead" }, t("price.lead")),
    h("section", { class: "card", "aria-labelledby": "pr-list-h" }, h("h2", { id: "pr-list-h" }, t("price.list")), holder),
    h("section", { class: "card", "aria-labelledby": "pr-set-h" }, h("h2", { id: "pr-set-h" }, t("price.set_title")), form));
  await load();
}

// -- all usage --------------------------------------------------------------------------------

export async function allUsagePage(main, state = { days: 30, account: "" }) {
  const currency = session.info.currency;
  const { since, labels } = lastDays(state.days);
  const filter = state.account ? { account: state.account } : {};
  const q = (extra) => new URLSearchParams({ ...filter, since, ...extra });
  const [accounts, keys, daily, byAccount, byModel] = await Promise.all([
    api("/admin/accounts"), api("/admin/keys"),
    api(`/admin/usage?${q({ group_by: "day" })}`),
    api(`/admin/usage?${q({ group_by: "account" })}`),
    api(`/admin/usage?${q({ group_by: "model" })}`),
  ]);
  const accountMap = new Map(accounts.data.map((a) => [a.id, a.name]));
  const keyMap = new Map(keys.data.map((k) => [k.id, `${k.prefix}…`]));
  const accountName = (id) => accountMap.get(id) || id;
  const keyName = (id) => keyMap.get(id) || id;
  const requests = requestsSection({ endpoint: "/admin/usage/requests", params: filter, keyName, accountName, currency });
  const accountSelect = h("select", { id: nextId("acct"), onchange: () => { state.account = accountSelect.value; allUsagePage(main, state); } },
    h("option", { value: "" }, t("au.all_accounts")),
    accounts.data.map((a) => h("option", { value: a.id, selected: a.id === state.account }, a.name)));
  const exportButton = h("button", { type: "button" }, t("usage.export"));
  exportButton.addEventListener("click", () => busy(exportButton, main, () =>
    exportCsv("/admin/usage/requests", filter, { keyName, accountName, currency })));
  const chartsHolder = h("div", {});
  fill(main,
    h("div", { class: "page-head" }, h("h1", { tabindex: -1 }, t("nav.all_usage")),
      h("div", { class: "filters" },
        h("div", { class: "field inline" }, h("label", { for: accountSelect.id }, t("usage.account")), accountSelect),
        rangeSelect(state.days, (d) => { state.days = d; allUsagePage(main, state); }))),
    h("section", { class: "card", "aria-labelledby": "au-daily" }, h("h2", { id: "au-daily" }, t("usage.per_day"), " ",
      h("small", { class: "muted" }, "(UTC)")), chartsHolder),
    h("div", { class: "two-col" },
      h("section", { class: "card", "aria-labelledby": "au-acc" }, h("h2", { id: "au-acc" }, t("au.per_account")),
        totalsTable(t("au.per_account"), t("usage.account"), byAccount.data, accountName, currency)),
      h("section", { class: "card", "aria-labelledby": "au-model" }, h("h2", { id: "au-model" }, t("usage.per_model")),
        totalsTable(t("usage.per_model"), t("usage.model"), byModel.data, (g) => g, currency))),
    h("section", { class: "card", "aria-labelledby": "au-recent" },
      h("div", { class: "card-head" }, h("h2", { id: "au-recent" }, t("usage.recent")), exportButton),
      requests.section));
  fill(chartsHolder, dailyCharts(daily.data, labels, currency, chartsHolder.clientWidth || 700));
  await requests.load();
}
