//go:build linux

package ipcluster

// State handoff: when a slot moves to a new worker for a deploy, a restart
// or a retirement (never a crash: the old worker is dead), the master
// connects the two with a socket pair, and the old worker writes whatever
// its application registered with OnHandoff for the new one to read with
// Handoff. The master only introduces them and waits for nothing:
//
//	new worker                     master                        old worker
//	  Handoff() ── handoff ──────▶ picks the source (handoffSource)
//	                               socketpair: one end each
//	  ◀── handoff {from}, fd ──────┼──── handoff-send {to}, fd ──▶ OnHandoff(w)
//	  reads to the end marker ◀════╪═════════════ the state ═════ (own goroutine)
//	  ── handoff-done {bytes, elapsed, err} ──▶ EventHandoff, metric
//
// Both ends bound the transfer by Config.HandoffTimeout and
// Config.HandoffMaxBytes, each its own; the slot moves when the new worker
// is ready, as without a handoff (with Config.WorkerReady the application
// reads Handoff before it calls Ready, so the bound caps the delay). The
// new worker asks lazily, at its first Handoff call, so an application
// that never calls it costs nothing.
//
// The stream on the socket pair is framed so that a cut-off state is never
// taken for a whole one: chunks of a 4-byte big-endian length (1 to
// handoffChunk) and that many bytes; then a 4-byte 0 (the end: success),
// or 0xFFFFFFFF, a 4-byte length and that many bytes of the old worker's
// error message. An end of file before either is an error.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/proto"
	"github.com/ipcluster/ipcluster/internal/steer"
)

const (
	handoffChunk  = 64 << 10   // the largest chunk of state in one frame of the stream
	handoffFailed = 0xFFFFFFFF // the frame header of the old worker's error
	maxHandoffErr = 4 << 10    // bytes of that error kept
)

// handoffState is a worker's share of the handoff: the application's
// callback and the new worker's one request. fn, master and workers are
// atomics (any goroutine); wait is under mu; once and r belong to Handoff.
type handoffState struct {
	fn      atomic.Pointer[func(io.Writer) error]
	master  atomic.Bool  // the master answers handoff requests (Welcome.Handoff)
	workers atomic.Int64 // the slot count Owns uses: at spawn, then the master's word
	sending atomic.Int32 // handOvers in flight: a retired worker does not exit before they end

	mu   sync.Mutex
	wait chan proto.Msg // Handoff waits for the master's answer here; nil otherwise

	once sync.Once
	r    io.Reader
}

// OnHandoff registers fn, which writes this worker's state for the worker
// that takes its slot over in a deploy, a restart, a retirement or a
// resize that splits the slot (see Handoff). fn runs on a goroutine of its
// own while this worker goes on serving; it may be called more than once,
// concurrently (a growth from 2 to 8 slots splits a slot three ways), each
// time with its own writer. The writer fails once Config.HandoffTimeout has
// passed since the request or Config.HandoffMaxBytes have been written; an
// error fn returns (or a panic) reaches the new worker as its Handoff
// error, never a truncated state. nil unregisters; a worker with no
// callback hands over an empty state. Safe to call from any goroutine.
func (w *Worker) OnHandoff(fn func(w io.Writer) error) {
	if fn == nil {
		w.handoff.fn.Store(nil)
		return
	}
	w.handoff.fn.Store(&fn)
}

// Handoff returns the state the slot's previous worker wrote with its
// OnHandoff callback, or an empty reader when there is none to take: the
// first worker of a slot, a crash's replacement (the old worker is dead),
// a spare given a crashed worker's slot, a slot a resize merged into
// this one (see the README), a previous worker that registered no
// callback or runs a release without handoff. For a slot a resize split,
// the state comes from the worker of the slot it split from: keep the
// clients for which Owns is true.
//
// The first call asks the master and reads the whole state, within
// Config.HandoffTimeout and Config.HandoffMaxBytes; later calls return the
// same reader. A failure (a timeout, a state too large, the old worker's
// error) gives a reader whose Read returns an error wrapping ErrHandoff
// that says which Config field to raise, and is reported to the master
// (EventHandoff) as the successes are. With Config.WorkerReady, call it
// before Ready: the slot moves to this worker only then, so its clients
// find their state. Without it, call it first thing in the work function:
// the slot may already have moved, and clients arriving meanwhile find
// none.
func (w *Worker) Handoff() io.Reader {
	w.handoff.once.Do(func() { w.handoff.r = w.takeHandoff() })
	return w.handoff.r
}

