// DOM helpers. Untrusted text (file names, paths, captions, answers) only ever goes in as text nodes.

import { apiKey, blobURL } from "./api.js";

/** `el("li", {className: "x", dataset: {resultId: 3}}, "text", child)`: properties, never HTML. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("aria-") || name === "role") node.setAttribute(name, String(value));
    else node[name] = value;
  }
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  node.replaceChildren();
}

/** The last part of a path (either separator). */
export function fileName(path) {
  const parts = String(path || "").split(/[\\/]/);
  return parts[parts.length - 1] || String(path || "");
}

/** Seconds as m:ss(.s). */
export function clock(seconds) {
  const s = Math.max(0, Number(seconds) || 0);
  const m = Math.floor(s / 60);
  const rest = s - m * 60;
  const text = Number.isInteger(rest) ? String(rest) : rest.toFixed(1);
  return `${m}:${rest < 10 ? "0" : ""}${text}`;
}

/** "0:01–0:02" for rows with times (videos and segments), else "". */
export function timeRange(result) {
  if (result.t_start == null) return "";
  return result.t_end == null ? `from ${clock(result.t_start)}` : `${clock(result.t_start)}–${clock(result.t_end)}`;
}

// ---- object URLs of fetched media (the key header cannot ride on <img src>) ----------------------------
/** A set of object URLs released together (one per view: the grid, the detail view, the sources). */
export class URLPool {
  constructor() { this.urls = new Set(); }
  add(url) { this.urls.add(url); return url; }
  release() {
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls.clear();
  }
}

function shown(img, src) {
  return new Promise((resolve, reject) => {
    img.addEventListener("load", resolve, { once: true });
    img.addEventListener("error", () => reject(new Error("the thumbnail could not be loaded")), { once: true });
    img.src = src;
  });
}

/** Load `/thumbs/{id}` into `img`; resolves true when shown, false when there is no thumbnail. Without an API
 * key the browser loads it itself (its HTTP cache, no copies); with one, through fetch() and a blob: URL. */
export async function loadThumb(img, id, size, pool) {
  const path = `/thumbs/${encodeURIComponent(id)}?size=${size}`;
  try {
    await shown(img, apiKey() ? pool.add(await blobURL(path)) : path);
    img.dataset.loaded = "true";
    return true;
  } catch (err) {
    img.dataset.loaded = "error";
    img.replaceWith(el("span", { className: "no-thumb", title: err.message }, "no preview"));
    return false;
  }
}

export async function mediaURL(path, pool) {
  return pool.add(await blobURL(path));
}
