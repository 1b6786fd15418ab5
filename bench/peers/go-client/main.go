// A grpc-go load client, for bench/grpc-go-client.sh: what a Go service
// (or ghz) calling a server looks like to it. grpc-go writes one DATA frame
// per message, where tonic packs many into one, and multiplexes every call
// on one connection.
//
//	grpc-go-client -addr 127.0.0.1:8080 -work add -workers 64 -for 5s
//	grpc-go-client -addr 127.0.0.1:8080 -work get -workers 64 -for 5s
//	grpc-go-client -addr 127.0.0.1:8080 -work bulk -users 400000 -streams 4
//	grpc-go-client -addr 127.0.0.1:8080 -work sync -window 64 -for 5s
//
// add: workers each call AddUser in a loop. get: 10,000 users are added
// first (not measured), then workers each call GetUser on them, in turn.
// bulk: BulkAddUsers streams share the users. sync: one SyncUsers stream
// upserts new users, keeping `window` of them unacknowledged; its own
// Changes come back to it too, as to every subscriber.
//
// With -pid, the server's CPU (utime + stime from /proc/PID/stat) is read
// right before and after the measured part, so setup is not counted. Prints
// one line: the work, operations, seconds, operations per second, and the
// server's CPU µs per operation (0 without -pid).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"

	pb "peer/usergrpc"
)

// The users GetUser reads: enough that the map is not all in cache lines,
// few enough to add in well under a second.
const getPopulation = 10000

var (
	pid   = flag.Int("pid", 0, "the server's process id, to read its CPU time")
	ticks = flag.Int("ticks", 100, "clock ticks per second (getconf CLK_TCK)")
)

// serverCPU is the server's utime + stime in seconds, or 0 without -pid.
func serverCPU() float64 {
	if *pid == 0 {
		return 0
	}
	stat, err := ioutil.ReadFile(fmt.Sprintf("/proc/%d/stat", *pid))
	if err != nil {
		log.Fatalf("server CPU: %v", err)
	}
	// The command (field 2) may hold spaces: count from after its ')'.
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / float64(*ticks)
}

func user(n int) *pb.User {
	return &pb.User{FirstName: fmt.Sprint("User", n), LastName: "Doe", Address: "1 Long Street, Springfield", Verified: n%2 == 0}
}

// loop runs call on `workers` goroutines until `d` has passed, and returns
// how many calls were made. A failed call ends the run.
func loop(workers int, d time.Duration, call func(worker, n int) error) uint64 {
	var done uint64
	var wg sync.WaitGroup
	until := time.Now().Add(d)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for n := 0; time.Now().Before(until); n++ {
				if err := call(w, n); err != nil {
					log.Fatalf("worker %d: %v", w, err)
				}
				atomic.AddUint64(&done, 1)
			}
		}(w)
	}
	wg.Wait()
	return done
}

func bulk(ctx context.Context, client pb.UserServiceClient, users, streams int) uint64 {
	var wg sync.WaitGroup
	var added, failed uint64
	for s := 0; s < streams; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			stream, err := client.BulkAddUsers(ctx)
			if err != nil {
				log.Fatalf("BulkAddUsers: %v", err)
			}
			row := &pb.User{LastName: "Doe", Address: "1 Long Street, Springfield", Verified: s%2 == 0}
			for n := s; n < users; n += streams {
				row.FirstName = fmt.Sprint("User", n)
				if err := stream.Send(row); err != nil {
					break // the status comes with the reply
				}
			}
			report, err := stream.CloseAndRecv()
			if err != nil {
				log.Fatalf("BulkAddUsers stream %d: %v", s, err)
			}
			atomic.AddUint64(&added, report.Added)
			atomic.AddUint64(&failed, report.Failed)
		}(s)
	}
	wg.Wait()
	if failed != 0 {
		log.Fatalf("%d rows failed", failed)
	}
	return added
}

// syncUsers upserts new users on one stream for `d`, at most `window`
// unacknowledged, and returns how many were acknowledged.
func syncUsers(ctx context.Context, client pb.UserServiceClient, window int, d time.Duration) uint64 {
	stream, err := client.SyncUsers(ctx)
	if err != nil {
		log.Fatalf("SyncUsers: %v", err)
	}
	credit := make(chan struct{}, window)
	for i := 0; i < window; i++ {
		credit <- struct{}{}
	}
	var acked uint64
	read := make(chan struct{})
	go func() {
		defer close(read)
		for {
			reply, err := stream.Recv()
			if err == io.EOF {
				return
			}
			if err != nil {
				log.Fatalf("SyncUsers: %v", err)
			}
			if ack := reply.GetAck(); ack != nil {
				if ack.Code != 0 {
					log.Fatalf("SyncUsers op %d: %d %s", ack.RequestId, ack.Code, ack.Message)
				}
				acked++
				credit <- struct{}{}
			}
		}
	}()
	until := time.Now().Add(d)
	for n := 0; time.Now().Before(until); n++ {
		<-credit
		op := &pb.SyncRequest{RequestId: uint64(n), Op: &pb.SyncRequest_Upsert{Upsert: user(n)}}
		if err := stream.Send(op); err != nil {
			log.Fatalf("SyncUsers send: %v", err)
		}
	}
	if err := stream.CloseSend(); err != nil {
		log.Fatalf("SyncUsers close: %v", err)
	}
	<-read
	return acked
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "server address")
	work := flag.String("work", "bulk", "add, get, bulk or sync")
	workers := flag.Int("workers", 64, "add, get: concurrent callers")
	runFor := flag.Duration("for", 5*time.Second, "add, get, sync: how long to call")
	users := flag.Int("users", 400000, "bulk: users to import")
	streams := flag.Int("streams", 4, "bulk: concurrent BulkAddUsers streams")
	window := flag.Int("window", 64, "sync: operations in flight")
	deadline := flag.Duration("deadline", 5*time.Minute, "deadline of the whole run")
	flag.Parse()

	conn, err := grpc.Dial(*addr, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		log.Fatalf("dial %s: %v", *addr, err)
	}
	defer conn.Close()
	client := pb.NewUserServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), *deadline)
	defer cancel()

	var ids []string
	if *work == "get" {
		ids = make([]string, getPopulation)
		for n := range ids {
			reply, err := client.AddUser(ctx, user(n))
			if err != nil {
				log.Fatalf("AddUser: %v", err)
			}
			ids[n] = reply.User.Id
		}
	}

	cpuBefore := serverCPU()
	began := time.Now()
	var ops uint64
	switch *work {
	case "add":
		ops = loop(*workers, *runFor, func(w, n int) error {
			_, err := client.AddUser(ctx, user(n*(*workers)+w))
			return err
		})
	case "get":
		ops = loop(*workers, *runFor, func(w, n int) error {
			_, err := client.GetUser(ctx, &pb.GetUserRequest{Id: ids[(n*(*workers)+w)%len(ids)]})
			return err
		})
	case "bulk":
		ops = bulk(ctx, client, *users, *streams)
	case "sync":
		ops = syncUsers(ctx, client, *window, *runFor)
	default:
		log.Fatalf("unknown work %q", *work)
	}
	elapsed := time.Since(began).Seconds()
	cpu := serverCPU() - cpuBefore
	fmt.Printf("work %s ops %d seconds %.3f ops_per_second %.0f server_cpu_us_per_op %.2f\n",
		*work, ops, elapsed, float64(ops)/elapsed, cpu*1e6/float64(ops))
}
