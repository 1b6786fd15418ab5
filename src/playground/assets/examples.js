// A valid first request for each method, and what happens on the wire in
// each pattern, in the voice of docs/patterns.md.

export const EXAMPLES = {
  "grpcUser.UserService/AddUser": { first_name: "Ada", last_name: "Lovelace", address: "London", verified: true },
  "grpcUser.UserService/GetUser": { id: "ada" },
  "grpcUser.UserService/ListUsers": { limit: 100 },
  "grpcUser.UserService/BulkAddUsers": { first_name: "Grace", last_name: "Hopper", address: "Arlington" },
  "grpcUser.UserService/SyncUsers": { request_id: 1, upsert: { id: "ada", first_name: "Ada", last_name: "Lovelace" } },
  "grpc.health.v1.Health/Check": { service: "grpcUser.UserService" },
  "grpc.health.v1.Health/Watch": { service: "" },
  "grpc.reflection.v1.ServerReflection/ServerReflectionInfo": { list_services: "" },
};

export const PATTERNS = {
  unary: {
    title: "Unary",
    wire: "One request, one reply, like a function call. The client sends its headers, one message and half-closes; the server answers with headers, one message and trailers carrying the status — or, for an error, a single HEADERS frame that is the status (Trailers-Only).",
  },
  server_streaming: {
    title: "Server streaming",
    wire: "One request, then a stream of replies. The server sends each message as soon as it has it; HTTP/2 flow control makes it wait when the client reads slowly. The trailers come after the last message.",
  },
  client_streaming: {
    title: "Client streaming",
    wire: "A stream of requests, then one reply. Each Send is one message on the open stream; End stream half-closes it, and only then does the server answer with its one message and the status.",
  },
  bidi_streaming: {
    title: "Bidirectional",
    wire: "Two independent streams on one call. Each Send goes out now; replies come whenever the server has them — here an Ack for each request and a Change for every write by any client — until one side ends.",
  },
};

// A message of `type` from the catalogue's fields, when there is no
// example: every scalar at a plausible value.
export function sample(type, messages, depth = 0) {
  const message = messages[type];
  const out = {};
  if (!message || depth > 2) return out;
  const seenOneofs = new Set();
  for (const field of message.fields) {
    if (field.oneof) {
      if (seenOneofs.has(field.oneof)) continue;
      seenOneofs.add(field.oneof);
    }
    let value;
    if (field.kind === "message") value = sample(field.type, messages, depth + 1);
    else if (field.kind === "enum") value = field.values[0];
    else if (field.type === "string") value = "";
    else if (field.type === "bool") value = false;
    else if (field.type === "bytes") value = "";
    else value = 0;
    out[field.name] = field.repeated ? [] : value;
  }
  return out;
}
