// Calls from the pages to the server: JSON in and out, the CSRF token on every state-changing call,
// and server-sent events read from a fetch stream (EventSource cannot POST or send headers).

/** The page's CSRF token, written by the server into <meta name="csrf-token">. */
export function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]')?.content ?? "";
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const detail = body.detail ?? body.error?.message;
    if (typeof detail === "string") message = detail;
    else if (Array.isArray(detail)) message = detail.map((d) => d.msg ?? String(d)).join("; ");
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) window.location.assign(`/login?next=${encodeURIComponent(location.pathname)}`);
  return new ApiError(response.status, message);
}

/** fetch() with the CSRF header and a JSON body; throws ApiError with the server's message on 4xx/5xx. */
export async function request(method, url, body, { signal } = {}) {
  const headers = { "X-CSRF-Token": csrfToken(), Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin", signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(url) {
  return (await request("GET", url)).json();
}

export async function sendJson(method, url, body) {
  const response = await request(method, url, body);
  return response.status === 204 ? null : response.json();
}

/** POST `body` and call `onEvent(obj)` for each `data: {json}` event of the streamed reply. */
export async function streamEvents(url, body, onEvent, { signal } = {}) {
  const response = await request("POST", url, body, { signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart())
        .join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}
