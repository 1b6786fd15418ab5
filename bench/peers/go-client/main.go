// A grpc-go bulk-import client, for bench/grpc-go-client.sh: what a Go
// service (or ghz) importing users looks like to a server. grpc-go writes
// one DATA frame per message, where tonic packs many into one.
//
//	grpc-go-client -addr 127.0.0.1:8080 -users 1000000 -streams 4
//
// Users get server-assigned ids; the streams share one connection, as
// grpc-go multiplexes them by default. Prints one line: users, seconds,
// users per second.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"sync"
	"time"

	"google.golang.org/grpc"

	pb "usergrpc"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "server address")
	users := flag.Int("users", 1000000, "users to import")
	streams := flag.Int("streams", 4, "concurrent BulkAddUsers streams")
	deadline := flag.Duration("deadline", 5*time.Minute, "deadline of each stream")
	flag.Parse()

	conn, err := grpc.Dial(*addr, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		log.Fatalf("dial %s: %v", *addr, err)
	}
	defer conn.Close()
	client := pb.NewUserServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), *deadline)
	defer cancel()

	var wg sync.WaitGroup
	var mu sync.Mutex
	var added, failed uint64
	began := time.Now()
	for s := 0; s < *streams; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			stream, err := client.BulkAddUsers(ctx)
			if err != nil {
				log.Fatalf("BulkAddUsers: %v", err)
			}
			row := &pb.User{LastName: "Doe", Address: "1 Long Street, Springfield", Verified: s%2 == 0}
			for n := s; n < *users; n += *streams {
				row.FirstName = fmt.Sprint("User", n)
				if err := stream.Send(row); err != nil {
					break // the status comes with the reply
				}
			}
			report, err := stream.CloseAndRecv()
			if err != nil {
				log.Fatalf("BulkAddUsers stream %d: %v", s, err)
			}
			mu.Lock()
			added += report.Added
			failed += report.Failed
			mu.Unlock()
		}(s)
	}
	wg.Wait()
	elapsed := time.Since(began).Seconds()
	if failed != 0 {
		log.Fatalf("%d rows failed", failed)
	}
	fmt.Printf("users %d seconds %.3f users_per_second %.0f\n", added, elapsed, float64(added)/elapsed)
}
