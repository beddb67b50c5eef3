package main

// Sessions across a deploy: when a slot moves to a new worker (a deploy,
// a restart, a retirement), the old worker writes its sessions for the
// new one through ipcluster's state handoff (Worker.OnHandoff), and the
// new worker reads them (Worker.Handoff) before it calls Ready, so a
// client that reconnects finds its session, nickname, rooms and cursor
// there. Only sessions travel: every worker has the messages, from the
// stream (pubsub.go).
//
// A session that starts on the old worker after it wrote its state, or
// any session after a crash (nothing is handed over), is re-created from
// what the client remembers: its session id, nickname, rooms and cursor
// (hub.attach, origin "client").

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"time"

	"github.com/ipcluster/ipcluster"
)

// sessionState is a session as it travels, as JSON.
type sessionState struct {
	ID, Nick string
	Rooms    []string
	Cursor   uint64
	Addr     netip.Addr
	LastSeen time.Time // zero: it had a socket open
}

// writeState writes the hub's sessions: the OnHandoff callback. It copies
// under the lock and encodes outside it, so the chat goes on meanwhile.
func (h *hub) writeState(w io.Writer) error {
	h.mu.Lock()
	st := make([]sessionState, 0, len(h.sessions))
	for _, s := range h.sessions {
		st = append(st, sessionState{ID: s.id, Nick: s.nick, Rooms: slices.Clone(s.rooms), Cursor: s.cursor, Addr: s.addr, LastSeen: s.lastSeen})
	}
	h.mu.Unlock()
	if err := json.NewEncoder(w).Encode(st); err != nil {
		return fmt.Errorf("encode %d sessions: %w", len(st), err)
	}
	return nil
}

// restoreState takes the sessions a previous worker wrote (nothing, for an
// empty reader) whose client keep accepts (one whose address is unknown is
// kept), and returns how many it took.
func (h *hub) restoreState(r io.Reader, keep func(netip.Addr) bool) (int, error) {
	var st []sessionState
	if err := json.NewDecoder(r).Decode(&st); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, nil // no state: a first start, a crash
		}
		return 0, fmt.Errorf("decode the previous worker's sessions: %w", err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, s := range st {
		if s.Addr.IsValid() && !keep(s.Addr) {
			continue // a split slot's: the other worker's client now
		}
		rooms, err := validRooms(s.Rooms)
		if err != nil || !sidRE.MatchString(s.ID) || !nickRE.MatchString(s.Nick) {
			continue
		}
		lastSeen := s.LastSeen
		if lastSeen.IsZero() {
			lastSeen = time.Now() // its socket is moving here: the TTL counts from now
		}
		h.sessions[s.ID] = &session{id: s.ID, nick: s.Nick, rooms: rooms, cursor: s.Cursor, addr: s.Addr, lastSeen: lastSeen, origin: "handoff"}
		n++
	}
	return n, nil
}

// takeHandoff restores the sessions the slot's previous worker handed
// over, if any. Call it before Worker.Ready.
func takeHandoff(w *ipcluster.Worker, h *hub, log *slog.Logger) {
	n, err := h.restoreState(w.Handoff(), w.Owns)
	switch {
	case err != nil:
		log.Warn("sessions not taken from the slot's previous worker; its clients re-create them from what they remember", "err", err)
	case n > 0:
		log.Info("sessions taken from the slot's previous worker", "sessions", n)
	}
}
