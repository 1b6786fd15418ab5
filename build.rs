//! Generates the gRPC code from `proto/user.proto` without a system `protoc`.
//!
//! `protox` is a protobuf compiler written in Rust: it parses the proto into a
//! file descriptor set, which feeds both the code generator and, written to
//! `OUT_DIR`, the server reflection service (so grpcurl needs no proto file),
//! along with the well-known types that the error details import.

use std::{env, fs, path::PathBuf};

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(["user.proto"], ["proto"])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("user_descriptor.bin"), fds.encode_to_vec())?;

    // The well-known types that the error details the server sends
    // (`google.rpc.Status`, `BadRequest`) import, for reflection to serve
    // with them.
    let well_known = protox::compile(
        [
            "google/protobuf/any.proto",
            "google/protobuf/duration.proto",
        ],
        ["proto"],
    )?;
    fs::write(
        out_dir.join("well_known_descriptor.bin"),
        well_known.encode_to_vec(),
    )?;

    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
