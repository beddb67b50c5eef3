package main

// The chat without a cluster: two workers' servers in this process, on
// one embedded NATS server, each behind its own TLS test server.

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// testNATS starts an embedded NATS server for the test.
func testNATS(t *testing.T) string {
	t.Helper()
	ns, url, err := startNATS(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	return url
}

// testWorker is one worker's chat on a TLS test server (HTTP/2 on).
type testWorker struct {
	*server
	ts *httptest.Server
}

func newTestWorker(t *testing.T, url string, slot int, h *hub) *testWorker {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	log := testLogger(t)
	b, err := dialBus(ctx, url, fmt.Sprintf("test slot %d", slot), log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.close)
	if h == nil {
		h = newHub()
	}
	if err := b.follow(ctx, h, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	s := &server{info: WorkerInfo{Slot: slot, PID: 1000 + slot, Version: "test"}, hub: h, bus: b, log: log}
	ts := httptest.NewUnstartedServer(s.handler())
	ts.EnableHTTP2 = true
	ts.StartTLS()
	t.Cleanup(ts.Close)
	return &testWorker{server: s, ts: ts}
}

// testClient is one WebSocket client.
type testClient struct {
	t   *testing.T
	c   *websocket.Conn
	hi  frame
	got []frame
}

func dialChat(t *testing.T, w *testWorker, hi hello) *testClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "wss"+strings.TrimPrefix(w.ts.URL, "https")+"/ws", &websocket.DialOptions{HTTPClient: w.ts.Client()})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.CloseNow() })
	tc := &testClient{t: t, c: c}
	if err := writeJSON(ctx, c, hi); err != nil {
		t.Fatal(err)
	}
	tc.hi = tc.next("welcome")
	return tc
}

// next reads frames until one of type typ, keeping the messages.
func (tc *testClient) next(typ string) frame {
	tc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		var f frame
		if err := readJSON(ctx, tc.c, &f); err != nil {
			tc.t.Fatalf("waiting for a %q frame: %v", typ, err)
		}
		if f.T == "msg" || f.T == "history" {
			tc.got = append(tc.got, f)
		}
		if f.T == typ {
			return f
		}
	}
}

func (tc *testClient) say(room, text, id string) frame {
	tc.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := writeJSON(ctx, tc.c, clientFrame{T: "say", Room: room, Text: text, ID: id}); err != nil {
		tc.t.Fatal(err)
	}
	return tc.next("ack")
}

// texts returns the texts of the messages received, in order.
func (tc *testClient) texts() []string {
	var out []string
	for _, f := range tc.got {
		if f.T == "msg" {
			out = append(out, f.Msg.Text)
		}
	}
	return out
}

// Two clients on two workers share a room: what one says, both get, once,
// in the stream's order, with the slot it was said on.
func TestFanOutAcrossWorkers(t *testing.T) {
	url := testNATS(t)
	w0, w1 := newTestWorker(t, url, 0, nil), newTestWorker(t, url, 1, nil)
	ann := dialChat(t, w0, hello{Nick: "ann"})
	bob := dialChat(t, w1, hello{Nick: "bob"})
	if ann.hi.Origin != "new" || ann.hi.Slot != 0 || bob.hi.Slot != 1 || !sidRE.MatchString(ann.hi.Session) {
		t.Fatalf("welcomes: %+v %+v", ann.hi, bob.hi)
	}
	a := ann.say("lobby", "hi bob", "1")
	b := bob.say("lobby", "hi ann", "1")
	if a.Seq == 0 || b.Seq <= a.Seq {
		t.Fatalf("acks: %+v %+v", a, b)
	}
	for _, c := range []*testClient{ann, bob} {
		for len(c.texts()) < 2 {
			c.next("msg")
		}
		if got := c.texts(); got[0] != "hi bob" || got[1] != "hi ann" {
			t.Errorf("%s got %q", c.hi.Nick, got)
		}
	}
	if m := bob.got[len(bob.got)-2].Msg; m.Nick != "ann" || m.Slot != 0 || m.Seq != a.Seq {
		t.Errorf("bob got ann's message as %+v", m)
	}
	// A room one is not in: an error naming the fix, nothing published.
	ctx := context.Background()
	_ = writeJSON(ctx, ann.c, clientFrame{T: "say", Room: "ops", Text: "x", ID: "2"})
	if e := ann.next("error"); !strings.Contains(e.Error, "join it first") {
		t.Errorf("say in a room not joined: %q", e.Error)
	}
}

