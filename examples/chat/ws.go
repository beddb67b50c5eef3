package main

// The HTTP side of a worker: the page, /whoami, and the WebSocket.
//
// The protocol is JSON text frames. The client's first frame is a hello
// (hub.go), then any of
//
//	{"t":"say","room":"lobby","text":"hi","id":"c7"}  the id is the client's; a resend with it is dropped
//	{"t":"join","room":"ops"}
//	{"t":"leave","room":"ops"}
//
// and the server sends
//
//	{"t":"welcome","session":…,"nick":…,"rooms":[…],"origin":…,"slot":…,"pid":…,"version":…,"remote":…}
//	{"t":"msg","msg":{…}}                 a message of one of its rooms, in seq order
//	{"t":"history","room":…,"msgs":[…]}   a room's recent messages, on joining it
//	{"t":"ack","id":"c7","seq":42}        the stream has the client's message
//	{"t":"missed","count":N}              messages too old to send any more
//	{"t":"error","error":…}
//
// When the worker retires, each socket is closed with code 1012 (service
// restart) at a random moment within -reconnect-spread, its reason naming
// a further delay ("retry_ms=N"); the client reconnects after it, reaching
// the slot's new worker, which has its session (handoff.go) and sends it
// what it missed from its cursor.

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/coder/websocket"
)

//go:embed index.html
var indexHTML []byte

const (
	closeGoingAway      = int(websocket.StatusGoingAway)
	closePolicy         = int(websocket.StatusPolicyViolation)
	closeServiceRestart = int(websocket.StatusServiceRestart)
	closeTryAgain       = int(websocket.StatusTryAgainLater)
	closeReplaced       = 4000 // the session opened another socket

	helloTimeout = 10 * time.Second
	writeTimeout = 10 * time.Second
	pingEvery    = 30 * time.Second
)

// WorkerInfo is where a socket is served, as /whoami and the welcome say
// (exported: the welcome frame embeds a pointer to it, which JSON decodes
// only for an exported type).
type WorkerInfo struct {
	Slot       int    `json:"slot"`
	PID        int    `json:"pid"`
	Generation int    `json:"generation"`
	Version    string `json:"version"`
}

// server is one worker's chat: its hub, its pub/sub, where it runs.
type server struct {
	info WorkerInfo
	hub  *hub
	bus  *bus
	log  *slog.Logger
}

// frame is one server frame; unset fields are left out.
type frame struct {
	T       string    `json:"t"`
	Session string    `json:"session,omitempty"`
	Nick    string    `json:"nick,omitempty"`
	Rooms   []string  `json:"rooms,omitempty"`
	Origin  string    `json:"origin,omitempty"`
	Remote  string    `json:"remote,omitempty"`
	Cursor  uint64    `json:"cursor,omitempty"`
	Msg     *message  `json:"msg,omitempty"`
	Room    string    `json:"room,omitempty"`
	Msgs    []message `json:"msgs,omitempty"`
	ID      string    `json:"id,omitempty"`
	Seq     uint64    `json:"seq,omitempty"`
	Count   uint64    `json:"count,omitempty"`
	Error   string    `json:"error,omitempty"`
	*WorkerInfo
}

// clientFrame is one client frame after the hello.
type clientFrame struct {
	T    string `json:"t"`
	Room string `json:"room"`
	Text string `json:"text"`
	ID   string `json:"id"`
}

func (s *server) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		_, _ = w.Write(indexHTML)
	})
	mux.HandleFunc("GET /whoami", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(struct {
			WorkerInfo
			Remote string `json:"remote"`
			Proto  string `json:"proto"`
			TLS    bool   `json:"tls"`
			hubStats
		}{s.info, r.RemoteAddr, r.Proto, r.TLS != nil, s.hub.stats()})
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /ws", s.serveWS)
	return mux
}

