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
	"io/ioutil"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "interop/usergrpc"
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
