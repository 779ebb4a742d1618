// The page: wires search, panels, the API key dialog, messages and the server's status.

import { apiKey, getJSON, onUnauthorized, setApiKey } from "./api.js";
import { chatOff, classifyThis, initPanels } from "./panels.js";
import { initSearch } from "./search.js";

const $ = (id) => document.getElementById(id);

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
}

/** Opens the key dialog; resolves true when a key was saved. */
function askForKey() {
  const dialog = $("key-dialog");
  const input = $("api-key");
  input.value = apiKey();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const choice = dialog.returnValue;
      if (choice === "save" && input.value.trim()) {
        setApiKey(input.value.trim());
        resolve(true);
      } else {
        if (choice === "forget") setApiKey("");
        resolve(false);
      }
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
}

async function status() {
  try {
    const health = await getJSON("/health");
    const parts = [`${health.index_size} indexed`];
    if (health.models?.encoder) parts.push(health.models.encoder);
    $("status").textContent = parts.join(" · ");
    if (!health.models?.chat) chatOff();
  } catch (err) {
    showMessage(`The server did not answer /health: ${err.message}`);
  }
}

function start() {
  onUnauthorized(askForKey);
  const handlers = { showMessage, clearMessage, classifyThis };
  initSearch(handlers);
  initPanels(handlers);
  $("key-button").addEventListener("click", async () => {
    if (await askForKey()) clearMessage();
  });
  window.addEventListener("unhandledrejection", (e) => showMessage(String(e.reason?.message || e.reason)));
  status();
}

start();
