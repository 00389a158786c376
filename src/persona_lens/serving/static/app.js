// persona-lens web page: chat with per-request steering, live trait meters and tokens coloured
// by their projection, streamed from this server's OpenAI-compatible API. No dependencies.
"use strict";

const state = {
  model: null,
  vectors: [],        // from GET /v1/persona/vectors (name, layer, meter {baseline, scale}, ...)
  history: [],        // the conversation sent with every request (steered replies only)
  busy: false,
};

const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function showError(message) {
  const box = document.createElement("div");
  box.className = "error";
  box.textContent = message;
  $("alerts").replaceChildren(box);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

// --- controls -----------------------------------------------------------------------------
function buildControls() {
  const sliders = $("sliders");
  const monitors = $("monitors");
  const colour = $("colour-trait");
  const guard = $("guard-trait");
  sliders.querySelectorAll(".slider").forEach((el) => el.remove());
  monitors.replaceChildren();
  colour.replaceChildren();
  guard.replaceChildren();
  $("no-vectors").hidden = state.vectors.length > 0;
  for (const v of state.vectors) {
    const wrap = document.createElement("div");
    wrap.className = "slider";
    wrap.innerHTML = `<div class="label"><span></span><span class="value">0.0</span></div>`;
    wrap.querySelector("span").textContent = v.name;
    wrap.title = `${v.trait}, layer ${v.layer}, ${v.hash}` + (v.description ? `: ${v.description}` : "");
    const input = document.createElement("input");
    Object.assign(input, { type: "range", min: "-3", max: "3", step: "0.1", value: "0" });
    input.dataset.trait = v.name;
    input.setAttribute("data-testid", "slider-" + v.name);
    input.setAttribute("aria-label", "steer " + v.name);
    input.addEventListener("input", () => {
      wrap.querySelector(".value").textContent = Number(input.value).toFixed(1);
    });
    wrap.appendChild(input);
    sliders.appendChild(wrap);

    const label = document.createElement("label");
    label.className = "row";
    const box = document.createElement("input");
    Object.assign(box, { type: "checkbox", checked: true });
    box.dataset.monitor = v.name;
    label.append(box, document.createTextNode(" " + v.name));
    monitors.appendChild(label);

    for (const select of [colour, guard]) {
      const option = document.createElement("option");
      option.value = option.textContent = v.name;
      select.appendChild(option);
    }
  }
}

function steering() {
  const steer = {};
  document.querySelectorAll("#sliders input[type=range]").forEach((input) => {
    const value = Number(input.value);
    if (value !== 0) steer[input.dataset.trait] = value;
  });
  return steer;
}

function monitored() {
  return [...document.querySelectorAll("#monitors input:checked")].map((b) => b.dataset.monitor);
}

function persona(steered) {
  const field = { steer: steered ? steering() : {}, monitor: monitored() };
  if (steered && $("guard-on").checked && $("guard-trait").value) {
    field.guard = {
      [$("guard-trait").value]: {
        threshold: Number($("guard-threshold").value),
        coefficient: Number($("guard-coefficient").value),
      },
    };
  }
  return field;
}

function requestBody(messages, steered) {
  return {
    model: state.model,
    messages,
    max_tokens: Number($("max-tokens").value) || 48,
    temperature: Number($("temperature").value) || 0,
    stream: true,
    stream_options: { include_usage: true },
    persona: persona(steered),
  };
}

// --- meters and colours -------------------------------------------------------------------
function vector(name) { return state.vectors.find((v) => v.name === name); }

function level(name, projection) {
  const v = vector(name);
  if (!v || !v.meter || projection === null || projection === undefined) return null;
  return (projection - v.meter.baseline) / v.meter.scale;
}

function tint(value) {
  if (value === null) return "transparent";
  const alpha = Math.min(1, Math.abs(value)) * 0.55;
  const rgb = getComputedStyle(document.documentElement).getPropertyValue(value >= 0 ? "--warm" : "--cold");
  return `rgba(${rgb.trim()}, ${alpha.toFixed(3)})`;
}

function colourToken(span) {
  const name = $("colour-trait").value;
  const projections = JSON.parse(span.dataset.projections || "{}");
  span.style.backgroundColor = tint(level(name, projections[name]));
}

function recolourAll() { document.querySelectorAll(".token").forEach(colourToken); }

function renderMeters(reply) {
  const box = reply.querySelector(".meters");
  box.replaceChildren();
  for (const [name, sum] of Object.entries(reply.sums)) {
    const count = reply.count || 1;
    const value = level(name, sum / count);
    const row = document.createElement("div");
    row.className = "meter";
    row.dataset.trait = name;
    row.setAttribute("data-testid", "meter-" + name);
    const clamped = Math.max(-1, Math.min(1, value ?? 0));
    const fill = `<div class="fill" style="${clamped >= 0 ? "left:50%" : "right:50%"};width:${(Math.abs(clamped) * 50).toFixed(1)}%;background:${tint(value)}"></div>`;
    row.innerHTML = `<span class="name"></span><div class="bar">${fill}</div><span class="number"></span>`;
    row.querySelector(".name").textContent = name;
    row.querySelector(".number").textContent = value === null ? "n/a" : (value >= 0 ? "+" : "") + value.toFixed(2);
    box.appendChild(row);
  }
}

function guardAlert(reply, event) {
  const alert = document.createElement("div");
  alert.className = "guard-alert";
  alert.setAttribute("data-testid", "guard-alert");
  alert.setAttribute("role", "alert");
  alert.textContent = `guard ${event.guard} fired at token ${event.token_index}: projection ` +
    `${event.projection.toFixed(2)} > ${event.threshold}; steering ${event.coefficient} ` +
    `for the rest of the reply`;
  reply.querySelector(".alerts").appendChild(alert);
}

function showTurns(reply, turns) {
  if (!turns || !turns.length) return;
  const parts = turns.map((t) => {
    const levels = Object.entries(t.projections).map(([n, p]) => {
      const l = level(n, p);
      return `${n} ${l === null ? "n/a" : (l >= 0 ? "+" : "") + l.toFixed(2)}`;
    });
    return `message ${t.message}: ${levels.join(", ")}`;
  });
  reply.querySelector(".turn-levels").textContent = "earlier assistant turns: " + parts.join("; ");
}

// --- streaming ----------------------------------------------------------------------------
function newReply(container, tag) {
  const reply = document.createElement("div");
  reply.className = "reply";
  reply.innerHTML = `<div class="tag"></div><div class="text"></div><div class="alerts"></div>` +
    `<div class="meters"></div><div class="turn-levels"></div>`;
  reply.querySelector(".tag").textContent = tag;
  reply.setAttribute("data-testid", "reply-" + (tag === "unsteered" ? "unsteered" : "steered"));
  reply.sums = {};
  reply.count = 0;
  reply.content = "";
  container.appendChild(reply);
  return reply;
}

function onChunk(reply, chunk) {
  const extra = chunk.persona || {};
  if (extra.turns) showTurns(reply, extra.turns);
  if (extra.prompt_projections && !reply.count) {
    for (const name of Object.keys(extra.prompt_projections)) reply.sums[name] = 0;
    renderMeters(reply);
  }
  const choice = (chunk.choices || [])[0];
  if (choice && choice.delta && choice.delta.content) reply.content += choice.delta.content;
  for (const token of extra.tokens || []) {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = token.text;
    span.dataset.projections = JSON.stringify(token.projections);
    span.title = Object.entries(token.projections)
      .map(([n, p]) => `${n}: ${p === null ? "n/a" : p.toFixed(2)}`).join("\n");
    colourToken(span);
    reply.querySelector(".text").appendChild(span);
    reply.count += 1;
    for (const [name, value] of Object.entries(token.projections)) {
      reply.sums[name] = (reply.sums[name] || 0) + (value ?? 0);
    }
    renderMeters(reply);
  }
  for (const event of extra.guard_events || []) {
    if (!choice || !choice.finish_reason) guardAlert(reply, event);
  }
}

async function stream(body, reply) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body),
  });
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    throw new Error(error.error ? error.error.message : response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") { reply.dataset.done = "true"; return reply.content; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      onChunk(reply, chunk);
    }
  }
  reply.dataset.done = "true";
  return reply.content;
}

