//! The playground's view of the services: the descriptors reflection
//! serves (comments included: protox keeps the proto's source info), the
//! methods the page may call, their description for the page, and proto3
//! JSON to and from protobuf, with prost-reflect.
//!
//! A request is checked against its message type before it is encoded, so
//! that a mistake is reported by field path (`user.first_name: expected a
//! string, got a number`) and nothing is sent. The check accepts what
//! proto3 JSON accepts (both the proto and the JSON field names, 64-bit
//! integers as numbers or strings, enums by name or number, `null` for a
//! default); prost-reflect then does the conversion.

use std::collections::{HashMap, HashSet};

use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, SerializeOptions,
};
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value, json};

use crate::reflection;

/// The services the page may call: this server's own, and no other. The
/// bridge refuses any other method name before anything is sent.
const SERVICES: [&str; 3] = [
    "grpcUser.UserService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
];

/// One method the page may call.
#[derive(Debug, Clone)]
pub struct Method {
    /// The HTTP/2 path: `/grpcUser.UserService/AddUser`.
    pub path: String,
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
    pub client_streaming: bool,
    pub server_streaming: bool,
}

/// Why a request message cannot be sent: the field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field's path (`user.first_name`); empty for the message itself.
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

/// The descriptors, and the methods by name (`grpcUser.UserService/AddUser`).
#[derive(Debug)]
pub struct Schema {
    pool: DescriptorPool,
    methods: HashMap<String, Method>,
}

impl Schema {
    /// From the descriptor sets built into the binary, those reflection
    /// serves.
    pub fn build() -> Self {
        let mut pool = DescriptorPool::new();
        let mut added = HashSet::new();
        for set in reflection::descriptor_sets() {
            let set =
                FileDescriptorSet::decode(set).expect("descriptor sets built into the binary");
            // The same well-known file comes in more than one set.
            let files: Vec<FileDescriptorProto> = set
                .file
                .into_iter()
                .filter(|file| added.insert(file.name().to_owned()))
                .collect();
            pool.add_file_descriptor_protos(files)
                .expect("descriptor sets built into the binary");
        }
        let mut methods = HashMap::new();
        for service in SERVICES {
            let service = pool
                .get_service_by_name(service)
                .expect("every service on the port is described");
            for method in service.methods() {
                let name = format!("{}/{}", service.full_name(), method.name());
                methods.insert(
                    name,
                    Method {
                        path: format!("/{}/{}", service.full_name(), method.name()),
                        input: method.input(),
                        output: method.output(),
                        client_streaming: method.is_client_streaming(),
                        server_streaming: method.is_server_streaming(),
                    },
                );
            }
        }
        Schema { pool, methods }
    }

    /// The method `name` names (`grpcUser.UserService/AddUser`, with or
    /// without a leading `/`), if the page may call it.
    pub fn method(&self, name: &str) -> Option<&Method> {
        self.methods.get(name.strip_prefix('/').unwrap_or(name))
    }

    /// What the page shows of the services it may call that `listed`
    /// keeps: each method with its pattern, its types and its comments,
    /// and every message type they use, with their fields' comments.
    pub fn catalogue(&self, listed: impl Fn(&str) -> bool) -> Value {
        let mut messages = Map::new();
        let mut services = Vec::new();
        for name in SERVICES.into_iter().filter(|name| listed(name)) {
            let service = self.pool.get_service_by_name(name).expect("described");
            let file = service.parent_file_descriptor_proto();
            let methods: Vec<Value> = service
                .methods()
                .map(|method| {
                    describe_message(&method.input(), &mut messages);
                    describe_message(&method.output(), &mut messages);
                    describe_method(&method, file)
                })
                .collect();
            services.push(json!({
                "name": service.full_name(),
                "comment": comment(file, service.path()),
                "methods": methods,
            }));
        }
        json!({ "services": services, "messages": messages })
    }

    /// `value` as a protobuf message of type `desc`, once it has been
    /// checked against the type.
    pub fn encode(&self, desc: &MessageDescriptor, value: &Value) -> Result<Vec<u8>, Invalid> {
        check_message(desc, value, "")?;
        let options = DeserializeOptions::new().deny_unknown_fields(true);
        let message = DynamicMessage::deserialize_with_options(desc.clone(), value, &options)
            .map_err(|err| Invalid {
                field: String::new(),
                reason: format!("not a {}: {err}", desc.full_name()),
            })?;
        Ok(message.encode_to_vec())
    }

    /// A message of type `desc` in proto3 JSON, as grpcurl prints it (JSON
    /// field names, default values left out, 64-bit integers as strings).
    pub fn decode(&self, desc: &MessageDescriptor, bytes: &[u8]) -> Result<Value, String> {
        let message = DynamicMessage::decode(desc.clone(), bytes)
            .map_err(|err| format!("not a {}: {err}", desc.full_name()))?;
        to_json(&message)
    }

