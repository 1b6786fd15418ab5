//! One WebSocket: the page's commands in, its calls' events out (the
//! protocol is in the module documentation of `playground`).
//!
//! The session is one task: it reads the page's commands and writes the
//! events of its calls, each call running in a task of its own that the
//! session owns (they end with it). Every queue between them is bounded:
//! the events of all calls share [`EVENT_QUEUE`], and a call stops reading
//! its response stream while it cannot queue; a call's requests wait in
//! [`SEND_QUEUE`].

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc::{self, error::TrySendError},
    task::JoinSet,
    time::Instant,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
    },
};
use tokio_util::sync::CancellationToken;

use super::{
    DEADLINE_GRACE, EVENT_QUEUE, MAX_CALLS_PER_WEBSOCKET, MAX_METADATA_BYTES, MAX_WEBSOCKET_FRAME,
    MAX_WEBSOCKET_MESSAGE, Playground, SEND_QUEUE, WEBSOCKET_IDLE, WEBSOCKET_SEND_TIMEOUT,
    call::{self, Call, Request},
    describe,
    schema::Method,
};
use crate::transport::Loopback;

/// How long the close frame may take once the session has ended.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What goes to the page.
#[derive(Debug)]
pub(super) enum Outgoing {
    Event(Value),
    Close(CloseCode, String),
}

/// A command from the page.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Command {
    Start {
        id: u64,
        method: String,
        #[serde(default)]
        metadata: Map<String, Value>,
        #[serde(default)]
        timeout_ms: Option<u64>,
        #[serde(default)]
        message: Option<Value>,
    },
    Send {
        id: u64,
        message: Value,
    },
    End {
        id: u64,
    },
    Cancel {
        id: u64,
    },
    Describe {
        id: u64,
        #[serde(default)]
        metadata: Map<String, Value>,
    },
}

/// What the session keeps of an open call.
struct OpenCall {
    method: Method,
    requests: mpsc::Sender<call::Input>,
    cancel: CancellationToken,
    half_closed: bool,
}

/// What the session's loop keeps between commands.
struct State {
    /// The calls open, by the page's id.
    open: HashMap<u64, OpenCall>,
    /// Their tasks, each returning its id when it ends.
    calls: JoinSet<u64>,
    connection: call::Connection,
    /// The server is shutting down: no new call.
    closing: bool,
    /// Whether the page may be told about the services' types: always
    /// without a token; with one, once a describe with it has succeeded.
    /// Until then a request that does not fit its type is refused without
    /// naming fields, which would describe the types piece by piece.
    described: bool,
}

/// One WebSocket session, and what its calls need.
pub(super) struct Session {
    pub playground: Playground,
    pub loopback: Loopback,
    pub client: SocketAddr,
    pub tls: bool,
    pub max_idle: Option<Duration>,
    pub stop: CancellationToken,
}

