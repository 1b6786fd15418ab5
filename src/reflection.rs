//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`), so that
//! grpcurl and other tools need no proto file.
//!
//! tonic-reflection ends the whole reflection stream with `NOT_FOUND` when a
//! client asks for a symbol or file it does not have; the reflection
//! protocol answers with an `error_response` on the stream, which stays open
//! for the client's next question. This implementation follows the
//! protocol. It describes:
//! - `grpcUser.UserService` and its messages;
//! - the health and reflection services on the port;
//! - the error details the server sends (`google.rpc.BadRequest` in the
//!   `grpc-status-details-bin` trailer), so that clients can decode them.
//!
//! A file is answered together with the files it imports that this stream
//! has not been sent yet, as grpc-go's reflection does, which saves a round
//! trip per import.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use futures::{Stream, StreamExt};
use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_reflection::pb::{v1, v1alpha};

use crate::proto;

use v1::{
    ErrorResponse, ExtensionNumberResponse, FileDescriptorResponse, ListServiceResponse,
    ServerReflectionRequest, ServerReflectionResponse, ServiceResponse,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// The descriptor sets served: the user service, the other services on the
/// port, and the error details (with the well-known types they import).
pub(crate) fn descriptor_sets() -> [&'static [u8]; 6] {
    [
        proto::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
        proto::WELL_KNOWN_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
}

/// What the reflection services know, shared by every stream.
#[derive(Debug)]
struct Index {
    /// Each file, by name: its imports and its encoded descriptor.
    files: HashMap<String, File>,
    /// The file defining each fully qualified symbol (messages, fields,
    /// enums and their values, services, methods).
    symbols: HashMap<String, String>,
    /// Fully qualified names of the services, in name order.
    services: Vec<String>,
}

#[derive(Debug)]
struct File {
    imports: Vec<String>,
    encoded: Vec<u8>,
}

impl Index {
    fn build() -> Self {
        let mut index = Index {
            files: HashMap::new(),
            symbols: HashMap::new(),
            services: Vec::new(),
        };
        for set in descriptor_sets() {
            let set =
                FileDescriptorSet::decode(set).expect("descriptor sets built into the binary");
            for file in set.file {
                index.add(file);
            }
        }
        index.services.sort();
        index
    }

    fn add(&mut self, file: FileDescriptorProto) {
        let name = file.name().to_owned();
        if self.files.contains_key(&name) {
            return;
        }
        let package = file.package();
        let mut symbols = Vec::new();
        for message in &file.message_type {
            message_symbols(package, message, &mut symbols);
        }
        for enumeration in &file.enum_type {
            enum_symbols(package, enumeration, &mut symbols);
        }
        for service in &file.service {
            let service_name = qualified(package, service.name());
            for method in &service.method {
                symbols.push(qualified(&service_name, method.name()));
            }
            self.services.push(service_name.clone());
            symbols.push(service_name);
        }
        for extension in &file.extension {
            symbols.push(qualified(package, extension.name()));
        }
        for symbol in symbols {
            self.symbols.insert(symbol, name.clone());
        }
        let file = File {
            imports: file.dependency.clone(),
            encoded: file.encode_to_vec(),
        };
        self.files.insert(name, file);
    }

    /// The reply to one request on a stream that has already been sent the
    /// files in `sent`.
    fn answer(&self, request: &MessageRequest, sent: &mut HashSet<String>) -> MessageResponse {
        match request {
            MessageRequest::FileByFilename(name) => self
                .file_with_imports(name, sent)
                .unwrap_or_else(|| not_found(format!("file {name:?} not found"))),
            MessageRequest::FileContainingSymbol(symbol) => {
                let symbol = symbol.strip_prefix('.').unwrap_or(symbol);
                self.symbols
                    .get(symbol)
                    .and_then(|file| self.file_with_imports(file, sent))
                    .unwrap_or_else(|| not_found(format!("symbol {symbol:?} not found")))
            }
            // No extensions are defined in what is served.
            MessageRequest::FileContainingExtension(request) => not_found(format!(
                "extension {} of {:?} not found",
                request.extension_number, request.containing_type
            )),
            MessageRequest::AllExtensionNumbersOfType(name) => {
                let name = name.strip_prefix('.').unwrap_or(name);
                if self.symbols.contains_key(name) {
                    MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                        base_type_name: name.to_owned(),
                        extension_number: Vec::new(),
                    })
                } else {
                    not_found(format!("type {name:?} not found"))
                }
            }
            MessageRequest::ListServices(_) => {
                MessageResponse::ListServicesResponse(ListServiceResponse {
                    service: self
                        .services
                        .iter()
                        .map(|name| ServiceResponse { name: name.clone() })
                        .collect(),
                })
            }
        }
    }

    /// `name`, then every file it imports, directly or not, that is not in
    /// `sent`; all of them are in `sent` afterwards.
    fn file_with_imports(&self, name: &str, sent: &mut HashSet<String>) -> Option<MessageResponse> {
        let file = self.files.get(name)?;
        // The file asked for is always sent, even if it was before.
        let mut descriptors = vec![file.encoded.clone()];
        sent.insert(name.to_owned());
        let mut pending: Vec<&str> = file.imports.iter().map(String::as_str).collect();
        while let Some(import) = pending.pop() {
            if sent.contains(import) {
                continue;
            }
            let Some(file) = self.files.get(import) else {
                continue;
            };
            sent.insert(import.to_owned());
            descriptors.push(file.encoded.clone());
            pending.extend(file.imports.iter().map(String::as_str));
        }
        Some(MessageResponse::FileDescriptorResponse(
            FileDescriptorResponse {
                file_descriptor_proto: descriptors,
            },
        ))
    }
}

