// Search: the query box, image search (file picker, drag and drop), options, the grid, paging, detail view.

import { ApiError, apiKey, dataURL, getJSON, postJSON } from "./api.js";
import { URLPool, clear, clock, el, fileName, loadThumb, mediaURL, timeRange } from "./dom.js";

const GRID_THUMB = 256;
const DETAIL_THUMB = 1024;
const MAX_K = 1000;

const $ = (id) => document.getElementById(id);
const gridURLs = new URLPool();
const detailURLs = new URLPool();

let ui = null;            // {showMessage, clearMessage, classifyThis}
let current = null;       // {query, label, shown, pageSize}
let offsetUnsupported = false;  // the server refused `offset`: page by asking for more instead
let detailResult = null;

// ---- what this server's /search takes (its OpenAPI document) -------------------------------------------
const OPTION_CONTROLS = { mode: ["#mode"], alpha: ["#alpha"], min_score: ["#min_score"], deduplicate: ["#deduplicate"] };
const FILTER_CONTROLS = {
  kinds: ['input[name="kinds"]'], path_prefix: ["#path_prefix"], extensions: ["#extensions"],
  mtime_from: ["#mtime_from"], mtime_to: ["#mtime_to"], min_width: ["#min_width"], min_height: ["#min_height"],
};

/** The object schema behind `schema` (following $ref and anyOf/oneOf/allOf); `#/$defs/...` refs are
 * relative to `root` (pydantic's inline schemas), others to the whole document. */
function resolve(root, doc, schema) {
  if (!schema || schema.properties) return schema || {};
  if (schema.$ref) {
    const path = schema.$ref.split("/").slice(1);
    return resolve(root, doc, path.reduce((o, k) => o?.[k], path[0] === "$defs" ? root : doc));
  }
  for (const branch of schema.anyOf || schema.oneOf || schema.allOf || []) {
    const found = resolve(root, doc, branch);
    if (found.properties) return found;
  }
  return schema;
}

function setSupported(selectors, supported) {
  for (const selector of selectors) {
    for (const node of document.querySelectorAll(selector)) {
      node.disabled = !supported;
      node.closest("label")?.classList.toggle("unsupported", !supported);
    }
  }
}

/** Grey out the options this server's /search does not take (so they are never sent), and page with
 * `offset` only where it exists. Without the document, everything stays on. */
export async function detectOptions() {
  let doc;
  try {
    doc = await getJSON("/openapi.json");
  } catch {
    return;
  }
  const root = doc.paths?.["/search"]?.post?.requestBody?.content?.["application/json"]?.schema
    ?? doc.components?.schemas?.SearchRequest;
  const props = resolve(root, doc, root).properties;
  if (!props) return;
  offsetUnsupported = !("offset" in props);
  const filterProps = resolve(root, doc, props.filters).properties || {};
  let missing = 0;
  for (const [name, selectors] of Object.entries(OPTION_CONTROLS)) {
    setSupported(selectors, name in props);
    missing += !(name in props);
  }
  for (const [name, selectors] of Object.entries(FILTER_CONTROLS)) {
    setSupported(selectors, name in filterProps);
    missing += !(name in filterProps);
  }
  $("options-note").hidden = missing === 0;
  $("options").dataset.detected = "true";
}

