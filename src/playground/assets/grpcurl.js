// The grpcurl command that does what the learner just did.

function quote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

// `call`: { method, metadata, timeoutMs, messages (sent, in order),
// streaming (client side), tls, auth }.
export function grpcurl(call) {
  const parts = ["grpcurl"];
  if (!call.tls) parts.push("-plaintext");
  if (call.auth) parts.push('-H "authorization: Bearer $(cat token)"');
  for (const [name, value] of Object.entries(call.metadata)) {
    if (name === "authorization") continue;
    parts.push(`-H ${quote(`${name}: ${value}`)}`);
  }
  if (call.timeoutMs !== null) parts.push(`-max-time ${call.timeoutMs / 1000}`);
  const target = `${location.host} ${call.method}`;
  if (!call.streaming) {
    const message = call.messages[0] ?? {};
    parts.push(`-d ${quote(JSON.stringify(message))}`);
    return `${parts.join(" ")} \\\n  ${target}`;
  }
  parts.push("-d @");
  const lines = call.messages.map((m) => JSON.stringify(m));
  return `${parts.join(" ")} \\\n  ${target} <<'EOF'\n${lines.join("\n")}${lines.length ? "\n" : ""}EOF`;
}
