// The playground page: the methods from the server's own descriptors,
// a request editor, and each call as it happens.

import { Bridge } from "./bridge.js";
import { Call, CallView } from "./call.js";
import { EXAMPLES, PATTERNS, sample } from "./examples.js";
import { Feed, watchHealth } from "./feed.js";

const $ = (id) => document.getElementById(id);

const state = {
  catalogue: null,
  tls: false,
  auth: false,
  token: "",
  methods: new Map(), // full name -> method
  current: null, // the selected method
  drafts: new Map(), // full name -> editor text
  calls: new Map(), // full name -> its latest Call
  started: false,
};

const view = new CallView(updateButtons);
const bridge = new Bridge(onHello, (text) => {
  const badge = $("connection");
  badge.textContent = text;
  badge.className = `badge ${text === "connected" ? "ok" : text.startsWith("disconnected") ? "failed" : ""}`;
});
const feed = new Feed(bridge, () => authMetadata({}));

function authMetadata(metadata, token = state.token) {
  return token ? { ...metadata, authorization: `Bearer ${token}` } : metadata;
}

// With a token required the hello describes nothing: the methods come
// once the token is given, through a reflection call that carries it.
function onHello(hello) {
  state.tls = hello.tls;
  state.auth = hello.auth;
  $("token-panel").hidden = !state.auth;
  if (hello.catalogue) showCatalogue(hello.catalogue);
  else if (!state.catalogue) {
    $("method-groups").replaceChildren(hint("The methods are listed once the server has your token."));
    $("method-head").replaceChildren(hint("This server needs a bearer token: give it above to list its methods, as reflection lists them only to a client with the token."));
  }
  watchHealth(bridge);
  if (!state.auth || state.token) feed.start();
  else $("feed-status").textContent = "give the token above to watch";
}

function hint(text) {
  const p = document.createElement("p");
  p.className = "hint";
  p.textContent = text;
  return p;
}

function showCatalogue(catalogue) {
  state.catalogue = catalogue;
  if (!state.started) {
    state.started = true;
    renderMethods();
  }
}

// Sends the token with a describe: the methods appear when the server
// accepts it; otherwise the page shows the status and asks again.
async function useToken(token) {
  const error = $("token-error");
  const input = $("token");
  const button = $("token-form").querySelector("button");
  error.textContent = "";
  button.disabled = true;
  const asked = () => {
    button.disabled = false;
    input.focus();
    input.select();
  };
  try {
    await bridge.describe(authMetadata({}, token), (event) => {
      if (event.type === "catalogue") {
        state.token = token;
        showCatalogue(event.catalogue);
        $("token-title").textContent = "Token accepted: every call carries it";
        feed.start();
      } else if (event.type === "status") {
        button.disabled = false;
        if (event.code !== 0) {
          error.textContent = `${event.code_name}: ${event.message}`;
          asked();
        }
      } else if (event.type === "error") {
        error.textContent = event.error;
        asked();
      }
    });
  } catch (err) {
    error.textContent = `not connected: ${err.message}`;
    asked();
  }
}

function renderMethods() {
  const groups = $("method-groups");
  groups.replaceChildren();
  const order = ["unary", "server_streaming", "client_streaming", "bidi_streaming"];
  const services = state.catalogue.services;
  const users = services.find((s) => s.name === "grpcUser.UserService");
  for (const pattern of order) {
    const methods = users.methods.filter((m) => m.pattern === pattern);
    groups.append(group(PATTERNS[pattern].title, methods));
  }
  const health = services.find((s) => s.name === "grpc.health.v1.Health");
  if (health) groups.append(group("Health", health.methods));
  for (const service of services) {
    for (const method of service.methods) state.methods.set(method.full_name, method);
  }
  select(users.methods[0].full_name);
}

function group(title, methods) {
  const section = document.createElement("section");
  section.className = "group";
  const heading = document.createElement("h2");
  heading.textContent = title;
  const list = document.createElement("ul");
  for (const method of methods) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "method";
    button.textContent = method.name;
    button.dataset.method = method.full_name;
    const types = document.createElement("span");
    types.className = "types";
    types.id = `types-${method.full_name.replace(/[^A-Za-z0-9]/g, "-")}`;
    types.textContent = `${short(method.input)} → ${short(method.output)}`;
    button.setAttribute("aria-describedby", types.id);
    button.addEventListener("click", () => select(method.full_name));
    item.append(button, types);
    list.append(item);
  }
  section.append(heading, list);
  return section;
}

function short(type) {
  return type.split(".").pop();
}

function select(fullName) {
  if (state.current) state.drafts.set(state.current.full_name, $("editor").value);
  const method = state.methods.get(fullName);
  state.current = method;
  for (const button of document.querySelectorAll("button.method")) {
    button.setAttribute("aria-current", button.dataset.method === fullName ? "true" : "false");
  }
  const head = $("method-head");
  head.replaceChildren();
  const title = document.createElement("h2");
  title.textContent = method.name;
  const pattern = document.createElement("span");
  pattern.className = `pattern pattern-${method.pattern}`;
  pattern.textContent = PATTERNS[method.pattern].title;
  title.append(" ", pattern);
  const types = document.createElement("p");
  types.className = "signature";
  // Breaks allowed after "/" and "(", not inside a name.
  const [service, name] = method.full_name.split("/");
  const stream = method.pattern === "server_streaming" || method.pattern === "bidi_streaming" ? "stream " : "";
  types.append(`${service}/`, document.createElement("wbr"), `${name}(`, document.createElement("wbr"),
    `${method.input}) → ${stream}${method.output}`);
  const comment = document.createElement("p");
  comment.className = "comment";
  comment.textContent = method.comment || "";
  const wire = document.createElement("p");
  wire.className = "wire";
  const wireTitle = document.createElement("strong");
  wireTitle.textContent = "On the wire: ";
  wire.append(wireTitle, PATTERNS[method.pattern].wire);
  head.append(title, types, comment, wire);

  $("request-form").hidden = false;
  $("result").hidden = false;
  $("input-type").textContent = method.input;
  const example = EXAMPLES[fullName] ?? sample(method.input, state.catalogue.messages);
  $("editor").value = state.drafts.get(fullName) ?? JSON.stringify(example, null, 2);
  $("end").hidden = !streamingRequest(method);
  renderFields(method.input);
  view.show(state.calls.get(fullName) ?? null);
  updateButtons();
}

