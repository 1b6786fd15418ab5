"""Fixtures for the grpcio suite: stubs generated from proto/user.proto at
test time, and the real server binary on a free loopback port."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
BINARY = Path(os.environ.get("USER_SERVICE_BIN", ROOT / "target" / "debug" / "user-service"))
STARTUP_TIMEOUT = 30


@pytest.fixture(scope="session")
def pb():
    """(user_pb2, user_pb2_grpc), generated into a temporary directory."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="user-service-stubs-")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_DIR / "user.proto"),
        ]
    )
    assert code == 0, "protoc failed"
    sys.path.insert(0, out)
    import user_pb2
    import user_pb2_grpc

    return user_pb2, user_pb2_grpc


class Server:
    """The user-service binary, listening on 127.0.0.1 on a port the kernel
    picked; the address is read from its startup log line."""

    def __init__(self, *args):
        assert BINARY.exists(), f"build the server first: {BINARY}"
        env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
        # The default, durable store, on a fresh file for each server.
        self.data = tempfile.mkdtemp(prefix="user-service-data-")
        store = f"sqlite:{self.data}/users.db"
        self.proc = subprocess.Popen(
            [str(BINARY), "--addr", "127.0.0.1:0", "--store", store, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        self.addr = self._wait_for_address()
        # Keep draining the log so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_address(self):
        found = {}

        def read():
            for line in self.proc.stdout:
                match = re.search(r"listening.*?(127\.0\.0\.1:\d+)", line)
                if match:
                    found["addr"] = match.group(1)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(STARTUP_TIMEOUT)
        if "addr" not in found:
            self.stop()
            raise RuntimeError("the server did not report its address")
        return found["addr"]

    def _drain(self):
        for _ in self.proc.stdout:
            pass

    def channel(self, **kwargs):
        channel = grpc.insecure_channel(self.addr, **kwargs)
        grpc.channel_ready_future(channel).result(timeout=STARTUP_TIMEOUT)
        return channel

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data, ignore_errors=True)
        return self.proc.returncode


@pytest.fixture
def server():
    server = Server()
    yield server
    assert server.stop() == 0, "the server exits 0 on SIGTERM"


@pytest.fixture
def stub(server, pb):
    _, user_pb2_grpc = pb
    channel = server.channel()
    yield user_pb2_grpc.UserServiceStub(channel)
    channel.close()


@pytest.fixture
def token_server(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("py-secret-token\n")
    server = Server("--auth-token-file", str(token_file))
    yield server
    assert server.stop() == 0