impl Session {
    /// Runs the session on `io`, the connection after its `101`, until the
    /// page closes it, it is idle, it breaks, or the server shuts down.
    pub(super) async fn run<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_WEBSOCKET_MESSAGE))
            .max_frame_size(Some(MAX_WEBSOCKET_FRAME))
            // Each event is written and flushed on its own: the queue is
            // where events wait, not a buffer in the socket's writer.
            .write_buffer_size(0)
            .max_write_buffer_size(4 * MAX_WEBSOCKET_MESSAGE);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let (mut sink, mut stream) = ws.split();
        let (events, mut outgoing) = mpsc::channel(EVENT_QUEUE);
        let client = self.client;
        tracing::debug!(
            client.address = %client.ip(),
            client.port = client.port(),
            "playground WebSocket open"
        );
        let writer = async {
            while let Some(out) = outgoing.recv().await {
                let (message, last) = match out {
                    Outgoing::Event(event) => (Message::text(event.to_string()), false),
                    Outgoing::Close(code, reason) => (
                        Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })),
                        true,
                    ),
                };
                match tokio::time::timeout(WEBSOCKET_SEND_TIMEOUT, sink.send(message)).await {
                    Ok(Ok(())) if !last => {}
                    Ok(Ok(())) => return,
                    Ok(Err(err)) => {
                        tracing::debug!(%err, "playground WebSocket write failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(
                            client.address = %client.ip(),
                            client.port = client.port(),
                            "playground WebSocket not read in time; closing it"
                        );
                        return;
                    }
                }
            }
        };
        let reader = self.read(&mut stream, events);
        tokio::pin!(writer, reader);
        tokio::select! {
            () = &mut writer => return,
            () = &mut reader => {}
        }
        // The calls are gone with the reader; the writer sends what they
        // queued, then the close frame, if the browser still reads.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer).await;
    }

    /// Reads the page's commands until the session ends; ends the calls
    /// (dropping them resets their streams) when it returns.
    async fn read<S>(&self, stream: &mut S, events: mpsc::Sender<Outgoing>)
    where
        S: futures::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    {
        let shared = &self.playground.shared;
        let mut hello = json!({
            "type": "hello",
            "auth": shared.auth,
            "tls": self.tls,
            "limits": {
                "calls_per_websocket": MAX_CALLS_PER_WEBSOCKET,
                "websocket_message_bytes": MAX_WEBSOCKET_MESSAGE,
                "metadata_bytes": MAX_METADATA_BYTES,
            },
        });
        // With a token required there is none: the services are described
        // only to a page that shows the token (`describe`), as reflection
        // describes them only to a client that does.
        if let Some(catalogue) = &shared.catalogue {
            hello["catalogue"] = catalogue.clone();
        }
        if events.send(Outgoing::Event(hello)).await.is_err() {
            return;
        }
        let mut state = State {
            open: HashMap::new(),
            calls: JoinSet::new(),
            connection: call::Connection::new(self.loopback.clone()),
            closing: false,
            described: !shared.auth,
        };
        let idle_limit = self
            .max_idle
            .map_or(WEBSOCKET_IDLE, |max| max.min(WEBSOCKET_IDLE));
        let idle = tokio::time::sleep(idle_limit);
        tokio::pin!(idle);
        let close = |code, reason: &str| Outgoing::Close(code, reason.to_owned());
        let ending = loop {
            tokio::select! {
                message = stream.next() => {
                    idle.as_mut().reset(Instant::now() + idle_limit);
                    let text = match message {
                        None => break None,
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Binary(_))) => {
                            let error = error_event(None, "binary messages are not part of the protocol: send JSON text");
                            if events.send(Outgoing::Event(error)).await.is_err() {
                                break None;
                            }
                            continue;
                        }
                        // tungstenite answers pings itself.
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Ok(Message::Close(_))) => break None,
                        Some(Err(err)) => break broken(&err),
                    };
                    let command = match parse(&text) {
                        Ok(command) => command,
                        Err(error) => {
                            if events.send(Outgoing::Event(error)).await.is_err() {
                                break None;
                            }
                            continue;
                        }
                    };
                    let outcome = self.command(command, &mut state, &events).await;
                    if let Err(error) = outcome
                        && events.send(Outgoing::Event(error)).await.is_err()
                    {
                        break None;
                    }
                }
                Some(ended) = state.calls.join_next(), if !state.calls.is_empty() => {
                    if let Ok(id) = ended {
                        state.open.remove(&id);
                    }
                    if state.closing && state.calls.is_empty() {
                        break Some(close(CloseCode::Away, "the server is shutting down"));
                    }
                    idle.as_mut().reset(Instant::now() + idle_limit);
                }
                () = &mut idle, if state.calls.is_empty() => {
                    tracing::debug!(
                        client.address = %self.client.ip(),
                        client.port = self.client.port(),
                        "playground WebSocket idle; closing it"
                    );
                    break Some(close(CloseCode::Away, "idle"));
                }
                () = self.stop.cancelled(), if !state.closing => {
                    // Open calls end as the server ends every call at
                    // shutdown; then the WebSocket closes.
                    state.closing = true;
                    if state.calls.is_empty() {
                        break Some(close(CloseCode::Away, "the server is shutting down"));
                    }
                }
            }
        };
        drop(state);
        if let Some(ending) = ending {
            let _ = events.send(ending).await;
        }
    }

    /// Carries out one command; `Err` is the error event to send.
    async fn command(
        &self,
        command: Command,
        state: &mut State,
        events: &mpsc::Sender<Outgoing>,
    ) -> Result<(), Value> {
        let schema = self.playground.schema();
        let State {
            open,
            calls,
            connection,
            closing,
            described,
        } = state;
        match command {
            Command::Start {
                id,
                method,
                metadata,
                timeout_ms,
                message,
            } => {
                let fail = |error: String| error_event(Some(id), &error);
                if *closing {
                    return Err(fail("the server is shutting down".into()));
                }
                if open.contains_key(&id) {
                    return Err(fail(format!("call {id} is already open")));
                }
                if open.len() >= MAX_CALLS_PER_WEBSOCKET {
                    return Err(fail(format!(
                        "{MAX_CALLS_PER_WEBSOCKET} calls are open on this WebSocket, the most it may have: end or cancel one first"
                    )));
                }
                let Some(method) = schema.method(&method).cloned() else {
                    return Err(fail(format!(
                        "unknown method {method:?}: the playground calls this server's own methods only (grpcUser.UserService, grpc.health.v1.Health, grpc.reflection.v1.ServerReflection)"
                    )));
                };
                let headers = metadata_headers(&metadata).map_err(fail)?;
                let first = match message {
                    Some(message) => Some(encode(self, &method, id, &message, *described)?),
                    None if method.client_streaming => None,
                    None => {
                        return Err(fail(format!(
                            "{} takes one request message: give it in start",
                            method.path
                        )));
                    }
                };
                let timeout = timeout_ms.map(Duration::from_millis);
                let sender = connection.sender().await.map_err(|err| {
                    fail(format!("cannot open the connection into the server: {err}"))
                })?;
                let (requests, inputs) = mpsc::channel(SEND_QUEUE);
                let cancel = CancellationToken::new();
                let call = Call {
                    id,
                    request: Request {
                        method: method.clone(),
                        metadata: headers,
                        timeout,
                        first,
                        end: !method.client_streaming,
                    },
                    playground: self.playground.clone(),
                    sender,
                    inputs,
                    cancel: cancel.clone(),
                    events: events.clone(),
                    deadline_grace: DEADLINE_GRACE,
                };
                calls.spawn(async move {
                    call.run().await;
                    id
                });
                open.insert(
                    id,
                    OpenCall {
                        half_closed: !method.client_streaming,
                        method,
                        requests,
                        cancel,
                    },
                );
                Ok(())
            }
            Command::Send { id, message } => {
                let call = find(open, id)?;
                if call.half_closed {
                    return Err(error_event(
                        Some(id),
                        &if call.method.client_streaming {
                            "the request stream is ended: no more messages".to_owned()
                        } else {
                            format!(
                                "{} takes one request message, sent with start",
                                call.method.path
                            )
                        },
                    ));
                }
                let encoded = encode(self, &call.method, id, &message, *described)?;
                call.requests
                    .try_send(call::Input::Message(encoded))
                    .map_err(|err| match err {
                        TrySendError::Full(_) => error_event(
                            Some(id),
                            &format!("{SEND_QUEUE} messages are waiting for the server to read them: wait for them to go"),
                        ),
                        TrySendError::Closed(_) => error_event(Some(id), &format!("call {id} has ended")),
                    })
            }
            Command::End { id } => {
                let call = find(open, id)?;
                if call.half_closed {
                    return Err(error_event(Some(id), "the request stream is already ended"));
                }
                call.half_closed = true;
                // Queued behind the messages, which go out first.
                let requests = call.requests.clone();
                match requests.try_send(call::Input::End) {
                    Ok(()) => Ok(()),
                    Err(TrySendError::Full(_)) => {
                        call.half_closed = false;
                        Err(error_event(
                            Some(id),
                            "messages are still waiting for the server to read them: end the stream once they have gone",
                        ))
                    }
                    Err(TrySendError::Closed(_)) => {
                        Err(error_event(Some(id), &format!("call {id} has ended")))
                    }
                }
            }
            Command::Cancel { id } => {
                find(open, id)?.cancel.cancel();
                Ok(())
            }
            Command::Describe { id, metadata } => {
                let fail = |error: String| error_event(Some(id), &error);
                if *closing {
                    return Err(fail("the server is shutting down".into()));
                }
                if open.contains_key(&id) {
                    return Err(fail(format!("call {id} is already open")));
                }
                let headers = metadata_headers(&metadata).map_err(fail)?;
                let sender = connection.sender().await.map_err(|err| {
                    fail(format!("cannot open the connection into the server: {err}"))
                })?;
                // Awaited here: one describe at a time, and commands wait
                // for it (a few milliseconds; at most its deadline).
                let answer = describe::list_services(&self.playground, sender, headers).await;
                if let Some(services) = answer.services {
                    *described = true;
                    let catalogue = schema.catalogue(|name| services.iter().any(|s| s == name));
                    let event = json!({ "type": "catalogue", "id": id, "catalogue": catalogue });
                    if events.send(Outgoing::Event(event)).await.is_err() {
                        return Ok(());
                    }
                }
                let mut status = answer.status;
                status["id"] = id.into();
                let _ = events.send(Outgoing::Event(status)).await;
                Ok(())
            }
        }
    }
}

