//! One call from the page: a real gRPC call over HTTP/2, on the session's
//! in-memory connection into this server, and the events the page sees of
//! it.
//!
//! The call reads its response stream only while its last events have
//! found room in the session's queue: a tab that reads slowly leaves the
//! data in h2's flow-control window, unread and unacknowledged, and the
//! server's handler waits for it. Request messages go out as the server's
//! window lets them, while the response is read (a bidirectional call
//! needs both at once).

use std::{collections::VecDeque, future::poll_fn, task::Poll, time::Duration};

use bytes::{Buf as _, Bytes, BytesMut};
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{HeaderMap, HeaderValue};
use serde_json::{Map, Value, json};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::{Playground, schema::Method, session::Outgoing};
use crate::transport::Loopback;

/// Events of a call decoded ahead of the session's queue: at most one
/// DATA frame's worth of messages (h2's 16 KiB frames).
const MAX_PENDING_EVENTS: usize = 4;

/// The session's HTTP/2 connection into the server, opened when first
/// needed and again once it has gone away (at its maximum age, say).
pub(super) struct Connection {
    loopback: Loopback,
    sender: Option<SendRequest<Bytes>>,
}

impl Connection {
    pub(super) fn new(loopback: Loopback) -> Self {
        Connection {
            loopback,
            sender: None,
        }
    }

    /// A handle to open a stream on the connection.
    pub(super) async fn sender(&mut self) -> Result<SendRequest<Bytes>, h2::Error> {
        if let Some(sender) = &mut self.sender {
            // Refused once the server has sent GOAWAY or the pipe broke;
            // pending only while the connection is at its stream limit.
            let ready = poll_fn(|cx| Poll::Ready(sender.poll_ready(cx))).await;
            if !matches!(ready, Poll::Ready(Err(_))) {
                return Ok(sender.clone());
            }
        }
        let (sender, connection) = h2::client::handshake(self.loopback.connect()).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "playground bridge connection ended");
            }
        });
        self.sender = Some(sender.clone());
        Ok(sender)
    }
}

/// A request message: its bytes, and the JSON it was made from.
#[derive(Debug)]
pub(super) struct Message {
    pub bytes: Bytes,
    pub json: Value,
}

/// What the page sends a call once it is open.
#[derive(Debug)]
pub(super) enum Input {
    Message(Message),
    End,
}

/// What a call starts with.
pub(super) struct Request {
    pub method: Method,
    pub metadata: HeaderMap,
    pub timeout: Option<Duration>,
    /// The first message, sent with the headers.
    pub first: Option<Message>,
    /// Whether the request ends after `first` (unary, server streaming).
    pub end: bool,
}

/// One call, ready to run.
pub(super) struct Call {
    pub id: u64,
    pub request: Request,
    pub playground: Playground,
    pub sender: SendRequest<Bytes>,
    pub inputs: mpsc::Receiver<Input>,
    pub cancel: CancellationToken,
    pub events: mpsc::Sender<Outgoing>,
    pub deadline_grace: Duration,
}

/// The state of the response.
enum Response {
    Waiting(h2::client::ResponseFuture),
    Body(RecvStream),
    Trailers(RecvStream),
    Done,
}

