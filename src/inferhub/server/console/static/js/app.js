// The console's shell: log-in, navigation (hash routes), language switch, log-out.
import { api, session } from "./api.js";
import { LANGS, applyI18n, lang, setLang, t } from "./i18n.js";
import { field, fill, h, notice } from "./dom.js";
import * as keys from "./pages/keys.js";
import * as usage from "./pages/usage.js";
import * as playground from "./pages/playground.js";
import * as account from "./pages/account.js";
import * as admin from "./pages/admin.js";

const ROUTES = [
  { path: "/keys", title: "nav.keys", render: keys.render },
  { path: "/usage", title: "nav.usage", render: usage.render },
  { path: "/playground", title: "nav.playground", render: playground.render },
  { path: "/account", title: "nav.account", render: account.render },
  { path: "/admin/accounts", title: "nav.accounts", render: admin.accountsPage, admin: true },
  { path: "/admin/prices", title: "nav.prices", render: admin.pricesPage, admin: true },
  { path: "/admin/usage", title: "nav.all_usage", render: admin.allUsagePage, admin: true },
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const logoutButton = document.getElementById("logout");
const langSelect = document.getElementById("lang");
let cleanup = null;
let loginMessage = null;

function currentRoute() {
  const path = location.hash.startsWith("#/") ? location.hash.slice(1) : "/keys";
  const isAdmin = session.info?.account.role === "admin";
  return ROUTES.find((r) => r.path === path && (!r.admin || isAdmin)) || ROUTES[0];
}

function drawNav(route) {
  const isAdmin = session.info.account.role === "admin";
  const link = (r) => h("li", {}, h("a", { href: `#${r.path}`, "aria-current": r === route ? "page" : null }, t(r.title)));
  fill(nav,
    h("ul", {}, ROUTES.filter((r) => !r.admin).map(link)),
    isAdmin ? h("ul", { class: "admin-nav", "aria-label": t("nav.operator") },
      h("li", { class: "nav-group", "aria-hidden": "true" }, t("nav.operator")),
      ROUTES.filter((r) => r.admin).map(link)) : null);
}

async function show({ focus = true } = {}) {
  if (cleanup) { cleanup(); cleanup = null; }
  if (!session.info) { drawLogin(); return; }
  document.body.classList.remove("logged-out");
  const route = currentRoute();
  drawNav(route);
  who.textContent = session.info.account.name;
  document.title = `${t(route.title)} · inferhub`;
  fill(main, h("p", { class: "loading", role: "status" }, t("loading")));
  main.dataset.route = route.path;
  main.setAttribute("aria-busy", "true"); // until the page has its data
  try {
    const result = await route.render(main);
    if (typeof result === "function") cleanup = result;
  } catch (err) {
    if (!session.info) return; // the session ended: the log-in form is shown
    fill(main, h("h1", { tabindex: -1 }, t(route.title)));
    notice(main, err.message || String(err));
  } finally {
    if (main.dataset.route === route.path) main.removeAttribute("aria-busy");
  }
  if (focus) main.querySelector("h1")?.focus();
}

function drawLogin() {
  document.body.classList.add("logged-out");
  main.dataset.route = "login";
  main.removeAttribute("aria-busy");
  fill(nav);
  who.textContent = "";
  document.title = `${t("login.title")} · inferhub`;
  const login = h("input", { type: "text", autocomplete: "username", required: true, autocapitalize: "none", spellcheck: false });
  const password = h("input", { type: "password", autocomplete: "current-password", required: true });
  const submit = h("button", { type: "submit", class: "primary wide" }, t("login.submit"));
  const form = h("form", { class: "login-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    try {
      if (!login.value.trim() || !password.value) throw new Error(t("login.missing"));
      session.info = await api("/console/api/login", { method: "POST",
        headers: { "X-Requested-With": "inferhub-console" },
        body: { login: login.value.trim(), password: password.value } });
      loginMessage = null;
      await show();
    } catch (err) {
      notice(form, err.message);
      password.select();
    } finally {
      submit.disabled = false;
    }
  } },
    field(t("login.email"), login), field(t("login.password"), password), submit);
  fill(main, h("div", { class: "login" },
    h("h1", { tabindex: -1 }, t("login.title")),
    h("p", { class: "muted" }, t("login.lead")),
    form));
  if (loginMessage) notice(form, loginMessage, "info");
  login.focus();
}

session.onExpired = () => {
  if (!session.info) return;
  session.info = null;
  playground.forgetKey();
  loginMessage = t("login.expired");
  show();
};

logoutButton.addEventListener("click", async () => {
  try {
    await api("/console/api/logout", { method: "POST" });
  } catch {
    // already logged out: nothing to undo
  }
  session.info = null;
  playground.forgetKey();
  loginMessage = t("login.logged_out");
  show();
});

document.querySelector(".skip").addEventListener("click", (ev) => {
  ev.preventDefault();
  (main.querySelector("h1") || main).focus();
});

for (const [code, label] of LANGS) langSelect.append(h("option", { value: code, lang: code }, label));
langSelect.value = lang();
langSelect.addEventListener("change", () => {
  setLang(langSelect.value);
  applyI18n(document);
  show({ focus: false });
});

window.addEventListener("hashchange", () => { if (location.hash.startsWith("#/")) show(); });

async function start() {
  applyI18n(document);
  try {
    session.info = await api("/console/api/session");
  } catch (err) {
    if (err.status !== 401) loginMessage = err.message;
    session.info = null;
  }
  await show({ focus: false });
}

start();
