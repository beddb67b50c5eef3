package main

// The chat itself: sessions, rooms and the message log of one worker, and
// its HTTP handlers. Nothing here knows about ipcluster beyond workerInfo,
// so it is tested with httptest alone (main_test.go).
//
// Everything lives in this worker's memory. That is the point of the
// example: the cluster routes a client to the same worker every time, so
// the worker that holds its session, its unread backlog and its open
// long-poll is the one its next request reaches. Rooms are per worker too:
// clients of different slots never see each other's messages. Fanning a
// room out across workers needs a pub/sub between them (see README.md) and
// is out of scope here.

import (
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net/http"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	pollWait = 25 * time.Second // a long-poll answers empty after this
	// pollRetireSpread: a retired worker answers each open poll at a
	// random moment within this (see server.drain).
	pollRetireSpread = time.Second
	tickEvery        = 10 * time.Second // an SSE stream's keep-alive comment
	logSize          = 1000             // messages a worker keeps, all rooms
	sessionTTL       = 30 * time.Minute // an idle session (no request, no stream) is dropped
	maxText          = 2000             // bytes of a message
	defaultRoom      = "lobby"

	sidCookie  = "sid"  // the session id: the key into this worker's memory
	chatCookie = "chat" // nick and rooms, to re-join on another worker
)

var (
	nickRE = regexp.MustCompile(`^[\p{L}\p{N}_.-]{1,24}$`)
	roomRE = regexp.MustCompile(`^[a-z0-9_-]{1,24}$`)
	sidRE  = regexp.MustCompile(`^[0-9a-f]{32}$`)

	errNoSession = errors.New("no session: POST /join?nick=...&room=... first")
	errNotJoined = errors.New("not in that room: join it first")
)

// message is one chat line.
type message struct {
	Seq  uint64    `json:"seq"`
	Room string    `json:"room"`
	From string    `json:"from"`
	Text string    `json:"text"`
	At   time.Time `json:"at"`
}

// session is one client's state. Its fields belong to the hub's mutex.
type session struct {
	id, nick string
	rooms    []string // sorted
	cursor   uint64   // the last seq delivered to this client
	rejoined bool     // recreated from the chat cookie: its worker changed
	lastSeen time.Time
	addr     netip.Addr // the client's address at its last request: whose slot it is in (handoff.go)
	open     int        // long-polls and streams in progress: never expired then
}

// hub is a worker's chat state, behind one mutex: short critical sections,
// no I/O under the lock.
type hub struct {
	mu       sync.Mutex
	base     uint64    // seq before this worker's first message
	seq      uint64    // the last message's seq
	log      []message // the last logSize messages, oldest first
	sessions map[string]*session
	// wake is closed, and replaced, whenever something a waiter may be
	// waiting for happened: a message, a join.
	wake chan struct{}
	now  func() time.Time

	messages atomic.Uint64 // sent since start, for stats
}

func newHub(now func() time.Time) *hub {
	// Sequence numbers start at the worker's start time in microseconds,
	// so a cursor that a client got from an earlier worker (the one its
	// slot had before a deploy) is below every seq of this one, and the
	// client gets this worker's whole backlog for its rooms rather than
	// skipping some of it. See hub.normalize.
	base := uint64(now().UnixMicro())
	return &hub{base: base, seq: base, sessions: map[string]*session{}, wake: make(chan struct{}), now: now}
}

// broadcast wakes every waiter. Call with h.mu held.
func (h *hub) broadcast() {
	close(h.wake)
	h.wake = make(chan struct{})
}

// normalize maps a client's cursor to this worker's sequence: one outside
// (base, seq] came from another worker, or is 0 for "from the start", and
// means everything this worker still has. Call with h.mu held.
func (h *hub) normalize(cursor uint64) (c uint64, reset bool) {
	if cursor < h.base || cursor > h.seq {
		return h.base, cursor != 0
	}
	return cursor, false
}

