"""Fixtures for the grpcio suite: stubs generated from proto/user.proto at
test time, and the real server binary on a free loopback port.

Every call gets a deadline, as real clients set one: the `stub` fixture
adds `timeout=DEADLINE` to each call that does not set its own."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
BINARY = Path(os.environ.get("USER_SERVICE_BIN", ROOT / "target" / "debug" / "user-service"))
STARTUP_TIMEOUT = 30
# The deadline of every call that does not set its own, in seconds.
DEADLINE = 10


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
    picked; the address is read from the file it writes once listening."""

    def __init__(self, *args):
        assert BINARY.exists(), f"build the server first: {BINARY}"
        env = dict(os.environ, RUST_LOG="info")
        # The default, durable store, on a fresh file for each server.
        self.data = tempfile.mkdtemp(prefix="user-service-data-")
        store = f"sqlite:{self.data}/users.db"
        addr_file = Path(self.data) / "addr"
        self.log = open(Path(self.data) / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(BINARY), "--addr", "127.0.0.1:0", "--addr-file", str(addr_file), "--store", store, *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not addr_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.addr = addr_file.read_text().strip()

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
        self.log.close()
        shutil.rmtree(self.data, ignore_errors=True)
        return self.proc.returncode


class WithDeadline:
    """A stub whose calls have a deadline of DEADLINE seconds unless they
    set their own `timeout`; `.future` and `.with_call` too."""

    def __init__(self, stub):
        self._stub = stub

    def __getattr__(self, name):
        return _Method(getattr(self._stub, name))


class _Method:
    def __init__(self, method):
        self._method = method

    def __call__(self, *args, timeout=DEADLINE, **kwargs):
        return self._method(*args, timeout=timeout, **kwargs)

    def future(self, *args, timeout=DEADLINE, **kwargs):
        return self._method.future(*args, timeout=timeout, **kwargs)

    def with_call(self, *args, timeout=DEADLINE, **kwargs):
        return self._method.with_call(*args, timeout=timeout, **kwargs)


@pytest.fixture
def server():
    server = Server()
    yield server
    assert server.stop() == 0, "the server exits 0 on SIGTERM"


@pytest.fixture
def stub(server, pb):
    _, user_pb2_grpc = pb
    channel = server.channel()
    yield WithDeadline(user_pb2_grpc.UserServiceStub(channel))
    channel.close()


@pytest.fixture
def token_server(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("py-secret-token\n")
    server = Server("--auth-token-file", str(token_file))
    yield server
    assert server.stop() == 0
