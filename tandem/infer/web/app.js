// The tandem chat page's logic: send the conversation to /v1/chat/completions with stream: true,
// read the server-sent events as they arrive, put delta.reasoning_content into the "Thinking"
// block and delta.content into the answer. Stop aborts the fetch (the server then frees the
// model's slot). The history sent back holds the answers only, not the thinking (DeepSeek's
// convention). A server started with an API key answers 401: the page then asks for the key once,
// keeps it in sessionStorage (this tab only) and sends it as `Authorization: Bearer <key>`.
// Served by `tandem serve` at /static/app.js; no build step.

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop");
let model = null, history = [], controller = null;
const KEY = "tandem-api-key";

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { authorization: `Bearer ${key}` } : {};
}

async function connect() {
  // Wait for the model (the server answers 503 while it loads), then show its name; on 401 ask
  // for the API key (again, if the one given was wrong).
  for (;;) {
    try {
      const r = await fetch("/v1/models", { headers: authHeaders() });
      if (r.status === 401) {
        const key = prompt(sessionStorage.getItem(KEY) ? "Wrong API key; try again:" : "This server needs an API key:");
        if (!key) {
          $("model").textContent = "this server needs an API key: reload the page to enter it";
          return;
        }
        sessionStorage.setItem(KEY, key.trim());
        continue;
      }
      if (r.ok) {
        const info = (await r.json()).data[0];
        model = info.id;
        $("model").textContent = `${model} · context ${info.max_model_len} tokens`;
        return;
      }
      $("model").textContent = (await errorText(r)) || "loading the model…";
    } catch (e) {
      $("model").textContent = "server unreachable, retrying…";
    }
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

function addTurn(role) {
  $("empty")?.remove();
  const turn = element("div", `turn ${role}`);
  log.append(turn);
  return turn;
}

function assistantTurn() {
  const turn = addTurn("assistant");
  const thinking = element("details", "thinking");
  thinking.open = true;
  thinking.hidden = true;
  const summary = element("summary", null, "Thinking…");
  const thoughts = element("div", "thoughts");
  thinking.append(summary, thoughts);
  const answer = element("div", "answer");
  const meta = element("div", "meta");
  turn.append(thinking, answer, meta);
  return { turn, thinking, summary, thoughts, answer, meta };
}

function settings() {
  const body = { model, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const system = $("system").value.trim();
  body.messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  return body;
}

// Yields the JSON payload of each `data:` event of a server-sent-event stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function ask(text) {
  history.push({ role: "user", content: text });
  addTurn("user").textContent = text;
  const view = assistantTurn();
  view.turn.scrollIntoView({ block: "end" });
  controller = new AbortController();
  busy(true);
  const started = performance.now();
  let answer = "", usage = null, finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "content-type": "application/json", ...authHeaders() },
      body: JSON.stringify(settings()), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const choice = event.choices?.[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        view.thinking.hidden = false;
        view.thoughts.textContent += delta.reasoning_content;
      }
      if (delta.content) {
        if (!answer) {                        // the answer starts: fold the thinking away
          view.thinking.open = false;
          view.summary.textContent = "Thinking";
        }
        answer += delta.content;
        view.answer.textContent = answer;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      view.turn.scrollIntoView({ block: "end" });
    }
    view.summary.textContent = "Thinking";
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? `${usage.completion_tokens} tokens · ${(usage.completion_tokens / seconds).toFixed(0)} tokens/s` : "";
    view.meta.textContent = [tokens, finish === "length" ? "cut at max tokens" : ""].filter(Boolean).join(" · ");
  } catch (e) {
    if (e.name === "AbortError") {
      view.meta.textContent = "stopped";
    } else {
      view.turn.classList.add("error");
      view.meta.textContent = e.message;
    }
    view.summary.textContent = "Thinking";
  } finally {
    if (!view.thoughts.textContent) view.thinking.remove();
    if (!answer && !view.turn.classList.contains("error")) view.answer.textContent = "(no answer)";
    if (view.turn.isConnected) history.push({ role: "assistant", content: answer });   // not after "New chat"
    controller = null;
    busy(false);
  }
}

function busy(on) {
  send.hidden = on;
  stop.hidden = !on;
  input.disabled = on;
  if (!on) input.focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || controller || !model) return;
  input.value = "";
  ask(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

stop.addEventListener("click", () => controller?.abort());

$("new-chat").addEventListener("click", () => {
  controller?.abort();
  history = [];
  log.replaceChildren();
});

connect();
