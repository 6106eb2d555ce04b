// The playground: shows the served model, streams answers, reports usage, TTFT and errors.
// Text chat goes to /v1/chat/completions (SSE, stream_options.include_usage: exact usage) when the
// service has /v1, else to the typed /chat_stream; a message with an image goes to /vision_stream
// (multipart). The typed streams carry no usage, so the page counts streamed chunks there instead.
"use strict";

const ROOT = new URL("../", document.baseURI); // the page lives at <root>/ui/
const KEY_STORAGE = "shardbento.apiKey";
const $ = (id) => document.getElementById(id);

const state = { card: null, history: [], controller: null, hasV1: false };

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (error && typeof error === "object") {
      const where = error.param ? ` (parameter: ${error.param})` : "";
      const code = error.code ? `, ${error.code}` : "";
      return `${error.message}${where}\n[HTTP ${response.status}, ${error.type}${code}]`;
    }
  } catch (_) { /* not JSON: show the raw body */ }
  return `HTTP ${response.status}: ${text.slice(0, 500) || response.statusText}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModel() {
  const response = await fetch(new URL("models", ROOT), { method: "POST", headers: headers() });
  if (!response.ok) {
    showError(`Could not read the served model: ${await errorMessage(response)}`);
    return;
  }
  const card = (state.card = await response.json());
  $("model-name").textContent = card.name;
  $("model-kind").textContent = card.kind;
  $("model-ready").textContent = card.ready ? "ready" : "loading";
  $("model-ready").className = `badge ${card.ready ? "ok" : "wait"}`;
  const devices = card.devices.length ? card.devices.join(", ") : "none yet";
  $("model-facts").textContent =
    `${card.engine} · parallel ${card.parallel} · devices ${devices} · context ${card.max_model_len} tokens`;
  $("spec").textContent = JSON.stringify(card.spec, null, 2);
  $("image-row").hidden = card.kind !== "vision";
  const defaults = card.spec.generation || {};
  if (defaults.max_tokens != null) $("max-tokens").placeholder = `default ${defaults.max_tokens}`;
  if (defaults.temperature != null) $("temperature").placeholder = `default ${defaults.temperature}`;
  $("seed").placeholder = "random";
  if (!card.ready) setTimeout(loadModel, 2000);
}

async function probeV1() {
  try {
    const response = await fetch(new URL("v1/models", ROOT), { headers: headers() });
    state.hasV1 = response.ok || response.status === 401;
  } catch (_) {
    state.hasV1 = false;
  }
}

function sampling() {
  const fields = {};
  const maxTokens = $("max-tokens").value.trim();
  const temperature = $("temperature").value.trim();
  const seed = $("seed").value.trim();
  if (maxTokens) fields.max_tokens = Number(maxTokens);
  if (temperature) fields.temperature = Number(temperature);
  if (seed) fields.seed = Number(seed);
  return fields;
}

function addMessage(role, text, imageUrl) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  item.dataset.role = role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(label, body);
  if (imageUrl) {
    const image = document.createElement("img");
    image.src = imageUrl;
    image.alt = "uploaded image";
    item.append(image);
  }
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function chatMessages() {
  const system = $("system").value.trim();
  return system ? [{ role: "system", content: system }, ...state.history] : [...state.history];
}

// Each request function returns a Response whose body is read by one of the two readers below.
function requestV1(signal) {
  const body = {
    model: state.card.name,
    messages: chatMessages(),
    stream: true,
    stream_options: { include_usage: true },
    ...sampling(),
  };
  return fetch(new URL("v1/chat/completions", ROOT), {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body), signal,
  });
}

function requestChatStream(signal) {
  const body = { messages: chatMessages(), ...sampling() };
  return fetch(new URL("chat_stream", ROOT), {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body), signal,
  });
}

function requestVisionStream(signal, prompt, file) {
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("prompt", prompt);
  for (const [name, value] of Object.entries(sampling())) form.append(name, String(value));
  return fetch(new URL("vision_stream", ROOT), { method: "POST", headers: headers(), body: form, signal });
}

async function* chunks(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    yield value;
  }
}

// Plain text deltas (typed APIs): every chunk is text.
async function* readText(response) {
  for await (const chunk of chunks(response)) if (chunk) yield { text: chunk };
}

// Server-sent events (/v1): `data: {json}` lines, a final usage chunk, then `data: [DONE]`.
async function* readSSE(response) {
  let buffer = "";
  for await (const chunk of chunks(response)) {
    buffer += chunk;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw new Error(payload.error.message || JSON.stringify(payload.error));
        const choice = (payload.choices || [])[0];
        yield { text: choice?.delta?.content || "", finish: choice?.finish_reason, usage: payload.usage };
      }
    }
  }
}

function formatStats(s) {
  const parts = [];
  if (s.ttftMs != null) parts.push(`TTFT ${s.ttftMs.toFixed(0)} ms`);
  parts.push(`total ${(s.totalMs / 1000).toFixed(2)} s`);
  if (s.usage) {
    const u = s.usage;
    parts.push(`usage: ${u.prompt_tokens} prompt + ${u.completion_tokens} completion = ${u.total_tokens} tokens`);
  } else {
    parts.push(`${s.chunks} chunks streamed (≈ completion tokens)`);
  }
  if (s.finish) parts.push(`finish: ${s.finish}`);
  if (s.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.controller) return;
  const file = state.card?.kind === "vision" ? $("image").files[0] : undefined;
  showError("");
  $("stats").textContent = "";
  const userItem = addMessage("user", prompt, file ? URL.createObjectURL(file) : undefined);
  const controller = (state.controller = new AbortController());
  const started = performance.now();
  const stats = { ttftMs: null, totalMs: 0, chunks: 0, usage: null, finish: null, stopped: false };
  let answer = null;
  setBusy(true);
  try {
    if (!file) state.history.push({ role: "user", content: prompt });
    const useV1 = !file && state.hasV1;
    const response = await (file
      ? requestVisionStream(controller.signal, prompt, file)
      : useV1 ? requestV1(controller.signal) : requestChatStream(controller.signal));
    if (!response.ok) throw new Error(await errorMessage(response));
    $("prompt").value = "";
    answer = addMessage("assistant", "");
    answer.classList.add("streaming");
    const text = answer.querySelector(".text");
    for await (const delta of (useV1 ? readSSE : readText)(response)) {
      if (delta.text) {
        if (stats.ttftMs == null) stats.ttftMs = performance.now() - started;
        stats.chunks += 1;
        text.textContent += delta.text;
        answer.scrollIntoView({ block: "end" });
      }
      if (delta.finish) stats.finish = delta.finish;
      if (delta.usage) stats.usage = delta.usage;
    }
    if (!file) state.history.push({ role: "assistant", content: text.textContent });
  } catch (error) {
    if (error.name === "AbortError") {
      stats.stopped = true;
    } else {
      if (!answer) {
        userItem.remove();
        if (!file) state.history.pop();
      }
      showError(answer ? `The stream broke off: ${error.message}` : error.message);
    }
  } finally {
    stats.totalMs = performance.now() - started;
    answer?.classList.remove("streaming");
    if (answer) $("stats").textContent = formatStats(stats);
    state.controller = null;
    setBusy(false);
  }
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadModel();
    probeV1();
  });
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.shiftKey) return;
    event.preventDefault();
    $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("clear").addEventListener("click", () => {
    state.history = [];
    $("messages").replaceChildren();
    $("stats").textContent = "";
    showError("");
  });
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    $("image-preview").hidden = !file;
    if (file) $("image-preview").src = URL.createObjectURL(file);
  });
  $("endpoint").textContent = `Server: ${ROOT.href}`;
  loadModel();
  probeV1();
}

init();
