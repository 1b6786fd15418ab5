"""The UserService contract through Python grpcio: a client stack that is
not ours, against the real server binary."""

import queue
import threading

import grpc
import pytest
from conftest import DEADLINE, WithDeadline

OK, INVALID, NOT_FOUND, EXISTS, PRECONDITION = 0, 3, 5, 6, 9


def user(pb, first_name, **fields):
    user_pb2, _ = pb
    return user_pb2.User(first_name=first_name, last_name="Doe", address="1 Long Street", **fields)


class Requests:
    """A request iterator fed by hand; close() ends the client's side."""

    def __init__(self):
        self.queue = queue.Queue()

    def send(self, request):
        self.queue.put(request)

    def close(self):
        self.queue.put(None)

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            yield item


def test_add_user_stores_and_replies_200(pb, stub):
    reply = stub.AddUser(user(pb, "John", verified=True))
    assert reply.code == 200
    assert reply.message == "user saved successfully"
    assert reply.user.id and reply.user.version == 1
    assert reply.user.first_name == "John" and reply.user.verified


def test_add_user_rejects_invalid_and_duplicate(pb, stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.AddUser(user(pb, "  "))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first_name" in err.value.details()
    # The google.rpc.BadRequest detail travels in the trailers.
    keys = [key for key, _ in err.value.trailing_metadata()]
    assert "grpc-status-details-bin" in keys

    stub.AddUser(user(pb, "Ann", id="ann-1"))
    with pytest.raises(grpc.RpcError) as err:
        stub.AddUser(user(pb, "Ann", id="ann-1"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_get_user(pb, stub):
    user_pb2, _ = pb
    added = stub.AddUser(user(pb, "Gus")).user
    got = stub.GetUser(user_pb2.GetUserRequest(id=added.id))
    assert got == added
    with pytest.raises(grpc.RpcError) as err:
        stub.GetUser(user_pb2.GetUserRequest(id="nobody"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.GetUser(user_pb2.GetUserRequest(id=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_users_orders_filters_resumes_and_limits(pb, stub):
    user_pb2, _ = pb
    for i, verified in enumerate([True, False, True, False, True]):
        stub.AddUser(user(pb, f"L{i}", id=f"id-{i}", verified=verified))
    ids = [u.id for u in stub.ListUsers(user_pb2.ListUsersRequest())]
    assert ids == [f"id-{i}" for i in range(5)]
    verified = [u.id for u in stub.ListUsers(user_pb2.ListUsersRequest(verified=True))]
    assert verified == ["id-0", "id-2", "id-4"]
    page = [u.id for u in stub.ListUsers(user_pb2.ListUsersRequest(after_id="id-1", limit=2))]
    assert page == ["id-2", "id-3"]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ListUsers(user_pb2.ListUsersRequest(after_id="not valid!")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bulk_add_users_counts_and_reports_bad_rows(pb, stub):
    rows = [
        user(pb, "Ok0"),
        user(pb, ""),  # invalid
        user(pb, "Ok2", id="dup"),
        user(pb, "Ok3", id="dup"),  # duplicate within the stream
        user(pb, "Ok4"),
    ]
    reply = stub.BulkAddUsers(iter(rows))
    assert (reply.added, reply.failed) == (3, 2)
    assert [(e.index, e.code) for e in reply.errors] == [(1, INVALID), (3, EXISTS)]


def test_sync_users_acks_every_request_and_streams_changes(pb, stub):
    user_pb2, _ = pb
    requests = Requests()
    responses = stub.SyncUsers(iter(requests))
    requests.send(user_pb2.SyncRequest(request_id=1, upsert=user(pb, "Sy", id="sy")))
    requests.send(user_pb2.SyncRequest(request_id=2, delete_id="nobody"))
    requests.send(user_pb2.SyncRequest(request_id=3, upsert=user(pb, "Sy", id="sy"), expected_version=7))
    requests.send(user_pb2.SyncRequest(request_id=4))
    requests.send(user_pb2.SyncRequest(request_id=5, upsert=user(pb, "Sy2", id="sy"), expected_version=1))
    requests.close()
    acks, changes = {}, []
    for response in responses:  # ends with OK once the client side is closed
        if response.HasField("ack"):
            acks[response.ack.request_id] = response.ack
        else:
            changes.append(response.change)
    assert {i: a.code for i, a in acks.items()} == {1: OK, 2: NOT_FOUND, 3: PRECONDITION, 4: INVALID, 5: OK}
    assert acks[5].user.version == 2
    assert [c.seq for c in changes] == [acks[1].seq, acks[5].seq]
    assert acks[5].seq == acks[1].seq + 1
    assert [c.kind for c in changes] == [user_pb2.Change.CREATED, user_pb2.Change.UPDATED]


def test_sync_users_sees_changes_from_other_calls(pb, stub):
    user_pb2, _ = pb
    requests = Requests()
    responses = stub.SyncUsers(iter(requests))
    seen = queue.Queue()

    def read():
        try:
            for response in responses:
                seen.put(response)
        except grpc.RpcError as err:
            seen.put(err)

    # The server subscribes before it sends the response headers: once they
    # are here, nothing committed later is missed.
    responses.initial_metadata()
    threading.Thread(target=read, daemon=True).start()
    stub.AddUser(user(pb, "Other"))
    stub.BulkAddUsers(iter([user(pb, "B1"), user(pb, "B2")]))
    seqs = []
    for _ in range(3):
        response = seen.get(timeout=10)
        assert not isinstance(response, Exception), response
        seqs.append(response.change.seq)
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    requests.close()


def test_health_and_compression(pb, server):
    _, user_pb2_grpc = pb
    channel = server.channel()
    # grpc.health.v1.Health/Check with an empty request; the reply is
    # HealthCheckResponse{status: SERVING (1)}.
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    assert check(b"", timeout=DEADLINE) == b"\x08\x01"
    channel.close()
    for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate, grpc.Compression.NoCompression):
        channel = server.channel(compression=compression)
        stub = WithDeadline(user_pb2_grpc.UserServiceStub(channel))
        if compression == grpc.Compression.Deflate:
            # Not accepted by the server: refused, as the spec says.
            with pytest.raises(grpc.RpcError) as err:
                stub.AddUser(user(pb, "Zip"))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        else:
            assert stub.AddUser(user(pb, "Zip")).code == 200
        channel.close()


def test_deadlines_end_streams(pb, stub):
    requests = Requests()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.SyncUsers(iter(requests), timeout=0.3):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    requests.close()


def test_bearer_token(pb, token_server):
    user_pb2, user_pb2_grpc = pb
    channel = token_server.channel()
    stub = WithDeadline(user_pb2_grpc.UserServiceStub(channel))
    for metadata in [None, [("authorization", "Bearer wrong")]]:
        with pytest.raises(grpc.RpcError) as err:
            stub.AddUser(user(pb, "Tok"), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = [("authorization", "Bearer py-secret-token")]
    added = stub.AddUser(user(pb, "Tok"), metadata=good).user
    assert stub.GetUser(user_pb2.GetUserRequest(id=added.id), metadata=good) == added
    # Health stays open.
    assert channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=DEADLINE) == b"\x08\x01"
    channel.close()