impl Call {
    /// Runs the call until it has a status and the page has been sent it.
    pub(super) async fn run(self) {
        let Call {
            id,
            request,
            playground,
            mut sender,
            mut inputs,
            cancel,
            events,
            deadline_grace,
        } = self;
        let started = Instant::now();
        let mut out = Events {
            id,
            started,
            pending: VecDeque::new(),
        };
        let method = request.method.clone();
        let head = head(&request);
        let sent_headers = header_map_json(head.headers(), true);
        let size = header_list_size(head.headers());
        let opened = match poll_fn(|cx| sender.poll_ready(cx)).await {
            Ok(()) => sender.send_request(head, false),
            Err(err) => Err(err),
        };
        let (response, mut send) = match opened {
            Ok(opened) => opened,
            Err(err) => {
                let status =
                    local_status(Code::Unavailable, &format!("cannot open the call: {err}"));
                let _ = events.send(Outgoing::Event(out.event(status))).await;
                return;
            }
        };
        out.push(
            json!({ "type": "sent", "part": "headers", "size": size, "metadata": sent_headers }),
        );
        let mut outbound: VecDeque<Message> = request.first.into_iter().collect();
        let mut end_after = request.end;
        let mut half_closed = false;
        let mut response = Response::Waiting(response);
        let mut decoder = Decoder::new(playground.shared.max_message_size);
        // Flow-control credit to give back once the events it carried are
        // queued for the page.
        let mut owed = 0;
        let mut deadline = request
            .timeout
            .map(|timeout| Box::pin(tokio::time::sleep(timeout + deadline_grace)));
        loop {
            // The request's end goes out once every message before it has.
            if outbound.is_empty() && end_after && !half_closed {
                if send.send_data(Bytes::new(), true).is_ok() {
                    out.push(json!({ "type": "sent", "part": "end", "size": 0 }));
                }
                half_closed = true;
            }
            if matches!(response, Response::Done) && out.pending.is_empty() {
                return;
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    send.send_reset(h2::Reason::CANCEL);
                    let status = local_status(Code::Cancelled, "cancelled from the page");
                    let _ = events.send(Outgoing::Event(out.event(status))).await;
                    return;
                }
                () = async { deadline.as_mut().expect("set").await }, if deadline.is_some() && !matches!(response, Response::Done) => {
                    send.send_reset(h2::Reason::CANCEL);
                    let status = local_status(Code::DeadlineExceeded, "deadline exceeded (the server did not end the call in time)");
                    let _ = events.send(Outgoing::Event(out.event(status))).await;
                    return;
                }
                permit = events.reserve(), if !out.pending.is_empty() => {
                    let Ok(permit) = permit else { return };
                    let event = out.pending.pop_front().expect("not empty");
                    permit.send(Outgoing::Event(event));
                    if out.pending.is_empty() && owed > 0 {
                        if let Response::Body(body) = &mut response {
                            let _ = body.flow_control().release_capacity(owed);
                        }
                        owed = 0;
                    }
                }
                input = inputs.recv(), if outbound.is_empty() && !end_after && out.pending.len() < MAX_PENDING_EVENTS => {
                    match input {
                        Some(Input::Message(message)) => outbound.push_back(message),
                        // The session is gone, or the page ended the stream.
                        Some(Input::End) | None => end_after = true,
                    }
                }
                capacity = wait_for_capacity(&mut send), if !outbound.is_empty() && !half_closed && out.pending.len() < MAX_PENDING_EVENTS => {
                    if capacity.is_err() {
                        // The server ended the stream: what it says comes
                        // in the response.
                        outbound.clear();
                        end_after = true;
                        half_closed = true;
                        continue;
                    }
                    let message = outbound.pop_front().expect("not empty");
                    let frame = frame(&message.bytes);
                    let size = frame.len();
                    let last = outbound.is_empty() && end_after;
                    if send.send_data(frame, last).is_ok() {
                        out.push(json!({ "type": "sent", "part": "message", "size": size, "message": message.json }));
                        if last {
                            out.push(json!({ "type": "sent", "part": "end", "size": 0 }));
                            half_closed = true;
                        }
                    }
                }
                next = response.next(), if out.pending.is_empty() && !matches!(response, Response::Done) => {
                    match next {
                        Next::Head(head) => {
                            let (parts, body) = head.into_parts();
                            let trailers_only = body.is_end_stream();
                            out.push(json!({
                                "type": "received",
                                "part": if trailers_only { "trailers" } else { "headers" },
                                "size": header_list_size(&parts.headers),
                                "metadata": header_map_json(&parts.headers, false),
                                "http_status": parts.status.as_u16(),
                            }));
                            if trailers_only {
                                out.push(status_event(&playground, &parts.headers, parts.status));
                                response = Response::Done;
                            } else {
                                response = Response::Body(body);
                            }
                        }
                        Next::Data(data) => {
                            owed += data.len();
                            decoder.push(&data);
                            loop {
                                match decoder.next() {
                                    Ok(Some(message)) => {
                                        let size = message.len() + 5;
                                        let event = match playground.schema().decode(&method.output, &message) {
                                            Ok(json) => json!({ "type": "received", "part": "message", "size": size, "message": json }),
                                            Err(err) => json!({ "type": "received", "part": "message", "size": size, "error": err }),
                                        };
                                        out.push(event);
                                    }
                                    Ok(None) => break,
                                    Err(err) => {
                                        send.send_reset(h2::Reason::CANCEL);
                                        out.push(local_status(Code::ResourceExhausted, &err));
                                        response = Response::Done;
                                        break;
                                    }
                                }
                            }
                            if out.pending.is_empty() && owed > 0 {
                                if let Response::Body(body) = &mut response {
                                    let _ = body.flow_control().release_capacity(owed);
                                }
                                owed = 0;
                            }
                        }
                        Next::DataDone => {
                            if let Response::Body(body) = std::mem::replace(&mut response, Response::Done) {
                                response = Response::Trailers(body);
                            }
                        }
                        Next::Trailers(trailers) => {
                            let trailers = trailers.unwrap_or_default();
                            out.push(json!({
                                "type": "received",
                                "part": "trailers",
                                "size": header_list_size(&trailers),
                                "metadata": header_map_json(&trailers, false),
                            }));
                            out.push(status_event(&playground, &trailers, http::StatusCode::OK));
                            response = Response::Done;
                        }
                        Next::Broken(err) => {
                            let code = if err.reason() == Some(h2::Reason::CANCEL) { Code::Cancelled } else { Code::Unavailable };
                            out.push(local_status(code, &format!("the stream broke: {err}")));
                            response = Response::Done;
                        }
                    }
                }
            }
        }
    }
}