// Owns reports whether a client address is routed to this worker's slot
// under the cluster's slot count as this worker last heard it (at spawn,
// in each welcome, and in the answer to its Handoff) and
// Config.IPv4SlotPrefix and IPv6SlotPrefix: the same arithmetic as the
// routes. The new worker of a slot a resize split keeps with it the
// clients that are now its own. A worker already running when a resize
// happens keeps the count it had until it reconnects (a deploy): use Owns
// to sort the state a handoff brings, not to turn clients away.
func (w *Worker) Owns(addr netip.Addr) bool {
	spec := steer.Spec{Workers: int(w.handoff.workers.Load()), V4Prefix: w.cfg.IPv4SlotPrefix, V6Prefix: w.cfg.IPv6SlotPrefix}
	return w.slot >= 0 && spec.Slot(addr) == w.slot
}

// takeHandoff asks the master for the slot's state and reads it.
func (w *Worker) takeHandoff() io.Reader {
	start := time.Now()
	timeout := w.cfg.HandoffTimeout
	deadline := start.Add(timeout)
	switch {
	case w.slot == spareSlot:
		return bytes.NewReader(nil) // serves no slot (the work function is never called so)
	case w.socket == "":
		return bytes.NewReader(nil) // development mode: no master, no worker before this one
	case !w.handoff.master.Load():
		w.log.Info("no state to take: the master runs a release without state handoff")
		return bytes.NewReader(nil)
	}
	ch := make(chan proto.Msg, 1)
	w.handoff.mu.Lock()
	w.handoff.wait = ch
	w.handoff.mu.Unlock()
	w.sendMsg(proto.TypeHandoff, &proto.Handoff{Slot: w.slot})
	var m proto.Msg
	select {
	case m = <-ch:
	case <-time.After(timeout):
		w.handoff.mu.Lock()
		if w.handoff.wait == ch { // still unanswered: a late answer is closed
			w.handoff.wait = nil
		}
		w.handoff.mu.Unlock()
		select {
		case m = <-ch: // answered after all
		default:
			err := fmt.Errorf("%w: the master did not answer the request within Config.HandoffTimeout (%s): raise HandoffTimeout if the master is overloaded", ErrHandoff, timeout)
			w.log.Warn("no state taken", "err", err)
			return &errReader{err}
		}
	}
	a := m.Body.(*proto.Handoff)
	if a.Workers > 0 {
		w.handoff.workers.Store(int64(a.Workers))
	}
	if a.From == 0 || len(m.FDs) != 1 {
		proto.CloseFDs(m.FDs)
		w.log.Info("no state to take", "reason", a.Reason)
		return bytes.NewReader(nil)
	}
	state, err := readHandoff(m.FDs[0], a.From, deadline, timeout, w.cfg.HandoffMaxBytes)
	elapsed := time.Since(start)
	done := &proto.HandoffDone{Bytes: int64(len(state)), ElapsedSec: elapsed.Seconds()}
	if err != nil {
		done.Bytes, done.Err = 0, err.Error() // none taken; the error says how far it got
		w.log.Warn("state handoff failed", "from", a.From, "bytes", len(state), "elapsed", elapsed, "err", err)
	} else {
		w.log.Info("state taken from the slot's previous worker", "from", a.From, "bytes", len(state), "elapsed", elapsed)
	}
	w.sendMsg(proto.TypeHandoffDone, done)
	if err != nil {
		return &errReader{err}
	}
	return bytes.NewReader(state)
}

// onHandoffAnswer gives the master's answer to the waiting Handoff, or
// closes its descriptor if Handoff gave up.
func (w *Worker) onHandoffAnswer(m proto.Msg) {
	w.handoff.mu.Lock()
	ch := w.handoff.wait
	w.handoff.wait = nil
	w.handoff.mu.Unlock()
	if ch == nil {
		proto.CloseFDs(m.FDs)
		return
	}
	ch <- m // buffered, and sent to once
}