function streamingRequest(method) {
  return method.pattern === "client_streaming" || method.pattern === "bidi_streaming";
}

function renderFields(type) {
  const list = $("field-list");
  list.replaceChildren();
  const message = state.catalogue.messages[type];
  $("fields").querySelector("summary").textContent = `Fields of ${type}`;
  if (!message) return;
  for (const field of message.fields) {
    const term = document.createElement("dt");
    const kind = field.repeated ? `repeated ${field.type}` : field.type;
    term.textContent = `${field.name} (${kind}${field.oneof ? `, oneof ${field.oneof}` : ""})`;
    const description = document.createElement("dd");
    description.textContent = field.comment || "—";
    list.append(term, description);
  }
}

function currentCall() {
  return state.current ? state.calls.get(state.current.full_name) : null;
}

function updateButtons() {
  const call = currentCall();
  const open = Boolean(call && call.open && call.id !== null);
  $("cancel").disabled = !open;
  $("end").disabled = !(open && call.streaming && !call.halfClosed);
}

function metadata() {
  const out = {};
  for (const row of $("metadata-rows").children) {
    const [name, value] = row.querySelectorAll("input");
    if (name.value.trim()) out[name.value.trim()] = value.value;
  }
  return out;
}

function deadline() {
  const text = $("deadline").value.trim();
  if (!text) return null;
  const seconds = Number(text);
  return Number.isFinite(seconds) && seconds >= 0 ? Math.round(seconds * 1000) : null;
}

async function send() {
  const method = state.current;
  if (!method) return;
  $("request-error").textContent = "";
  let message;
  try {
    message = JSON.parse($("editor").value);
  } catch (err) {
    $("request-error").textContent = `nothing sent: the editor does not hold JSON (${err.message})`;
    return;
  }
  const open = currentCall();
  if (open && open.open && open.id !== null && open.streaming && !open.halfClosed) {
    bridge.send({ type: "send", id: open.id, message });
    bumpRequestId(message);
    return;
  }
  const call = new Call({
    method: method.full_name,
    pattern: method.pattern,
    metadata: metadata(),
    timeoutMs: deadline(),
    tls: state.tls,
    auth: Boolean(state.token),
  });
  state.calls.set(method.full_name, call);
  view.show(call);
  try {
    call.id = await bridge.start(method.full_name, {
      metadata: authMetadata(call.metadata),
      timeoutMs: call.timeoutMs,
      message,
    }, (event) => {
      if (event.type === "error" && call.timelineCount === 0) {
        call.status = { code: -1, code_name: "NOT_SENT", message: event.error, details: [], local: true };
      }
      call.apply(event);
    });
  } catch (err) {
    call.status = { code: 14, code_name: "UNAVAILABLE", message: `not connected: ${err.message}`, details: [] };
    view.render();
  }
  if (streamingRequest(method)) bumpRequestId(message);
  updateButtons();
}

// SyncUsers requests carry an id echoed in their Ack: the next one gets
// the next id, so that the learner can press Send again.
function bumpRequestId(message) {
  for (const key of ["request_id", "requestId"]) {
    if (typeof message[key] === "number") {
      message[key] += 1;
      $("editor").value = JSON.stringify(message, null, 2);
    }
  }
}

function addMetadataRow(name = "", value = "") {
  const rows = $("metadata-rows");
  const n = rows.children.length + 1;
  const row = document.createElement("div");
  row.className = "metadata-row";
  const nameInput = document.createElement("input");
  nameInput.value = name;
  nameInput.placeholder = "name";
  nameInput.setAttribute("aria-label", `Metadata name ${n}`);
  const valueInput = document.createElement("input");
  valueInput.value = value;
  valueInput.placeholder = "value";
  valueInput.setAttribute("aria-label", `Metadata value ${n}`);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "small";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove metadata ${n}`);
  remove.addEventListener("click", () => row.remove());
  row.append(nameInput, valueInput, remove);
  rows.append(row);
  nameInput.focus();
}

$("request-form").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("editor").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    send();
  }
});
$("end").addEventListener("click", () => {
  const call = currentCall();
  if (call && call.id !== null) bridge.send({ type: "end", id: call.id });
});
$("cancel").addEventListener("click", () => {
  const call = currentCall();
  if (call && call.id !== null) bridge.send({ type: "cancel", id: call.id });
});
$("add-metadata").addEventListener("click", () => addMetadataRow());
$("copy").addEventListener("click", async () => {
  const text = $("grpcurl").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copied").textContent = "Copied";
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("grpcurl"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("copied").textContent = "Selected: press Ctrl+C";
  }
});
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  useToken($("token").value.trim());
});

bridge.connect().catch(() => {});
