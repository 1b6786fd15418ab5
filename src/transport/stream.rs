//! One call: an HTTP/2 stream handed to the service and its reply sent back.
//!
//! [`serve`] reads nothing itself: the service reads the request through
//! [`RequestBody`], which gives HTTP/2 flow-control credit back as it goes,
//! so a handler that stops reading stops the client. It sends the response
//! head, then pipes the body's frames out under the client's flow control,
//! and ends the stream with the body's trailers.
//!
//! Two details matter to clients other than our own:
//! - A reply without a body (every error status, as tonic builds it) goes
//!   out as one HEADERS frame with END_STREAM: gRPC's Trailers-Only form.
//!   grpc-go and grpcio read the status only from that form or from real
//!   trailers; a HEADERS frame followed by an empty DATA frame loses it.
//! - A reply that ends before the client has finished sending (a call
//!   refused before its body is read, a stream ended early) does not reset
//!   the stream: the rest of the request is read and discarded, within
//!   bounds, until the client's END_STREAM. Each reset would count towards
//!   h2's limit on streams the server resets (`max_local_error_reset_streams`)
//!   once the client's late frames arrive, and a client whose calls are
//!   rejected by the thousand would have its whole connection torn down.

use std::{
    future::poll_fn,
    net::SocketAddr,
    pin::{Pin, pin},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tonic::Status;

use super::{CallService, ResponseBody};

/// The error type of bodies the server sends.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Longest a finished call waits for the rest of its request before the
/// stream is reset. A client that sees the reply stops sending; what it had
/// already sent arrives within a round trip.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Most request bytes discarded after the reply: about one stream window.
/// A client that keeps sending past that is not finishing, and gets a reset.
pub const DRAIN_MAX_BYTES: usize = 1024 * 1024;

/// Longest a call whose client reset the stream (or whose connection is
/// gone) before the reply head goes on running, to finish with what it
/// received; then it is cancelled.
pub const ABANDONED_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one call: hands `request` to `service` and sends its response on
/// `respond`, then reads what is left of the request (see the module
/// documentation). Returns when the stream is done, or when the client reset
/// it and the call has ended; dropping the future cancels the call.
pub async fn serve<S, B>(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    mut service: S,
) where
    S: CallService<B>,
    B: ResponseBody,
{
    // For the log lines of the call.
    let client = super::client_addr(request.extensions());
    let (parts, recv) = request.into_parts();
    let (body, mut returned) = RequestBody::new(recv);
    let request = http::Request::from_parts(parts, body);

    // The handler runs until it returns the response head, unless the
    // client resets the stream first (a cancelled call).
    let call = async {
        poll_fn(|cx| service.poll_ready(cx)).await?;
        service.call(request).await
    };
    let mut call = pin!(call);
    let response = tokio::select! {
        biased;
        Ok(response) = &mut call => response,
        // Reset by the client, or the connection is gone. No one will read
        // the reply, but the call gets a moment to end on its own: its
        // request body now fails after the data already received, so a
        // handler reading it stops there (an import commits the rows it
        // had received). Past that moment it is cancelled.
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            let _ = tokio::time::timeout(ABANDONED_CALL_TIMEOUT, call).await;
            return;
        }
    };

    let (head, body) = response.into_parts();
    let head = http::Response::from_parts(head, ());
    if body.is_end_stream() {
        // Trailers-Only: the status is in the head, in one frame. The body
        // goes now, not after the drain below: it holds what the call
        // holds (its in-flight slot), and the call is over.
        drop(body);
        if respond.send_response(head, true).is_err() {
            return;
        }
    } else {
        let Ok(mut send) = respond.send_response(head, false) else {
            return;
        };
        if send_body(pin!(body), &mut send, client).await.is_err() {
            return;
        }
    }
    // The reply is complete and the response body dropped; so is the
    // request body, unless something still holds it.
    if let Ok(recv) = returned.try_recv() {
        drain(recv).await;
    }
}

/// Why a response body stopped before its end.
#[derive(Debug)]
struct Stopped;

