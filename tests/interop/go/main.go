// The grpc-go client suite: user-service as grpc-go clients (grpcurl, ghz,
// Go services) see it, every call with a deadline, as they make them.
//
// It starts the real server binary itself (on port 0, learning the address
// from --addr-file), once per group of checks, runs each check, prints
// PASS or FAIL with the reason, and exits 1 if any check failed.
//
//	interop-go -server target/debug/user-service
//
// scripts/interop-go.sh builds it offline from Debian's grpc-go packages
// and runs it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/golang/protobuf/proto"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	v1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"

	pb "usergrpc"
	v1 "reflectionv1"
)

var (
	serverBin = flag.String("server", "target/debug/user-service", "the user-service binary")
	bulkUsers = flag.Int("bulk-users", 1000000, "users imported by the bulk check, over 4 streams")
	listUsers = flag.Int("list-users", 100000, "users read back by the listing check")
	only      = flag.String("only", "", "run only the checks whose name contains this")
)

// Every call and stream gets a deadline, as real clients set one.
const (
	callDeadline   = 10 * time.Second
	streamDeadline = 5 * time.Minute
	patience       = 20 * time.Second
	token          = "go-interop-token"
)

// ---- the checks' runner

type failure struct{ message string }

// T is what a check gets: Fatalf ends the check as failed.
type T struct{ cleanups []func() }

func (t *T) Fatalf(format string, args ...interface{}) {
	panic(failure{fmt.Sprintf(format, args...)})
}

func (t *T) Cleanup(f func()) { t.cleanups = append(t.cleanups, f) }

var failed []string

func check(name string, fn func(t *T)) {
	if *only != "" && !strings.Contains(name, *only) {
		return
	}
	start := time.Now()
	t := &T{}
	outcome := func() (message string) {
		defer func() {
			if r := recover(); r != nil {
				if f, ok := r.(failure); ok {
					message = f.message
				} else {
					message = fmt.Sprintf("panic: %v\n%s", r, debug.Stack())
				}
			}
		}()
		fn(t)
		return ""
	}()
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
	elapsed := time.Since(start).Round(time.Millisecond)
	if outcome == "" {
		fmt.Printf("PASS %s (%v)\n", name, elapsed)
	} else {
		fmt.Printf("FAIL %s (%v): %s\n", name, elapsed, outcome)
		failed = append(failed, name)
	}
}

func deadline(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// ---- the server under test

type server struct {
	cmd  *exec.Cmd
	addr string
	dir  string
	log  *os.File
}

// start runs the binary on a free port with a memory store and `args`.
func start(t *T, args ...string) *server {
	dir, err := ioutil.TempDir("", "user-service-go-")
	if err != nil {
		t.Fatalf("temp dir: %v", err)
	}
	addrFile := filepath.Join(dir, "addr")
	log, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		t.Fatalf("log file: %v", err)
	}
	all := append([]string{"--addr", "127.0.0.1:0", "--addr-file", addrFile, "--store", "memory"}, args...)
	cmd := exec.Command(*serverBin, all...)
	cmd.Stdout = log
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", *serverBin, err)
	}
	s := &server{cmd: cmd, dir: dir, log: log}
	t.Cleanup(s.kill)
	// The file appears, whole, once the server listens.
	for waited := time.Duration(0); ; waited += 20 * time.Millisecond {
		if text, err := ioutil.ReadFile(addrFile); err == nil {
			s.addr = strings.TrimSpace(string(text))
			return s
		}
		if waited > patience {
			t.Fatalf("the server did not start: %s", s.logText())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *server) logText() string {
	text, _ := ioutil.ReadFile(s.log.Name())
	return string(text)
}

// stop sends SIGTERM and returns the exit code.
func (s *server) stop(t *T) int {
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.cmd.Wait() }()
	select {
	case err := <-done:
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode()
		}
		return 0
	case <-time.After(patience):
		t.Fatalf("the server did not stop")
		return -1
	}
}

func (s *server) kill() {
	if s.cmd.ProcessState == nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
	}
	s.log.Close()
	os.RemoveAll(s.dir)
}