fn find(open: &mut HashMap<u64, OpenCall>, id: u64) -> Result<&mut OpenCall, Value> {
    open.get_mut(&id)
        .ok_or_else(|| error_event(Some(id), &format!("no open call {id}")))
}

/// A request message of `method`, encoded with what it was made of. A
/// message that does not fit its type is named by field only when the page
/// may be told about the types (`described`).
fn encode(
    session: &Session,
    method: &Method,
    id: u64,
    message: &Value,
    described: bool,
) -> Result<call::Message, Value> {
    match session.playground.schema().encode(&method.input, message) {
        Ok(bytes) => Ok(call::Message {
            bytes: Bytes::from(bytes),
            json: message.clone(),
        }),
        Err(_) if !described => Err(error_event(
            Some(id),
            "nothing sent: the message does not fit the method's request type; \
             the types are described once the token is given (describe)",
        )),
        Err(invalid) => {
            let mut error = error_event(Some(id), &format!("nothing sent: {invalid}"));
            error["field"] = Value::String(invalid.field);
            Err(error)
        }
    }
}

/// The command in `text`, or the error event saying why it is not one.
fn parse(text: &str) -> Result<Command, Value> {
    let value: Value =
        serde_json::from_str(text).map_err(|err| error_event(None, &format!("not JSON: {err}")))?;
    let id = value.get("id").and_then(Value::as_u64);
    serde_json::from_value(value)
        .map_err(|err| error_event(id, &format!("not a command of the protocol: {err}")))
}

