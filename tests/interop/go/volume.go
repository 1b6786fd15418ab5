// Volume at grpc-go's pace: a bulk import over 4 streams, a long listing,
// SyncUsers with 64 in flight and a stream of tiny messages.
package main

import (
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"

	pb "interop/usergrpc"
)

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
