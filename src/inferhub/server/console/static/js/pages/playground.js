// Playground: pick a model and the sampling parameters, chat with streamed replies, see the
// usage and cost of each. Calls go to /v1/chat/completions with a short-lived key that the
// server mints for this console session (kept in memory only, revoked at log-out).
import { ApiError, api, session, streamChat } from "../api.js";
import { t } from "../i18n.js";
import { busy, costMicros, field, fill, h, money, nextId, notice, priceFor } from "../dom.js";

let playgroundKey = null; // {secret, expiresAt}; lives as long as this page load

async function key(renew = false) {
  if (!renew && playgroundKey && playgroundKey.expiresAt - 60_000 > Date.now()) return playgroundKey.secret;
  const created = await api("/console/api/playground-key", { method: "POST" });
  playgroundKey = { secret: created.secret, expiresAt: Date.parse(created.key.expires_at) };
  return playgroundKey.secret;
}

export function forgetKey() {
  playgroundKey = null;
}

function numberInput(value, { min, max, step }) {
  return h("input", { type: "number", value: String(value), min, max, step, inputmode: "decimal" });
}

export async function render(main) {
  const { models, currency } = session.info;
  const prices = (await api("/v1/dashboard/prices")).data;
  const messages = []; // the conversation sent with each request
  let controller = null;

  const model = h("select", {}, models.map((m) => h("option", { value: m }, m)));
  const system = h("textarea", { rows: 2 }, "You are a helpful assistant.");
  const temperature = numberInput(1, { min: 0, max: 2, step: 0.1 });
  const topP = numberInput(1, { min: 0.01, max: 1, step: 0.05 });
  const maxTokens = numberInput(128, { min: 1, step: 1 });
  const stop = h("input", { type: "text", placeholder: "\\n\\n, END" });
  const presence = numberInput(0, { min: -2, max: 2, step: 0.1 });
  const frequency = numberInput(0, { min: -2, max: 2, step: 0.1 });
  const seed = h("input", { type: "number", step: 1, inputmode: "numeric" });

  const log = h("div", { class: "chat-log", role: "log", "aria-label": t("pg.conversation"), tabindex: 0 });
  const status = h("p", { class: "muted", role: "status", "aria-live": "polite" });
  const input = h("textarea", { rows: 3, placeholder: t("pg.placeholder"), id: nextId("msg") });
  const send = h("button", { type: "submit", class: "primary" }, t("pg.send"));
  const stopButton = h("button", { type: "button", disabled: true }, t("pg.stop"));
  const clear = h("button", { type: "button" }, t("pg.clear"));

  const emptyLog = () => fill(log, h("p", { class: "muted empty-log" }, t("pg.empty")));
  emptyLog();

  const bubble = (role, text) => {
    log.querySelector(".empty-log")?.remove();
    const content = h("div", { class: "msg-text" }, text);
    const meta = h("div", { class: "msg-meta" });
    const el = h("div", { class: `msg ${role}` },
      h("div", { class: "msg-role" }, role === "user" ? t("pg.you") : t("pg.assistant")), content, meta);
    log.append(el);
    log.scrollTop = log.scrollHeight;
    return { el, content, meta };
  };

  const params = () => {
    const body = {
      model: model.value,
      temperature: Number(temperature.value),
      top_p: Number(topP.value),
      presence_penalty: Number(presence.value),
      frequency_penalty: Number(frequency.value),
    };
    if (maxTokens.value.trim()) body.max_tokens = Number(maxTokens.value);
    if (seed.value.trim()) body.seed = Number(seed.value);
    const stops = stop.value.split(",").map((s) => s.trim().replace(/\\n/g, "\n")).filter(Boolean);
    if (stops.length) body.stop = stops;
    return body;
  };

  const ask = async (text) => {
    const system_ = system.value.trim();
    const history = [...(system_ ? [{ role: "system", content: system_ }] : []), ...messages,
      { role: "user", content: text }];
    bubble("user", text);
    const reply = bubble("assistant", "");
    reply.el.classList.add("streaming");
    log.setAttribute("aria-busy", "true");
    status.textContent = t("pg.generating");
    controller = new AbortController();
    let received = "";
    const body = { ...params(), messages: history };
    const call = async (secret) => streamChat(secret, body, {
      signal: controller.signal,
      onDelta: (d) => { received += d; reply.content.textContent = received; log.scrollTop = log.scrollHeight; },
    });
    try {
      let result;
      try {
        result = await call(await key());
      } catch (err) {
        // The key expired or was revoked (e.g. another tab minted a new one): renew once.
        if (!(err instanceof ApiError && err.status === 401) || received) throw err;
        result = await call(await key(true));
      }
      messages.push({ role: "user", content: text }, { role: "assistant", content: received });
      const u = result.usage;
      if (u) {
        const cost = costMicros(u.prompt_tokens, u.completion_tokens, priceFor(prices, body.model));
        reply.meta.textContent = t("pg.usage", {
          prompt: u.prompt_tokens, completion: u.completion_tokens,
          cost: cost === null ? "—" : money(cost, currency), finish: result.finishReason || "",
        });
      }
      status.textContent = t("pg.done");
    } catch (err) {
      if (err.name === "AbortError") {
        reply.meta.textContent = t("pg.stopped");
        if (received) messages.push({ role: "user", content: text }, { role: "assistant", content: received });
        status.textContent = t("pg.stopped");
      } else {
        reply.el.classList.add("failed");
        reply.meta.textContent = "";
        if (!received) reply.content.textContent = "";
        notice(reply.el, err.message);
        status.textContent = t("pg.failed");
      }
    } finally {
      reply.el.classList.remove("streaming");
      log.removeAttribute("aria-busy");
      controller = null;
      stopButton.disabled = true;
    }
  };

  const form = h("form", { class: "composer", onsubmit: async (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    if (!model.value) { notice(form, t("pg.no_model")); return; }
    input.value = "";
    stopButton.disabled = false;
    await busy(send, form, () => ask(text));
    input.focus();
  } },
    h("label", { for: input.id, class: "sr-only" }, t("pg.message")),
    input,
    h("div", { class: "actions" }, h("small", { class: "muted hint" }, t("pg.enter_hint")), clear, stopButton, send));

  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  stopButton.addEventListener("click", () => controller?.abort());
  clear.addEventListener("click", () => { controller?.abort(); messages.length = 0; emptyLog(); status.textContent = ""; });

  const price = h("p", { class: "muted" });
  const showPrice = () => {
    const p = priceFor(prices, model.value);
    price.textContent = p
      ? t("pg.price", { input: money(p.input_micros_per_mtok, currency), output: money(p.output_micros_per_mtok, currency) })
      : "";
  };
  model.addEventListener("change", showPrice);
  showPrice();

  fill(main,
    h("h1", { tabindex: -1 }, t("nav.playground")),
    h("p", { class: "lead" }, t("pg.lead")),
    h("div", { class: "playground" },
      h("section", { class: "card settings", "aria-labelledby": "pg-settings" }, h("details", {
        // Open beside the chat on wide screens; folded under it on phones.
        open: window.matchMedia("(min-width: 900px)").matches },
        h("summary", {}, h("h2", { id: "pg-settings" }, t("pg.settings"))),
        field(t("pg.model"), model), price,
        field(t("pg.system"), system),
        h("div", { class: "param-grid" },
          field("temperature", temperature, "0 – 2"),
          field("top_p", topP, "(0, 1]"),
          field("max_tokens", maxTokens),
          field("seed", seed, t("pg.optional")),
          field("presence_penalty", presence, "-2 – 2"),
          field("frequency_penalty", frequency, "-2 – 2")),
        field("stop", stop, t("pg.stop_hint")))),
      h("section", { class: "card chat", "aria-labelledby": "pg-chat" },
        h("h2", { id: "pg-chat", class: "sr-only" }, t("pg.conversation")),
        log, status, form)));
  return () => controller?.abort();
}