// readHandoff reads a whole state from fd (it closes it), by deadline and
// within max bytes.
func readHandoff(fd, from int, deadline time.Time, timeout time.Duration, max int64) ([]byte, error) {
	c, err := fileConn(fd)
	if err != nil {
		return nil, fmt.Errorf("%w: the socket from worker %d: %v", ErrHandoff, from, err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(deadline)
	r := bufio.NewReaderSize(c, handoffChunk+4)
	var state []byte
	var hdr [4]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return state, handoffReadErr(err, from, len(state), timeout)
		}
		n := binary.BigEndian.Uint32(hdr[:])
		switch {
		case n == 0:
			return state, nil
		case n == handoffFailed:
			if _, err := io.ReadFull(r, hdr[:]); err != nil {
				return state, handoffReadErr(err, from, len(state), timeout)
			}
			msg := make([]byte, min(binary.BigEndian.Uint32(hdr[:]), maxHandoffErr))
			if _, err := io.ReadFull(r, msg); err != nil {
				return state, handoffReadErr(err, from, len(state), timeout)
			}
			return state, fmt.Errorf("%w: worker %d could not write its state: %s", ErrHandoff, from, msg)
		case n > handoffChunk:
			return state, fmt.Errorf("%w: worker %d sent a chunk of %d bytes, more than %d: not a state handoff stream", ErrHandoff, from, n, handoffChunk)
		case int64(len(state))+int64(n) > max:
			return state, fmt.Errorf("%w: the state from worker %d exceeds Config.HandoffMaxBytes (%d bytes): raise HandoffMaxBytes, or have OnHandoff write less",
				ErrHandoff, from, max)
		}
		at := len(state)
		state = append(state, make([]byte, n)...)
		if _, err := io.ReadFull(r, state[at:]); err != nil {
			return state[:at], handoffReadErr(err, from, at, timeout)
		}
	}
}

// handoffReadErr says what a failed read of worker from's state means.
func handoffReadErr(err error, from, got int, timeout time.Duration) error {
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("%w: worker %d's state did not end within Config.HandoffTimeout (%s; %d bytes read): raise HandoffTimeout, or have OnHandoff write less or sooner",
			ErrHandoff, from, timeout, got)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: worker %d closed the handoff before the end of its state (%d bytes read): it exited, or its writer passed its own Config.HandoffTimeout",
			ErrHandoff, from, got)
	}
	return fmt.Errorf("%w: read worker %d's state: %v", ErrHandoff, from, err)
}

// onHandoffSend runs the application's callback for the worker that takes
// this one's slot over, on a goroutine of its own: this worker goes on
// serving meanwhile.
func (w *Worker) onHandoffSend(h *proto.Handoff, fds []int) {
	if len(fds) != 1 {
		proto.CloseFDs(fds)
		w.log.Warn("handoff request without its socket; ignored", "to", h.To, "descriptors", len(fds))
		return
	}
	w.handoff.sending.Add(1)
	go func() {
		defer w.handoff.sending.Add(-1)
		w.handOver(h, fds[0])
	}()
}

// handOver writes this worker's state to fd for worker h.To.
func (w *Worker) handOver(h *proto.Handoff, fd int) {
	start := time.Now()
	c, err := fileConn(fd)
	if err != nil {
		w.log.Warn("state handoff: the socket", "to", h.To, "err", err)
		return
	}
	// Past the deadline the socket closes even while the callback is
	// still busy: the receiver is not kept waiting by a callback that
	// blocks without writing.
	timeout := w.cfg.HandoffTimeout
	_ = c.SetWriteDeadline(start.Add(timeout))
	closer := time.AfterFunc(timeout, func() { c.Close() })
	defer closer.Stop()
	defer c.Close()
	hw := &handoffWriter{c: c, max: w.cfg.HandoffMaxBytes, timeout: timeout}
	bw := bufio.NewWriterSize(hw, handoffChunk)
	var cbErr error
	if fn := w.handoff.fn.Load(); fn != nil {
		done := make(chan error, 1)
		go func() {
			err := w.callHandoff(*fn, bw)
			if err == nil {
				err = bw.Flush()
			}
			done <- err
		}()
		select {
		case cbErr = <-done:
		case <-time.After(timeout):
			// The socket is closed now (closer): the callback goes on
			// alone, its writes failing, and this worker may exit.
			w.log.Warn("state handoff to the slot's new worker: OnHandoff still busy after Config.HandoffTimeout; the new worker goes without",
				"to", h.To, "slot", h.Slot, "timeout", timeout)
			return
		}
	}
	err = hw.end(cbErr)
	elapsed := time.Since(start)
	if err != nil {
		w.log.Warn("state handoff to the slot's new worker failed", "to", h.To, "slot", h.Slot, "bytes", hw.n, "elapsed", elapsed, "err", err)
		return
	}
	w.log.Info("state handed over to the slot's new worker", "to", h.To, "slot", h.Slot, "bytes", hw.n, "elapsed", elapsed)
}

