//! The services, through reflection. On a server whose calls need the
//! token, the `hello` describes nothing: the page asks with `describe`,
//! and the bridge makes a real reflection call (`ServerReflectionInfo`
//! with `list_services`, as grpcurl's `list`) carrying the page's
//! metadata, so that the token is checked where it is checked for any
//! client. The page gets the catalogue of the services listed only when
//! that call ends OK; otherwise it gets the call's status
//! (`UNAUTHENTICATED` without the right token).

use std::future::poll_fn;

use bytes::Bytes;
use h2::client::SendRequest;
use http::HeaderMap;
use prost::Message as _;
use serde_json::Value;
use tonic::Code;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, ServerReflectionResponse, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse,
};

use super::{
    DEADLINE_GRACE, DESCRIBE_TIMEOUT, Playground,
    call::{self, Decoder, Request, local_status, status_event},
};

/// The method a describe calls.
const LIST_SERVICES: &str = "grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

/// What a describe came to.
pub(super) struct Described {
    /// The services reflection listed, when its call ended OK.
    pub services: Option<Vec<String>>,
    /// The reflection call's status, as a `status` event without its id.
    pub status: Value,
}

impl Described {
    fn failed(status: Value) -> Self {
        Described {
            services: None,
            status,
        }
    }
}

/// Asks the server which services it has, through `sender` (the session's
/// connection into it) with `metadata` (the page's: its token).
pub(super) async fn list_services(
    playground: &Playground,
    sender: SendRequest<Bytes>,
    metadata: HeaderMap,
) -> Described {
    let call = call(playground, sender, metadata);
    match tokio::time::timeout(DESCRIBE_TIMEOUT + DEADLINE_GRACE, call).await {
        Ok(Ok(described)) => described,
        Ok(Err(err)) => {
            let code = if err.reason() == Some(h2::Reason::CANCEL) {
                Code::Cancelled
            } else {
                Code::Unavailable
            };
            Described::failed(local_status(
                code,
                &format!("the reflection call broke: {err}"),
            ))
        }
        // Dropping the call resets its stream.
        Err(_) => Described::failed(local_status(
            Code::DeadlineExceeded,
            "deadline exceeded (the server did not end the reflection call in time)",
        )),
    }
}

async fn call(
    playground: &Playground,
    mut sender: SendRequest<Bytes>,
    metadata: HeaderMap,
) -> Result<Described, h2::Error> {
    let method = playground
        .schema()
        .method(LIST_SERVICES)
        .cloned()
        .expect("reflection is one of the playground's services");
    let head = call::head(&Request {
        method,
        metadata,
        timeout: Some(DESCRIBE_TIMEOUT),
        first: None,
        end: true,
    });
    let request = ServerReflectionRequest {
        host: String::new(),
        // "The content will not be checked", says the proto.
        message_request: Some(MessageRequest::ListServices("*".into())),
    };
    poll_fn(|cx| sender.poll_ready(cx)).await?;
    let (response, mut send) = sender.send_request(head, false)?;
    // One small message: h2 sends it as the window allows.
    send.send_data(call::frame(&request.encode_to_vec()), true)?;
    let (parts, mut body) = response.await?.into_parts();
    if body.is_end_stream() {
        // Trailers-Only: refused before any message (the token).
        return Ok(Described::failed(status_event(
            playground,
            &parts.headers,
            parts.status,
        )));
    }
    // The first message is the answer; the server sends no other to one
    // request, and any other is read and dropped, one at a time.
    let mut decoder = Decoder::new(playground.shared.max_message_size);
    let mut answer = None;
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
        decoder.push(&data);
        loop {
            match decoder.next() {
                Ok(Some(message)) => {
                    answer.get_or_insert(message);
                }
                Ok(None) => break,
                Err(err) => {
                    return Ok(Described::failed(local_status(
                        Code::ResourceExhausted,
                        &err,
                    )));
                }
            }
        }
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    let status = status_event(playground, &trailers, http::StatusCode::OK);
    if status["code"] != Code::Ok as i32 {
        return Ok(Described::failed(status));
    }
    let listed = answer
        .and_then(|answer| ServerReflectionResponse::decode(answer).ok())
        .and_then(|answer| match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => Some(list.service),
            _ => None,
        });
    Ok(match listed {
        Some(services) => Described {
            services: Some(services.into_iter().map(|service| service.name).collect()),
            status,
        },
        None => Described::failed(local_status(
            Code::Internal,
            "reflection answered without the list of services",
        )),
    })
}
