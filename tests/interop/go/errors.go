// The error paths: every code and message of every method, the token, the
// limits and deadlines.
package main

import (
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	v1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"

	pb "interop/usergrpc"
)

// ---- the checks

func checkErrors() {
	check("every error of every method carries its code and message", func(t *T) {
		s := start(t)
		client := pb.NewUserServiceClient(s.dial(t))
		ctx, cancel := deadline(callDeadline)
		defer cancel()

		_, err := client.AddUser(ctx, &pb.User{FirstName: " "})
		expectStatus(t, "AddUser without a name", err, codes.InvalidArgument, "first_name: must not be empty")
		var violation *errdetails.BadRequest_FieldViolation
		for _, detail := range status.Convert(err).Details() {
			if bad, ok := detail.(*errdetails.BadRequest); ok && len(bad.FieldViolations) == 1 {
				violation = bad.FieldViolations[0]
			}
		}
		if violation == nil || violation.Field != "first_name" || violation.Description != "must not be empty" {
			t.Fatalf("no BadRequest detail naming first_name: %v", status.Convert(err).Details())
		}
		_, err = client.AddUser(ctx, &pb.User{Id: "not an id", FirstName: "Ann"})
		expectStatus(t, "AddUser with a bad id", err, codes.InvalidArgument,
			"id: may only contain A-Z, a-z, 0-9, '-' and '_', found ' '")
		_, err = client.AddUser(ctx, &pb.User{FirstName: strings.Repeat("x", 257)})
		expectStatus(t, "AddUser with a long name", err, codes.InvalidArgument,
			"first_name: must be at most 256 bytes, got 257")
		ada := &pb.User{Id: "ada", FirstName: "Ada", LastName: "Lovelace"}
		reply, err := client.AddUser(ctx, ada)
		must(t, "AddUser", err)
		if reply.Code != 200 || reply.User.GetVersion() != 1 {
			t.Fatalf("AddUser reply: %v", reply)
		}
		_, err = client.AddUser(ctx, ada)
		expectStatus(t, "AddUser twice", err, codes.AlreadyExists, `user "ada" already exists`)

		_, err = client.GetUser(ctx, &pb.GetUserRequest{Id: "nobody"})
		expectStatus(t, "GetUser of an unknown id", err, codes.NotFound, `user "nobody" not found`)
		_, err = client.GetUser(ctx, &pb.GetUserRequest{})
		expectStatus(t, "GetUser without an id", err, codes.InvalidArgument, "id: must not be empty")

		list, err := client.ListUsers(ctx, &pb.ListUsersRequest{AfterId: "not an id"})
		must(t, "ListUsers", err)
		_, err = list.Recv()
		expectStatus(t, "ListUsers after a bad id", err, codes.InvalidArgument,
			"after_id: may only contain A-Z, a-z, 0-9, '-' and '_', found ' '")

		bulk, err := client.BulkAddUsers(ctx)
		must(t, "BulkAddUsers", err)
		for _, row := range []*pb.User{user("Grace"), {FirstName: ""}, ada} {
			must(t, "send a row", bulk.Send(row))
		}
		report, err := bulk.CloseAndRecv()
		must(t, "BulkAddUsers reply", err)
		if report.Added != 1 || report.Failed != 2 || len(report.Errors) != 2 ||
			report.Errors[0].Index != 1 || report.Errors[0].Code != int32(codes.InvalidArgument) ||
			report.Errors[1].Index != 2 || report.Errors[1].Code != int32(codes.AlreadyExists) ||
			report.Errors[1].Message != `user "ada" already exists` {
			t.Fatalf("BulkAddUsers report: %v", report)
		}

		sync, err := client.SyncUsers(ctx)
		must(t, "SyncUsers", err)
		requests := []*pb.SyncRequest{
			{RequestId: 1},
			{RequestId: 2, Op: &pb.SyncRequest_DeleteId{DeleteId: "nobody"}},
			{RequestId: 3, Op: &pb.SyncRequest_Upsert{Upsert: ada}, ExpectedVersion: 7},
		}
		for _, request := range requests {
			must(t, "send a sync request", sync.Send(request))
		}
		must(t, "close the sync stream", sync.CloseSend())
		want := map[uint64]struct {
			code    codes.Code
			message string
		}{
			1: {codes.InvalidArgument, "op: set either upsert or delete_id"},
			2: {codes.NotFound, `user "nobody" not found`},
			3: {codes.FailedPrecondition, "expected version 7, stored version is 1"},
		}
		for range requests {
			response, err := sync.Recv()
			must(t, "a sync reply", err)
			ack := response.GetAck()
			if ack == nil {
				t.Fatalf("expected an Ack, got %v", response)
			}
			w := want[ack.RequestId]
			if codes.Code(ack.Code) != w.code || (w.message != "" && ack.Message != w.message) {
				t.Fatalf("Ack %d: code %d %q, want %v %q", ack.RequestId, ack.Code, ack.Message, w.code, w.message)
			}
		}
		if _, err := sync.Recv(); err != io.EOF {
			t.Fatalf("SyncUsers end: %v", err)
		}

		err = s.dial(t).Invoke(ctx, "/grpcUser.UserService/Nothing", &pb.GetUserRequest{}, &pb.User{})
		expectStatus(t, "an unknown method", err, codes.Unimplemented, "")
		err = s.dial(t).Invoke(ctx, "/grpcUser.Nothing/GetUser", &pb.GetUserRequest{}, &pb.User{})
		expectStatus(t, "an unknown service", err, codes.Unimplemented, "")

		_, err = client.AddUser(ctx, &pb.User{FirstName: "Big", Address: strings.Repeat("x", 5<<20)})
		expectStatus(t, "a message over the size limit", err, codes.OutOfRange, "")
	})
}