    /// The details of a `grpc-status-details-bin` trailer (a
    /// `google.rpc.Status`, base64 already removed): each detail in proto3
    /// JSON, with its `@type` (`google.rpc.BadRequest`, ...).
    pub fn status_details(&self, bytes: &[u8]) -> Result<Vec<Value>, String> {
        let status = self
            .pool
            .get_message_by_name("google.rpc.Status")
            .expect("the error details are described");
        let status = self.decode(&status, bytes)?;
        Ok(match status.get("details") {
            Some(Value::Array(details)) => details.clone(),
            _ => Vec::new(),
        })
    }
}

fn to_json(message: &DynamicMessage) -> Result<Value, String> {
    message
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .map_err(|err| err.to_string())
}

fn describe_method(method: &MethodDescriptor, file: &FileDescriptorProto) -> Value {
    let pattern = match (method.is_client_streaming(), method.is_server_streaming()) {
        (false, false) => "unary",
        (false, true) => "server_streaming",
        (true, false) => "client_streaming",
        (true, true) => "bidi_streaming",
    };
    json!({
        "name": method.name(),
        "full_name": format!("{}/{}", method.parent_service().full_name(), method.name()),
        "pattern": pattern,
        "input": method.input().full_name(),
        "output": method.output().full_name(),
        "comment": comment(file, method.path()),
    })
}

/// Adds `desc` and the message types of its fields to `messages`, once.
fn describe_message(desc: &MessageDescriptor, messages: &mut Map<String, Value>) {
    if messages.contains_key(desc.full_name()) {
        return;
    }
    // Placed first, so that a recursive type ends the walk.
    messages.insert(desc.full_name().to_owned(), Value::Null);
    let file = desc.parent_file_descriptor_proto();
    let mut fields = Vec::new();
    for field in desc.fields() {
        let (kind, type_name) = match field.kind() {
            Kind::Message(message) => {
                describe_message(&message, messages);
                ("message", message.full_name().to_owned())
            }
            Kind::Enum(enumeration) => ("enum", enumeration.full_name().to_owned()),
            other => ("scalar", kind_name(&other).to_owned()),
        };
        let values: Vec<String> = match field.kind() {
            Kind::Enum(enumeration) => enumeration.values().map(|v| v.name().to_owned()).collect(),
            _ => Vec::new(),
        };
        fields.push(json!({
            "name": field.name(),
            "json_name": field.json_name(),
            "kind": kind,
            "type": type_name,
            "repeated": field.is_list(),
            "map": field.is_map(),
            "values": values,
            "oneof": field
                .containing_oneof()
                .filter(|oneof| !oneof.is_synthetic())
                .map(|oneof| oneof.name().to_owned()),
            "comment": comment(file, field.path()),
        }));
    }
    messages.insert(
        desc.full_name().to_owned(),
        json!({ "comment": comment(file, desc.path()), "fields": fields }),
    );
}

/// The comments the proto has at `path` (leading, then trailing), trimmed.
fn comment(file: &FileDescriptorProto, path: &[i32]) -> String {
    let Some(info) = &file.source_code_info else {
        return String::new();
    };
    let Some(location) = info.location.iter().find(|l| l.path == path) else {
        return String::new();
    };
    let text: Vec<&str> = [location.leading_comments(), location.trailing_comments()]
        .into_iter()
        .map(str::trim)
        .filter(|text| !text.is_empty())
        .collect();
    text.join("\n")
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 => "int32",
        Kind::Int64 => "int64",
        Kind::Uint32 => "uint32",
        Kind::Uint64 => "uint64",
        Kind::Sint32 => "sint32",
        Kind::Sint64 => "sint64",
        Kind::Fixed32 => "fixed32",
        Kind::Fixed64 => "fixed64",
        Kind::Sfixed32 => "sfixed32",
        Kind::Sfixed64 => "sfixed64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
        Kind::Message(_) => "message",
        Kind::Enum(_) => "enum",
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// What a JSON value is, for error messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks `value` against the message type `desc`; `path` names it.
fn check_message(desc: &MessageDescriptor, value: &Value, path: &str) -> Result<(), Invalid> {
    let Value::Object(object) = value else {
        return Err(invalid(
            path,
            format!(
                "expected a JSON object (a {}), got {}",
                desc.full_name(),
                json_kind(value)
            ),
        ));
    };
    let mut seen: HashMap<u32, &str> = HashMap::new();
    let mut oneofs: HashMap<String, &str> = HashMap::new();
    for (key, value) in object {
        let at = join(path, key);
        let Some(field) = desc
            .get_field_by_name(key)
            .or_else(|| desc.get_field_by_json_name(key))
        else {
            let names: Vec<String> = desc.fields().map(|f| f.name().to_owned()).collect();
            return Err(invalid(
                &at,
                format!(
                    "unknown field in {}; its fields are {}",
                    desc.full_name(),
                    names.join(", ")
                ),
            ));
        };
        if let Some(other) = seen.insert(field.number(), key) {
            return Err(invalid(
                &at,
                format!("the same field as {other:?}, given twice"),
            ));
        }
        if value.is_null() {
            continue;
        }
        if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic())
            && let Some(other) = oneofs.insert(oneof.name().to_owned(), key)
        {
            return Err(invalid(
                &at,
                format!(
                    "{other:?} is set too; they are alternatives (oneof {}): set one",
                    oneof.name()
                ),
            ));
        }
        check_field(&field, value, &at)?;
    }
    Ok(())
}

