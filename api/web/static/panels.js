// The classify panel (labels -> probability bars) and the ask panel (streamed grounded /chat).

import { ApiError, dataURL, events, postJSON, request } from "./api.js";
import { URLPool, clear, el, fileName, loadThumb } from "./dom.js";
import { openDetail } from "./search.js";

const $ = (id) => document.getElementById(id);
const sourceURLs = new URLPool();
const SOURCE_THUMB = 128;

let ui = null;
let classifyTarget = null;  // {image_id, label} or {image, label}
let askImage = null;        // {image, label}

// ---- classify --------------------------------------------------------------------------------------------
/** Labels from the text box: one per line, or comma-separated on a single line; blanks and repeats dropped. */
export function parseLabels(text) {
  const lines = text.split("\n").map((s) => s.trim()).filter(Boolean);
  const parts = lines.length === 1 ? lines[0].split(",") : lines;
  return [...new Set(parts.map((s) => s.trim()).filter(Boolean))];
}

export function classifyThis(result) {
  classifyTarget = { image_id: result.id, label: fileName(result.path) };
  $("classify-target").textContent = classifyTarget.label;
  $("labels").focus();
}

function bar({ label, score }) {
  const pct = Math.max(0, Math.min(1, Number(score))) * 100;
  const fill = el("span", { className: "fill" });
  fill.style.width = `${pct.toFixed(1)}%`;
  return el(
    "li", { className: "bar-row" },
    el("span", { className: "label" }, label),
    el("span", { className: "bar", role: "img", "aria-label": `${label}: ${pct.toFixed(1)} percent` }, fill),
    el("span", { className: "pct" }, `${pct.toFixed(1)}%`),
  );
}

async function classify(e) {
  e.preventDefault();
  ui.clearMessage();
  const labels = parseLabels($("labels").value);
  if (labels.length < 2) {
    ui.showMessage("Give at least two different labels to classify between.");
    return;
  }
  if (!classifyTarget) {
    ui.showMessage("Choose an image first: upload one, or open a result and press “Classify this”.");
    return;
  }
  const { label, ...target } = classifyTarget;
  const list = $("classify-results");
  list.setAttribute("aria-busy", "true");
  try {
    const response = await postJSON("/classify", { ...target, labels });
    list.replaceChildren(...response.scores.map(bar));
    list.dataset.label = response.label;
  } catch (err) {
    ui.showMessage(`Classification failed: ${err.message}`);
  } finally {
    list.removeAttribute("aria-busy");
  }
}

// ---- ask -------------------------------------------------------------------------------------------------
export function chatOff() {
  $("chat-off").hidden = false;
  for (const node of $("ask-form").querySelectorAll("textarea, input, button")) node.disabled = true;
}

function showSources(sources) {
  sourceURLs.release();
  const list = $("sources");
  clear(list);
  for (const source of sources) {
    const result = { kind: "image", ...source };
    const name = fileName(source.path);
    const img = el("img", { alt: name, width: SOURCE_THUMB, height: SOURCE_THUMB });
    const open = el("button", { type: "button", className: "open", title: source.path }, img,
      el("span", { className: "name" }, name));
    open.addEventListener("click", () => openDetail(result));
    list.append(el("li", { className: "source", dataset: { sourceId: source.id } }, open));
    loadThumb(img, source.id, SOURCE_THUMB, sourceURLs);
  }
}

async function ask(e) {
  e.preventDefault();
  ui.clearMessage();
  const question = $("question").value.trim();
  if (!question) {
    ui.showMessage("Type a question first.");
    return;
  }
  const answer = $("answer");
  clear(answer);
  sourceURLs.release();
  clear($("sources"));
  answer.dataset.state = "streaming";
  const submit = $("ask-submit");
  submit.disabled = true;
  const body = { question, stream: true, max_new_tokens: Number($("max-tokens").value) || 256 };
  if (askImage) body.images = [askImage.image];
  try {
    const response = await request("/chat", { method: "POST", json: body });
    if (!(response.headers.get("content-type") || "").startsWith("text/event-stream")) {
      const whole = await response.json();
      answer.append(document.createTextNode(whole.answer));
      showSources(whole.sources || []);
    } else {
      for await (const { event, data } of events(response)) {
        if (event === "message") answer.append(document.createTextNode(data.text));
        else if (event === "sources") showSources(data.sources || []);
        else if (event === "error") throw new ApiError(500, `the answer stopped: ${data.detail}`);
      }
    }
    answer.dataset.state = "done";
  } catch (err) {
    answer.dataset.state = "error";
    if (err instanceof ApiError && err.status === 503) chatOff();
    ui.showMessage(`Asking failed: ${err.message}`);
  } finally {
    if ($("chat-off").hidden) submit.disabled = false;
  }
}

function setAskImage(value) {
  askImage = value;
  $("ask-target").textContent = value ? value.label : "none (answer from the collection)";
  $("ask-clear").hidden = !value;
}

export function initPanels(handlers) {
  ui = handlers;
  $("classify-form").addEventListener("submit", classify);
  $("classify-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      classifyTarget = { image: await dataURL(file), label: file.name };
      $("classify-target").textContent = file.name;
    } catch (err) {
      ui.showMessage(err.message);
    }
  });
  $("ask-form").addEventListener("submit", ask);
  $("ask-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      setAskImage({ image: await dataURL(file), label: file.name });
    } catch (err) {
      ui.showMessage(err.message);
    }
  });
  $("ask-clear").addEventListener("click", () => {
    setAskImage(null);
    $("ask-file").value = "";
    $("question").focus();
  });
}