func checkAuth() {
	check("without the token every call is UNAUTHENTICATED; health stays open", func(t *T) {
		dir, _ := ioutil.TempDir("", "token-")
		defer os.RemoveAll(dir)
		tokenFile := filepath.Join(dir, "token")
		must(t, "write token", ioutil.WriteFile(tokenFile, []byte(token+"\n"), 0o600))
		s := start(t, "--auth-token-file", tokenFile)
		conn := s.dial(t)
		client := pb.NewUserServiceClient(conn)
		for _, presented := range []string{"", "wrong"} {
			ctx, cancel := deadline(callDeadline)
			message := "missing bearer token"
			if presented != "" {
				ctx = withToken(ctx, presented)
				message = "invalid bearer token"
			}
			_, err := client.AddUser(ctx, user("Ann"))
			expectStatus(t, "AddUser", err, codes.Unauthenticated, message)
			_, err = client.GetUser(ctx, &pb.GetUserRequest{Id: "ann"})
			expectStatus(t, "GetUser", err, codes.Unauthenticated, message)
			list, err := client.ListUsers(ctx, &pb.ListUsersRequest{})
			must(t, "ListUsers", err)
			_, err = list.Recv()
			expectStatus(t, "ListUsers", err, codes.Unauthenticated, message)
			bulk, err := client.BulkAddUsers(ctx)
			must(t, "BulkAddUsers", err)
			_ = bulk.Send(user("Ann"))
			_, err = bulk.CloseAndRecv()
			expectStatus(t, "BulkAddUsers", err, codes.Unauthenticated, message)
			sync, err := client.SyncUsers(ctx)
			must(t, "SyncUsers", err)
			_, err = sync.Recv()
			expectStatus(t, "SyncUsers", err, codes.Unauthenticated, message)
			reflection, err := v1alpha.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
			must(t, "reflection", err)
			_, err = reflection.Recv()
			expectStatus(t, "reflection", err, codes.Unauthenticated, message)
			cancel()
		}
		ctx, cancel := deadline(callDeadline)
		defer cancel()
		health, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		must(t, "health without a token", err)
		if health.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health: %v", health)
		}
		_, err = client.AddUser(withToken(ctx, token), user("Ann"))
		must(t, "AddUser with the token", err)
	})

	check("10,000 rejected calls on one connection, then a call that succeeds on it", func(t *T) {
		dir, _ := ioutil.TempDir("", "token-")
		defer os.RemoveAll(dir)
		tokenFile := filepath.Join(dir, "token")
		must(t, "write token", ioutil.WriteFile(tokenFile, []byte(token), 0o600))
		s := start(t, "--auth-token-file", tokenFile)
		client := pb.NewUserServiceClient(s.dial(t))
		const calls, workers = 10000, 64
		var next, wrong int64
		var firstWrong atomic.Value
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for atomic.AddInt64(&next, 1) <= calls {
					ctx, cancel := deadline(callDeadline)
					var err error
					if w%2 == 0 {
						_, err = client.AddUser(ctx, user("NoToken"))
					} else {
						// Invalid as well as unauthenticated: refused first
						// for the token.
						_, err = client.AddUser(withToken(ctx, "nope"), &pb.User{})
					}
					cancel()
					if status.Code(err) != codes.Unauthenticated {
						atomic.AddInt64(&wrong, 1)
						firstWrong.Store(fmt.Sprint(err))
					}
				}
			}(w)
		}
		wg.Wait()
		if wrong != 0 {
			t.Fatalf("%d calls were not UNAUTHENTICATED, e.g. %v", wrong, firstWrong.Load())
		}
		ctx, cancel := deadline(callDeadline)
		defer cancel()
		_, err := client.AddUser(withToken(ctx, token), user("Ann"))
		must(t, "the call after them", err)
	})
}