/// The next part of a response.
enum Next {
    Head(http::Response<RecvStream>),
    Data(Bytes),
    DataDone,
    Trailers(Option<HeaderMap>),
    Broken(h2::Error),
}

impl Response {
    async fn next(&mut self) -> Next {
        let result = match self {
            Response::Waiting(future) => future.await.map(Next::Head),
            Response::Body(body) => match body.data().await {
                Some(data) => data.map(Next::Data),
                None => Ok(Next::DataDone),
            },
            Response::Trailers(body) => body.trailers().await.map(Next::Trailers),
            Response::Done => std::future::pending().await,
        };
        result.unwrap_or_else(Next::Broken)
    }
}

/// Ready once the stream may send at least one byte.
async fn wait_for_capacity(send: &mut SendStream<Bytes>) -> Result<(), ()> {
    send.reserve_capacity(1);
    poll_fn(|cx| {
        if send.capacity() > 0 {
            return Poll::Ready(Ok(()));
        }
        match send.poll_capacity(cx) {
            Poll::Ready(Some(Ok(_))) => Poll::Ready(Ok(())),
            Poll::Ready(Some(Err(_)) | None) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The events of one call, in order, each with its time since the start.
struct Events {
    id: u64,
    started: Instant,
    pending: VecDeque<Value>,
}

impl Events {
    fn event(&self, mut event: Value) -> Value {
        event["id"] = self.id.into();
        let elapsed = self.started.elapsed().as_secs_f64() * 1000.0;
        event["t_ms"] = ((elapsed * 1000.0).round() / 1000.0).into();
        event
    }

    fn push(&mut self, event: Value) {
        let event = self.event(event);
        self.pending.push_back(event);
    }
}

/// A request message as gRPC sends it: uncompressed, its length, itself.
pub(super) fn frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.extend_from_slice(&[0]);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame.freeze()
}

/// gRPC messages out of a response's DATA frames.
pub(super) struct Decoder {
    buffer: BytesMut,
    max: usize,
}

impl Decoder {
    pub(super) fn new(max: usize) -> Self {
        Decoder {
            buffer: BytesMut::new(),
            max,
        }
    }

    /// Adds what a DATA frame carried.
    pub(super) fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    /// The next whole message, `None` until one is in, or why the stream
    /// cannot be read.
    pub(super) fn next(&mut self) -> Result<Option<Bytes>, String> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        if self.buffer[0] != 0 {
            return Err("a compressed message, which the playground did not ask for".into());
        }
        let len = u32::from_be_bytes(self.buffer[1..5].try_into().expect("4 bytes")) as usize;
        if len > self.max {
            return Err(format!(
                "a message of {len} bytes, over the limit of {}",
                self.max
            ));
        }
        if self.buffer.len() < 5 + len {
            return Ok(None);
        }
        self.buffer.advance(5);
        Ok(Some(self.buffer.split_to(len).freeze()))
    }
}

/// The request's head: the method's path, gRPC's headers, the deadline as
/// `grpc-timeout`, the page's metadata.
pub(super) fn head(request: &Request) -> http::Request<()> {
    let mut head = http::Request::new(());
    *head.method_mut() = http::Method::POST;
    *head.uri_mut() = request
        .method
        .path
        .parse()
        .expect("method paths are valid URIs");
    let headers = head.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    headers.insert(
        "user-agent",
        HeaderValue::from_static("user-service-playground"),
    );
    if let Some(timeout) = request.timeout {
        headers.insert("grpc-timeout", grpc_timeout(timeout));
    }
    headers.extend(request.metadata.clone());
    head
}

/// A `grpc-timeout` value: at most 8 digits, in the finest unit that fits.
fn grpc_timeout(timeout: Duration) -> HeaderValue {
    let millis = timeout.as_millis();
    let value = if millis < 100_000_000 {
        format!("{millis}m")
    } else {
        format!("{}S", (timeout.as_secs()).min(99_999_999))
    };
    HeaderValue::from_str(&value).expect("digits and a unit")
}

/// The size of a header block as HTTP/2 counts it (RFC 9113, 6.5.2): each
/// field's name and value, plus 32.
fn header_list_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

/// Headers as the page shows them; a request's `authorization` masked.
fn header_map_json(headers: &HeaderMap, mask: bool) -> Value {
    let mut map = Map::new();
    for (name, value) in headers {
        let text = if mask && name == "authorization" {
            "Bearer ••••••".to_owned()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        match map.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&text);
            }
            _ => {
                map.insert(name.as_str().to_owned(), Value::String(text));
            }
        }
    }
    Value::Object(map)
}

