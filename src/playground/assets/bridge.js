// The WebSocket to the server's bridge: one per tab, calls multiplexed on
// it by id. See docs/playground.md for the protocol.

export class Bridge {
  constructor(onHello, onState) {
    this.onHello = onHello;
    this.onState = onState;
    this.handlers = new Map();
    this.nextId = 1;
    this.socket = null;
    this.ready = null;
  }

  // Opens the WebSocket unless it is open; resolves with the hello.
  connect() {
    if (this.ready) return this.ready;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws`);
    this.socket = socket;
    this.onState("connecting…");
    this.ready = new Promise((resolve, reject) => {
      socket.addEventListener("message", (message) => {
        let event;
        try {
          event = JSON.parse(message.data);
        } catch {
          return;
        }
        if (event.type === "hello") {
          this.onState("connected");
          this.onHello(event);
          resolve(event);
          return;
        }
        const handler = this.handlers.get(event.id);
        if (handler) {
          handler(event);
          if (event.type === "status") this.handlers.delete(event.id);
        } else if (event.type === "error") {
          console.warn("playground:", event.error);
        }
      });
      socket.addEventListener("close", (close) => {
        this.ready = null;
        const reason = close.reason ? `: ${close.reason}` : "";
        this.onState(`disconnected${reason}`);
        for (const [id, handler] of this.handlers) {
          handler({ type: "status", id, code: 14, code_name: "UNAVAILABLE",
            message: `the WebSocket closed${reason}`, details: [], local: true, t_ms: null });
        }
        this.handlers.clear();
        reject(new Error(`closed${reason}`));
      });
    });
    this.ready.catch(() => {});
    return this.ready;
  }

  // Starts a call; `handler` gets each of its events. Returns its id.
  async start(method, { metadata = {}, timeoutMs = null, message = undefined }, handler) {
    await this.connect();
    const id = this.nextId++;
    this.handlers.set(id, handler);
    const command = { type: "start", id, method, metadata };
    if (timeoutMs !== null) command.timeout_ms = timeoutMs;
    if (message !== undefined) command.message = message;
    this.send(command);
    return id;
  }

  // Asks for the services through a reflection call that carries
  // `metadata` (the token); `handler` gets a `catalogue` event when it
  // succeeds, then the call's status.
  async describe(metadata, handler) {
    await this.connect();
    const id = this.nextId++;
    this.handlers.set(id, handler);
    this.send({ type: "describe", id, metadata });
    return id;
  }

  send(command) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(command));
      return true;
    }
    return false;
  }
}