// session returns the session with id, or, if this worker does not know
// it but the client's chat cookie names a nick, recreates it: the client's
// slot moved to this worker (a deploy, a crash, a retirement) and the
// session stayed behind in the old one's memory. Nil if neither.
func (h *hub) session(id string, saved url.Values, addr netip.Addr) *session {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s := h.sessions[id]; s != nil {
		s.lastSeen, s.addr = h.now(), addr
		return s
	}
	nick := saved.Get("nick")
	if !sidRE.MatchString(id) || !nickRE.MatchString(nick) {
		return nil
	}
	s := &session{id: id, nick: nick, rejoined: true, lastSeen: h.now(), addr: addr}
	for _, r := range saved["room"] {
		if roomRE.MatchString(r) && !slices.Contains(s.rooms, r) {
			s.rooms = append(s.rooms, r)
		}
	}
	slices.Sort(s.rooms)
	// Cursor h.base: the new worker's backlog is all news to this client.
	s.cursor = h.base
	h.sessions[id] = s
	return s
}

// join creates the session (s nil) or adds a room to it, and renames it
// if nick is not empty.
func (h *hub) join(s *session, id, nick, room string, addr netip.Addr) (*session, error) {
	if nick != "" && !nickRE.MatchString(nick) {
		return nil, fmt.Errorf("nick %q: use 1 to 24 letters, digits, '_', '.' or '-'", nick)
	}
	if !roomRE.MatchString(room) {
		return nil, fmt.Errorf("room %q: use 1 to 24 of a-z, 0-9, '_' or '-'", room)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if s == nil {
		if nick == "" {
			return nil, errors.New("nick: required to join the first time")
		}
		s = &session{id: id, cursor: h.seq}
		h.sessions[id] = s
	}
	if nick != "" {
		s.nick = nick
	}
	if !slices.Contains(s.rooms, room) {
		s.rooms = append(s.rooms, room)
		slices.Sort(s.rooms)
	}
	s.lastSeen, s.addr = h.now(), addr
	h.broadcast() // a waiting poll may now have backlog in the new room
	return s, nil
}

// send appends a message to room from s.
func (h *hub) send(s *session, room, text string) (message, error) {
	if text == "" || len(text) > maxText {
		return message{}, fmt.Errorf("text: 1 to %d bytes", maxText)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if room == "" && len(s.rooms) > 0 {
		room = s.rooms[0]
	}
	if !slices.Contains(s.rooms, room) {
		return message{}, errNotJoined
	}
	h.seq++
	m := message{Seq: h.seq, Room: room, From: s.nick, Text: text, At: h.now()}
	if len(h.log) == logSize {
		// Shift rather than ring: 1000 small structs, and it keeps
		// the log ordered for pending.
		h.log = append(h.log[:0], h.log[1:]...)
	}
	h.log = append(h.log, m)
	h.messages.Add(1)
	h.broadcast()
	return m, nil
}

// pending returns s's messages after cursor, the cursor to use next, and
// a channel closed when there may be more. Call with h.mu held.
func (h *hub) pendingLocked(s *session, cursor uint64) (msgs []message, next uint64, reset bool, wake <-chan struct{}) {
	cursor, reset = h.normalize(cursor)
	for _, m := range h.log {
		if m.Seq > cursor && slices.Contains(s.rooms, m.Room) {
			msgs = append(msgs, m)
		}
	}
	return msgs, h.seq, reset, h.wake
}

// pending is pendingLocked with the lock, and moves s's cursor to next.
func (h *hub) pending(s *session, cursor uint64) ([]message, uint64, bool, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	msgs, next, reset, wake := h.pendingLocked(s, cursor)
	s.cursor = next
	s.lastSeen = h.now()
	return msgs, next, reset, wake
}

// opened counts a poll or stream on s (delta 1) or its end (-1).
func (h *hub) opened(s *session, delta int) {
	h.mu.Lock()
	s.open += delta
	s.lastSeen = h.now()
	h.mu.Unlock()
}

// expire drops sessions idle for longer than ttl with nothing open.
func (h *hub) expire(ttl time.Duration) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for id, s := range h.sessions {
		if s.open == 0 && h.now().Sub(s.lastSeen) > ttl {
			delete(h.sessions, id)
			n++
		}
	}
	return n
}

// sessionView is a session as /whoami shows it.
type sessionView struct {
	Nick     string   `json:"nick"`
	Rooms    []string `json:"rooms"`
	Cursor   uint64   `json:"cursor"`
	Unread   int      `json:"unread"`
	Rejoined bool     `json:"rejoined"`
}

func (h *hub) view(s *session) *sessionView {
	h.mu.Lock()
	defer h.mu.Unlock()
	msgs, _, _, _ := h.pendingLocked(s, s.cursor)
	return &sessionView{Nick: s.nick, Rooms: slices.Clone(s.rooms), Cursor: s.cursor, Unread: len(msgs), Rejoined: s.rejoined}
}

// workerInfo is what the chat shows about the worker serving it.
type workerInfo struct {
	Slot       int    `json:"slot"`
	PID        int    `json:"pid"`
	Generation int    `json:"generation"`
	Version    string `json:"version"`
}

// server is the chat's HTTP side.
type server struct {
	hub  *hub
	info workerInfo
	log  *slog.Logger

	pollWait, tickEvery time.Duration
	// sseGrace: how long after retirement an SSE stream goes on before
	// it is closed (see drain).
	sseGrace time.Duration

	retired             chan struct{} // closed by drain
	stopping            chan struct{} // closed by stop
	drainOnce, stopOnce sync.Once

	streams, polls atomic.Int64
}

func newServer(info workerInfo, log *slog.Logger, sseGrace time.Duration) *server {
	return &server{
		hub: newHub(time.Now), info: info, log: log,
		pollWait: pollWait, tickEvery: tickEvery, sseGrace: sseGrace,
		retired: make(chan struct{}), stopping: make(chan struct{}),
	}
}

// drain is called once the worker is retired: its slot points at a new
// worker, so this one gets no new connections. Open long-polls answer at a
// random moment within pollRetireSpread (with what they have, often
// nothing), so their clients' next polls reach the new worker in a second
// rather than up to pollWait later, and not all in one instant. SSE streams have no end of their own, and
// there are two bad ways to end them. Kept until the worker is told to
// finish (DrainTimeout, 10 minutes by default), they would show a room no
// new client joins any more, and hold the old worker's memory all along.
// Closed at once, every client of the slot would reconnect in the same
// instant, and messages still in flight would be lost. So each stream is
// told at once (event "retiring", with a short retry hint for its
// reconnection), keeps flowing for a grace period, and is closed at a
// random time between half of it and all of it, which spreads the
// reconnections over the new worker. Safe to call more than once.
func (s *server) drain() { s.drainOnce.Do(func() { close(s.retired) }) }

// stop is called when the worker must finish: polls answer at once, and
// streams send a last retry hint and close. Safe to call more than once.
func (s *server) stop() { s.stopOnce.Do(func() { close(s.stopping) }) }

func (s *server) isRetired() bool {
	select {
	case <-s.retired:
		return true
	default:
		return false
	}
}

// appStats is what the worker reports in each heartbeat (Worker.SetStats):
// the master's status and EventStats show it.
type appStats struct {
	Sessions int    `json:"sessions"`
	Streams  int64  `json:"streams"`
	Polls    int64  `json:"polls"`
	Messages uint64 `json:"messages"`
}

// stats must be quick: it runs on the worker's heartbeat goroutine.
func (s *server) stats() appStats {
	s.hub.mu.Lock()
	n := len(s.hub.sessions)
	s.hub.mu.Unlock()
	return appStats{Sessions: n, Streams: s.streams.Load(), Polls: s.polls.Load(), Messages: s.hub.messages.Load()}
}

//go:embed index.html
var indexHTML []byte

func (s *server) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write(indexHTML)
	})
	mux.HandleFunc("POST /join", s.join)
	mux.HandleFunc("POST /send", s.send)
	mux.HandleFunc("GET /poll", s.poll)
	mux.HandleFunc("GET /events", s.events)
	mux.HandleFunc("GET /whoami", s.whoami)
	return mux
}