fn qualified(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    }
}

fn message_symbols(scope: &str, message: &DescriptorProto, symbols: &mut Vec<String>) {
    let name = qualified(scope, message.name());
    for field in &message.field {
        symbols.push(qualified(&name, field.name()));
    }
    for oneof in &message.oneof_decl {
        symbols.push(qualified(&name, oneof.name()));
    }
    for nested in &message.nested_type {
        message_symbols(&name, nested, symbols);
    }
    for enumeration in &message.enum_type {
        enum_symbols(&name, enumeration, symbols);
    }
    symbols.push(name);
}

/// An enum and its values, which protobuf scopes beside the enum, not in it.
fn enum_symbols(scope: &str, enumeration: &EnumDescriptorProto, symbols: &mut Vec<String>) {
    symbols.push(qualified(scope, enumeration.name()));
    for value in &enumeration.value {
        symbols.push(qualified(scope, value.name()));
    }
}

fn not_found(message: String) -> MessageResponse {
    MessageResponse::ErrorResponse(ErrorResponse {
        error_code: Code::NotFound as i32,
        error_message: message,
    })
}

/// The reflection services, both versions over one index.
#[derive(Debug, Clone)]
pub struct Reflection {
    index: Arc<Index>,
}

impl Default for Reflection {
    fn default() -> Self {
        Self::new()
    }
}

impl Reflection {
    pub fn new() -> Self {
        Reflection {
            index: Arc::new(Index::build()),
        }
    }

    /// `grpc.reflection.v1.ServerReflection`.
    pub fn v1(&self) -> v1::server_reflection_server::ServerReflectionServer<Self> {
        v1::server_reflection_server::ServerReflectionServer::new(self.clone())
    }

    /// `grpc.reflection.v1alpha.ServerReflection`: what grpcurl before 1.9
    /// speaks. Its messages are v1's, field for field.
    pub fn v1alpha(&self) -> v1alpha::server_reflection_server::ServerReflectionServer<Self> {
        v1alpha::server_reflection_server::ServerReflectionServer::new(self.clone())
    }
}

/// The replies of one reflection stream, one per request, in order. tonic
/// polls it; it reads the next request only when the previous reply has
/// been taken.
pub struct Replies<Req, Resp> {
    requests: Streaming<Req>,
    index: Arc<Index>,
    /// Files this stream has been sent, which are not sent again as
    /// imports.
    sent: HashSet<String>,
    _reply: std::marker::PhantomData<fn() -> Resp>,
}

impl<Req, Resp> Stream for Replies<Req, Resp>
where
    Req: Message + Default,
    Resp: Message + Default,
{
    type Item = Result<Resp, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let request = match ready!(this.requests.poll_next_unpin(cx)) {
            Some(Ok(request)) => request,
            Some(Err(status)) => return Poll::Ready(Some(Err(status))),
            None => return Poll::Ready(None),
        };
        let request: ServerReflectionRequest = same_wire(&request);
        let response = match &request.message_request {
            Some(message) => this.index.answer(message, &mut this.sent),
            None => MessageResponse::ErrorResponse(ErrorResponse {
                error_code: Code::InvalidArgument as i32,
                error_message: "the request asks nothing".to_owned(),
            }),
        };
        let reply = ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request),
            message_response: Some(response),
        };
        Poll::Ready(Some(Ok(same_wire(&reply))))
    }
}

