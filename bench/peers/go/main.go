// A grpc-go peer of user-service, for bench/run.sh.
//
// It serves proto/user.proto with the semantics the benchmark relies on:
// validation, AddUser/GetUser, ListUsers in id order with after_id and limit
// (a page of users copied under the lock at a time), BulkAddUsers with counts
// and the first 100 errors, and SyncUsers upserts and deletes with Acks and
// Changes fanned out to every open SyncUsers stream through bounded channels
// (a subscriber that falls behind is ended with ABORTED). Users live in a map
// plus a sorted slice of ids behind one mutex. Ids it assigns are
// time-ordered hex, not UUIDv7: they sort the same way, which is what the
// benchmark needs.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "peer/usergrpc"
)

const (
	maxText           = 256
	maxReportedErrors = 100
	feedCapacity      = 65536
	pageSize          = 256
	maxMessageSize    = 4 * 1024 * 1024
)

var idRe = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

func invalid(u *pb.User) string {
	if u.Id != "" && !idRe.MatchString(u.Id) {
		return "id: may only contain A-Z, a-z, 0-9, '-' and '_', 1-64 characters"
	}
	if strings.TrimSpace(u.FirstName) == "" {
		return "first_name: must not be empty"
	}
	if len(u.FirstName) > maxText || len(u.LastName) > maxText || len(u.Address) > maxText {
		return "a text field is longer than 256 bytes"
	}
	return ""
}

type subscriber struct {
	ch     chan *pb.SyncResponse
	lagged chan struct{}
}

type store struct {
	mu      sync.Mutex
	users   map[string]*pb.User
	ids     []string
	seq     uint64
	counter uint64
	subs    map[*subscriber]struct{}
}

func (s *store) publish(kind pb.Change_Kind, u *pb.User) uint64 {
	s.seq++
	change := &pb.SyncResponse{Event: &pb.SyncResponse_Change{Change: &pb.Change{Seq: s.seq, Kind: kind, User: u}}}
	for sub := range s.subs {
		select {
		case sub.ch <- change:
		default:
			close(sub.lagged)
			delete(s.subs, sub)
		}
	}
	return s.seq
}

func (s *store) insertID(id string) {
	n := len(s.ids)
	if n == 0 || id > s.ids[n-1] {
		s.ids = append(s.ids, id)
		return
	}
	i := sort.SearchStrings(s.ids, id)
	s.ids = append(s.ids, "")
	copy(s.ids[i+1:], s.ids[i:])
	s.ids[i] = id
}

// create returns a code (0 OK, 3 invalid, 6 duplicate), a message, the user and its seq.
func (s *store) create(in *pb.User) (int32, string, *pb.User, uint64) {
	if msg := invalid(in); msg != "" {
		return 3, msg, nil, 0
	}
	u := &pb.User{Id: in.Id, FirstName: in.FirstName, LastName: in.LastName, Address: in.Address, Verified: in.Verified, Version: 1}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.createLocked(u)
}

func (s *store) createLocked(u *pb.User) (int32, string, *pb.User, uint64) {
	if u.Id == "" {
		s.counter++
		u.Id = fmt.Sprintf("%012x-%016x", time.Now().UnixMilli(), s.counter)
	}
	if _, ok := s.users[u.Id]; ok {
		return 6, fmt.Sprintf("user %q already exists", u.Id), nil, 0
	}
	u.Version = 1
	s.users[u.Id] = u
	s.insertID(u.Id)
	return 0, "", u, s.publish(pb.Change_CREATED, u)
}

func (s *store) upsert(in *pb.User, expected uint64) (int32, string, *pb.User, uint64) {
	if msg := invalid(in); msg != "" {
		return 3, msg, nil, 0
	}
	u := &pb.User{Id: in.Id, FirstName: in.FirstName, LastName: in.LastName, Address: in.Address, Verified: in.Verified}
	s.mu.Lock()
	defer s.mu.Unlock()
	var current *pb.User
	if u.Id != "" {
		current = s.users[u.Id]
	}
	stored := uint64(0)
	if current != nil {
		stored = current.Version
	}
	if expected != 0 && expected != stored {
		return 9, "version mismatch", nil, 0
	}
	if current == nil {
		return s.createLocked(u)
	}
	u.Version = current.Version + 1
	s.users[u.Id] = u
	return 0, "", u, s.publish(pb.Change_UPDATED, u)
}

func (s *store) delete(id string, expected uint64) (int32, string, *pb.User, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	current, ok := s.users[id]
	if !ok {
		return 5, fmt.Sprintf("user %q not found", id), nil, 0
	}
	if expected != 0 && expected != current.Version {
		return 9, "version mismatch", nil, 0
	}
	delete(s.users, id)
	i := sort.SearchStrings(s.ids, id)
	s.ids = append(s.ids[:i], s.ids[i+1:]...)
	return 0, "", current, s.publish(pb.Change_DELETED, current)
}

var grpcCodes = map[int32]codes.Code{3: codes.InvalidArgument, 5: codes.NotFound, 6: codes.AlreadyExists, 9: codes.FailedPrecondition}

type server struct {
	store *store
}