// A message resent with the same id (its ack was lost with the socket)
// is in the stream once: the second ack names the first's seq, and no
// client gets it twice.
func TestResendIsDeduplicated(t *testing.T) {
	url := testNATS(t)
	w := newTestWorker(t, url, 0, nil)
	ann := dialChat(t, w, hello{Nick: "ann"})
	first := ann.say("lobby", "once", "7")
	second := ann.say("lobby", "once", "7")
	if first.Seq != second.Seq {
		t.Fatalf("resend got seq %d, first %d", second.Seq, first.Seq)
	}
	third := ann.say("lobby", "after", "8")
	for len(ann.texts()) < 2 {
		ann.next("msg")
	}
	if got := ann.texts(); len(got) != 2 || got[0] != "once" || got[1] != "after" {
		t.Fatalf("got %q, want [once after] (seqs %d %d)", got, first.Seq, third.Seq)
	}
}

// A retiring worker closes its sockets with 1012 and a retry hint; its
// sessions go to the slot's next worker by the handoff; a client that
// reconnects there with its cursor finds its session and gets what was
// said meanwhile, once, and nothing it had.
func TestRetireHandoffResume(t *testing.T) {
	url := testNATS(t)
	old, other := newTestWorker(t, url, 0, nil), newTestWorker(t, url, 1, nil)
	ann := dialChat(t, old, hello{Nick: "ann", Rooms: []string{"lobby", "ops"}})
	bob := dialChat(t, other, hello{Nick: "bob", Rooms: []string{"lobby"}})
	bob.say("lobby", "one", "1")
	ann.next("msg")
	cursor := ann.got[len(ann.got)-1].Msg.Seq

	// The handoff, as ipcluster runs it: the old worker writes, the new
	// one reads before it serves.
	var state bytes.Buffer
	if err := old.hub.writeState(&state); err != nil {
		t.Fatal(err)
	}
	nh := newHub()
	if n, err := nh.restoreState(&state, func(netip.Addr) bool { return true }); err != nil || n != 1 {
		t.Fatalf("restore: %d sessions, %v", n, err)
	}
	next := newTestWorker(t, url, 0, nh)

	idle := old.hub.retire(0, jitter)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, _, err := ann.c.Read(ctx)
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.StatusServiceRestart || !strings.Contains(ce.Reason, "retry_ms=") {
		t.Fatalf("retiring worker's close: %v", err)
	}
	select {
	case <-idle:
	case <-ctx.Done():
		t.Fatal("the retired hub never saw its socket end")
	}
	// A socket that reaches the retired worker now is told to go too.
	c, _, err := websocket.Dial(ctx, "wss"+strings.TrimPrefix(old.ts.URL, "https")+"/ws", &websocket.DialOptions{HTTPClient: old.ts.Client()})
	if err != nil {
		t.Fatal(err)
	}
	_ = writeJSON(ctx, c, hello{Session: ann.hi.Session})
	if _, _, err := c.Read(ctx); !errors.As(err, &ce) || ce.Code != websocket.StatusServiceRestart {
		t.Fatalf("a late socket on the retired worker: %v", err)
	}

	bob.say("lobby", "two", "2")
	bob.say("lobby", "three", "3")
	back := dialChat(t, next, hello{Session: ann.hi.Session, Nick: "ann", Rooms: []string{"lobby"}, Cursor: cursor})
	if back.hi.Origin != "handoff" || back.hi.Session != ann.hi.Session || len(back.hi.Rooms) != 2 {
		t.Fatalf("welcome on the new worker: %+v", back.hi)
	}
	for len(back.texts()) < 2 {
		back.next("msg")
	}
	if got := back.texts(); len(got) != 2 || got[0] != "two" || got[1] != "three" {
		t.Fatalf("after the move ann got %q, want [two three]", got)
	}
}

