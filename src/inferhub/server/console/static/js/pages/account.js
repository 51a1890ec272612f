// My account: who I am, my balance, and changing my console password.
import { api, session } from "../api.js";
import { t } from "../i18n.js";
import { busy, dateTime, field, fill, h, money, notice } from "../dom.js";

export async function render(main) {
  const currency = session.info.currency;
  const account = await api("/v1/dashboard/account");
  const current = h("input", { type: "password", autocomplete: "current-password", required: true });
  const fresh = h("input", { type: "password", autocomplete: "new-password", minlength: 8, required: true });
  const again = h("input", { type: "password", autocomplete: "new-password", minlength: 8, required: true });
  const submit = h("button", { type: "submit", class: "primary" }, t("me.change"));
  const form = h("form", { class: "grid-form narrow", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    await busy(submit, form, async () => {
      if (fresh.value.length < 8) throw new Error(t("me.too_short"));
      if (fresh.value !== again.value) throw new Error(t("me.mismatch"));
      await api("/console/api/password", { method: "POST",
        body: { current_password: current.value, new_password: fresh.value } });
      form.reset();
      notice(form, t("me.changed"), "ok");
    });
  } },
    // For password managers: which account this password belongs to.
    h("input", { type: "text", autocomplete: "username", value: account.email || account.name,
      hidden: true, readonly: true, tabindex: -1, "aria-hidden": "true" }),
    field(t("me.current"), current), field(t("me.new"), fresh, t("acc.password_hint")),
    field(t("me.again"), again), h("div", { class: "actions" }, submit));
  const row = (k, v) => [h("dt", {}, k), h("dd", {}, v)];
  fill(main,
    h("h1", { tabindex: -1 }, t("nav.account")),
    h("section", { class: "card", "aria-labelledby": "me-h" }, h("h2", { id: "me-h" }, t("me.profile")),
      h("dl", { class: "facts" },
        row(t("acc.name"), account.name), row(t("acc.email"), account.email || "—"),
        row(t("acc.role"), account.role === "admin" ? t("acc.admin") : t("acc.user")),
        row(t("usage.balance"), money(account.balance_micros, currency)),
        row(t("acc.created"), dateTime(account.created_at)),
        row(t("me.session_ends"), dateTime(session.info.expires_at)))),
    h("section", { class: "card", "aria-labelledby": "me-pw" }, h("h2", { id: "me-pw" }, t("me.password")), form));
}