async function send(event) {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || state.busy || !state.model) return;
  state.busy = true;
  $("send").disabled = true;
  $("alerts").replaceChildren();
  const turn = document.createElement("div");
  turn.className = "turn";
  const user = document.createElement("div");
  user.className = "user-message";
  user.textContent = text;
  const replies = document.createElement("div");
  replies.className = "replies";
  turn.append(user, replies);
  $("transcript").appendChild(turn);
  const messages = [...state.history, { role: "user", content: text }];
  const steeredBody = requestBody(messages, true);
  showCode(steeredBody);
  const compare = $("compare").checked;
  if (compare) replies.classList.add("compare");
  const steered = newReply(replies, compare ? "steered" : "reply");
  const runs = [stream(steeredBody, steered)];
  if (compare) runs.push(stream(requestBody(messages, false), newReply(replies, "unsteered")));
  $("message").value = "";
  setStatus("generating...");
  try {
    const [content] = await Promise.all(runs);
    state.history = [...messages, { role: "assistant", content }];
    setStatus("");
  } catch (error) {
    showError(error.message);
    setStatus("");
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("transcript").scrollTop = $("transcript").scrollHeight;
  }
}

// --- reproduce ----------------------------------------------------------------------------
function python(value, indent) {
  const pad = " ".repeat(indent);
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return "[\n" + value.map((v) => pad + "    " + python(v, indent + 4)).join(",\n") + ",\n" + pad + "]";
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return "{\n" + entries.map(([k, v]) => pad + "    " + JSON.stringify(k) + ": " + python(v, indent + 4))
    .join(",\n") + ",\n" + pad + "}";
}

