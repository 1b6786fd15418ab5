"""Connection limits as grpcio clients see them: sockets that never finish
their handshake are closed while real clients are served, and connections
past --max-connections are refused with UNAVAILABLE."""

import re
import resource
import socket
import time
import urllib.request

import grpc
from conftest import DEADLINE, Server, WithDeadline

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def user(pb, first_name):
    user_pb2, _ = pb
    return user_pb2.User(first_name=first_name, last_name="Doe", address="1 Long Street")


def closed_by_server(sock, timeout):
    """Whether the server closes `sock` within `timeout` seconds (reading
    and dropping what it sends first: its SETTINGS)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def metric(server, name):
    """The value of the sample `name` at the server's metrics endpoint, whose
    address the server logs once it listens."""
    deadline = time.monotonic() + DEADLINE
    while True:
        with open(server.log.name) as log:
            found = re.search(r"metrics at (http://\S+/metrics)", log.read())
        if found:
            break
        assert time.monotonic() < deadline, "the server did not log its metrics address"
        time.sleep(0.02)
    with urllib.request.urlopen(found.group(1), timeout=DEADLINE) as response:
        text = response.read().decode()
    values = re.findall(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
    assert len(values) == 1, f"{name} not exposed once: {values}"
    return float(values[0])


def test_5000_held_sockets_are_closed_after_the_handshake_timeout_while_clients_are_served(pb):
    _, user_pb2_grpc = pb
    held_count = 5000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * held_count)), hard))
    server = Server("--handshake-timeout", "3", "--metrics-addr", "127.0.0.1:0")
    host, port = server.addr.rsplit(":", 1)
    held = []
    try:
        for i in range(held_count):
            sock = socket.create_connection((host, int(port)), timeout=DEADLINE)
            # Half say nothing at all; half send the preface and stop there.
            if i % 2:
                sock.sendall(PREFACE)
            held.append(sock)
        # Meanwhile a client, with a deadline on every call, is served.
        channel = server.channel()
        stub = WithDeadline(user_pb2_grpc.UserServiceStub(channel))
        for i in range(20):
            assert stub.AddUser(user(pb, f"Served{i}")).code == 200
        # Every held socket is closed, and by the handshake timeout: the
        # server counted exactly these (the client's connection finished
        # its handshake and is not among them).
        for sock in held:
            assert closed_by_server(sock, DEADLINE)
        assert metric(server, "user_service_connections_handshake_timeouts_total") == held_count
        # The real client's connection finished its handshake: still served.
        assert stub.AddUser(user(pb, "Again")).code == 200
        channel.close()
    finally:
        for sock in held:
            sock.close()
        assert server.stop() == 0


def test_connections_past_the_limit_are_unavailable_and_the_others_served(pb):
    _, user_pb2_grpc = pb
    server = Server("--max-connections", "2")
    # Channels in one process share connections unless told not to.
    own = [("grpc.use_local_subchannel_pool", 1)]
    try:
        channels = [server.channel(options=own), server.channel(options=own)]
        stubs = [WithDeadline(user_pb2_grpc.UserServiceStub(c)) for c in channels]
        for stub in stubs:
            assert stub.AddUser(user(pb, "In")).code == 200
        third = grpc.insecure_channel(server.addr, options=own)
        refused = WithDeadline(user_pb2_grpc.UserServiceStub(third))
        try:
            refused.AddUser(user(pb, "Out"))
            raise AssertionError("a connection past the limit was served")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        third.close()
        for stub in stubs:
            assert stub.AddUser(user(pb, "Still in")).code == 200
        for channel in channels:
            channel.close()
    finally:
        assert server.stop() == 0