/// Re-reads a message as another type with the same fields and numbers
/// (v1alpha and v1 messages; a v1 message as itself).
fn same_wire<A: Message, B: Message + Default>(message: &A) -> B {
    B::decode(message.encode_to_vec().as_slice()).expect("v1 and v1alpha share one wire format")
}

macro_rules! reflection_service {
    ($version:ident) => {
        #[tonic::async_trait]
        impl $version::server_reflection_server::ServerReflection for Reflection {
            type ServerReflectionInfoStream =
                Replies<$version::ServerReflectionRequest, $version::ServerReflectionResponse>;

            async fn server_reflection_info(
                &self,
                request: Request<Streaming<$version::ServerReflectionRequest>>,
            ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
                Ok(Response::new(Replies {
                    requests: request.into_inner(),
                    index: self.index.clone(),
                    sent: HashSet::new(),
                    _reply: std::marker::PhantomData,
                }))
            }
        }
    };
}

reflection_service!(v1);
reflection_service!(v1alpha);

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(index: &Index, request: MessageRequest) -> MessageResponse {
        index.answer(&request, &mut HashSet::new())
    }

    fn files(response: MessageResponse) -> Vec<String> {
        let MessageResponse::FileDescriptorResponse(files) = response else {
            panic!("not a file response: {response:?}");
        };
        files
            .file_descriptor_proto
            .iter()
            .map(|bytes| {
                FileDescriptorProto::decode(bytes.as_slice())
                    .unwrap()
                    .name()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn every_import_of_every_file_is_served() {
        let index = Index::build();
        for (name, file) in &index.files {
            for import in &file.imports {
                assert!(index.files.contains_key(import), "{name} imports {import}");
            }
        }
    }

    #[test]
    fn lists_every_service_on_the_port() {
        let MessageResponse::ListServicesResponse(list) =
            ask(&Index::build(), MessageRequest::ListServices(String::new()))
        else {
            panic!("not a service list");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
                "grpcUser.UserService",
            ]
        );
    }

    #[test]
    fn finds_symbols_of_every_kind() {
        let index = Index::build();
        for symbol in [
            "grpcUser.UserService",
            "grpcUser.UserService.AddUser",
            "grpcUser.User",
            "grpcUser.User.first_name",
            ".grpcUser.SyncRequest",
            "google.rpc.BadRequest",
            "google.rpc.BadRequest.FieldViolation",
            "grpc.health.v1.HealthCheckResponse.ServingStatus",
            "grpc.health.v1.HealthCheckResponse.SERVING",
        ] {
            let response = ask(&index, MessageRequest::FileContainingSymbol(symbol.into()));
            assert!(
                matches!(response, MessageResponse::FileDescriptorResponse(_)),
                "{symbol}: {response:?}"
            );
        }
    }

    #[test]
    fn a_file_comes_with_the_imports_not_sent_yet() {
        let index = Index::build();
        let mut sent = HashSet::new();
        let symbol = MessageRequest::FileContainingSymbol("google.rpc.BadRequest".into());
        let first = files(index.answer(&symbol, &mut sent));
        // tonic-types names it without its directory.
        assert_eq!(first[0], "error_details.proto");
        assert!(
            first.contains(&"google/protobuf/duration.proto".to_owned()),
            "{first:?}"
        );
        // Asked again on the same stream: the file, without its imports.
        assert_eq!(files(index.answer(&symbol, &mut sent)), first[..1]);
    }

    #[test]
    fn unknown_names_get_an_error_response() {
        let index = Index::build();
        for request in [
            MessageRequest::FileContainingSymbol("grpcUser.Nothing".into()),
            MessageRequest::FileByFilename("nothing.proto".into()),
            MessageRequest::AllExtensionNumbersOfType("grpcUser.Nothing".into()),
            MessageRequest::FileContainingExtension(v1::ExtensionRequest {
                containing_type: "grpcUser.User".into(),
                extension_number: 100,
            }),
        ] {
            let MessageResponse::ErrorResponse(error) = ask(&index, request) else {
                panic!("not an error response");
            };
            assert_eq!(error.error_code, Code::NotFound as i32);
        }
    }
}
