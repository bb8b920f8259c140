// famserve playground: chat (streamed over server-sent events read from fetch's ReadableStream), sessions
// (create, pick, fork, delete, details) and file ingestion with progress. Plain ES module, no dependencies; every
// URL is relative, so the page works behind a path prefix. The API key stays in this tab (sessionStorage).

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "famserve.apiKey";
// One append request per part of the file (1 MiB; ?ingest_part_bytes=N in the page's URL sets another size).
const INGEST_PART_BYTES = Number(new URLSearchParams(location.search).get("ingest_part_bytes")) || 1 << 20;
const CUT_WINDOW_BYTES = 1 << 16; // where to look for that line break, at the end of each part

const state = {
  apiKey: sessionStorage.getItem(KEY_STORAGE) || "",
  model: null,
  sessionId: null, // null: stateless chat, the history lives in this page
  history: [],
  abort: null, // AbortController of the reply being streamed
};

class APIError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code || error?.type || null;
  }
  toString() {
    return `${this.status ?? ""} ${this.code ?? "error"}: ${this.message}`.trim();
  }
}

// --- HTTP ----------------------------------------------------------------------------------------------------------

function headers(extra = {}) {
  return state.apiKey ? { ...extra, Authorization: `Bearer ${state.apiKey}` } : extra;
}

async function request(method, path, { json, body, contentType, signal } = {}) {
  const init = { method, signal, headers: headers(contentType ? { "Content-Type": contentType } : {}) };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    let error = null;
    try { error = (await response.json()).error; } catch { /* not JSON */ }
    throw new APIError(response.status, error || { message: response.statusText });
  }
  return response;
}

const api = async (method, path, options) => (await request(method, path, options)).json();

// The JSON payloads of an SSE response until `data: [DONE]`; an error event throws; comments (": ping") are skipped.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new APIError(null, event.error);
        yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// --- status, models, mode ------------------------------------------------------------------------------------------

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function fail(error) {
  if (error.name === "AbortError") return;
  setStatus(error instanceof APIError ? error.toString() : `${error.message || error}`, true);
  if (error.status === 401) $("api-key").focus();
}

function showMode(mode) {
  if (mode) $("mode").textContent = mode;
}

async function connect() {
  state.apiKey = $("api-key").value.trim();
  if (state.apiKey) sessionStorage.setItem(KEY_STORAGE, state.apiKey);
  else sessionStorage.removeItem(KEY_STORAGE);
  setStatus("connecting…");
  const models = (await api("GET", "v1/models")).data;
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  select.disabled = models.length === 0;
  state.model = models[0]?.id ?? null;
  showMode(models[0]?.famserve?.mode);
  try {
    await loadSessions();
  } catch (error) {
    setStatus(`connected, but the sessions could not be listed: ${error}`, true);
    return;
  }
  setStatus(`connected to ${state.model}`);
}

// --- sessions ------------------------------------------------------------------------------------------------------

async function loadSessions() {
  const sessions = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ limit: "100", ...(after ? { after } : {}) });
    const page = await api("GET", `v1/sessions?${query}`);
    sessions.push(...page.data);
    if (!page.has_more || page.data.length === 0) break;
    after = page.last_id;
  }
  renderSessions(sessions);
}