/// The status a call ended with, from its trailers (or its Trailers-Only
/// head), with the error details decoded.
pub(super) fn status_event(
    playground: &Playground,
    trailers: &HeaderMap,
    http: http::StatusCode,
) -> Value {
    let status = tonic::Status::from_header_map(trailers).unwrap_or_else(|| {
        // No grpc-status: as gRPC's HTTP mapping says.
        let code = match http.as_u16() {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502..=504 => Code::Unavailable,
            200 => Code::Unknown,
            _ => Code::Unknown,
        };
        tonic::Status::new(code, format!("no grpc-status (HTTP {http})"))
    });
    let details = if status.details().is_empty() {
        Vec::new()
    } else {
        playground
            .schema()
            .status_details(status.details())
            .unwrap_or_else(|err| vec![json!({ "error": err })])
    };
    json!({
        "type": "status",
        "code": status.code() as i32,
        "code_name": code_name(status.code()),
        "message": status.message(),
        "details": details,
    })
}

/// A status the bridge decided itself (the page cancelled, the deadline
/// passed without the server ending the call, the stream broke).
pub(super) fn local_status(code: Code, message: &str) -> Value {
    json!({
        "type": "status",
        "code": code as i32,
        "code_name": code_name(code),
        "message": message,
        "details": [],
        "local": true,
    })
}

/// The name gRPC's documentation gives a code: `NOT_FOUND`.
pub(super) fn code_name(code: Code) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_fit_in_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(grpc_timeout(Duration::MAX), "99999999S");
    }

    #[test]
    fn messages_come_out_whole_and_bounded() {
        let mut decoder = Decoder::new(8);
        decoder.buffer.extend_from_slice(&[0, 0, 0, 0, 2, b'h']);
        assert_eq!(decoder.next(), Ok(None));
        decoder.buffer.extend_from_slice(&[b'i', 0, 0, 0, 0, 0]);
        assert_eq!(decoder.next(), Ok(Some(Bytes::from_static(b"hi"))));
        assert_eq!(decoder.next(), Ok(Some(Bytes::new())));
        decoder.buffer.extend_from_slice(&[0, 0, 0, 0, 9]);
        assert!(decoder.next().unwrap_err().contains("over the limit"));
    }

    #[test]
    fn code_names_are_grpcs() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }
}