func (s *server) AddUser(ctx context.Context, in *pb.User) (*pb.Response, error) {
	code, msg, u, _ := s.store.create(in)
	if code != 0 {
		return nil, status.Error(grpcCodes[code], msg)
	}
	return &pb.Response{Code: 200, Message: "user saved successfully", User: u}, nil
}

func (s *server) GetUser(ctx context.Context, in *pb.GetUserRequest) (*pb.User, error) {
	if in.Id == "" {
		return nil, status.Error(codes.InvalidArgument, "id: must not be empty")
	}
	s.store.mu.Lock()
	u, ok := s.store.users[in.Id]
	s.store.mu.Unlock()
	if !ok {
		return nil, status.Errorf(codes.NotFound, "user %q not found", in.Id)
	}
	return u, nil
}

func (s *server) ListUsers(in *pb.ListUsersRequest, stream pb.UserService_ListUsersServer) error {
	after := in.AfterId
	started := after != ""
	var sent uint32
	page := make([]*pb.User, 0, pageSize)
	for {
		page = page[:0]
		s.store.mu.Lock()
		i := 0
		if started {
			i = sort.SearchStrings(s.store.ids, after)
			if i < len(s.store.ids) && s.store.ids[i] == after {
				i++
			}
		}
		for ; i < len(s.store.ids) && len(page) < pageSize; i++ {
			u := s.store.users[s.store.ids[i]]
			if in.Verified != nil && u.Verified != in.GetVerified() {
				continue
			}
			page = append(page, u)
		}
		more := i < len(s.store.ids)
		if i > 0 && i <= len(s.store.ids) {
			after = s.store.ids[i-1]
			started = true
		}
		s.store.mu.Unlock()
		for _, u := range page {
			if in.Limit != 0 && sent == in.Limit {
				return nil
			}
			if err := stream.Send(u); err != nil {
				return err
			}
			sent++
		}
		if !more {
			return nil
		}
	}
}

func (s *server) BulkAddUsers(stream pb.UserService_BulkAddUsersServer) error {
	reply := &pb.BulkAddUsersResponse{}
	var index uint64
	for {
		u, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(reply)
		}
		if err != nil {
			return err
		}
		if code, msg, _, _ := s.store.create(u); code != 0 {
			reply.Failed++
			if len(reply.Errors) < maxReportedErrors {
				reply.Errors = append(reply.Errors, &pb.BulkError{Index: index, Code: code, Message: msg})
			}
		} else {
			reply.Added++
		}
		index++
	}
}

func (s *server) SyncUsers(stream pb.UserService_SyncUsersServer) error {
	sub := &subscriber{ch: make(chan *pb.SyncResponse, feedCapacity), lagged: make(chan struct{})}
	s.store.mu.Lock()
	s.store.subs[sub] = struct{}{}
	s.store.mu.Unlock()
	defer func() {
		s.store.mu.Lock()
		delete(s.store.subs, sub)
		s.store.mu.Unlock()
	}()
	// Subscribed: answer with headers at once, as user-service does.
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	type ackSeq struct {
		ack *pb.SyncResponse
		seq uint64
	}
	acks := make(chan ackSeq, 64)
	go func() {
		defer close(acks)
		for {
			req, err := stream.Recv()
			if err != nil {
				return
			}
			var code int32
			var msg string
			var u *pb.User
			var seq uint64
			switch op := req.Op.(type) {
			case *pb.SyncRequest_Upsert:
				code, msg, u, seq = s.store.upsert(op.Upsert, req.ExpectedVersion)
			case *pb.SyncRequest_DeleteId:
				code, msg, u, seq = s.store.delete(op.DeleteId, req.ExpectedVersion)
			default:
				code, msg = 3, "op: set either upsert or delete_id"
			}
			ack := &pb.SyncResponse{Event: &pb.SyncResponse_Ack{Ack: &pb.Ack{RequestId: req.RequestId, Code: code, Message: msg, Seq: seq, User: u}}}
			select {
			case acks <- ackSeq{ack, seq}:
			case <-stream.Context().Done():
				return
			}
		}
	}()
	var ownSeq, deliveredSeq uint64
	// Set to nil once the reader has closed it: a nil channel never fires
	// in a select, so one select serves both phases.
	ackCh := acks
	for {
		if ackCh == nil && deliveredSeq >= ownSeq {
			return nil
		}
		var out *pb.SyncResponse
		select {
		case a, ok := <-ackCh:
			if !ok {
				ackCh = nil
				continue
			}
			if a.seq > ownSeq {
				ownSeq = a.seq
			}
			out = a.ack
		case c := <-sub.ch:
			deliveredSeq = c.GetChange().Seq
			out = c
		case <-sub.lagged:
			return status.Error(codes.Aborted, "change feed subscriber fell too far behind")
		case <-stream.Context().Done():
			return stream.Context().Err()
		}
		if err := stream.Send(out); err != nil {
			return err
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "address to listen on")
	flag.Parse()
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	s := grpc.NewServer(grpc.MaxRecvMsgSize(maxMessageSize), grpc.MaxSendMsgSize(maxMessageSize), grpc.MaxConcurrentStreams(1024))
	pb.RegisterUserServiceServer(s, &server{store: &store{users: map[string]*pb.User{}, subs: map[*subscriber]struct{}{}}})
	log.Printf("grpc-go peer listening on %s", lis.Addr())
	log.Fatal(s.Serve(lis))
}