// callHandoff calls the application's callback, turning a panic into an
// error: this worker still serves its connections, and must not die of it.
func (w *Worker) callHandoff(fn func(io.Writer) error, wr io.Writer) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("OnHandoff panicked: %v", v)
			w.log.Error("OnHandoff panicked; the new worker gets an error instead of the state", "panic", v, "stack", string(debug.Stack()))
		}
	}()
	return fn(wr)
}

// handoffWriter frames the state into chunks, counts it against max, and
// ends the stream with the end marker or the error.
type handoffWriter struct {
	c       net.Conn
	max     int64
	timeout time.Duration
	n       int64
	err     error // sticky: the first failure
	broken  bool  // err is the socket's
}

func (hw *handoffWriter) Write(p []byte) (int, error) {
	if hw.err != nil {
		return 0, hw.err
	}
	if hw.n+int64(len(p)) > hw.max {
		hw.err = fmt.Errorf("%w: the state exceeds Config.HandoffMaxBytes (%d bytes): raise HandoffMaxBytes (in both builds), or write less", ErrHandoff, hw.max)
		return 0, hw.err
	}
	written := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), handoffChunk)]
		var hdr [4]byte
		binary.BigEndian.PutUint32(hdr[:], uint32(len(chunk)))
		bufs := net.Buffers{hdr[:], chunk}
		if _, err := bufs.WriteTo(hw.c); err != nil {
			hw.err, hw.broken = hw.writeErr(err), true
			return written, hw.err
		}
		written += len(chunk)
		hw.n += int64(len(chunk))
		p = p[len(chunk):]
	}
	return written, nil
}

func (hw *handoffWriter) writeErr(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("%w: writing the state took longer than Config.HandoffTimeout (%s): raise HandoffTimeout, or write less or sooner", ErrHandoff, hw.timeout)
	}
	return fmt.Errorf("%w: write the state: %v", ErrHandoff, err)
}

// end writes the end marker, or the error (the callback's, or the
// writer's own) for the receiver; it returns the handoff's error.
func (hw *handoffWriter) end(cbErr error) error {
	err := hw.err
	if err == nil {
		err = cbErr
	}
	if err == nil {
		var hdr [4]byte
		if _, werr := hw.c.Write(hdr[:]); werr != nil {
			return hw.writeErr(werr)
		}
		return nil
	}
	if hw.broken {
		return err // nothing more can be written to the socket
	}
	// The receiver says it failed: the message need not.
	msg := strings.TrimPrefix(err.Error(), ErrHandoff.Error()+": ")
	if len(msg) > maxHandoffErr {
		msg = msg[:maxHandoffErr]
	}
	frame := make([]byte, 8+len(msg))
	binary.BigEndian.PutUint32(frame, handoffFailed)
	binary.BigEndian.PutUint32(frame[4:], uint32(len(msg)))
	copy(frame[8:], msg)
	_, _ = hw.c.Write(frame)
	return err
}

// fileConn makes a net.Conn of a received socket descriptor (closing fd:
// the conn holds a duplicate).
func fileConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "handoff")
	defer f.Close()
	return net.FileConn(f)
}

// errReader is a reader that only fails.
type errReader struct{ err error }

func (r *errReader) Read([]byte) (int, error) { return 0, r.err }

