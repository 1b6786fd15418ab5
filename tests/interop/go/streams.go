// Reflection, health, and connection management as grpc-go sees them.
package main

import (
	"context"
	"io"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	v1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/stats"
	"google.golang.org/protobuf/proto"

	v1 "interop/reflectionv1"
	pb "interop/usergrpc"
)

func checkReflection() {
	check("reflection v1alpha and v1: services, symbols, and an error response on an open stream", func(t *T) {
		s := start(t)
		conn := s.dial(t)
		ctx, cancel := deadline(callDeadline)
		defer cancel()

		alpha, err := v1alpha.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
		must(t, "v1alpha", err)
		ask := func(request *v1alpha.ServerReflectionRequest) *v1alpha.ServerReflectionResponse {
			must(t, "send", alpha.Send(request))
			response, err := alpha.Recv()
			must(t, "v1alpha reply", err)
			return response
		}
		services := ask(&v1alpha.ServerReflectionRequest{MessageRequest: &v1alpha.ServerReflectionRequest_ListServices{}}).
			GetListServicesResponse().GetService()
		var names []string
		for _, service := range services {
			names = append(names, service.Name)
		}
		sort.Strings(names)
		want := "grpc.health.v1.Health grpc.reflection.v1.ServerReflection grpc.reflection.v1alpha.ServerReflection grpcUser.UserService"
		if strings.Join(names, " ") != want {
			t.Fatalf("services: %v", names)
		}
		missing := ask(&v1alpha.ServerReflectionRequest{MessageRequest: &v1alpha.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "grpcUser.Nothing"}})
		if e := missing.GetErrorResponse(); e == nil || codes.Code(e.ErrorCode) != codes.NotFound {
			t.Fatalf("unknown symbol: %v", missing)
		}
		// The stream is still open.
		for _, symbol := range []string{"grpcUser.UserService", "google.rpc.BadRequest"} {
			found := ask(&v1alpha.ServerReflectionRequest{MessageRequest: &v1alpha.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: symbol}})
			files := found.GetFileDescriptorResponse().GetFileDescriptorProto()
			if len(files) == 0 {
				t.Fatalf("%s: %v", symbol, found)
			}
		}
		missingFile := ask(&v1alpha.ServerReflectionRequest{MessageRequest: &v1alpha.ServerReflectionRequest_FileByFilename{FileByFilename: "nothing.proto"}})
		if e := missingFile.GetErrorResponse(); e == nil || codes.Code(e.ErrorCode) != codes.NotFound {
			t.Fatalf("unknown file: %v", missingFile)
		}
		must(t, "close v1alpha", alpha.CloseSend())
		if _, err := alpha.Recv(); err != io.EOF {
			t.Fatalf("v1alpha end: %v", err)
		}

		stream, err := v1.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
		must(t, "v1", err)
		for _, request := range []*v1.ServerReflectionRequest{
			{MessageRequest: &v1.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "grpcUser.Nothing"}},
			{MessageRequest: &v1.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "grpcUser.User"}},
		} {
			must(t, "send v1", stream.Send(request))
		}
		first, err := stream.Recv()
		must(t, "v1 reply", err)
		if e := first.GetErrorResponse(); e == nil || codes.Code(e.ErrorCode) != codes.NotFound {
			t.Fatalf("v1 unknown symbol: %v", first)
		}
		second, err := stream.Recv()
		must(t, "v1 second reply", err)
		if len(second.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
			t.Fatalf("v1 grpcUser.User: %v", second)
		}
		if !proto.Equal(second.GetOriginalRequest(), &v1.ServerReflectionRequest{MessageRequest: &v1.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "grpcUser.User"}}) {
			t.Fatalf("original request not echoed: %v", second.GetOriginalRequest())
		}
	})
}

func checkHealth() {
	check("health: SERVING, then at shutdown NOT_SERVING before UNAVAILABLE, overall and named", func(t *T) {
		s := start(t)
		conn := s.dial(t)
		health := healthpb.NewHealthClient(conn)
		ctx, cancel := deadline(callDeadline)
		defer cancel()
		names := []string{"", "grpcUser.UserService"}
		var watches []healthpb.Health_WatchClient
		for _, name := range names {
			reply, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: name})
			must(t, "Check "+name, err)
			if reply.Status != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("Check %q: %v", name, reply.Status)
			}
			watch, err := health.Watch(ctx, &healthpb.HealthCheckRequest{Service: name})
			must(t, "Watch "+name, err)
			first, err := watch.Recv()
			must(t, "first status", err)
			if first.Status != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("Watch %q: %v", name, first.Status)
			}
			watches = append(watches, watch)
		}
		_, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: "nothing"})
		expectStatus(t, "Check of an unknown service", err, codes.NotFound, "")

		exited := make(chan int, 1)
		go func() { exited <- s.stop(t) }()
		for i, watch := range watches {
			next, err := watch.Recv()
			must(t, "status at shutdown", err)
			if next.Status != healthpb.HealthCheckResponse_NOT_SERVING {
				t.Fatalf("Watch %q at shutdown: %v", names[i], next.Status)
			}
			_, err = watch.Recv()
			expectStatus(t, "Watch end", err, codes.Unavailable, "")
		}
		if code := <-exited; code != 0 {
			t.Fatalf("exit code %d", code)
		}
	})
}