// serveWS runs one socket: the hello, then a reader (this goroutine) and
// a writer.
func (s *server) serveWS(w http.ResponseWriter, r *http.Request) {
	// Accept checks that the page's origin is this host (a page of another
	// site cannot open a socket with its visitor's session).
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return // Accept has answered
	}
	defer c.CloseNow()
	c.SetReadLimit(16 << 10)
	ctx := r.Context()

	var hi hello
	hctx, cancel := context.WithTimeout(ctx, helloTimeout)
	err = readJSON(hctx, c, &hi)
	cancel()
	if err != nil {
		_ = c.Close(websocket.StatusPolicyViolation, "expected a hello frame first")
		return
	}
	addr, _ := netip.ParseAddrPort(r.RemoteAddr)
	sock, att, err := s.hub.attach(hi, addr.Addr().Unmap(), newSessionID)
	if errors.Is(err, errRetired) {
		// A socket that reached this worker as it retired: its slot
		// has moved, so a new one reaches the new worker.
		_ = c.Close(websocket.StatusServiceRestart, fmt.Sprintf("worker retiring: reconnect; retry_ms=%d", mrand.IntN(250)))
		return
	}
	if err != nil {
		_ = writeJSON(ctx, c, frame{T: "error", Error: err.Error()})
		_ = c.Close(websocket.StatusPolicyViolation, "bad hello")
		return
	}
	sess := att.session
	defer s.hub.detach(sess, sock)
	s.log.Debug("socket open", "session", sess.id, "nick", sess.nick, "origin", att.origin, "backlog", len(att.backlog), "remote", r.RemoteAddr)

	info := s.info
	first := []frame{{T: "welcome", Session: sess.id, Nick: sess.nick, Rooms: att.rooms, Origin: att.origin, Remote: r.RemoteAddr, WorkerInfo: &info}}
	if att.missed > 0 {
		first = append(first, frame{T: "missed", Count: att.missed})
	}
	for i := range att.backlog {
		first = append(first, frame{T: "msg", Msg: &att.backlog[i]})
	}
	if att.origin == "new" {
		for _, room := range att.rooms {
			first = append(first, frame{T: "history", Room: room, Msgs: att.history[room]})
		}
	}
	for _, f := range first {
		if err := writeJSON(ctx, c, f); err != nil {
			return
		}
	}

	wctx, stop := context.WithCancel(ctx)
	defer stop()
	go s.write(wctx, c, sock, stop)
	for {
		var f clientFrame
		if err := readJSON(wctx, c, &f); err != nil {
			return
		}
		if reply := s.handle(wctx, sess, f); reply != nil {
			if err := writeJSON(wctx, c, *reply); err != nil {
				return
			}
		}
	}
}

// write sends the socket's messages until the hub closes it or the
// connection ends; stop ends the reader too.
func (s *server) write(ctx context.Context, c *websocket.Conn, sock *socket, stop func()) {
	defer stop()
	ping := time.NewTicker(pingEvery)
	defer ping.Stop()
	var why closeReason
	var closeAt <-chan time.Time // set once the hub asks for the close
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-sock.out:
			if writeJSON(ctx, c, frame{T: "msg", Msg: &m}) != nil {
				return
			}
		case <-ping.C:
			pctx, cancel := context.WithTimeout(ctx, writeTimeout)
			err := c.Ping(pctx)
			cancel()
			if err != nil {
				return
			}
		case why = <-sock.kick:
			// Messages go on until the moment comes (a retirement's
			// jitter), then the close.
			closeAt = time.After(why.delay)
		case <-closeAt:
			reason := why.reason
			if why.retryMS > 0 {
				reason += "; retry_ms=" + strconv.Itoa(why.retryMS)
			}
			_ = c.Close(websocket.StatusCode(why.code), reason)
			return
		}
	}
}

// handle does what a client frame asks and returns the reply, if any.
func (s *server) handle(ctx context.Context, sess *session, f clientFrame) *frame {
	switch f.T {
	case "say":
		if !midRE.MatchString(f.ID) {
			return &frame{T: "error", Error: "say: id must be 1 to 40 letters, digits, '_' or '-'"}
		}
		if f.Text == "" || len(f.Text) > maxText {
			return &frame{T: "error", ID: f.ID, Error: fmt.Sprintf("say: text of %d bytes: send 1 to %d", len(f.Text), maxText)}
		}
		nick, ok := s.hub.inRoom(sess, f.Room)
		if !ok {
			return &frame{T: "error", ID: f.ID, Error: fmt.Sprintf("say: not in room %q: join it first", f.Room)}
		}
		pctx, cancel := context.WithTimeout(ctx, writeTimeout)
		defer cancel()
		seq, err := s.bus.publish(pctx, message{ID: sess.id + "-" + f.ID, Room: f.Room, Nick: nick, Text: f.Text,
			At: time.Now().UTC(), Slot: s.info.Slot, PID: s.info.PID})
		if err != nil {
			s.log.Warn("publish failed", "err", err)
			return &frame{T: "error", ID: f.ID, Error: "say: the message was not sent; it is resent when you reconnect"}
		}
		return &frame{T: "ack", ID: f.ID, Seq: seq}
	case "join":
		recent, err := s.hub.join(sess, f.Room)
		if err != nil {
			return &frame{T: "error", Error: "join: " + err.Error()}
		}
		return &frame{T: "history", Room: f.Room, Msgs: recent}
	case "leave":
		s.hub.leave(sess, f.Room)
		return nil
	}
	return &frame{T: "error", Error: fmt.Sprintf("unknown frame type %q: want say, join or leave", f.T)}
}

func readJSON(ctx context.Context, c *websocket.Conn, v any) error {
	typ, data, err := c.Read(ctx)
	if err != nil {
		return err
	}
	if typ != websocket.MessageText {
		return errors.New("binary frame: this protocol is JSON text")
	}
	return json.Unmarshal(data, v)
}

func writeJSON(ctx context.Context, c *websocket.Conn, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, writeTimeout)
	defer cancel()
	return c.Write(ctx, websocket.MessageText, data)
}

// newSessionID returns 128 random bits in hex.
func newSessionID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		fmt.Fprintln(os.Stderr, "chat: no randomness:", err)
		os.Exit(1)
	}
	return hex.EncodeToString(b[:])
}
