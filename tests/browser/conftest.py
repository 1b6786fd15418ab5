"""Fixtures for the playground's browser tests: the real server binary on a
free loopback port, Debian's headless Chromium driven by Playwright (never
a browser Playwright downloads), and grpcio stubs for the changes another
client makes while the page watches."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("USER_SERVICE_BIN", ROOT / "target" / "debug" / "user-service"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STARTUP_TIMEOUT = 30
# Every wait on the page, in milliseconds, and every grpcio call's deadline.
PATIENCE_MS = 10_000
DEADLINE = 10


class Server:
    """The user-service binary on 127.0.0.1, port picked by the kernel."""

    def __init__(self, *args):
        assert BINARY.exists(), f"build the server first: {BINARY}"
        self.data = tempfile.mkdtemp(prefix="user-service-browser-")
        addr_file = Path(self.data) / "addr"
        self.log = open(Path(self.data) / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(BINARY), "--addr", "127.0.0.1:0", "--addr-file", str(addr_file), "--store", "memory", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, RUST_LOG="info"),
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        # The file appears, whole, once the server listens.
        while not addr_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.addr = addr_file.read_text().strip()
        self.url = f"http://{self.addr}/"

    def channel(self):
        channel = grpc.insecure_channel(self.addr)
        grpc.channel_ready_future(channel).result(timeout=STARTUP_TIMEOUT)
        return channel

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STARTUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def pb():
    """(user_pb2, user_pb2_grpc), generated into a temporary directory."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="user-service-stubs-")
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}", "user.proto"]
    )
    assert code == 0, "protoc failed"
    sys.path.insert(0, out)
    import user_pb2
    import user_pb2_grpc

    return user_pb2, user_pb2_grpc


@pytest.fixture(scope="module")
def server():
    server = Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(PATIENCE_MS)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"errors in the page: {errors}"
