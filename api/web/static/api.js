// Same-origin calls to the API: the API key header, errors as readable messages, server-sent events.

const KEY_STORAGE = "ivl-api-key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";  // storage disabled: no key
  }
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

let askForKey = null;
let pendingAsk = null;

/** `fn()` resolves true once the user entered a key (called on a 401; concurrent 401s share one prompt). */
export function onUnauthorized(fn) {
  askForKey = fn;
}

function promptOnce() {
  if (!pendingAsk) pendingAsk = Promise.resolve(askForKey()).finally(() => { pendingAsk = null; });
  return pendingAsk;
}

/** A FastAPI `detail` (string, validation error list or object) as one line of text. */
export function describe(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => {
      const loc = (e.loc || []).filter((p) => p !== "body").join(".");
      return loc ? `${loc}: ${e.msg}` : String(e.msg ?? JSON.stringify(e));
    }).join("; ");
  }
  if (typeof detail === "object") return detail.message || JSON.stringify(detail);
  return String(detail);
}

async function errorOf(response) {
  let text = "";
  try {
    const body = await response.clone().json();
    text = describe(body.detail ?? body.error?.message ?? body);
  } catch {
    text = (await response.text()).slice(0, 300);
  }
  if (response.status === 429) {
    const wait = response.headers.get("Retry-After");
    text = `the server is busy${wait ? `, retry in ${wait} s` : ""} (${text})`;
  }
  return new ApiError(response.status, `${response.status} ${response.statusText}: ${text}`.trim());
}

/** fetch() with the API key; a 401 asks for a key once and retries; other errors throw ApiError. */
export async function request(path, { method = "GET", json, signal, retry = true } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, credentials: "same-origin" });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `cannot reach the server (${err.message})`);
  }
  if (response.status === 401 && retry && askForKey && (await promptOnce())) {
    return request(path, { method, json, signal, retry: false });
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path, options = {}) {
  return (await request(path, options)).json();
}

export async function postJSON(path, json, options = {}) {
  return (await request(path, { ...options, method: "POST", json })).json();
}

/** An object URL of a GET response's body (for <img>/<video> sources that need the key header). */
export async function blobURL(path, options = {}) {
  const response = await request(path, options);
  return URL.createObjectURL(await response.blob());
}

/** The events of a text/event-stream response: {event, data} with `data` parsed as JSON. */
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
    if (done) return;
  }
}

/** A File as a data: URL (the API takes base64 with a data: prefix). */
export function dataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}: ${reader.error}`));
    reader.readAsDataURL(file);
  });
}
