// One call as the page shows it: its responses (a bounded number of rows,
// the rest counted), its timeline, its status and its grpcurl command.

import { grpcurl } from "./grpcurl.js";

// Rows kept per call: a ListUsers of a million users must not grow the
// page without bound. The rest are counted.
export const MAX_RESPONSE_ROWS = 200;
export const MAX_TIMELINE_ROWS = 400;

const $ = (id) => document.getElementById(id);

export class Call {
  constructor({ method, pattern, metadata, timeoutMs, tls, auth }) {
    this.method = method;
    this.pattern = pattern;
    this.metadata = metadata;
    this.timeoutMs = timeoutMs;
    this.tls = tls;
    this.auth = auth;
    this.id = null;
    this.responses = [];
    this.responseCount = 0;
    this.timeline = [];
    this.timelineCount = 0;
    this.firstMessageAt = null;
    this.lastMessageAt = null;
    this.sentMessages = [];
    this.halfClosed = false;
    this.status = null;
    this.view = null;
  }

  get streaming() {
    return this.pattern === "client_streaming" || this.pattern === "bidi_streaming";
  }

  get open() {
    return this.status === null;
  }

  // An event of this call, from the bridge.
  apply(event) {
    if (event.type === "error") {
      this.view?.error(event.error);
      return;
    }
    this.timelineCount++;
    if (this.timeline.length < MAX_TIMELINE_ROWS) {
      this.timeline.push(event);
      this.view?.timelineRow(event);
    }
    if (event.type === "sent" && event.part === "message") this.sentMessages.push(event.message);
    if (event.type === "sent" && event.part === "end") this.halfClosed = true;
    if (event.type === "received" && event.part === "message") {
      this.responseCount++;
      this.firstMessageAt ??= event.t_ms;
      this.lastMessageAt = event.t_ms;
      if (this.responses.length < MAX_RESPONSE_ROWS) {
        this.responses.push(event);
        this.view?.responseRow(event, this, this.responses.length);
      }
    }
    if (event.type === "status") this.status = event;
    this.view?.update(this);
  }

  command() {
    return grpcurl({
      method: this.method,
      metadata: this.metadata,
      timeoutMs: this.timeoutMs,
      messages: this.sentMessages,
      streaming: this.streaming,
      tls: this.tls,
      auth: this.auth,
    });
  }

  rate() {
    if (this.responseCount < 2) return null;
    const span = (this.lastMessageAt - this.firstMessageAt) / 1000;
    return span > 0 ? (this.responseCount - 1) / span : null;
  }
}

// The result panel, showing one call at a time.
export class CallView {
  constructor(onButtons) {
    this.call = null;
    this.onButtons = onButtons;
    this.pending = false;
  }

  show(call) {
    if (this.call) this.call.view = null;
    this.call = call;
    $("result-empty").hidden = Boolean(call);
    $("result-body").hidden = !call;
    $("responses").replaceChildren();
    $("timeline").replaceChildren();
    $("request-error").textContent = "";
    if (!call) return;
    call.view = this;
    call.responses.forEach((event, i) => this.responseRow(event, call, i + 1));
    for (const event of call.timeline) this.timelineRow(event);
    this.render();
  }

  error(message) {
    $("request-error").textContent = message;
  }

  // The `n`th response: a line with its number, its kind (SyncUsers'
  // ack or change), its time and size, then the message as the editor
  // shows a request, indented.
  responseRow(event, call, n) {
    const list = $("responses");
    // A list scrolled to its end follows the stream; one scrolled back
    // stays where the learner is reading.
    const following = list.scrollHeight - list.scrollTop - list.clientHeight < 8;
    const row = document.createElement("li");
    const head = document.createElement("div");
    head.className = "response-head";
    const number = document.createElement("span");
    number.className = "n";
    number.textContent = `#${n}`;
    head.append(number);
    let message = event.message ?? { error: event.error };
    const keys = Object.keys(message);
    if (call.pattern === "bidi_streaming" && keys.length === 1) {
      // One of a oneof: its name as a tag.
      const tag = document.createElement("span");
      tag.className = `tag tag-${keys[0]}`;
      tag.textContent = keys[0];
      head.append(tag);
      message = message[keys[0]];
    }
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = `${event.t_ms.toFixed(1)} ms · ${event.size} B`;
    head.append(when);
    const body = document.createElement("pre");
    body.textContent = JSON.stringify(message, null, 2);
    row.append(head, body);
    list.append(row);
    if (following) list.scrollTop = list.scrollHeight;
  }

  timelineRow(event) {
    const row = document.createElement("tr");
    row.className = event.type === "sent" ? "out" : event.type === "status" ? "end" : "in";
    const dir = event.type === "sent" ? "→" : "←";
    let what;
    if (event.type === "status") {
      what = `status ${event.code_name}${event.local ? " (bridge)" : ""}`;
    } else {
      what = `${event.part}`;
      if (event.part === "message" && event.message) {
        const keys = Object.keys(event.message);
        if (keys.length === 1 && typeof event.message[keys[0]] === "object") what += ` (${keys[0]})`;
      }
    }
    const cells = [dir, what, event.t_ms === null ? "" : event.t_ms.toFixed(1), event.size ?? ""];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    row.firstChild.setAttribute("aria-label", event.type === "sent" ? "sent" : "received");
    $("timeline").append(row);
  }

  update() {
    // Coalesced: a fast stream updates the counters once a frame.
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  render() {
    const call = this.call;
    if (!call) return;
    const status = $("status");
    if (call.status) {
      const s = call.status;
      status.textContent = s.code === 0 ? "OK" : `${s.code_name}: ${s.message}`;
      status.className = `status ${s.code === 0 ? "ok" : "failed"}`;
      if (s.details && s.details.length) {
        const details = document.createElement("pre");
        details.className = "details";
        details.textContent = JSON.stringify(s.details, null, 2);
        status.append(details);
      }
    } else {
      status.textContent = call.halfClosed ? "waiting for the server…" : "open";
      status.className = "status open";
    }
    const hidden = call.responseCount - call.responses.length;
    const rate = call.rate();
    let counter = `${call.responseCount} message${call.responseCount === 1 ? "" : "s"}`;
    if (rate !== null) counter += ` · ${Math.round(rate).toLocaleString()}/s`;
    if (hidden > 0) counter += ` · ${hidden.toLocaleString()} more not shown`;
    $("counter").textContent = counter;
    const moreEvents = call.timelineCount - call.timeline.length;
    $("timeline-title").textContent = moreEvents > 0 ? `Timeline (${moreEvents.toLocaleString()} more events not shown)` : "Timeline";
    $("grpcurl").textContent = call.command();
    this.onButtons();
  }
}
