// Calls to the server: the session cookie goes along by itself (same origin); state-changing
// calls add the session's CSRF token. Errors become ApiError with a readable message.
import { t } from "./i18n.js";

export const session = {
  info: null, // the answer of GET /console/api/session: account, csrf_token, models, currency
  onExpired: () => {},
};

export class ApiError extends Error {
  constructor(status, error) {
    super(readable(status, error));
    this.status = status;
    this.code = error?.code || null;
    this.param = error?.param || null;
    this.serverMessage = error?.message || "";
  }
}

/** The message to show for an OpenAI-shaped error: ours for known codes, else the server's. */
export function readable(status, error) {
  const code = error?.code;
  const known = code ? t(`err.code.${code}`, { param: error?.param || "" }, null) : null;
  if (known) return known;
  const message = error?.message || t("err.http", { status });
  return status >= 500 ? t("err.server", { message }) : message;
}

async function errorOf(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    error = null;
  }
  return new ApiError(response.status, error);
}

/** fetch() with JSON in and out; throws ApiError. Options: method, body, headers, raw. */
export async function api(path, { method = "GET", body, headers = {}, raw = false, signal } = {}) {
  const h = { Accept: "application/json", ...headers };
  if (body !== undefined) h["Content-Type"] = "application/json";
  if (method !== "GET" && session.info) h["X-CSRF-Token"] = session.info.csrf_token;
  let response;
  try {
    response = await fetch(path, {
      method, headers: h, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin", cache: "no-store", signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { message: t("err.network") });
  }
  if (!response.ok) {
    const err = await errorOf(response);
    if (err.status === 401 && err.code === "invalid_session") session.onExpired(err);
    throw err;
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

/** Every row of a paged list endpoint (limit/offset), up to `max` rows. */
export async function allPages(path, params, max = 100_000) {
  const rows = [];
  const limit = 1000;
  for (let offset = 0; offset < max; offset += limit) {
    const q = new URLSearchParams({ ...params, limit, offset });
    const page = (await api(`${path}?${q}`)).data;
    rows.push(...page);
    if (page.length < limit) break;
  }
  return rows;
}

/**
 * A streamed chat completion with a bearer key: calls onDelta(text) for each piece of content
 * and resolves with {id, usage, finishReason}. Aborting `signal` stops it.
 */
export async function streamChat(key, body, { onDelta, signal }) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${key}`,
        Accept: "text/event-stream" },
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      credentials: "omit", cache: "no-store", signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { message: t("err.network") });
  }
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const result = { id: response.headers.get("x-request-id"), usage: null, finishReason: null };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error);
      if (chunk.usage) result.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta?.content) onDelta(choice.delta.content);
        if (choice.finish_reason) result.finishReason = choice.finish_reason;
      }
    }
  }
  return result;
}
