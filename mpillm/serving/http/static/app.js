// mpillm chat page: multi-turn chat over the server's own /v1/chat/completions (SSE stream).
// Model output is inserted with textContent only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // {role, content} of the finished turns
let controller = null;       // AbortController of the running request
let model = null;

const settings = ["system", "temperature", "max-tokens", "api-key", "schema"];
for (const id of settings) {
  const saved = localStorage.getItem("mpillm." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("mpillm." + id, $(id).value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
    model = j.data[0].id;
    $("model").textContent = model + (j.data[0].max_model_len ? ` · context ${j.data[0].max_model_len}` : "");
  } catch (e) {
    $("model").textContent = "not connected: " + e.message;
    setTimeout(loadModel, 3000);
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setMeta(div, text) {
  let meta = div.querySelector(".meta");
  if (!meta) { meta = document.createElement("span"); meta.className = "meta"; div.appendChild(meta); }
  meta.textContent = text;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// The "JSON schema or tools" setting: an object constrains the reply to that schema, an array
// is the tools the model may call, one call per reply (the page runs no tools, so a reply that goes
// on calling shows nothing more). Throws when it is not JSON.
function constraint() {
  const raw = $("schema").value.trim();
  if (!raw) return {};
  let v;
  try { v = JSON.parse(raw); } catch (e) { throw new Error("JSON schema or tools: " + e.message); }
  if (Array.isArray(v)) return { tools: v, parallel_tool_calls: false };
  return { response_format: { type: "json_schema", json_schema: { name: "page", schema: v, strict: true } } };
}

// A tool call in the reply: its name, then its arguments as they stream.
function toolCall(out, span, d) {
  let calls = out.querySelector(".calls");
  if (!calls) { calls = document.createElement("div"); calls.className = "calls"; out.insertBefore(calls, span.nextSibling); }
  let el = calls.querySelector(`[data-index="${d.index}"]`);
  if (!el) {
    el = document.createElement("div");
    el.className = "call";
    el.dataset.index = d.index;
    const name = document.createElement("span");
    name.className = "name";
    const args = document.createElement("code");
    el.append(name, args);
    calls.appendChild(el);
  }
  if (d.function && d.function.name) el.querySelector(".name").textContent = "tool call: " + d.function.name;
  if (d.function && d.function.arguments) el.querySelector("code").textContent += d.function.arguments;
  return el;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant streaming", "");
  const span = out.querySelector(".text");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model: model || undefined, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  try { Object.assign(body, constraint()); } catch (e) { out.classList.add("error"); setMeta(out, e.message); history.pop(); return; }
  const calls = [];           // the reply's tool calls, for the history
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, pieces = 0, usage = null, finish = null, stopped = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { const j = await r.json(); if (j.error) msg = j.error.message; } catch (_) {}
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message);
          if (j.usage) usage = j.usage;
          for (const c of j.choices || []) {
            if (c.delta && (c.delta.reasoning_content || c.delta.content)) {
              // a token of either kind: the speed counts reasoning tokens too (usage does)
              if (tFirst === null) tFirst = performance.now();
              pieces++;
              const s = (performance.now() - tFirst) / 1000;
              if (s > 0) $("speed").textContent = (pieces / s).toFixed(1) + " tok/s";
            }
            if (c.delta && c.delta.reasoning_content) {   // a reasoning model's thoughts: apart, collapsible
              let box = out.querySelector("details.reasoning");
              if (!box) {
                // open while the thoughts stream (the reader sees the model working), closed
                // when the answer starts unless the reader has toggled it meanwhile
                box = document.createElement("details");
                box.className = "reasoning";
                box.open = true;
                const sum = document.createElement("summary");
                sum.textContent = "reasoning";
                sum.addEventListener("click", () => { box.dataset.toggled = "1"; });
                box.append(sum, document.createElement("span"));
                out.insertBefore(box, span);
              }
              box.querySelector("span").textContent += c.delta.reasoning_content;
              if (box.open) out.scrollIntoView({ block: "end" });
            }
            if (c.delta && c.delta.content) {
              const box = span.textContent === "" && out.querySelector("details.reasoning");
              if (box && !box.dataset.toggled) box.open = false;
              span.textContent += c.delta.content;
              out.scrollIntoView({ block: "end" });
            }
            for (const d of (c.delta && c.delta.tool_calls) || []) {
              if (tFirst === null) tFirst = performance.now();
              if (d.id) calls[d.index] = { id: d.id, type: "function", function: { name: d.function.name, arguments: "" } };
              if (d.function && d.function.arguments) calls[d.index].function.arguments += d.function.arguments;
              toolCall(out, span, d);
              out.scrollIntoView({ block: "end" });
            }
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else { out.classList.add("error"); setMeta(out, "error: " + e.message); }
  } finally {
    out.classList.remove("streaming");
    setBusy(false);
    controller = null;
  }
  const reply = span.textContent;
  history.push(calls.length ? { role: "assistant", content: reply || null, tool_calls: calls } : { role: "assistant", content: reply });
  // a call has no result on the page: say so, so that the next turn is a valid conversation
  for (const c of calls) history.push({ role: "tool", tool_call_id: c.id, content: "(no result: the chat page runs no tools)" });
  const t1 = performance.now();
  const n = usage ? usage.completion_tokens : pieces;
  const gen = tFirst ? (t1 - tFirst) / 1000 : 0;
  const rate = gen > 0 && n > 1 ? ((n - 1) / gen).toFixed(1) + " tok/s" : "";
  if (!out.classList.contains("error")) {
    const parts = [];
    if (stopped) parts.push("stopped");
    else if (finish === "length") parts.push("cut at max tokens");
    parts.push(n + " tokens");
    if (rate) parts.push(rate);
    if (tFirst) parts.push("first token " + ((tFirst - t0) / 1000).toFixed(2) + " s");
    if (usage && usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens)
      parts.push(usage.prompt_tokens_details.cached_tokens + " prompt tokens reused");
    setMeta(out, parts.join(" · "));
    if (rate) $("speed").textContent = rate;
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("log").textContent = "";
  $("speed").textContent = "";
});
loadModel();
