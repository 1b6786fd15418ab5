"""What grpcio (C core) clients see, each call with a deadline: exact codes
and messages on every error path, error details, volume on one channel,
rejected calls that leave the channel working, reflection and health."""

import queue
import threading

import grpc
import pytest
from conftest import DEADLINE, Server, WithDeadline
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status


def user(pb, first_name, **fields):
    user_pb2, _ = pb
    fields = {"last_name": "Doe", "address": "1 Long Street", **fields}
    return user_pb2.User(first_name=first_name, **fields)


def status_of(call):
    """(code, details) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_every_error_path_has_its_code_and_message(pb, stub):
    user_pb2, _ = pb
    with pytest.raises(grpc.RpcError) as err:
        stub.AddUser(user(pb, " "))
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "first_name: must not be empty",
    )
    # The google.rpc.BadRequest detail decodes as such.
    status = rpc_status.from_call(err.value)
    assert len(status.details) == 1
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("first_name", "must not be empty")
    ]

    assert status_of(lambda: stub.AddUser(user(pb, "Ann", id="no spaces"))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "id: may only contain A-Z, a-z, 0-9, '-' and '_', found ' '",
    )
    assert status_of(lambda: stub.AddUser(user(pb, "A", address="x" * 257))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "address: must be at most 256 bytes, got 257",
    )
    stub.AddUser(user(pb, "Ada", id="ada"))
    assert status_of(lambda: stub.AddUser(user(pb, "Ada", id="ada"))) == (
        grpc.StatusCode.ALREADY_EXISTS,
        'user "ada" already exists',
    )
    assert status_of(lambda: stub.GetUser(user_pb2.GetUserRequest(id="nobody"))) == (
        grpc.StatusCode.NOT_FOUND,
        'user "nobody" not found',
    )
    assert status_of(lambda: stub.GetUser(user_pb2.GetUserRequest())) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "id: must not be empty",
    )
    assert status_of(lambda: list(stub.ListUsers(user_pb2.ListUsersRequest(after_id="a b")))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "after_id: may only contain A-Z, a-z, 0-9, '-' and '_', found ' '",
    )
    code, _ = status_of(lambda: stub.AddUser(user(pb, "Big", address="x" * (5 << 20))))
    assert code == grpc.StatusCode.OUT_OF_RANGE


def test_unknown_methods_are_unimplemented(server):
    channel = server.channel()
    for path in ("/grpcUser.UserService/Nothing", "/grpcUser.Nothing/GetUser"):
        call = channel.unary_unary(path)
        assert status_of(lambda: call(b"", timeout=DEADLINE))[0] == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


def test_a_bulk_import_of_100k_users(pb, stub):
    user_pb2, _ = pb
    count = 100_000
    rows = (user(pb, f"Bulk{i}") for i in range(count))
    reply = stub.BulkAddUsers(rows, timeout=300)
    assert (reply.added, reply.failed, list(reply.errors)) == (count, 0, [])
    listed = sum(1 for _ in stub.ListUsers(user_pb2.ListUsersRequest(), timeout=300))
    assert listed == count


def test_10000_rejected_calls_then_a_call_that_succeeds_on_the_same_channel(pb, token_server):
    _, user_pb2_grpc = pb
    channel = token_server.channel()
    stub = WithDeadline(user_pb2_grpc.UserServiceStub(channel))
    calls, window = 10_000, 100
    codes = []
    pending = []
    for i in range(calls):
        if i % 2:
            # A wrong token.
            call = stub.AddUser.future(user(pb, "T"), metadata=[("authorization", "Bearer wrong")])
        else:
            # No token, and an invalid user: refused for the token first.
            call = stub.AddUser.future(user(pb, ""))
        pending.append(call)
        if len(pending) == window:
            codes.extend(c.exception().code() for c in pending)
            pending = []
    codes.extend(c.exception().code() for c in pending)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * calls
    good = [("authorization", "Bearer py-secret-token")]
    assert stub.AddUser(user(pb, "After"), metadata=good).code == 200
    channel.close()


def test_reflection_answers_unknown_names_and_keeps_the_stream_open(server):
    channel = server.channel()
    # grpcio's own reflection client: an error_response is a KeyError.
    database = ProtoReflectionDescriptorDatabase(channel)
    assert set(database.get_services()) == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpcUser.UserService",
    }
    with pytest.raises(KeyError):
        database.FindFileContainingSymbol("grpcUser.Nothing")
    assert database.FindFileContainingSymbol("grpcUser.UserService").package == "grpcUser"
    assert database.FindFileContainingSymbol("google.rpc.BadRequest").package == "google.rpc"

    # Several questions on one stream, in v1alpha and in v1 (the same
    # messages under another service name).
    request = reflection_pb2.ServerReflectionRequest
    questions = [
        request(file_containing_symbol="grpcUser.Nothing"),
        request(file_by_filename="nothing.proto"),
        request(file_containing_symbol="grpcUser.User"),
    ]
    v1alpha = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=request.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    for info in (v1alpha, v1):
        replies = list(info(iter(questions), timeout=DEADLINE))
        kinds = [reply.WhichOneof("message_response") for reply in replies]
        assert kinds == ["error_response", "error_response", "file_descriptor_response"]
        assert [reply.error_response.error_code for reply in replies[:2]] == [5, 5]
        assert [reply.original_request for reply in replies] == questions
    channel.close()


def test_health_watch_reports_not_serving_before_the_end_at_shutdown(pb):
    server = Server()
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    names = ["", "grpcUser.UserService"]
    for name in names:
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE)
        assert reply.status == serving
    code, _ = status_of(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="nothing"), timeout=DEADLINE)
    )
    assert code == grpc.StatusCode.NOT_FOUND

    seen = {name: queue.Queue() for name in names}

    def watch(name):
        try:
            for reply in health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE):
                seen[name].put(reply.status)
        except grpc.RpcError as err:
            seen[name].put(err.code())

    for name in names:
        threading.Thread(target=watch, args=(name,), daemon=True).start()
        assert seen[name].get(timeout=DEADLINE) == serving
    assert server.stop() == 0
    for name in names:
        assert seen[name].get(timeout=DEADLINE) == not_serving, name
        assert seen[name].get(timeout=DEADLINE) == grpc.StatusCode.UNAVAILABLE, name
    channel.close()
