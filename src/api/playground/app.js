// llm-gateway playground: sends a conversation to the gateway's OpenAI-compatible door
// (/v1/chat/completions), shows the answer as it streams in, and what the gateway said
// about it (provider, usage, latency, X-Cache, the rate-limit headers). No framework,
// no build step: the page's Content-Security-Policy allows only this file's script.
"use strict";

const KEY_STORAGE = "llm-gateway.playground.key";

const $ = (id) => document.getElementById(id);
const els = {
  key: $("api-key"), model: $("model"), loadModels: $("load-models"),
  modelStatus: $("model-status"), stream: $("stream"), messages: $("messages"),
  composer: $("composer"), prompt: $("prompt"), send: $("send"), clear: $("clear"),
  error: $("error"),
};

/** The conversation so far, as the API takes it. */
let history = [];

function setState(state) {
  // Read by people (the busy button) and by the browser test (data-state).
  document.body.dataset.state = state;
  els.send.disabled = state === "busy";
}

function authHeaders() {
  return { "Authorization": "Bearer " + els.key.value.trim() };
}

function show(id, value) {
  $(id).textContent = value === undefined || value === null || value === "" ? "–" : String(value);
}

function showError(text) {
  els.error.textContent = text;
  els.error.hidden = !text;
}

/** Seconds to wait after a 429, from retry-after-ms or Retry-After. */
function waitSeconds(headers) {
  const ms = Number(headers.get("retry-after-ms"));
  if (Number.isFinite(ms) && ms > 0) return Math.ceil(ms / 100) / 10;
  const s = Number(headers.get("retry-after"));
  return Number.isFinite(s) && s > 0 ? s : null;
}

/** An error answer in words a person can act on. */
function explain(status, headers, message) {
  const detail = message ? ` The gateway said: “${message}”` : "";
  switch (status) {
    case 401:
      return "The gateway did not accept this API key (401). Enter one of the gateway's keys above." + detail;
    case 429: {
      const wait = waitSeconds(headers);
      const retry = headers.get("x-should-retry") === "false"
        ? " Waiting a moment will not help: the request is larger than the limit, or the key's token budget is spent for this period."
        : wait !== null ? ` Wait ${wait} s before sending again.` : " Wait a moment before sending again.";
      return "Rate limited (429): this key has used up its allowance for now." + retry + detail;
    }
    case 502:
      return "The upstream provider failed (502): the gateway tried the providers of this model and none gave an answer. Try again, or pick another model." + detail;
    case 503:
      return "The gateway is busy or a dependency is unavailable (503). Try again shortly." + detail;
    case 504:
      return "The upstream provider took too long to answer (504)." + detail;
    case 404:
      return "No route for this model (404). Load the models again and pick one of them." + detail;
    case 400: case 413: case 422:
      return `The gateway refused the request (${status}).` + detail;
    default:
      return `The request failed with HTTP ${status}.` + detail;
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body && body.error && (body.error.message || body.error)) || body.detail || "";
  } catch (_) {
    return "";
  }
}

async function loadModels() {
  els.modelStatus.textContent = "Loading models…";
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) {
      const message = await errorMessage(response);
      els.modelStatus.textContent = "";
      showError(explain(response.status, response.headers, message));
      return;
    }
    const body = await response.json();
    const previous = els.model.value;
    els.model.replaceChildren(...body.data.map((m) => {
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = m.owned_by ? `${m.id} (${m.owned_by})` : m.id;
      return option;
    }));
    if (body.data.some((m) => m.id === previous)) els.model.value = previous;
    els.modelStatus.textContent = `${body.data.length} model(s) available.`;
    showError("");
  } catch (error) {
    els.modelStatus.textContent = "";
    showError("Could not reach the gateway: " + error.message);
  }
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  item.append(who, content);
  els.messages.append(item);
  item.scrollIntoView({ block: "nearest" });
  return { item, content };
}

function showHeaders(response, started) {
  show("d-status", response.status);
  show("d-provider", response.headers.get("x-provider"));
  show("d-cache", response.headers.get("x-cache"));
  show("d-requests", response.headers.get("x-ratelimit-remaining-requests"));
  // No token header on a limited answer: the key's tier has no token limit.
  const limited = response.headers.has("x-ratelimit-remaining-requests");
  show("d-tokens", response.headers.get("x-ratelimit-remaining-tokens") ??
    (limited ? "not limited" : null));
  show("d-request-id", response.headers.get("x-request-id"));
  show("d-latency", `${Math.round(performance.now() - started)} ms`);
}

function showUsage(usage) {
  show("d-usage", usage
    ? `${usage.prompt_tokens} / ${usage.completion_tokens} / ${usage.total_tokens}`
    : null);
}

function resetDetails() {
  for (const id of ["d-status", "d-provider", "d-model", "d-usage", "d-latency", "d-ttft",
    "d-cache", "d-requests", "d-tokens", "d-request-id"]) show(id, null);
}

/** Reads an event stream's `data:` payloads as they arrive. */
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function send(text) {
  const model = els.model.value;
  if (!els.key.value.trim()) {
    showError("Enter an API key first.");
    els.key.focus();
    return;
  }
  if (!model) {
    showError("Pick a model first (Load models lists them).");
    return;
  }
  showError("");
  resetDetails();
  setState("busy");
  history.push({ role: "user", content: text });
  const user = addMessage("user", text);
  const answer = addMessage("assistant", "");
  const stream = els.stream.checked;
  const started = performance.now();
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({
        model, messages: history, stream,
        ...(stream ? { stream_options: { include_usage: true } } : {}),
      }),
    });
    showHeaders(response, started);
    if (!response.ok) {
      throw new Error(explain(response.status, response.headers, await errorMessage(response)));
    }
    if (stream) {
      let complete = false;
      for await (const data of events(response.body)) {
        if (data === "[DONE]") { complete = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error("The upstream failed mid-answer: " + chunk.error.message);
        if (chunk.model) show("d-model", chunk.model);
        if (chunk.usage) showUsage(chunk.usage);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (!reply) show("d-ttft", `${Math.round(performance.now() - started)} ms`);
          reply += delta.content;
          answer.content.textContent = reply;
        }
      }
      if (!complete) throw new Error("The answer stopped before its end.");
    } else {
      const body = await response.json();
      reply = (body.choices[0].message && body.choices[0].message.content) || "";
      answer.content.textContent = reply;
      show("d-model", body.model);
      showUsage(body.usage);
    }
    show("d-latency", `${Math.round(performance.now() - started)} ms`);
    history.push({ role: "assistant", content: reply });
    setState("answered");
  } catch (error) {
    // The failed turn leaves the history (the next send retries it) and the page says why.
    history.pop();
    user.item.classList.add("failed");
    if (!reply) answer.item.remove();
    els.prompt.value = els.prompt.value || text;
    showError(error instanceof TypeError ? "Could not reach the gateway: " + error.message : error.message);
    setState("failed");
  }
}

els.key.value = sessionStorage.getItem(KEY_STORAGE) || "";
els.key.addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORAGE, els.key.value.trim());
  if (els.key.value.trim()) loadModels();
});
els.loadModels.addEventListener("click", loadModels);
els.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = els.prompt.value.trim();
  if (!text || document.body.dataset.state === "busy") return;
  els.prompt.value = "";
  send(text);
});
els.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    els.composer.requestSubmit();
  }
});
els.clear.addEventListener("click", () => {
  history = [];
  els.messages.replaceChildren();
  resetDetails();
  showError("");
  els.prompt.focus();
});
document.querySelector("#settings").addEventListener("submit", (e) => e.preventDefault());
setState("idle");
if (els.key.value) loadModels();