// connEvents reports the client's connections opening and closing.
type connEvents struct{ begins, ends chan struct{} }

func newConnEvents() *connEvents {
	return &connEvents{begins: make(chan struct{}, 100), ends: make(chan struct{}, 100)}
}

func (h *connEvents) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (h *connEvents) HandleRPC(context.Context, stats.RPCStats)                       {}
func (h *connEvents) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (h *connEvents) HandleConn(_ context.Context, s stats.ConnStats) {
	switch s.(type) {
	case *stats.ConnBegin:
		h.begins <- struct{}{}
	case *stats.ConnEnd:
		h.ends <- struct{}{}
	}
}

func await(t *T, events chan struct{}, what string) {
	select {
	case <-events:
	case <-time.After(patience):
		t.Fatalf("no %s within %v", what, patience)
	}
}

func (s *server) dialWatched(t *T) (*grpc.ClientConn, *connEvents) {
	events := newConnEvents()
	ctx, cancel := deadline(patience)
	defer cancel()
	conn, err := grpc.DialContext(ctx, s.addr, grpc.WithInsecure(), grpc.WithBlock(), grpc.WithStatsHandler(events))
	if err != nil {
		t.Fatalf("dial %s: %v", s.addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	await(t, events.begins, "connection")
	return conn, events
}

func checkConnections() {
	check("an old connection is sent GOAWAY: its stream goes on, new calls use a new connection", func(t *T) {
		s := start(t, "--max-connection-age", "1")
		conn, events := s.dialWatched(t)
		client := pb.NewUserServiceClient(conn)
		ctx, cancel := deadline(callDeadline)
		defer cancel()
		sync, err := client.SyncUsers(ctx)
		must(t, "SyncUsers", err)
		op := func(id uint64) {
			must(t, "a request", sync.Send(&pb.SyncRequest{RequestId: id, Op: &pb.SyncRequest_DeleteId{DeleteId: "x"}}))
			for {
				reply, err := sync.Recv()
				must(t, "its Ack", err)
				// Changes made by other calls come in between.
				if ack := reply.GetAck(); ack != nil {
					if ack.RequestId != id {
						t.Fatalf("Ack for %d, want %d", ack.RequestId, id)
					}
					return
				}
			}
		}
		op(1)
		// At the GOAWAY, grpc-go opens a new connection for new calls.
		await(t, events.begins, "second connection")
		_, err = client.AddUser(ctx, user("New connection"))
		must(t, "AddUser after GOAWAY", err)
		op(2)
		must(t, "close", sync.CloseSend())
		if _, err := sync.Recv(); err != io.EOF {
			t.Fatalf("stream end: %v", err)
		}
		// The old connection closes once its stream is done.
		await(t, events.ends, "old connection to close")
	})

	check("past the age grace, a stream still open ends UNAVAILABLE", func(t *T) {
		s := start(t, "--max-connection-age", "1", "--max-connection-age-grace", "1")
		client := pb.NewUserServiceClient(s.dial(t))
		ctx, cancel := deadline(callDeadline)
		defer cancel()
		sync, err := client.SyncUsers(ctx)
		must(t, "SyncUsers", err)
		_, err = sync.Recv()
		expectStatus(t, "the stream", err, codes.Unavailable, "")
		_, err = client.AddUser(ctx, user("After"))
		must(t, "a call after", err)
	})

	check("an idle connection is sent GOAWAY; the next call reconnects", func(t *T) {
		s := start(t, "--max-connection-idle", "1")
		conn, events := s.dialWatched(t)
		client := pb.NewUserServiceClient(conn)
		ctx, cancel := deadline(callDeadline)
		defer cancel()
		_, err := client.AddUser(ctx, user("Before"))
		must(t, "AddUser", err)
		await(t, events.ends, "idle connection to close")
		_, err = client.AddUser(ctx, user("After"))
		must(t, "AddUser after", err)
	})
}