// After a crash (no handoff), the client's memory re-creates its session
// and it gets what it missed.
func TestSessionFromClientAfterCrash(t *testing.T) {
	url := testNATS(t)
	w, other := newTestWorker(t, url, 0, nil), newTestWorker(t, url, 1, nil)
	bob := dialChat(t, other, hello{Nick: "bob"})
	bob.say("lobby", "before", "1")
	sid := newSessionID()
	back := dialChat(t, w, hello{Session: sid, Nick: "ann", Rooms: []string{"lobby"}, Cursor: 0})
	if back.hi.Origin != "client" || back.hi.Session != sid {
		t.Fatalf("welcome: %+v", back.hi)
	}
	back.next("msg")
	if got := back.texts(); len(got) != 1 || got[0] != "before" {
		t.Fatalf("got %q", got)
	}
	// Bad hellos: an error naming the fix.
	for _, hi := range []hello{{}, {Nick: "no spaces"}, {Nick: "ann", Rooms: []string{"UPPER"}}} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, _, err := websocket.Dial(ctx, "wss"+strings.TrimPrefix(w.ts.URL, "https")+"/ws", &websocket.DialOptions{HTTPClient: w.ts.Client()})
		if err != nil {
			t.Fatal(err)
		}
		_ = writeJSON(ctx, c, hi)
		var f frame
		if err := readJSON(ctx, c, &f); err != nil || f.T != "error" || !strings.Contains(f.Error, "use ") && !strings.Contains(f.Error, "send a nick") {
			t.Errorf("hello %+v: %+v %v", hi, f, err)
		}
		c.CloseNow()
		cancel()
	}
}

// The ring: a client whose cursor is older than the ring is told how
// many messages it missed; the backlog is in order and of its rooms.
func TestHubSince(t *testing.T) {
	h := newHub()
	// Past the slack: the ring trimmed once, to seqs ringSlack+1..n.
	n := ringSize + ringSlack + 10
	for i := 1; i <= n; i++ {
		room := "lobby"
		if i%2 == 0 {
			room = "ops"
		}
		h.feed(message{Seq: uint64(i), Room: room})
	}
	h.feed(message{Seq: 5, Room: "lobby"}) // a redelivery: dropped
	if len(h.ring) != ringSize+10 || h.ring[0].Seq != ringSlack+1 {
		t.Fatalf("ring of %d from seq %d, want %d from %d", len(h.ring), h.ring[0].Seq, ringSize+10, ringSlack+1)
	}
	got, missed := h.sinceLocked(3, []string{"lobby"})
	// Gone from the ring: 4..2500; beyond the backlog's bound: 4005 of
	// the 5005 lobby messages the ring has.
	if missed != 2497+4005 {
		t.Errorf("missed %d, want 6502", missed)
	}
	if len(got) != maxBacklog || got[len(got)-1].Seq != uint64(n-1) {
		t.Errorf("backlog of %d ending at %d", len(got), got[len(got)-1].Seq)
	}
	got, missed = h.sinceLocked(uint64(n-4), []string{"ops"})
	if missed != 0 || len(got) != 2 || got[0].Seq != uint64(n-2) || got[1].Seq != uint64(n) {
		t.Errorf("recent: %+v, missed %d", got, missed)
	}
}

// The worker's certificate is read again when its files change: a new
// handshake gets the new one; a pair that does not load keeps the old.
func TestCertReload(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, err := writeSelfSigned(dir, "first", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := newCertReloader(certFile, keyFile, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", r.tlsConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.(*tls.Conn).Handshake()
			}()
		}
	}()
	serve := func() string { // a new handshake: the certificate it gets
		t.Helper()
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if cn := serve(); cn != "first" {
		t.Fatalf("served %q", cn)
	}
	later := func() { // as if a second passed: the next handshake looks
		r.mu.Lock()
		r.checked = time.Time{}
		r.mu.Unlock()
	}
	if _, _, err := writeSelfSigned(dir, "second", []string{"127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	bump(t, certFile, keyFile)
	later()
	if cn := serve(); cn != "second" {
		t.Fatalf("after renewal served %q, want second", cn)
	}
	if err := os.WriteFile(certFile, []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	later()
	if cn := serve(); cn != "second" {
		t.Fatalf("after a broken write served %q, want second (kept)", cn)
	}
	// Missing files at start: an error naming the flags.
	if _, err := newCertReloader(filepath.Join(dir, "none.pem"), keyFile, testLogger(t)); err == nil || !strings.Contains(err.Error(), "-cert") {
		t.Errorf("missing certificate: %v", err)
	}
	if _, err := newCertReloader(keyFile, keyFile, testLogger(t)); err == nil || !strings.Contains(err.Error(), "-cert and -key") {
		t.Errorf("key as certificate: %v", err)
	}
}

// bump moves the files' modification times on, as a renewal a second
// later would (some file systems keep whole seconds).
func bump(t *testing.T, files ...string) {
	t.Helper()
	ts := time.Now().Add(2 * time.Second)
	for _, f := range files {
		if err := os.Chtimes(f, ts, ts); err != nil {
			t.Fatal(err)
		}
	}
}