fn check_field(field: &FieldDescriptor, value: &Value, path: &str) -> Result<(), Invalid> {
    if field.is_map() {
        let Value::Object(entries) = value else {
            return Err(invalid(
                path,
                format!("expected an object (a map), got {}", json_kind(value)),
            ));
        };
        let Kind::Message(entry) = field.kind() else {
            return Ok(());
        };
        let value_field = entry.map_entry_value_field();
        for (key, value) in entries {
            check_kind(&value_field.kind(), value, &join(path, key))?;
        }
        return Ok(());
    }
    if field.is_list() {
        let Value::Array(items) = value else {
            return Err(invalid(
                path,
                format!(
                    "expected an array (a repeated field), got {}",
                    json_kind(value)
                ),
            ));
        };
        for (i, item) in items.iter().enumerate() {
            check_kind(&field.kind(), item, &format!("{path}[{i}]"))?;
        }
        return Ok(());
    }
    check_kind(&field.kind(), value, path)
}

fn check_kind(kind: &Kind, value: &Value, path: &str) -> Result<(), Invalid> {
    let expected = |what: &str| {
        Err(invalid(
            path,
            format!("expected {what}, got {}", json_kind(value)),
        ))
    };
    match kind {
        Kind::Message(message) => {
            // The well-known types have JSON forms of their own (a
            // Duration is "1.5s"): prost-reflect checks those.
            if message.full_name().starts_with("google.protobuf.") {
                return Ok(());
            }
            check_message(message, value, path)
        }
        Kind::Enum(enumeration) => match value {
            Value::String(name) if enumeration.get_value_by_name(name).is_some() => Ok(()),
            Value::Number(n)
                if n.as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .is_some_and(|n| enumeration.get_value(n).is_some()) =>
            {
                Ok(())
            }
            _ => {
                let names: Vec<String> =
                    enumeration.values().map(|v| v.name().to_owned()).collect();
                expected(&format!("one of {}", names.join(", ")))
            }
        },
        Kind::String => match value {
            Value::String(_) => Ok(()),
            _ => expected("a string"),
        },
        Kind::Bytes => match value {
            Value::String(_) => Ok(()),
            _ => expected("a string (base64)"),
        },
        Kind::Bool => match value {
            Value::Bool(_) => Ok(()),
            _ => expected("true or false"),
        },
        Kind::Double | Kind::Float => match value {
            Value::Number(_) => Ok(()),
            Value::String(s)
                if s.parse::<f64>().is_ok()
                    || ["NaN", "Infinity", "-Infinity"].contains(&s.as_str()) =>
            {
                Ok(())
            }
            _ => expected("a number"),
        },
        integer => check_integer(integer, value, path),
    }
}

/// An integer field: a JSON number or a string of digits, in the range of
/// its type.
fn check_integer(kind: &Kind, value: &Value, path: &str) -> Result<(), Invalid> {
    let (name, min, max): (&str, i128, i128) = match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            ("an int32", i32::MIN.into(), i32::MAX.into())
        }
        Kind::Uint32 | Kind::Fixed32 => ("a uint32", 0, u32::MAX.into()),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            ("an int64", i64::MIN.into(), i64::MAX.into())
        }
        _ => ("a uint64", 0, u64::MAX.into()),
    };
    let number = match value {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from)),
        Value::String(s) => s.parse::<i128>().ok(),
        _ => None,
    };
    match number {
        Some(n) if (min..=max).contains(&n) => Ok(()),
        Some(_) => Err(invalid(path, format!("out of range for {name}"))),
        None => Err(invalid(
            path,
            format!("expected {name} (a whole number), got {}", json_kind(value)),
        )),
    }
}