/// Sends `body` on `send`: each data frame once the client's flow control
/// has room for some of it, then the trailers (or an empty DATA frame with
/// END_STREAM when the body has none). An error in the body resets the
/// stream; a reset by the client ends the body (dropping it cancels the
/// call).
async fn send_body<B: ResponseBody>(
    mut body: Pin<&mut B>,
    send: &mut SendStream<Bytes>,
    client: Option<SocketAddr>,
) -> Result<(), Stopped> {
    loop {
        let frame = poll_fn(|cx| {
            if send.poll_reset(cx).is_ready() {
                return Poll::Ready(Err(Stopped));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => {
                return send.send_data(Bytes::new(), true).map_err(|_| Stopped);
            }
            Some(Err(err)) => {
                let err: BoxError = err.into();
                tracing::debug!(
                    %err,
                    client.address = client.map(|client| tracing::field::display(client.ip())),
                    client.port = client.map(|client| client.port()),
                    "response body failed; resetting the stream"
                );
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return Err(Stopped);
            }
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                if !data.is_empty() {
                    // A claim of one byte, not the whole chunk: h2 raises it
                    // to what is buffered when the data is sent. Claiming
                    // more up front would hold connection window that other
                    // streams could use (hyper does the same, see its
                    // issue 4003).
                    send.reserve_capacity(1);
                    poll_fn(|cx| wait_for_capacity(send, cx)).await?;
                }
                send.send_data(data, end).map_err(|_| Stopped)?;
                if end {
                    return Ok(());
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            send.reserve_capacity(0);
            return send.send_trailers(trailers).map_err(|_| Stopped);
        }
        // A frame kind that HTTP/2 cannot carry: skipped.
    }
}

/// Ready once the stream may send at least one byte.
fn wait_for_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Stopped>> {
    loop {
        // Reset by the client, or the connection is gone.
        if send.poll_reset(cx).is_ready() {
            return Poll::Ready(Err(Stopped));
        }
        if send.capacity() > 0 {
            return Poll::Ready(Ok(()));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            // The stream is closed or reset.
            Some(Err(_)) | None => return Poll::Ready(Err(Stopped)),
        }
    }
}

/// Reads and discards the rest of a request whose reply is complete, until
/// the client ends its side, for at most [`DRAIN_TIMEOUT`] and
/// [`DRAIN_MAX_BYTES`]. Dropping `recv` afterwards closes the stream without
/// a reset when the client did end its side.
async fn drain(mut recv: RecvStream) {
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut discarded = 0;
        while let Some(chunk) = recv.data().await {
            let Ok(chunk) = chunk else { return };
            discarded += chunk.len();
            // Credit back, or a client blocked on flow control never ends.
            let _ = recv.flow_control().release_capacity(chunk.len());
            if discarded > DRAIN_MAX_BYTES {
                return;
            }
        }
        let _ = recv.trailers().await;
    });
    let _ = drained.await;
}

/// The body of a request, as the service reads it: DATA frames, then the
/// trailers if the client sent any.
///
/// Each chunk read gives its flow-control credit back to the client at
/// once, as hyper does: what the client may send beyond what the handler
/// has taken is one stream window. When dropped before the client has
/// ended its side, the stream is handed back to the call's task, which discards
/// the rest once the reply is out, instead of resetting the stream.
pub struct RequestBody {
    recv: Option<RecvStream>,
    returned: Option<oneshot::Sender<RecvStream>>,
    data_done: bool,
}

impl RequestBody {
    fn new(recv: RecvStream) -> (Self, oneshot::Receiver<RecvStream>) {
        let (sender, receiver) = oneshot::channel();
        let body = RequestBody {
            recv: Some(recv),
            returned: Some(sender),
            data_done: false,
        };
        (body, receiver)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let Some(recv) = &mut this.recv else {
            return Poll::Ready(None);
        };
        if !this.data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only if the stream is already closed, when there
                    // is no one to give credit to.
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(broken(&err)))),
                None => this.data_done = true,
            }
        }
        match ready!(recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(broken(&err)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.as_ref().is_none_or(RecvStream::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The status of a call whose request broke: its stream was reset, or its
/// connection is gone.
///
/// A client that cancels (RST_STREAM with CANCEL) or goes away (its
/// connection closes or fails) makes the call `CANCELLED`, as gRPC's
/// HTTP/2 mapping and grpc-go have it. (tonic's `Streaming` then ends the
/// request stream as if the client had finished it: a handler stops
/// reading there, and an import commits what it received. Whatever the
/// handler replies goes nowhere; the call is recorded as `Canceled`.)
/// Other reset codes map as that same mapping says.
fn broken(err: &h2::Error) -> Status {
    if err.is_io() {
        return Status::cancelled("the client's connection closed");
    }
    match err.reason() {
        Some(h2::Reason::CANCEL) => Status::cancelled("the client cancelled the call"),
        Some(h2::Reason::REFUSED_STREAM) => Status::unavailable(format!("stream refused: {err}")),
        Some(h2::Reason::ENHANCE_YOUR_CALM) => {
            Status::resource_exhausted(format!("stream ended: {err}"))
        }
        Some(h2::Reason::INADEQUATE_SECURITY) => {
            Status::permission_denied(format!("stream ended: {err}"))
        }
        _ => Status::internal(format!("stream ended: {err}")),
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let (Some(recv), Some(returned)) = (self.recv.take(), self.returned.take())
            && !recv.is_end_stream()
        {
            // `serve` may have finished already; then the stream is reset
            // as it would have been anyway.
            let _ = returned.send(recv);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body::Frame;
    use http_body_util::BodyExt as _;
    use tokio::sync::mpsc;

    use super::super::{
        TransportConfig,
        testing::{
            self, DATA, END_HEADERS, END_STREAM, HEADERS, ServiceFn, empty, frames, h2_client, head,
        },
    };
    use super::*;

    /// A connection that is sent GOAWAY one second after its last call
    /// ends: the tests wait for it (in paused time) to know that every call
    /// is over, the reading of what its client sent after the reply
    /// included.
    fn idle_after_a_second() -> TransportConfig {
        TransportConfig {
            max_connection_idle: Some(Duration::from_secs(1)),
            ..TransportConfig::default()
        }
    }

    /// Waits for the connection to be over: its calls over, then idle, then
    /// closed (by the server's GOAWAY, or by the client seeing it: a write
    /// may then fail, which is not what these tests look at).
    async fn wait_for_the_end(task: tokio::task::JoinHandle<Result<(), h2::Error>>) {
        let _ended = task.await.expect("the connection's task did not panic");
    }

    /// Opens a call on `path` whose client goes on sending.
    async fn open(
        client: &mut h2::client::SendRequest<Bytes>,
        path: &str,
    ) -> (h2::client::ResponseFuture, SendStream<Bytes>) {
        let request = http::Request::post(path).body(()).unwrap();
        client.send_request(request, false).unwrap()
    }

    #[tokio::test]
    async fn a_reply_without_a_body_is_one_headers_frame_with_end_stream() {
        let service = ServiceFn(|_| async { head(Some("5"), empty()) });
        let mut served = testing::serve(service, TransportConfig::default());
        let mut client = h2_client(served.io.take().unwrap()).await;
        let response = testing::call(&mut client, "/missing").await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "5");
        assert!(response.body().is_end_stream());
        // Trailers-Only: grpc-go and grpcio read the status from this form.
        assert_eq!(served.written.on(1), [(HEADERS, END_HEADERS | END_STREAM)]);
    }

    #[tokio::test]
    async fn a_reply_with_a_body_is_headers_data_then_trailers() {
        let service = ServiceFn(|_| async {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let body = frames(vec![
                Frame::data(Bytes::from_static(b"reply")),
                Frame::trailers(trailers),
            ]);
            head(None, body)
        });
        let mut served = testing::serve(service, TransportConfig::default());
        let mut client = h2_client(served.io.take().unwrap()).await;
        let response = testing::call(&mut client, "/found").await.unwrap();
        let mut body = response.into_body();
        assert_eq!(body.data().await.unwrap().unwrap(), "reply");
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(
            served.written.on(1),
            [
                (HEADERS, END_HEADERS),
                (DATA, 0),
                (HEADERS, END_HEADERS | END_STREAM)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_before_the_request_ends_reads_the_rest_without_a_reset() {
        // Refused before its body is read, as a call without the token is.
        let service = ServiceFn(|_| async { head(Some("16"), empty()) });
        let mut served = testing::serve(service, idle_after_a_second());
        let mut client = h2_client(served.io.take().unwrap()).await;
        let (response, mut send) = open(&mut client, "/refused").await;
        let response = response.await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "16");
        // The client, which had more on the way, sends it and ends.
        for _ in 0..3 {
            send.send_data(Bytes::from(vec![0; 16 * 1024]), false)
                .unwrap();
        }
        send.send_data(Bytes::new(), true).unwrap();
        // Every call over, the connection goes idle and is closed.
        wait_for_the_end(served.task).await;
        assert_eq!(served.written.on(1), [(HEADERS, END_HEADERS | END_STREAM)]);
        assert!(served.written.resets(1).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_sending_after_the_reply_is_reset_past_the_bound() {
        let service = ServiceFn(|_| async { head(Some("16"), empty()) });
        let mut served = testing::serve(service, idle_after_a_second());
        let mut client = h2_client(served.io.take().unwrap()).await;
        let (response, mut send) = open(&mut client, "/refused").await;
        response.await.unwrap();
        // More than the server reads after a reply, and no end.
        let chunk = 16 * 1024;
        for _ in 0..=DRAIN_MAX_BYTES / chunk {
            send.send_data(Bytes::from(vec![0; chunk]), false).unwrap();
        }
        wait_for_the_end(served.task).await;
        // NO_ERROR: the reply was complete (RFC 9113, section 8.1).
        assert_eq!(served.written.resets(1), [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_sending_after_the_reply_is_reset_at_the_drain_timeout() {
        let service = ServiceFn(|_| async { head(Some("16"), empty()) });
        let mut served = testing::serve(service, idle_after_a_second());
        let mut client = h2_client(served.io.take().unwrap()).await;
        let (response, _send) = open(&mut client, "/refused").await;
        let replied_at = tokio::time::Instant::now();
        response.await.unwrap();
        wait_for_the_end(served.task).await;
        // The call ended at the drain timeout, then the connection idled.
        assert_eq!(replied_at.elapsed(), DRAIN_TIMEOUT + Duration::from_secs(1));
        assert_eq!(served.written.resets(1), [0]);
    }

    #[tokio::test]
    async fn a_call_reset_by_its_client_sees_its_request_body_fail_with_cancelled() {
        let (codes, mut seen) = mpsc::unbounded_channel();
        let service = ServiceFn(move |request: http::Request<RequestBody>| {
            let codes = codes.clone();
            async move {
                let mut body = request.into_body();
                assert_eq!(
                    body.frame().await.unwrap().unwrap().into_data().unwrap(),
                    "one"
                );
                let broken = body.frame().await.unwrap().unwrap_err();
                codes.send(broken.code()).unwrap();
                head(Some("1"), empty())
            }
        });
        let mut served = testing::serve(service, TransportConfig::default());
        let mut client = h2_client(served.io.take().unwrap()).await;
        let (_response, mut send) = open(&mut client, "/reads").await;
        send.send_data(Bytes::from_static(b"one"), false).unwrap();
        send.send_reset(h2::Reason::CANCEL);
        assert_eq!(seen.recv().await, Some(tonic::Code::Cancelled));
    }

    #[test]
    fn a_broken_request_maps_to_the_status_grpc_gives_it() {
        let code = |err: h2::Error| broken(&err).code();
        assert_eq!(code(h2::Reason::CANCEL.into()), tonic::Code::Cancelled);
        assert_eq!(
            code(h2::Reason::REFUSED_STREAM.into()),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(h2::Reason::ENHANCE_YOUR_CALM.into()),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            code(h2::Reason::INADEQUATE_SECURITY.into()),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(h2::Reason::PROTOCOL_ERROR.into()),
            tonic::Code::Internal
        );
    }
}