func (s *server) dial(t *T) *grpc.ClientConn {
	ctx, cancel := deadline(patience)
	defer cancel()
	conn, err := grpc.DialContext(ctx, s.addr, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.MaxCallSendMsgSize(16<<20)))
	if err != nil {
		t.Fatalf("dial %s: %v", s.addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// ---- assertions

func expectStatus(t *T, what string, err error, code codes.Code, message string) {
	st, ok := status.FromError(err)
	if !ok || st.Code() != code || (message != "" && st.Message() != message) {
		t.Fatalf("%s: got %v, want %v %q", what, err, code, message)
	}
}

func must(t *T, what string, err error) {
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func user(first string) *pb.User {
	return &pb.User{FirstName: first, LastName: "Doe", Address: "1 Long Street, Springfield"}
}

func withToken(ctx context.Context, value string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+value)
}

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

func checkVolume() {
	check(fmt.Sprintf("bulk import of %d users over 4 streams, then ListUsers of %d", *bulkUsers, *listUsers), func(t *T) {
		s := start(t)
		client := pb.NewUserServiceClient(s.dial(t))
		ctx, cancel := deadline(streamDeadline)
		defer cancel()
		const streams = 4
		var added, failed uint64
		errs := make(chan error, streams)
		began := time.Now()
		for i := 0; i < streams; i++ {
			go func(i int) {
				stream, err := client.BulkAddUsers(ctx)
				if err != nil {
					errs <- err
					return
				}
				row := user("Bulk")
				for n := i; n < *bulkUsers; n += streams {
					row.FirstName = fmt.Sprint("Bulk", n)
					if err := stream.Send(row); err != nil {
						// The status is in the reply.
						break
					}
				}
				report, err := stream.CloseAndRecv()
				if err == nil {
					atomic.AddUint64(&added, report.Added)
					atomic.AddUint64(&failed, report.Failed)
				}
				errs <- err
			}(i)
		}
		for i := 0; i < streams; i++ {
			must(t, "a bulk stream", <-errs)
		}
		elapsed := time.Since(began)
		if added != uint64(*bulkUsers) || failed != 0 {
			t.Fatalf("added %d, failed %d of %d", added, failed, *bulkUsers)
		}
		fmt.Printf("     %d users in %v (%.0f users/s)\n", added, elapsed.Round(time.Millisecond),
			float64(added)/elapsed.Seconds())

		list, err := client.ListUsers(ctx, &pb.ListUsersRequest{Limit: uint32(*listUsers)})
		must(t, "ListUsers", err)
		var last string
		count := 0
		for {
			u, err := list.Recv()
			if err == io.EOF {
				break
			}
			must(t, "a listed user", err)
			if u.Id <= last {
				t.Fatalf("ids out of order: %q after %q", u.Id, last)
			}
			last = u.Id
			count++
		}
		if count != *listUsers {
			t.Fatalf("listed %d users, want %d", count, *listUsers)
		}
	})

	check("SyncUsers with 64 requests in flight: every Ack, every Change, one gapless sequence", func(t *T) {
		const ops, window = 20000, 64
		s := start(t)
		client := pb.NewUserServiceClient(s.dial(t))
		ctx, cancel := deadline(streamDeadline)
		defer cancel()
		sync, err := client.SyncUsers(ctx)
		must(t, "SyncUsers", err)
		slots := make(chan struct{}, window)
		sendErr := make(chan error, 1)
		go func() {
			for i := 1; i <= ops; i++ {
				slots <- struct{}{}
				// Ten users, updated over and over.
				u := user("Sync")
				u.Id = fmt.Sprint("s", i%10)
				if err := sync.Send(&pb.SyncRequest{RequestId: uint64(i), Op: &pb.SyncRequest_Upsert{Upsert: u}}); err != nil {
					sendErr <- err
					return
				}
			}
			sendErr <- sync.CloseSend()
		}()
		ackSeq := map[uint64]uint64{}
		var nextAck, lastSeq uint64 = 1, 0
		changes := 0
		for {
			response, err := sync.Recv()
			if err == io.EOF {
				break
			}
			must(t, "a sync reply", err)
			if ack := response.GetAck(); ack != nil {
				if ack.RequestId != nextAck || ack.Code != 0 {
					t.Fatalf("Ack %d (code %d %q), want request %d OK", ack.RequestId, ack.Code, ack.Message, nextAck)
				}
				nextAck++
				ackSeq[ack.Seq] = ack.RequestId
				<-slots
			} else if change := response.GetChange(); change != nil {
				if change.Seq != lastSeq+1 && lastSeq != 0 {
					t.Fatalf("seq %d after %d", change.Seq, lastSeq)
				}
				if _, ok := ackSeq[change.Seq]; !ok {
					t.Fatalf("Change %d before its Ack", change.Seq)
				}
				lastSeq = change.Seq
				changes++
			}
		}
		must(t, "sending", <-sendErr)
		if nextAck != ops+1 || changes != ops {
			t.Fatalf("%d Acks and %d Changes, want %d each", nextAck-1, changes, ops)
		}
	})

	check("SyncUsers deletes of 1-character ids, as fast as grpc-go sends them", func(t *T) {
		const ops = 100000
		s := start(t)
		client := pb.NewUserServiceClient(s.dial(t))
		ctx, cancel := deadline(streamDeadline)
		defer cancel()
		sync, err := client.SyncUsers(ctx)
		must(t, "SyncUsers", err)
		sendErr := make(chan error, 1)
		go func() {
			for i := 1; i <= ops; i++ {
				id := string(rune('a' + i%26))
				if err := sync.Send(&pb.SyncRequest{RequestId: uint64(i), Op: &pb.SyncRequest_DeleteId{DeleteId: id}}); err != nil {
					sendErr <- err
					return
				}
			}
			sendErr <- sync.CloseSend()
		}()
		acks := 0
		for {
			response, err := sync.Recv()
			if err == io.EOF {
				break
			}
			must(t, fmt.Sprintf("reply after %d Acks", acks), err)
			ack := response.GetAck()
			if ack == nil || codes.Code(ack.Code) != codes.NotFound || ack.RequestId != uint64(acks+1) {
				t.Fatalf("reply %d: %v", acks+1, response)
			}
			acks++
		}
		must(t, "sending", <-sendErr)
		if acks != ops {
			t.Fatalf("%d Acks, want %d", acks, ops)
		}
	})
}

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

func main() {
	flag.Parse()
	checkErrors()
	checkAuth()
	checkLimits()
	checkReflection()
	checkHealth()
	checkConnections()
	checkVolume()
	if len(failed) > 0 {
		fmt.Printf("grpc-go suite: %d failed: %s\n", len(failed), strings.Join(failed, "; "))
		os.Exit(1)
	}
	fmt.Println("grpc-go suite: all checks passed")
}