// ---- request body ---------------------------------------------------------------------------------------
function number(id) {
  if ($(id).disabled) return undefined;
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function dateSeconds(id, endOfDay) {
  const value = $(id).disabled ? "" : $(id).value;
  if (!value) return undefined;
  const ms = Date.parse(`${value}T${endOfDay ? "23:59:59" : "00:00:00"}`);
  return Number.isFinite(ms) ? Math.floor(ms / 1000) : undefined;
}

/** The filters the user set (none: undefined, so the request works against servers without filters). */
export function filters() {
  const f = {};
  const kinds = [...document.querySelectorAll('input[name="kinds"]:checked')].map((c) => c.value);
  if (kinds.length) f.kinds = kinds;
  const text = (id) => ($(id).disabled ? "" : $(id).value.trim());
  const prefix = text("path_prefix");
  if (prefix) f.path_prefix = prefix;
  const exts = text("extensions").split(/[\s,]+/).filter(Boolean)
    .map((e) => (e.startsWith(".") ? e : `.${e}`).toLowerCase());
  if (exts.length) f.extensions = exts;
  const from = dateSeconds("mtime_from", false);
  const to = dateSeconds("mtime_to", true);
  if (from !== undefined) f.mtime_from = from;
  if (to !== undefined) f.mtime_to = to;
  for (const name of ["min_width", "min_height"]) {
    const v = number(name);
    if (v !== undefined) f[name] = v;
  }
  return Object.keys(f).length ? f : undefined;
}

function pageSize() {
  const k = Math.round(number("k") ?? 24);
  return Math.min(Math.max(Number.isFinite(k) ? k : 24, 1), MAX_K);
}

function body(query, k, offset) {
  const b = { ...query, k };
  const f = filters();
  if (f) b.filters = f;
  const mode = $("mode").disabled ? "" : $("mode").value;
  if (mode) b.mode = mode;
  const alpha = number("alpha");
  if (mode === "hybrid" && alpha !== undefined) b.alpha = alpha;
  const minScore = number("min_score");
  if (minScore !== undefined) b.min_score = minScore;
  if ($("deduplicate").checked && !$("deduplicate").disabled) b.deduplicate = true;
  if (offset) b.offset = offset;
  return b;
}

function refusedOffset(err) {
  return err instanceof ApiError && err.status === 422 && /offset/.test(err.message);
}

// ---- the grid --------------------------------------------------------------------------------------------
function resultItem(result) {
  const name = fileName(result.path);
  const img = el("img", { alt: name, width: GRID_THUMB, height: GRID_THUMB, decoding: "async" });
  const range = timeRange(result);
  const info = el(
    "span", { className: "info" },
    el("span", { className: "name" }, name),
    el("span", { className: "score" }, `score ${Number(result.score).toFixed(3)}`),
    range ? el("span", { className: "time" }, `${result.kind === "segment" ? "moment" : "video"} ${range}`) : null,
    result.caption ? el("span", { className: "caption" }, result.caption) : null,
    Array.isArray(result.found_by) && result.found_by.length
      ? el("span", { className: "found-by" }, `found by ${result.found_by.join(" + ")}`) : null,
  );
  const open = el("button", { type: "button", className: "open", title: result.path }, img, info);
  open.addEventListener("click", () => openDetail(result, open));
  const item = el("li", { className: `result kind-${result.kind || "image"}`, dataset: { resultId: result.id } }, open);
  return { item, thumb: () => loadThumb(img, result.id, GRID_THUMB, gridURLs) };
}

async function show(results, append) {
  const grid = $("results");
  if (!append) {
    gridURLs.release();
    clear(grid);
  }
  const started = performance.now();
  grid.dataset.state = "loading";
  const items = results.map(resultItem);
  grid.append(...items.map((x) => x.item));
  await Promise.all(items.map((x) => x.thumb()));
  grid.dataset.thumbsMs = String(Math.round(performance.now() - started));
  grid.dataset.state = "done";
}

function summarize(results) {
  const { label, shown } = current;
  $("summary").textContent = shown
    ? `${shown} result${shown === 1 ? "" : "s"} for ${label}`
    : `No results for ${label}`;
  $("load-more").hidden = results.length < current.pageSize || shown >= MAX_K;
}

/** Run a new search: `query` is {text} | {image} | {image_id}; `label` describes it to the user. */
export async function search(query, label) {
  ui.clearMessage();
  current = { query, label, shown: 0, pageSize: pageSize() };
  const mine = current;
  $("results").setAttribute("aria-busy", "true");
  try {
    const response = await postJSON("/search", body(query, current.pageSize));
    if (mine !== current) return;  // a newer search started meanwhile
    current.shown = response.results.length;
    summarize(response.results);
    await show(response.results, false);
  } catch (err) {
    if (mine === current) ui.showMessage(`Search failed: ${err.message}`);
  } finally {
    $("results").removeAttribute("aria-busy");
  }
}

async function loadMore() {
  if (!current) return;
  const mine = current;
  const { query, shown, pageSize: k } = current;
  try {
    let results;
    if (!offsetUnsupported) {
      try {
        results = (await postJSON("/search", body(query, k, shown))).results;
      } catch (err) {
        if (!refusedOffset(err)) throw err;
        offsetUnsupported = true;
      }
    }
    if (offsetUnsupported) {
      const more = Math.min(shown + k, MAX_K);
      results = (await postJSON("/search", body(query, more))).results.slice(shown);
    }
    if (mine !== current) return;
    current.shown += results.length;
    summarize(results);
    const firstNew = $("results").children.length;
    await show(results, true);
    $("results").children[firstNew]?.querySelector("button")?.focus();
  } catch (err) {
    ui.showMessage(`Loading more failed: ${err.message}`);
  }
}

// ---- detail view -----------------------------------------------------------------------------------------
function meta(result) {
  const rows = [
    ["id", result.id],
    ["kind", result.kind || "image"],
    ["path", result.path],
    ["score", Number(result.score).toFixed(4)],
    ["time", timeRange(result)],
    ["caption", result.caption],
    ["found by", Array.isArray(result.found_by) ? result.found_by.join(", ") : undefined],
  ];
  for (const name of ["width", "height"]) if (result[name] != null) rows.push([name, result[name]]);
  return rows.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]);
}