pub(super) fn error_event(id: Option<u64>, error: &str) -> Value {
    let mut event = json!({ "type": "error", "error": error });
    if let Some(id) = id {
        event["id"] = id.into();
    }
    event
}

/// The close frame for a WebSocket that broke the protocol or a limit;
/// `None` when the connection is simply gone.
fn broken(err: &tungstenite::Error) -> Option<Outgoing> {
    use tungstenite::error::{CapacityError, Error};
    tracing::debug!(%err, "playground WebSocket read failed");
    let (code, reason) = match err {
        Error::Capacity(CapacityError::MessageTooLong { .. }) => (
            CloseCode::Size,
            format!("message larger than {MAX_WEBSOCKET_MESSAGE} bytes"),
        ),
        Error::Capacity(err) => (CloseCode::Size, err.to_string()),
        Error::Protocol(err) => (
            CloseCode::Protocol,
            format!("WebSocket protocol error: {err}"),
        ),
        Error::Utf8(_) => (CloseCode::Invalid, "text message is not UTF-8".into()),
        _ => return None,
    };
    Some(Outgoing::Close(code, reason))
}

/// The page's metadata as request headers, or why it cannot be sent: names
/// must be lowercase header names that gRPC leaves to applications (not
/// `grpc-*`, not the pseudo-headers or the ones gRPC itself sets), values
/// printable ASCII (base64 for `-bin` names), all within
/// [`MAX_METADATA_BYTES`].
fn metadata_headers(metadata: &Map<String, Value>) -> Result<HeaderMap, String> {
    const RESERVED: [&str; 8] = [
        "content-type",
        "te",
        "host",
        "connection",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "content-length",
    ];
    let mut headers = HeaderMap::new();
    let mut total = 0;
    for (name, value) in metadata {
        let Value::String(value) = value else {
            return Err(format!("metadata {name:?}: the value must be a string"));
        };
        total += name.len() + value.len();
        if total > MAX_METADATA_BYTES {
            return Err(format!("metadata over {MAX_METADATA_BYTES} bytes"));
        }
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !valid_name {
            return Err(format!(
                "metadata {name:?}: a name is lowercase letters, digits, '-', '_' and '.'"
            ));
        }
        if name.starts_with("grpc-") || RESERVED.contains(&name.as_str()) {
            return Err(format!("metadata {name:?}: reserved for gRPC itself"));
        }
        let valid_value = if name.ends_with("-bin") {
            value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
        } else {
            value.bytes().all(|b| (0x20..0x7f).contains(&b))
        };
        if !valid_value {
            return Err(format!(
                "metadata {name:?}: the value must be printable ASCII (base64 for a -bin name)"
            ));
        }
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|err| err.to_string())?;
        let value = HeaderValue::from_str(value).map_err(|err| err.to_string())?;
        headers.append(name, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect()
    }

    #[test]
    fn metadata_is_checked_before_anything_is_sent() {
        let ok = metadata_headers(&metadata(&[("x-demo", "1"), ("authorization", "Bearer t")]));
        assert_eq!(ok.unwrap().len(), 2);
        for (name, value, says) in [
            ("X-Demo", "1", "lowercase"),
            ("grpc-timeout", "1S", "reserved"),
            ("content-type", "text/plain", "reserved"),
            ("x-demo", "line\nbreak", "printable"),
            ("x-demo-bin", "not base64!", "base64"),
            ("", "1", "lowercase"),
        ] {
            let err = metadata_headers(&metadata(&[(name, value)])).unwrap_err();
            assert!(err.contains(says), "{name}: {err}");
        }
        let long = "v".repeat(MAX_METADATA_BYTES);
        assert!(metadata_headers(&metadata(&[("x-long", &long)])).is_err());
    }

    #[test]
    fn commands_parse_and_bad_ones_say_why() {
        assert!(matches!(
            parse(r#"{"type": "cancel", "id": 3}"#),
            Ok(Command::Cancel { id: 3 })
        ));
        let error = parse("{not json").unwrap_err();
        assert!(error["error"].as_str().unwrap().starts_with("not JSON"));
        let error = parse(r#"{"type": "sned", "id": 4}"#).unwrap_err();
        assert_eq!(error["id"], 4);
        assert!(error["error"].as_str().unwrap().contains("sned"), "{error}");
        let error = parse(r#"{"type": "end", "id": 4, "extra": 1}"#).unwrap_err();
        assert!(
            error["error"].as_str().unwrap().contains("extra"),
            "{error}"
        );
    }
}
