package main

// Sessions across a deploy: when a slot moves to a new worker (a deploy, a
// restart, a retirement), the old worker hands its hub to the new one
// through ipcluster's state handoff, so a client's next request finds its
// session, nickname, rooms and cursor, and its unread backlog, on the new
// worker. The old worker writes (Worker.OnHandoff) while it goes on
// serving; the new one reads (Worker.Handoff) before it calls Ready, and
// only then does the slot move to it (Config.WorkerReady).
//
// What does not move: changes the old worker makes after it wrote its
// state, in the moment before the slot moves (a message sent then stays
// on the old worker; a client that polled it there gets its backlog
// again). After a crash there is nothing to take: clients re-join from
// their chat cookie (hub.session). A resize that splits a slot hands the
// new worker the state of the slot it split from, of which it keeps the
// sessions of its own clients (Worker.Owns); one that merges two slots
// hands nothing, and the merged slot's clients re-join from their cookie.

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

// hubState is a hub as it travels from one worker to the next, as JSON.
type hubState struct {
	Base, Seq uint64
	Log       []message
	Sessions  []sessionState
}

// sessionState is a session as it travels.
type sessionState struct {
	ID, Nick string
	Rooms    []string
	Cursor   uint64
	Rejoined bool
	LastSeen time.Time
	Addr     netip.Addr
}

// writeState writes the hub for the worker that takes this one's slot
// over: the OnHandoff callback. It copies under the lock and encodes
// outside it, so the chat goes on meanwhile.
func (h *hub) writeState(w io.Writer) error {
	h.mu.Lock()
	st := hubState{Base: h.base, Seq: h.seq, Log: slices.Clone(h.log), Sessions: make([]sessionState, 0, len(h.sessions))}
	for _, s := range h.sessions {
		st.Sessions = append(st.Sessions, sessionState{ID: s.id, Nick: s.nick, Rooms: slices.Clone(s.rooms), Cursor: s.cursor,
			Rejoined: s.rejoined, LastSeen: s.lastSeen, Addr: s.addr})
	}
	h.mu.Unlock()
	if err := json.NewEncoder(w).Encode(&st); err != nil {
		return fmt.Errorf("encode %d sessions and %d messages: %w", len(st.Sessions), len(st.Log), err)
	}
	return nil
}

// restoreState takes the state a previous worker wrote (nothing, for an
// empty reader): its message log, so that the cursors it handed out still
// count, and the sessions whose client keep accepts (a session whose
// address is unknown is kept). It returns how many sessions it took.
func (h *hub) restoreState(r io.Reader, keep func(netip.Addr) bool) (int, error) {
	var st hubState
	if err := json.NewDecoder(r).Decode(&st); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, nil // no state: a first start, a crash
		}
		return 0, fmt.Errorf("decode the previous worker's state: %w", err)
	}
	if st.Base > st.Seq || len(st.Log) > logSize {
		return 0, fmt.Errorf("the previous worker's state is inconsistent: base %d, seq %d, %d messages", st.Base, st.Seq, len(st.Log))
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	// Cursors from the old worker are in (its base, its seq]. This
	// worker's own messages continue from its own start time, which is
	// above both, and above whatever the old worker sent after writing
	// this: no two messages share a seq.
	h.base, h.seq = st.Base, max(h.seq, st.Seq)
	h.log = st.Log
	n := 0
	for _, s := range st.Sessions {
		if s.Addr.IsValid() && !keep(s.Addr) {
			continue // a split slot's: the other worker's client now
		}
		if !sidRE.MatchString(s.ID) || !nickRE.MatchString(s.Nick) {
			continue
		}
		h.sessions[s.ID] = &session{id: s.ID, nick: s.Nick, rooms: s.Rooms, cursor: s.Cursor, rejoined: s.Rejoined, lastSeen: s.LastSeen, addr: s.Addr}
		n++
	}
	return n, nil
}

// takeHandoff restores the sessions the slot's previous worker handed
// over, if any. Call it before Worker.Ready: the slot moves to this
// worker only then, so no client finds its session missing.
func takeHandoff(w *ipcluster.Worker, h *hub, log *slog.Logger) {
	n, err := h.restoreState(w.Handoff(), w.Owns)
	switch {
	case err != nil:
		log.Warn("sessions not taken from the slot's previous worker; its clients re-join from their cookie", "err", err)
	case n > 0:
		log.Info("sessions taken from the slot's previous worker", "sessions", n)
	}
}
