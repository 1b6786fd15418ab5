//! Generates the gRPC code from `proto/user.proto` without a system `protoc`.
//!
//! `protox` is a protobuf compiler written in Rust: it parses the proto into a
//! file descriptor set, which feeds both the code generator and, written to
//! `OUT_DIR`, the server reflection service (so grpcurl needs no proto file).

use std::{env, fs, path::PathBuf};

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(["user.proto"], ["proto"])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("user_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