func checkLimits() {
	check("calls past the in-flight and subscriber caps are RESOURCE_EXHAUSTED", func(t *T) {
		s := start(t, "--max-in-flight-calls", "2", "--max-subscribers", "1")
		client := pb.NewUserServiceClient(s.dial(t))
		ctx, cancel := deadline(callDeadline)
		defer cancel()
		first, err := client.SyncUsers(ctx)
		must(t, "SyncUsers", err)
		must(t, "SyncUsers request", first.Send(&pb.SyncRequest{RequestId: 1, Op: &pb.SyncRequest_DeleteId{DeleteId: "x"}}))
		if _, err := first.Recv(); err != nil {
			t.Fatalf("first SyncUsers: %v", err)
		}
		second, err := client.SyncUsers(ctx)
		must(t, "second SyncUsers", err)
		_, err = second.Recv()
		expectStatus(t, "a second SyncUsers", err, codes.ResourceExhausted,
			"too many SyncUsers streams open; retry with backoff")
		open, err := client.BulkAddUsers(ctx)
		must(t, "BulkAddUsers", err)
		must(t, "a row", open.Send(user("Ann")))
		// The import holds the second slot once its row is committed: its
		// Change reaches the open SyncUsers stream. (Calls take their slots
		// as the server gets to them, not in the order they were sent.)
		change, err := first.Recv()
		must(t, "the row's Change", err)
		if change.GetChange().GetUser().GetFirstName() != "Ann" {
			t.Fatalf("expected the row's Change, got %v", change)
		}
		_, err = client.AddUser(ctx, user("Ann"))
		expectStatus(t, "AddUser past the cap", err, codes.ResourceExhausted,
			"too many calls in flight; retry with backoff")
		_, err = open.CloseAndRecv()
		must(t, "the bulk import", err)
		_, err = client.AddUser(ctx, user("Ann"))
		must(t, "AddUser once a slot is free", err)
	})

	check("streams still open at their deadline end with DEADLINE_EXCEEDED", func(t *T) {
		s := start(t)
		client := pb.NewUserServiceClient(s.dial(t))
		ctx, cancel := deadline(300 * time.Millisecond)
		defer cancel()
		sync, err := client.SyncUsers(ctx)
		must(t, "SyncUsers", err)
		_, err = sync.Recv()
		expectStatus(t, "SyncUsers", err, codes.DeadlineExceeded, "")
		ctx2, cancel2 := deadline(300 * time.Millisecond)
		defer cancel2()
		bulk, err := client.BulkAddUsers(ctx2)
		must(t, "BulkAddUsers", err)
		must(t, "a row", bulk.Send(user("Ann")))
		_, err = bulk.CloseAndRecv()
		// Ended by the deadline, whichever side noticed first.
		if status.Code(err) != codes.DeadlineExceeded && err != nil {
			t.Fatalf("BulkAddUsers: %v", err)
		}
	})

	check("a subscriber that falls too far behind is ABORTED", func(t *T) {
		s := start(t, "--feed-capacity", "8")
		// A fixed 64 KiB window (no BDP growth): a stream the client does
		// not read stops the server after about a thousand Changes.
		conn, err := grpc.Dial(s.addr, grpc.WithInsecure(), grpc.WithInitialWindowSize(64<<10),
			grpc.WithInitialConnWindowSize(64<<10))
		must(t, "dial", err)
		defer conn.Close()
		client := pb.NewUserServiceClient(conn)
		writer := pb.NewUserServiceClient(s.dial(t))
		ctx, cancel := deadline(callDeadline)
		defer cancel()
		sync, err := client.SyncUsers(ctx)
		must(t, "SyncUsers", err)
		// The subscription is in place once the headers are in.
		if _, err := sync.Header(); err != nil {
			t.Fatalf("headers: %v", err)
		}
		bulk, err := writer.BulkAddUsers(ctx)
		must(t, "BulkAddUsers", err)
		for i := 0; i < 5000; i++ {
			must(t, "a row", bulk.Send(user(fmt.Sprint("u", i))))
		}
		_, err = bulk.CloseAndRecv()
		must(t, "the import", err)
		for {
			_, err := sync.Recv()
			if err != nil {
				expectStatus(t, "the lagging stream", err, codes.Aborted, "")
				return
			}
		}
	})
}
