package main

// The hub: one worker's sessions and its copy of the message stream.
//
// Every worker receives every message (pubsub.go feeds them here in the
// stream's order), keeps the stream's tail in a ring, and writes to each
// open socket the messages of its session's rooms. A message's seq is the
// stream's sequence number, one order for the whole cluster, so a
// session's cursor (the last seq its client has) means the same on every
// worker: a client that comes back to another worker (after a deploy or
// a retirement) is sent what it missed from the ring, exactly once.
//
// What lives only here, in this worker's memory, is the session: its
// nickname, rooms and cursor, and the socket its client has open. It
// travels to the slot's next worker by the state handoff (handoff.go).

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"sync"
	"time"
)

const (
	ringSize   = 10000            // messages of the stream a worker keeps at least (the stream keeps as many)
	ringSlack  = ringSize / 4     // and at most this many more, trimmed at once
	sessionTTL = 10 * time.Minute // a session with no socket for this long is dropped
	historyLen = 50               // messages of a room sent to a client that joins it
	maxRooms   = 16               // rooms a session may be in
	maxText    = 2000             // bytes of a message's text
	maxBacklog = 1000             // messages sent to a client that comes back; older ones are counted as missed
)

var (
	nickRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,24}$`)
	roomRE = regexp.MustCompile(`^[a-z0-9-]{1,32}$`)
	sidRE  = regexp.MustCompile(`^[0-9a-f]{32}$`)
	midRE  = regexp.MustCompile(`^[A-Za-z0-9_-]{1,40}$`) // a client's id for a message it sends
)

// message is one chat message, as published and as sent to clients.
type message struct {
	Seq  uint64    `json:"seq"`  // the stream's sequence number: the cluster's one order
	ID   string    `json:"id"`   // session id and the sender's id for it: the stream drops a resend
	Room string    `json:"room"` // without the "#"
	Nick string    `json:"nick"`
	Text string    `json:"text"`
	At   time.Time `json:"at"`
	Slot int       `json:"slot"` // where its sender was connected
	PID  int       `json:"pid"`
}

// session is one client's state in this worker.
type session struct {
	id       string
	nick     string
	rooms    []string
	cursor   uint64 // the highest seq written to its client
	addr     netip.Addr
	lastSeen time.Time
	origin   string // how this worker came by it, until its first socket (see attach)
	sock     *socket
}

// socket is a session's open connection, as the hub sees it: the writer
// goroutine (ws.go) drains out and closes the connection when told.
type socket struct {
	out    chan message
	kick   chan closeReason // buffered 1: why the hub wants it closed
	closed bool             // under hub.mu: kick was sent
}

// closeReason is a WebSocket close the hub asks for.
type closeReason struct {
	code    int
	reason  string
	delay   time.Duration // wait this long first (a retirement's jitter)
	retryMS int           // the client's reconnection delay hint
}

// hub is a worker's sessions and ring. Every field is under mu.
type hub struct {
	mu       sync.Mutex
	ring     []message // the stream's tail in seq order: the last ringSize to ringSize+ringSlack
	last     uint64    // the highest seq received (0: none)
	sessions map[string]*session
	sockets  int
	idle     chan struct{} // closed when sockets drops to 0 while draining; nil otherwise
	retired  bool          // new sockets are refused with a retry hint
}

func newHub() *hub {
	return &hub{sessions: make(map[string]*session)}
}

// feed takes one message from the stream, in order, and writes it to the
// open sockets of the sessions in its room. A socket whose buffer is full
// (a client that does not read) is closed: its client reconnects and gets
// what it missed from its cursor.
func (h *hub) feed(m message) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if m.Seq <= h.last {
		return // a redelivery
	}
	h.last = m.Seq
	if len(h.ring) == ringSize+ringSlack {
		// Trim a slack's worth at once: a copy every ringSlack messages,
		// not one of the whole ring per message.
		h.ring = append(h.ring[:0], h.ring[ringSlack:]...)
	}
	h.ring = append(h.ring, m)
	for _, s := range h.sessions {
		if s.sock == nil || !slices.Contains(s.rooms, m.Room) || m.Seq <= s.cursor {
			continue
		}
		select {
		case s.sock.out <- m:
			s.cursor = m.Seq
		default:
			h.kickLocked(s.sock, closeReason{code: closeTryAgain, reason: "too slow: reconnect and catch up", retryMS: 1000})
		}
	}
}

// caughtUp reports whether the hub has every message up to seq.
func (h *hub) caughtUp(seq uint64) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.last >= seq
}

// hello is what a client says first: who it is, and what it has.
type hello struct {
	Session string   `json:"session"` // "" for a new client
	Nick    string   `json:"nick"`    // its nickname, for a new session or to re-create one
	Rooms   []string `json:"rooms"`   // its rooms, likewise
	Cursor  uint64   `json:"cursor"`  // the highest seq it has shown
}

// attachment is what a socket starts with.
type attachment struct {
	session *session
	origin  string               // how this worker had the session (see attach)
	rooms   []string             // its rooms, as they were
	history map[string][]message // for a new session: its rooms' recent messages
	backlog []message            // what the client missed, in order
	missed  uint64               // messages it missed that are older than the ring (or than maxBacklog)
}

var errRetired = errors.New("this worker is retiring")

// attach finds or makes the session a hello names and opens a socket on
// it, with the messages its client missed since its cursor (a new session
// starts at the stream's end). A second socket on a session replaces the
// first. The new socket and the backlog are taken under the lock that
// feed holds, so no message falls between them or comes twice. The
// attachment says how this worker came by the session: "new", "memory"
// (it was here), "handoff" (the slot's previous worker handed it over) or
// "client" (re-created from what the client remembers: after a crash).
func (h *hub) attach(hi hello, addr netip.Addr, newID func() string) (*socket, attachment, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.retired {
		return nil, attachment{}, errRetired
	}
	s := h.sessions[hi.Session]
	if s == nil {
		if hi.Nick == "" {
			return nil, attachment{}, errors.New("no such session here and no nickname to start one: send a nick")
		}
		if !nickRE.MatchString(hi.Nick) {
			return nil, attachment{}, fmt.Errorf("nickname %q: use 1 to 24 letters, digits, '_', '.' or '-'", hi.Nick)
		}
		rooms, err := validRooms(hi.Rooms)
		if err != nil {
			return nil, attachment{}, err
		}
		s = &session{id: newID(), nick: hi.Nick, rooms: rooms, cursor: h.last, origin: "new"}
		if sidRE.MatchString(hi.Session) {
			// A session this worker does not have (its worker crashed,
			// or it began after the handoff): re-create it from what
			// the client remembers, and send what it missed.
			s.id, s.origin, s.cursor = hi.Session, "client", hi.Cursor
		}
		h.sessions[s.id] = s
	} else {
		s.cursor = hi.Cursor // what the client has shown is what counts
	}
	s.cursor = min(s.cursor, h.last)
	if s.sock != nil {
		h.kickLocked(s.sock, closeReason{code: closeReplaced, reason: "this session opened another connection"})
	}
	sock := &socket{out: make(chan message, 256), kick: make(chan closeReason, 1)}
	s.sock, s.addr, s.lastSeen = sock, addr, time.Time{}
	h.sockets++
	a := attachment{session: s, origin: s.origin, rooms: slices.Clone(s.rooms)}
	if s.origin == "new" {
		a.history = make(map[string][]message, len(s.rooms))
		for _, r := range s.rooms {
			a.history[r] = h.recentLocked(r)
		}
	}
	s.origin = "memory"
	a.backlog, a.missed = h.sinceLocked(s.cursor, s.rooms)
	s.cursor = h.last // the backlog has every message of its rooms up to here
	return sock, a, nil
}

// sinceLocked returns the ring's messages after cursor in rooms, and how
// many messages (of any room) after cursor the ring no longer holds.
func (h *hub) sinceLocked(cursor uint64, rooms []string) ([]message, uint64) {
	var missed uint64
	i, _ := slices.BinarySearchFunc(h.ring, cursor+1, func(m message, seq uint64) int { return cmpSeq(m.Seq, seq) })
	if len(h.ring) > 0 && h.ring[0].Seq > cursor+1 {
		missed = h.ring[0].Seq - cursor - 1
	}
	var out []message
	for _, m := range h.ring[i:] {
		if slices.Contains(rooms, m.Room) {
			out = append(out, m)
		}
	}
	if n := len(out) - maxBacklog; n > 0 {
		missed += uint64(n)
		out = out[n:]
	}
	return out, missed
}

func cmpSeq(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// detach ends a socket: its session stays for sessionTTL.
func (h *hub) detach(s *session, sock *socket) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s.sock == sock {
		s.sock, s.lastSeen = nil, time.Now()
	}
	h.sockets--
	if h.sockets == 0 && h.idle != nil {
		close(h.idle)
		h.idle = nil
	}
}

// join adds a room to a session and returns its recent messages, which
// the client may not have (they came before it joined).
func (h *hub) join(s *session, room string) ([]message, error) {
	if !roomRE.MatchString(room) {
		return nil, fmt.Errorf("room %q: use 1 to 32 lower-case letters, digits or '-'", room)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if slices.Contains(s.rooms, room) {
		return nil, nil
	}
	if len(s.rooms) >= maxRooms {
		return nil, fmt.Errorf("already in %d rooms: leave one first", maxRooms)
	}
	s.rooms = append(s.rooms, room)
	return h.recentLocked(room), nil
}

// recentLocked returns a room's last historyLen messages, in order.
func (h *hub) recentLocked(room string) []message {
	var recent []message
	for i := len(h.ring) - 1; i >= 0 && len(recent) < historyLen; i-- {
		if h.ring[i].Room == room {
			recent = append(recent, h.ring[i])
		}
	}
	slices.Reverse(recent)
	return recent
}

// leave takes a room from a session.
func (h *hub) leave(s *session, room string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s.rooms = slices.DeleteFunc(s.rooms, func(r string) bool { return r == room })
}

// inRoom reports whether a session is in room, and its nickname.
func (h *hub) inRoom(s *session, room string) (string, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return s.nick, slices.Contains(s.rooms, room)
}

// retire asks every socket to reconnect (to the slot's new worker), each
// at a random moment within spread so the new worker is not hit by all
// its clients at once, and refuses new sockets. It returns a channel
// closed when the last socket has ended.
func (h *hub) retire(spread time.Duration, jitter func(time.Duration) time.Duration) <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.retired = true
	for _, s := range h.sessions {
		if s.sock != nil {
			h.kickLocked(s.sock, closeReason{code: closeServiceRestart, reason: "worker retiring: reconnect",
				delay: jitter(spread), retryMS: int(jitter(250*time.Millisecond) / time.Millisecond)})
		}
	}
	return h.idleLocked()
}

// closeAll closes every socket at once (the worker is told to finish).
func (h *hub) closeAll() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.retired = true
	for _, s := range h.sessions {
		if s.sock != nil {
			h.kickLocked(s.sock, closeReason{code: closeGoingAway, reason: "worker stopping", retryMS: 1000})
		}
	}
	return h.idleLocked()
}

func (h *hub) idleLocked() <-chan struct{} {
	if h.sockets == 0 {
		c := make(chan struct{})
		close(c)
		return c
	}
	if h.idle == nil {
		h.idle = make(chan struct{})
	}
	return h.idle
}

func (h *hub) kickLocked(sock *socket, r closeReason) {
	if sock.closed {
		return
	}
	sock.closed = true
	sock.kick <- r
}

// expire drops sessions with no socket for longer than ttl.
func (h *hub) expire(ttl time.Duration, now time.Time) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for id, s := range h.sessions {
		if s.sock == nil && !s.lastSeen.IsZero() && now.Sub(s.lastSeen) > ttl {
			delete(h.sessions, id)
			n++
		}
	}
	return n
}

// hubStats is what the worker reports in its heartbeat (Worker.SetStats).
type hubStats struct {
	Sessions int    `json:"sessions"`
	Sockets  int    `json:"sockets"`
	Seq      uint64 `json:"seq"`
}

func (h *hub) stats() hubStats {
	h.mu.Lock()
	defer h.mu.Unlock()
	return hubStats{Sessions: len(h.sessions), Sockets: h.sockets, Seq: h.last}
}

// validRooms checks a client's rooms; none means #lobby.
func validRooms(rooms []string) ([]string, error) {
	if len(rooms) == 0 {
		return []string{"lobby"}, nil
	}
	if len(rooms) > maxRooms {
		return nil, fmt.Errorf("%d rooms: at most %d", len(rooms), maxRooms)
	}
	out := make([]string, 0, len(rooms))
	for _, r := range rooms {
		if !roomRE.MatchString(r) {
			return nil, fmt.Errorf("room %q: use 1 to 32 lower-case letters, digits or '-'", r)
		}
		if !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	return out, nil
}