// ---- the master's half ----

// handoffRecord is a handoff the master set up for a new worker, until it
// reports the outcome.
type handoffRecord struct{ from, fromSlot int }

// onHandoffAsk answers a new worker's request for its slot's state: a
// socket pair, one end to it and one to the source, or none.
func (m *master) onHandoffAsk(q *proc) {
	src, why := m.handoffSource(q)
	if src == nil {
		// Every first start asks: the worker logs its own answer.
		m.log.Debug("no state handoff for the new worker", append(q.logAttrs(), "reason", why)...)
		q.peer.send(proto.TypeHandoff, &proto.Handoff{Slot: q.slot, Workers: len(m.slots), Reason: why})
		return
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		why = "socket pair: " + err.Error()
		m.log.Warn("no state handoff for the new worker", append(q.logAttrs(), "reason", why)...)
		q.peer.send(proto.TypeHandoff, &proto.Handoff{Slot: q.slot, Workers: len(m.slots), Reason: why})
		return
	}
	defer proto.CloseFDs(fds[:]) // the workers get duplicates
	q.handoff = &handoffRecord{from: src.pid, fromSlot: src.slot}
	q.predecessor = nil // asked once: let it go
	m.log.Info("handing a slot's state over", append(q.logAttrs(), "from", src.pid, "from_slot", src.slot, "from_state", src.state.String())...)
	src.peer.sendFDs(proto.TypeHandoffSend, &proto.Handoff{Slot: q.slot, To: q.pid, Workers: len(m.slots)}, fds[:1])
	q.peer.sendFDs(proto.TypeHandoff, &proto.Handoff{Slot: q.slot, From: src.pid, Workers: len(m.slots)}, fds[1:])
}

// handoffSource is the worker whose state q takes, or nil and why none:
// the worker q replaced in its slot (a retirement, a restart, a deploy:
// retired or standing by, still alive), or, while q is not yet serving,
// the slot's serving worker; for a slot a resize split, the worker of the
// slot it split from. A crash leaves none: the slot's worker is gone.
func (m *master) handoffSource(q *proc) (*proc, string) {
	if q.handoff != nil {
		return nil, "asked already"
	}
	if q.slot < 0 || q.slot >= len(m.slots) {
		return nil, "a spare serves no slot"
	}
	var src *proc
	switch s := m.slots[q.slot]; {
	case q.predecessor != nil:
		src = q.predecessor
	case s != nil && s != q:
		src = s
	case q.splitFrom >= 0 && q.splitFrom < len(m.slots):
		src = m.slots[q.splitFrom]
	}
	switch {
	case src == nil:
		return nil, "no live previous worker in the slot (a first start, a crash, a merge)"
	case m.procs[src.pid] != src || src.peer == nil:
		return nil, "the previous worker, pid " + strconv.Itoa(src.pid) + ", is gone or not connected"
	case !src.handoffOK:
		return nil, "the previous worker, pid " + strconv.Itoa(src.pid) + ", runs a release without state handoff"
	case src.unresponsive:
		return nil, "the previous worker, pid " + strconv.Itoa(src.pid) + ", is unresponsive"
	case src.state == stateStopping || src.state == stateSpare || src.state == stateStarting:
		return nil, "the previous worker, pid " + strconv.Itoa(src.pid) + ", is " + src.state.String()
	}
	return src, ""
}

// onHandoffDone reports a handoff's outcome, as the new worker tells it.
func (m *master) onHandoffDone(q *proc, d *proto.HandoffDone) {
	h := q.handoff
	if h == nil {
		return // not one this master set up
	}
	ev := EventHandoff{Slot: q.slot, From: h.from, To: q.pid, Bytes: d.Bytes, Elapsed: seconds(d.ElapsedSec), Err: d.Err}
	attrs := append(q.logAttrs(), "from", h.from, "from_slot", h.fromSlot, "bytes", d.Bytes, "elapsed", ev.Elapsed)
	if d.Err != "" {
		m.log.Warn("state handoff failed; the slot moves without it", append(attrs, "err", d.Err)...)
	} else {
		m.log.Info("state handed over", attrs...)
	}
	m.emit.send(ev)
}
