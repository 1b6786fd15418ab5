"""A Python grpcio (asyncio) peer of user-service, for bench/run.sh.

It serves proto/user.proto with the semantics the benchmark relies on:
validation, AddUser/GetUser, ListUsers in id order with after_id and limit,
BulkAddUsers with counts and the first 100 errors, and SyncUsers upserts and
deletes with Acks and Changes fanned out to every open SyncUsers stream
through bounded queues (a subscriber that falls behind is ended with
ABORTED). Users live in a dict plus a sorted list of ids. Ids it assigns are
time-ordered hex, not UUIDv7: they sort the same way, which is what the
benchmark needs.
"""

import argparse
import asyncio
import bisect
import itertools
import re
import time

import grpc

import user_pb2 as pb
import user_pb2_grpc as pb_grpc

MAX_TEXT = 256
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_REPORTED_ERRORS = 100
FEED_CAPACITY = 65536
MAX_MESSAGE_SIZE = 4 * 1024 * 1024


def invalid(user):
    if user.id and not ID_RE.match(user.id):
        return "id: may only contain A-Z, a-z, 0-9, '-' and '_', 1-64 characters"
    if not user.first_name.strip():
        return "first_name: must not be empty"
    for field in ("first_name", "last_name", "address"):
        if len(getattr(user, field).encode()) > MAX_TEXT:
            return f"{field}: must be at most {MAX_TEXT} bytes"
    return None


class Store:
    def __init__(self):
        self.users = {}
        self.ids = []
        self.seq = 0
        self.subscribers = set()
        self.counter = itertools.count()

    def new_id(self):
        return f"{time.time_ns() // 1_000_000:012x}-{next(self.counter):016x}"

    def publish(self, kind, user):
        self.seq += 1
        change = pb.SyncResponse(change=pb.Change(seq=self.seq, kind=kind, user=user))
        for sub in list(self.subscribers):
            if not sub.lagged:
                try:
                    sub.out.put_nowait(change)
                except asyncio.QueueFull:
                    sub.lagged = True
                    sub.out_overflow()
        return self.seq

    def create(self, user):
        """Returns (code, message, stored user, seq)."""
        message = invalid(user)
        if message:
            return 3, message, None, 0
        stored = pb.User()
        stored.CopyFrom(user)
        if not stored.id:
            stored.id = self.new_id()
        if stored.id in self.users:
            return 6, f"user {stored.id!r} already exists", None, 0
        stored.version = 1
        self.users[stored.id] = stored
        if not self.ids or stored.id > self.ids[-1]:
            self.ids.append(stored.id)
        else:
            bisect.insort(self.ids, stored.id)
        return 0, "", stored, self.publish(pb.Change.CREATED, stored)

    def upsert(self, user, expected):
        message = invalid(user)
        if message:
            return 3, message, None, 0
        current = self.users.get(user.id) if user.id else None
        if expected and expected != (current.version if current else 0):
            return 9, "version mismatch", None, 0
        if current is None:
            return self.create(user)
        stored = pb.User()
        stored.CopyFrom(user)
        stored.version = current.version + 1
        self.users[stored.id] = stored
        return 0, "", stored, self.publish(pb.Change.UPDATED, stored)

    def delete(self, user_id, expected):
        current = self.users.get(user_id)
        if current is None:
            return 5, f"user {user_id!r} not found", None, 0
        if expected and expected != current.version:
            return 9, "version mismatch", None, 0
        del self.users[user_id]
        del self.ids[bisect.bisect_left(self.ids, user_id)]
        return 0, "", current, self.publish(pb.Change.DELETED, current)


CODES = {3: grpc.StatusCode.INVALID_ARGUMENT, 5: grpc.StatusCode.NOT_FOUND,
         6: grpc.StatusCode.ALREADY_EXISTS, 9: grpc.StatusCode.FAILED_PRECONDITION}


class Subscriber:
    def __init__(self):
        self.out = asyncio.Queue(FEED_CAPACITY)
        self.lagged = False
        self.overflow = asyncio.Event()

    def out_overflow(self):
        self.overflow.set()


class Service(pb_grpc.UserServiceServicer):
    def __init__(self):
        self.store = Store()

    async def AddUser(self, request, context):
        code, message, user, _ = self.store.create(request)
        if code:
            await context.abort(CODES[code], message)
        return pb.Response(code=200, message="user saved successfully", user=user)

    async def GetUser(self, request, context):
        if not request.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id: must not be empty")
        user = self.store.users.get(request.id)
        if user is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"user {request.id!r} not found")
        return user

    async def ListUsers(self, request, context):
        ids = self.store.ids
        i = bisect.bisect_right(ids, request.after_id) if request.after_id else 0
        sent = 0
        verified = request.verified if request.HasField("verified") else None
        while i < len(ids) and (request.limit == 0 or sent < request.limit):
            user = self.store.users.get(ids[i])
            i += 1
            if user is None or (verified is not None and user.verified != verified):
                continue
            sent += 1
            yield user

    async def BulkAddUsers(self, request_iterator, context):
        reply = pb.BulkAddUsersResponse()
        index = 0
        async for user in request_iterator:
            code, message, _, _ = self.store.create(user)
            if code:
                reply.failed += 1
                if len(reply.errors) < MAX_REPORTED_ERRORS:
                    reply.errors.add(index=index, code=code, message=message)
            else:
                reply.added += 1
            index += 1
        return reply

    async def SyncUsers(self, request_iterator, context):
        sub = Subscriber()
        self.store.subscribers.add(sub)
        # Subscribed: answer with headers at once, as user-service does, so
        # that a client waiting for them can go on.
        await context.send_initial_metadata(())
        done = object()

        async def read():
            try:
                async for request in request_iterator:
                    op = request.WhichOneof("op")
                    if op == "upsert":
                        code, message, user, seq = self.store.upsert(request.upsert, request.expected_version)
                    elif op == "delete_id":
                        code, message, user, seq = self.store.delete(request.delete_id, request.expected_version)
                    else:
                        code, message, user, seq = 3, "op: set either upsert or delete_id", None, 0
                    await sub.out.put(pb.SyncResponse(ack=pb.Ack(
                        request_id=request.request_id, code=code, message=message, seq=seq, user=user)))
            finally:
                await sub.out.put(done)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                if sub.lagged:
                    await context.abort(grpc.StatusCode.ABORTED, "change feed subscriber fell too far behind")
                item = await sub.out.get()
                if item is done:
                    break
                yield item
        finally:
            self.store.subscribers.discard(sub)
            reader.cancel()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", default="127.0.0.1:8080")
    args = parser.parse_args()
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
        ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
        ("grpc.max_concurrent_streams", 1024),
    ])
    pb_grpc.add_UserServiceServicer_to_server(Service(), server)
    server.add_insecure_port(args.addr)
    await server.start()
    print(f"grpcio peer listening on {args.addr}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