async function detailMedia(result) {
  const box = $("detail-media");
  const name = fileName(result.path);
  if ((result.kind || "image") === "image") {
    const img = el("img", { alt: name });
    box.append(img);
    await loadThumb(img, result.id, DETAIL_THUMB, detailURLs);
    return;
  }
  const start = Number(result.t_start) || 0;
  const video = el("video", { controls: true, muted: true, playsInline: true, preload: "metadata" });
  video.setAttribute("aria-label", `${name} from ${clock(start)}`);
  video.addEventListener("loadedmetadata", () => {
    if (Math.abs(video.currentTime - start) > 0.05) video.currentTime = start;
  }, { once: true });
  box.append(video);
  const fragment = `#t=${start}${result.t_end != null ? `,${result.t_end}` : ""}`;
  const path = `/images/${encodeURIComponent(result.id)}`;
  try {
    video.src = (apiKey() ? await mediaURL(path, detailURLs) : path) + fragment;
  } catch (err) {
    video.replaceWith(el("p", { className: "no-thumb" }, `cannot load the video: ${err.message}`));
  }
}

export function openDetail(result) {
  detailResult = result;
  detailURLs.release();
  clear($("detail-media"));
  $("detail-title").textContent = fileName(result.path);
  $("detail-meta").replaceChildren(...meta(result));
  $("original").href = `/images/${encodeURIComponent(result.id)}`;
  const dialog = $("detail");
  if (!dialog.open) dialog.showModal();
  $("more-like-this").focus();
  detailMedia(result).catch((err) => ui.showMessage(err.message));
}

function closeDetail() {
  $("detail").close();
}

async function openOriginal(event) {
  if (!apiKey() || !detailResult) return;  // no key needed: the plain link works
  event.preventDefault();
  try {
    window.open(await mediaURL(`/images/${encodeURIComponent(detailResult.id)}`, detailURLs), "_blank", "noopener");
  } catch (err) {
    ui.showMessage(`Cannot open the original: ${err.message}`);
  }
}

// ---- wiring ----------------------------------------------------------------------------------------------
async function searchFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    ui.showMessage(`${file.name} is not an image`);
    return;
  }
  try {
    await search({ image: await dataURL(file) }, `image “${file.name}”`);
  } catch (err) {
    ui.showMessage(err.message);
  }
}

function wireDrop() {
  const zone = $("drop-zone");
  let depth = 0;
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    zone.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) zone.hidden = true;
  });
  document.addEventListener("dragover", (e) => {
    if (hasFiles(e)) e.preventDefault();
  });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    zone.hidden = true;
    searchFile(e.dataTransfer.files[0]);
  });
}

export function initSearch(handlers) {
  ui = handlers;
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("q").value.trim();
    if (!text) {
      ui.showMessage("Type something to search for, or choose an image.");
      return;
    }
    history.replaceState(null, "", `#q=${encodeURIComponent(text)}`);
    search({ text }, `“${text}”`);
  });
  $("image-file").addEventListener("change", (e) => {
    searchFile(e.target.files[0]);
    e.target.value = "";
  });
  $("load-more").addEventListener("click", loadMore);
  $("detail-close").addEventListener("click", closeDetail);
  $("more-like-this").addEventListener("click", () => {
    const result = detailResult;
    closeDetail();
    search({ image_id: result.id }, `images like “${fileName(result.path)}”`);
    $("results").focus();
  });
  $("classify-this").addEventListener("click", () => {
    const result = detailResult;
    closeDetail();
    ui.classifyThis(result);
  });
  $("original").addEventListener("click", openOriginal);
  $("detail").addEventListener("close", () => {
    detailURLs.release();
    clear($("detail-media"));
  });
  wireDrop();
  detectOptions();
  const hash = new URLSearchParams(location.hash.slice(1)).get("q");
  if (hash) {
    $("q").value = hash;
    search({ text: hash }, `“${hash}”`);
  }
}
