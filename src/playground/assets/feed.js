// The live feed (a SyncUsers stream that only listens) and the server's
// health (a health Watch): two calls the page keeps open for itself.

// Changes kept in the panel; older ones drop off the end.
const MAX_FEED_ROWS = 100;

const $ = (id) => document.getElementById(id);

export class Feed {
  constructor(bridge, metadata) {
    this.bridge = bridge;
    this.metadata = metadata;
    this.id = null;
    this.count = 0;
    $("feed-restart").addEventListener("click", () => this.start());
  }

  async start() {
    if (this.id !== null) this.bridge.send({ type: "cancel", id: this.id });
    $("feed-restart").hidden = true;
    $("feed-status").textContent = "watching every change…";
    try {
      this.id = await this.bridge.start("grpcUser.UserService/SyncUsers",
        { metadata: this.metadata() }, (event) => this.event(event));
    } catch (err) {
      $("feed-status").textContent = `not connected: ${err.message}`;
      $("feed-restart").hidden = false;
    }
  }

  event(event) {
    if (event.type === "received" && event.part === "message" && event.message.change) {
      const change = event.message.change;
      const user = change.user ?? {};
      this.count++;
      const row = document.createElement("li");
      row.className = `change ${String(change.kind).toLowerCase()}`;
      const seq = document.createElement("span");
      seq.className = "seq";
      seq.textContent = `#${change.seq}`;
      const kind = document.createElement("span");
      kind.className = "kind";
      kind.textContent = change.kind;
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = `${user.id ?? ""} ${[user.firstName, user.lastName].filter(Boolean).join(" ")}`;
      row.append(seq, kind, who);
      const list = $("feed");
      list.prepend(row);
      while (list.children.length > MAX_FEED_ROWS) list.lastChild.remove();
      $("feed-status").textContent = `watching: ${this.count.toLocaleString()} change${this.count === 1 ? "" : "s"} seen`;
    } else if (event.type === "status") {
      this.id = null;
      $("feed-status").textContent = `feed ended: ${event.code_name}${event.message ? ` (${event.message})` : ""}`;
      $("feed-restart").hidden = false;
    }
  }
}

export async function watchHealth(bridge) {
  const badge = $("health");
  const show = (text, ok) => {
    badge.textContent = `health: ${text}`;
    badge.className = `badge ${ok ? "ok" : "failed"}`;
  };
  try {
    await bridge.start("grpc.health.v1.Health/Watch", { message: { service: "" } }, (event) => {
      if (event.type === "received" && event.part === "message") {
        const status = event.message.status ?? "UNKNOWN";
        show(status, status === "SERVING");
      } else if (event.type === "status") {
        show(event.code === 0 ? "ended" : event.code_name, false);
      }
    });
  } catch {
    show("unknown", false);
  }
}
