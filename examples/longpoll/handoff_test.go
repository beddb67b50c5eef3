package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// A hub handed to the next worker: its clients' sessions come back as
// they were (nick, rooms, cursor, not re-joined), their cursors still
// count, and the new worker's messages come after every old one. A
// split slot's worker keeps only its own clients; an empty state is none.
func TestHandoffRestoresSessions(t *testing.T) {
	oldSrv, old := newTestServer(t, 100)
	ann, bob := newClient(t), newClient(t)
	join(t, ann, old.URL, "ann", "lobby")
	join(t, ann, old.URL, "", "dev")
	join(t, bob, old.URL, "bob", "lobby")
	m1 := send(t, bob, old.URL, "lobby", "one")
	p := poll(t, ann, old.URL+"/poll")
	m2 := send(t, bob, old.URL, "lobby", "two") // unread by ann
	var before whoamiReply
	do(t, ann, "GET", old.URL+"/whoami", &before)
	if p.Cursor != m1.Seq || before.Session.Cursor != m1.Seq || before.Session.Unread != 1 {
		t.Fatalf("ann before the handoff: poll %+v, session %+v; want cursor %d, 1 unread", p, before.Session, m1.Seq)
	}

	var state bytes.Buffer
	if err := oldSrv.hub.writeState(&state); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Microsecond) // the new worker starts later
	newSrv, next := newTestServer(t, 200)
	n, err := newSrv.hub.restoreState(bytes.NewReader(state.Bytes()), func(netip.Addr) bool { return true })
	if err != nil || n != 2 {
		t.Fatalf("restore: %d sessions, %v; want 2", n, err)
	}
	t.Logf("2 sessions and 2 messages: %d bytes", state.Len())

	var after whoamiReply
	do(t, ann, "GET", next.URL+"/whoami", &after)
	if s := after.Session; after.PID != 200 || s == nil || s.Nick != "ann" || strings.Join(s.Rooms, ",") != "dev,lobby" ||
		s.Cursor != before.Session.Cursor || s.Unread != 1 || s.Rejoined {
		t.Fatalf("ann on the new worker: %+v %+v, want her session as it was: %+v", after, after.Session, before.Session)
	}
	// Her next poll gets what she had not read, then the new worker's
	// messages, in order.
	m3 := send(t, bob, next.URL, "lobby", "three")
	if m3.Seq <= m2.Seq {
		t.Errorf("the new worker's first message has seq %d, not after the old one's %d", m3.Seq, m2.Seq)
	}
	p = poll(t, ann, next.URL+"/poll")
	if len(p.Messages) != 2 || p.Messages[0].Seq != m2.Seq || p.Messages[1].Seq != m3.Seq || p.Reset {
		t.Errorf("ann's poll on the new worker = %+v, want two then three", p)
	}

	// A split slot's new worker keeps the sessions of its own clients:
	// here, none (the test clients are 127.0.0.1).
	split := newHub(time.Now)
	if n, err := split.restoreState(bytes.NewReader(state.Bytes()), func(netip.Addr) bool { return false }); err != nil || n != 0 {
		t.Errorf("restore keeping no client: %d sessions, %v; want none", n, err)
	}
	if n, err := newHub(time.Now).restoreState(strings.NewReader(""), nil); err != nil || n != 0 {
		t.Errorf("restore of an empty state: %d, %v; want nothing, no error", n, err)
	}
	if _, err := newHub(time.Now).restoreState(strings.NewReader(`{"Base":`), nil); err == nil {
		t.Error("restore of a cut state: no error")
	}
}