// current returns the request's session, recreated from the chat cookie if
// needed, or nil.
func (s *server) current(r *http.Request) *session {
	c, err := r.Cookie(sidCookie)
	if err != nil {
		return nil
	}
	var saved url.Values
	if cc, err := r.Cookie(chatCookie); err == nil {
		saved, _ = url.ParseQuery(cc.Value)
	}
	return s.hub.session(c.Value, saved, clientAddr(r))
}

// clientAddr is the request's client address, unmapped; invalid if the
// server did not set RemoteAddr (a test's handler called directly).
func clientAddr(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// setCookies writes the session id and the chat cookie. The chat cookie
// is what lets a client keep its nick and rooms across a deploy: sessions
// live in one worker's memory, and the next worker of the slot rebuilds
// the session from it (hub.session). Its backlog does not survive; a real
// app that needs it would persist sessions, or have the old worker hand
// them over.
func setCookies(w http.ResponseWriter, v *sessionView, id string) {
	saved := url.Values{"nick": {v.Nick}, "room": v.Rooms}
	for _, c := range []*http.Cookie{
		{Name: sidCookie, Value: id, Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode},
		{Name: chatCookie, Value: saved.Encode(), Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode},
	} {
		http.SetCookie(w, c)
	}
}

func (s *server) join(w http.ResponseWriter, r *http.Request) {
	sess := s.current(r)
	id := ""
	if sess != nil {
		id = sess.id
	} else {
		b := make([]byte, 16)
		_, _ = rand.Read(b)
		id = hex.EncodeToString(b)
	}
	room := r.FormValue("room")
	if room == "" {
		room = defaultRoom
	}
	sess, err := s.hub.join(sess, id, r.FormValue("nick"), room, clientAddr(r))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	v := s.hub.view(sess)
	setCookies(w, v, id)
	s.writeJSON(w, s.whoamiOf(v))
}

func (s *server) send(w http.ResponseWriter, r *http.Request) {
	sess := s.current(r)
	if sess == nil {
		http.Error(w, errNoSession.Error(), http.StatusUnauthorized)
		return
	}
	m, err := s.hub.send(sess, r.FormValue("room"), r.FormValue("text"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	s.writeJSON(w, m)
}

// pollReply is a long-poll's answer.
type pollReply struct {
	Cursor   uint64     `json:"cursor"` // pass it to the next poll
	Messages []message  `json:"messages"`
	Reset    bool       `json:"reset,omitempty"` // the cursor was another worker's
	Worker   workerInfo `json:"worker"`
}

// poll answers at once if the session has messages after the cursor
// (?cursor=N, default the session's own), or waits up to pollWait for one.
func (s *server) poll(w http.ResponseWriter, r *http.Request) {
	sess := s.current(r)
	if sess == nil {
		http.Error(w, errNoSession.Error(), http.StatusUnauthorized)
		return
	}
	s.polls.Add(1)
	defer s.polls.Add(-1)
	s.hub.opened(sess, 1)
	defer s.hub.opened(sess, -1)

	cursor, err := s.cursorOf(r, sess)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	timeout := time.NewTimer(s.pollWait)
	defer timeout.Stop()
	reply := pollReply{Worker: s.info, Messages: []message{}}
	retired := s.retired
	var leave <-chan time.Time
wait:
	for {
		msgs, next, reset, wake := s.hub.pending(sess, cursor)
		reply.Cursor, reply.Reset = next, reply.Reset || reset
		if len(msgs) > 0 {
			reply.Messages = msgs
			break
		}
		cursor = next
		select {
		case <-wake:
		case <-timeout.C:
			break wait
		case <-retired:
			// The client's next poll reaches the new worker: answer
			// soon, each poll at its own moment.
			retired = nil
			leave = time.After(mrand.N(pollRetireSpread + 1))
		case <-leave:
			break wait
		case <-s.stopping:
			break wait
		case <-r.Context().Done():
			return
		}
	}
	s.writeJSON(w, reply)
}

// cursorOf reads ?cursor=N, or for an SSE reconnection the Last-Event-ID
// header, falling back to the session's cursor.
func (s *server) cursorOf(r *http.Request, sess *session) (uint64, error) {
	v := r.URL.Query().Get("cursor")
	if v == "" {
		v = r.Header.Get("Last-Event-ID")
	}
	if v == "" {
		s.hub.mu.Lock()
		defer s.hub.mu.Unlock()
		return sess.cursor, nil
	}
	c, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("cursor %q: not a message number", v)
	}
	return c, nil
}

// events streams the session's messages as server-sent events.
func (s *server) events(w http.ResponseWriter, r *http.Request) {
	sess := s.current(r)
	if sess == nil {
		http.Error(w, errNoSession.Error(), http.StatusUnauthorized)
		return
	}
	cursor, err := s.cursorOf(r, sess)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	s.streams.Add(1)
	defer s.streams.Add(-1)
	s.hub.opened(sess, 1)
	defer s.hub.opened(sess, -1)

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // for a proxy in front, if any
	rc := http.NewResponseController(w)
	// A client that stops reading must not hold this goroutine and its
	// connection forever (the server has no WriteTimeout: streams are
	// long): each flush gets its own deadline.
	flush := func() bool {
		_ = rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		return rc.Flush() == nil
	}

	hello, _ := json.Marshal(s.whoamiOf(s.hub.view(sess)))
	_, _ = fmt.Fprintf(w, "retry: 3000\n\n")
	_ = writeEvent(w, 0, "hello", hello)
	if !flush() {
		return
	}
	tick := time.NewTicker(s.tickEvery)
	defer tick.Stop()
	// Opened after retirement (a keep-alive connection that got in
	// first): the case below fires at once, and this stream drains too.
	retired := s.retired
	var closeAt <-chan time.Time
	for {
		msgs, next, _, wake := s.hub.pending(sess, cursor)
		cursor = next
		for _, m := range msgs {
			data, _ := json.Marshal(m)
			_ = writeEvent(w, m.Seq, "message", data)
		}
		if len(msgs) > 0 && !flush() {
			return
		}
		select {
		case <-wake:
		case <-tick.C:
			// A comment: EventSource ignores it, but it keeps proxies
			// from timing the stream out, and curl -N shows which
			// worker still holds the stream.
			fmt.Fprintf(w, ": tick pid=%d slot=%d retired=%t\n\n", s.info.PID, s.info.Slot, s.isRetired())
			if !flush() {
				return
			}
		case <-retired:
			retired = nil
			grace := s.sseGrace/2 + mrand.N(s.sseGrace/2+1)
			data, _ := json.Marshal(map[string]any{"pid": s.info.PID, "slot": s.info.Slot, "closing_in_ms": grace.Milliseconds()})
			_, _ = fmt.Fprintf(w, "retry: %d\n\n", 500+mrand.N(1000)) // reconnect soon, not all at once
			_ = writeEvent(w, 0, "retiring", data)
			if !flush() {
				return
			}
			closeAt = time.After(grace)
		case <-closeAt:
			_ = writeEvent(w, 0, "bye", []byte(`{"reason":"retired"}`))
			flush()
			return
		case <-s.stopping:
			_, _ = fmt.Fprintf(w, "retry: %d\n\n", 500+mrand.N(1000))
			_ = writeEvent(w, 0, "bye", []byte(`{"reason":"stopping"}`))
			flush()
			return
		case <-r.Context().Done():
			return
		}
	}
}

// writeEvent writes one server-sent event: an id line if id is not 0 (a
// reconnecting EventSource sends the last one back as Last-Event-ID), the
// event name, and data, one data line per line of it.
func writeEvent(w io.Writer, id uint64, event string, data []byte) error {
	var b strings.Builder
	if id != 0 {
		fmt.Fprintf(&b, "id: %d\n", id)
	}
	if event != "" {
		fmt.Fprintf(&b, "event: %s\n", event)
	}
	for _, line := range strings.Split(strings.ReplaceAll(string(data), "\r\n", "\n"), "\n") {
		fmt.Fprintf(&b, "data: %s\n", line)
	}
	b.WriteString("\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// whoamiReply is /whoami's answer: the worker, and the session it holds.
type whoamiReply struct {
	workerInfo
	Retired bool         `json:"retired"`
	Session *sessionView `json:"session"`
}

func (s *server) whoamiOf(v *sessionView) whoamiReply {
	return whoamiReply{workerInfo: s.info, Retired: s.isRetired(), Session: v}
}

func (s *server) whoami(w http.ResponseWriter, r *http.Request) {
	var v *sessionView
	if sess := s.current(r); sess != nil {
		v = s.hub.view(sess)
	}
	s.writeJSON(w, s.whoamiOf(v))
}

func (s *server) writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		s.log.Debug("write reply", "err", err)
	}
}