function showCode(body) {
  const base = window.location.origin;
  const key = $("api-key").value.trim();
  const json = JSON.stringify(body, null, 2).replace(/'/g, "'\\''");
  $("code-curl").textContent =
    `curl -N ${base}/v1/chat/completions \\\n  -H 'Content-Type: application/json' \\\n` +
    (key ? `  -H "Authorization: Bearer $PERSONA_LENS_API_KEY" \\\n` : "") +
    `  -d '${json}'`;
  const { model, messages, persona: extra, stream: _s, stream_options: _o, ...rest } = body;
  const args = Object.entries(rest).map(([k, v]) => `    ${k}=${python(v, 4)},`).join("\n");
  $("code-python").textContent =
    `from openai import OpenAI\n\n` +
    `client = OpenAI(base_url="${base}/v1", api_key=${key ? 'os.environ["PERSONA_LENS_API_KEY"]' : '"none"'})\n` +
    `reply = client.chat.completions.create(\n    model=${JSON.stringify(model)},\n` +
    `    messages=${python(messages, 4)},\n${args}\n    extra_body={"persona": ${python(extra, 4)}},\n)\n` +
    `print(reply.choices[0].message.content)\n` +
    `print(reply.model_extra["persona"]["projections"])\n`;
  if (key) $("code-python").textContent = "import os\n" + $("code-python").textContent;
}

function selectTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  $("code-curl").hidden = name !== "curl";
  $("code-python").hidden = name !== "python";
}

// --- start --------------------------------------------------------------------------------
async function connect() {
  try {
    const models = await getJSON("/v1/models");
    state.model = models.data[0].id;
    state.vectors = (await getJSON("/v1/persona/vectors")).data;
    $("model").textContent = state.model;
    setStatus(`${state.vectors.length} vector${state.vectors.length === 1 ? "" : "s"} loaded`);
    buildControls();
    document.body.dataset.ready = "true";
  } catch (error) {
    $("model").textContent = "not connected";
    setStatus(error.message);
  }
}

$("composer").addEventListener("submit", send);
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("new-chat").addEventListener("click", () => {
  state.history = [];
  $("transcript").replaceChildren();
  $("alerts").replaceChildren();
});
$("reset-steering").addEventListener("click", () => {
  document.querySelectorAll("#sliders input[type=range]").forEach((input) => {
    input.value = "0";
    input.dispatchEvent(new Event("input"));
  });
});
$("colour-trait").addEventListener("change", recolourAll);
$("api-key").addEventListener("change", connect);
document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => selectTab(t.dataset.tab)));
connect();