function sessionOption(session) {
  const label = document.createElement("label");
  label.className = "option";
  const input = Object.assign(document.createElement("input"), { type: "radio", name: "session", value: session?.id ?? "" });
  const name = document.createElement("span");
  name.className = session ? "mono" : "";
  name.textContent = session ? session.id : "No session (stateless chat)";
  label.append(input, " ", name);
  if (session) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${session.tokens_processed.toLocaleString()} tok`;
    label.append(meta);
  }
  input.checked = (session?.id ?? null) === state.sessionId;
  return label;
}

function renderSessions(sessions) {
  if (state.sessionId && !sessions.some((s) => s.id === state.sessionId)) selectSession(null, false);
  $("session-options").replaceChildren(sessionOption(null), ...sessions.map(sessionOption));
  const current = sessions.find((s) => s.id === state.sessionId);
  if (current) showSession(current);
}

function formatBytes(count) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let size = count, unit = 0;
  while (size >= 1024 && unit < units.length - 1) { size /= 1024; unit++; }
  return unit === 0 ? `${size} B` : `${size.toFixed(1)} ${units[unit]}`;
}

function showSession(session) {
  $("d-id").textContent = session.id;
  $("d-tokens").textContent = session.tokens_processed.toLocaleString();
  $("d-state").textContent = `${formatBytes(session.state_bytes)} (${session.state_bytes.toLocaleString()} bytes)`;
  $("d-blocks").textContent = session.blocks.toLocaleString();
  $("d-turns").textContent = session.turns.toLocaleString();
  const fam = session.fam;
  $("d-fam").textContent = `${fam.mode}: block ${fam.block_size}, memory ${fam.memory_blocks}, ` +
    `FAM ${fam.fam_length}, sinks ${fam.sink_tokens}` + (fam.fam_after_window ? ", FAM read after the window" : "");
  const option = [...document.querySelectorAll('input[name="session"]')].find((i) => i.value === session.id);
  const meta = option?.parentElement.querySelector(".meta");
  if (meta) meta.textContent = `${session.tokens_processed.toLocaleString()} tok`;
}

function selectSession(id, clear = true) {
  state.sessionId = id || null;
  $("session-details").hidden = !state.sessionId;
  $("chat-where").textContent = state.sessionId
    ? `in session ${state.sessionId}: the server keeps the conversation`
    : "stateless: the history is kept in this page";
  if (clear) clearTranscript();
}

async function refreshSession() {
  if (state.sessionId) showSession(await api("GET", `v1/sessions/${state.sessionId}`));
}

async function createSession() {
  const systemPrompt = $("system-prompt").value.trim();
  const session = await api("POST", "v1/sessions", { json: systemPrompt ? { system_prompt: systemPrompt } : {} });
  selectSession(session.id);
  await loadSessions();
  setStatus(`created session ${session.id}`);
}

async function forkSession() {
  const session = await api("POST", `v1/sessions/${state.sessionId}/fork`);
  selectSession(session.id);
  await loadSessions();
  setStatus(`forked into session ${session.id}`);
}

async function deleteSession() {
  const id = state.sessionId;
  if (!window.confirm(`Delete session ${id}? Its state is lost.`)) return;
  await api("DELETE", `v1/sessions/${id}`);
  selectSession(null);
  await loadSessions();
  setStatus(`deleted session ${id}`);
}

// --- ingest --------------------------------------------------------------------------------------------------------

// Where the part [start, end) of the file should end: after a line break between two visible characters, else after
// any line break, else between UTF-8 characters (so each part is valid text). The same rule as the Python client.
async function partEnd(file, start, end) {
  if (end >= file.size) return file.size;
  const low = Math.max(start + 1, end - CUT_WINDOW_BYTES);
  const bytes = new Uint8Array(await file.slice(low, end).arrayBuffer());
  const space = (b) => b === 0x20 || (b >= 0x09 && b <= 0x0d);
  let anyNewline = -1;
  for (let i = bytes.length - 2; i > 0; i--) {
    if (bytes[i] !== 0x0a) continue;
    if (anyNewline < 0) anyNewline = i;
    if (!space(bytes[i - 1]) && !space(bytes[i + 1])) return low + i + 1;
  }
  if (anyNewline >= 0) return low + anyNewline + 1;
  let cut = bytes.length - 1;
  while (cut > 0 && (bytes[cut] & 0xc0) === 0x80) cut--;
  return cut > 0 ? low + cut : end;
}

async function ingest() {
  const file = $("ingest-file").files[0];
  if (!file) throw new Error("choose a text file to ingest first");
  const id = state.sessionId;
  const bar = $("ingest-progress");
  const started = performance.now();
  let sent = 0, tokens = 0;
  const show = (session) => {
    const seconds = (performance.now() - started) / 1000;
    bar.value = file.size ? sent / file.size : 1;
    $("ingest-status").textContent = `${formatBytes(sent)} of ${formatBytes(file.size)} · ` +
      `${tokens.toLocaleString()} tokens · ${Math.round(tokens / Math.max(seconds, 1e-3)).toLocaleString()} tokens/s`;
    if (session) showSession(session);
  };
  $("ingest").disabled = true;
  try {
    show(null);
    while (sent < file.size) {
      const end = await partEnd(file, sent, sent + INGEST_PART_BYTES);
      const response = await request("POST", `v1/sessions/${id}/append?stream=true`,
        { body: file.slice(sent, end), contentType: "text/plain; charset=utf-8" });
      const before = tokens;
      for await (const event of sseEvents(response)) {
        tokens = before + event.tokens_appended;
        show(event.session);
      }
      sent = end;
      show(null);
    }
    setStatus(`ingested ${file.name}: ${tokens.toLocaleString()} tokens into session ${id}`);
    await loadSessions();
  } finally {
    $("ingest").disabled = false;
  }
}

// --- chat ----------------------------------------------------------------------------------------------------------

function addMessage(role, text) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  element.append(who, body);
  $("transcript").append(element);
  scrollToEnd();
  return element;
}

function scrollToEnd() {
  const transcript = $("transcript");
  transcript.scrollTop = transcript.scrollHeight;
}

function clearTranscript() {
  state.history = [];
  $("transcript").replaceChildren();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function sendMessage() {
  const text = $("message").value.trim();
  if (!text || state.abort) return;
  $("message").value = "";
  addMessage("user", text);
  const user = { role: "user", content: text };
  const inSession = state.sessionId !== null;
  const path = inSession ? `v1/sessions/${state.sessionId}/chat/completions` : "v1/chat/completions";
  const body = {
    model: $("model").value || state.model || undefined,
    messages: inSession ? [user] : [...state.history, user],
    max_tokens: Number($("max-tokens").value) || undefined,
    temperature: Number($("temperature").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const reply = addMessage("assistant", "");
  const output = reply.querySelector(".text");
  state.abort = new AbortController();
  setBusy(true);
  let finish = null, usage = null;
  try {
    const response = await request("POST", path, { json: body, signal: state.abort.signal });
    for await (const chunk of sseEvents(response)) {
      showMode(chunk.famserve?.mode);
      usage = chunk.usage || usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta?.content) output.textContent += choice.delta.content;
        finish = choice.finish_reason || finish;
      }
      scrollToEnd();
    }
    if (!inSession) state.history.push(user, { role: "assistant", content: output.textContent });
    const info = document.createElement("span");
    info.className = "info";
    info.textContent = [finish && `finish: ${finish}`,
      usage && `${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens`].filter(Boolean).join(" · ");
    reply.append(info);
    setStatus("");
    if (inSession) await refreshSession();
  } catch (error) {
    if (error.name === "AbortError") reply.append(Object.assign(document.createElement("span"), { className: "info", textContent: "stopped" }));
    else reply.replaceWith(addMessage("error", error.toString()));
    throw error;
  } finally {
    state.abort = null;
    setBusy(false);
  }
}

// --- wiring --------------------------------------------------------------------------------------------------------

function on(id, event, handler) {
  $(id).addEventListener(event, (e) => {
    if (event === "submit") e.preventDefault();
    Promise.resolve(handler(e)).catch(fail);
  });
}

on("connect-form", "submit", connect);
on("create-form", "submit", createSession);
on("refresh-sessions", "click", loadSessions);
on("fork-session", "click", forkSession);
on("delete-session", "click", deleteSession);
on("ingest-form", "submit", ingest);
on("chat-form", "submit", sendMessage);
on("stop", "click", () => state.abort?.abort());
on("clear-chat", "click", clearTranscript);
on("model", "change", () => { state.model = $("model").value; });
on("session-options", "change", async (e) => {
  selectSession(e.target.value);
  await refreshSession();
});
on("message", "keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("api-key").value = state.apiKey;
connect().catch(fail);
