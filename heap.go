//go:build linux

package ipcluster

// Heap snapshots (Config.HeapProfileDir): the master takes a heap profile
// of each worker from its operator socket (ops.go) once the worker has
// served HeapProfileWarmup (the start), and again when it has retired and
// drained, or just before the master ends it for the memory budget or its
// drain deadline (the end); internal/heapsnap writes both and their diff.
//
// The loop decides and records; the fetches and the writes run on a
// goroutine per snapshot, bounded by heapFetchTimeout, which reports back
// with evHeap. A drained worker does not exit on its own while the master
// takes snapshots (Welcome.HeapSnapshots): it says drained and waits, at
// most heapHoldTimeout, for the die the master sends once its end is
// written (onDrained, onHeap). A dismissal waits for the end the same way
// (dismiss, in monitor.go, through heapBefore).
//
// Per worker, the loop owns heap: what was taken and what is in flight.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/ipcluster/ipcluster/internal/heapsnap"
	"github.com/ipcluster/ipcluster/internal/proto"
)

const (
	// heapFetchTimeout bounds one heap profile's fetch (it runs a GC
	// first) and write.
	heapFetchTimeout = 10 * time.Second
	// heapHoldTimeout bounds a drained worker's wait for the master's
	// die (worker.go): a master that never answers costs this much.
	heapHoldTimeout = 30 * time.Second
	// maxHeapProfile bounds what the master reads of one profile.
	maxHeapProfile = 256 << 20
	// keptHeapSnapshots is how many pairs the status names.
	keptHeapSnapshots = 16
)

// heapState is one worker's snapshots.
type heapState struct {
	name     string // the set's name in the store, fixed at the first snapshot
	start    string // the start's path, once written
	tried    bool   // a start was asked for (taken, failed or in flight)
	inFlight bool   // a fetch is under way; evHeap ends it
	endWant  bool   // an end is due once the start in flight is written
	ended    bool   // the end was taken (or failed): never again
	// then is what waits for the end: die to a drained worker, or a
	// dismissal (monitor.go).
	then func()
}

// evHeap reports a snapshot written (or its failure).
type evHeap struct {
	p              *proc
	end            bool
	start, endPath string
	diff           string
	top            string
	err            error
}

func (evHeap) isEvent() {}

// openHeapStore opens Config.HeapProfileDir, if set.
func openHeapStore(cfg *Config) (*heapsnap.Store, error) {
	if cfg.HeapProfileDir == "" {
		return nil, nil
	}
	s, err := heapsnap.Open(cfg.HeapProfileDir, cfg.HeapProfileMaxBytes)
	if err != nil {
		return nil, fmt.Errorf("Config.HeapProfileDir: %w", err)
	}
	return s, nil
}

// heapName names p's set: cluster, slot, pid and generation.
func (m *master) heapName(p *proc) string {
	return fmt.Sprintf("%s-slot%d-pid%d-gen%d", m.cfg.Name, max(p.slot, 0), p.pid, p.gen)
}

// takeHeapStarts asks for the start of every worker that has served its
// slot for HeapProfileWarmup; called at each monitor tick.
func (m *master) takeHeapStarts(now time.Time) {
	if m.heaps == nil || m.phase == phaseStopping {
		return
	}
	for _, p := range m.procs {
		if p.state.serving() && !p.heap.tried && p.ops != "" && !p.activeSince.IsZero() && now.Sub(p.activeSince) >= m.cfg.HeapProfileWarmup {
			m.heapStart(p)
		}
	}
}

// heapStart fetches p's start, unless one was asked for already.
func (m *master) heapStart(p *proc) {
	if m.heaps == nil || p.ops == "" || p.heap.tried || p.heap.inFlight {
		return
	}
	p.heap.tried, p.heap.inFlight = true, true
	if p.heap.name == "" {
		p.heap.name = m.heapName(p)
	}
	go m.fetchHeap(p, false)
}

// heapBefore runs then once p's end has been taken, or at once if there is
// none to take: heap snapshots off, p never got a start and was not
// retired for memory, it cannot be reached, or its end was taken already.
// It reports whether then was deferred.
func (m *master) heapBefore(p *proc, then func()) bool {
	switch {
	case m.heaps == nil || p.ops == "" || p.heap.ended || p.unresponsive:
		return false
	case p.heap.then != nil:
		return true // already waiting: the first then stands
	case !p.heap.tried && p.retireCause != CauseMemory:
		return false // it never served its warm-up: nothing to compare
	}
	p.heap.then = then
	if !p.heap.tried {
		m.heapStart(p) // a memory retirement always leaves a pair
	}
	if p.heap.inFlight {
		p.heap.endWant = true // after the start
		return true
	}
	m.heapEnd(p)
	return true
}

// heapEnd fetches p's end.
func (m *master) heapEnd(p *proc) {
	p.heap.inFlight, p.heap.ended = true, true
	if p.heap.name == "" {
		p.heap.name = m.heapName(p)
	}
	go m.fetchHeap(p, true)
}

// fetchHeap takes one heap profile of p and writes it, off the loop.
func (m *master) fetchHeap(p *proc, end bool) {
	ev := evHeap{p: p, end: end}
	ctx, cancel := context.WithTimeout(context.Background(), heapFetchTimeout)
	defer cancel()
	prof, err := fetchHeapProfile(ctx, p.ops)
	switch {
	case err != nil:
		ev.err = fmt.Errorf("fetch the heap profile of worker pid %d: %w", p.pid, err)
	case end:
		ev.endPath, ev.diff, ev.err = m.heaps.WriteEnd(p.heap.name, prof)
		if ev.diff != "" {
			ev.top = heapTop(ev.diff)
		}
	default:
		ev.start, ev.err = m.heaps.WriteStart(p.heap.name, prof)
	}
	m.send(ev)
}

// fetchHeapProfile GETs /debug/pprof/heap?gc=1 from an operator socket.
func fetchHeapProfile(ctx context.Context, sock string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://worker/debug/pprof/heap?gc=1", nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: operatorTransport(sock, heapFetchTimeout)}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /debug/pprof/heap: %s", resp.Status)
	}
	return io.ReadAll(io.LimitReader(resp.Body, maxHeapProfile))
}

// heapTop is the diff's largest growths by in-use bytes, for the log.
func heapTop(diff string) string {
	b, err := os.ReadFile(diff)
	if err != nil {
		return ""
	}
	top, err := heapsnap.Top(b, "inuse_space", 3)
	if err != nil {
		return ""
	}
	var parts []string
	for _, e := range top {
		parts = append(parts, fmt.Sprintf("%s %+d", e.Func, e.Flat))
	}
	return strings.Join(parts, ", ")
}

// onHeap records a snapshot written, and runs what waited for an end.
func (m *master) onHeap(ev evHeap) {
	p := ev.p
	p.heap.inFlight = false
	if !ev.end {
		if ev.err != nil {
			m.log.Warn("heap snapshot start failed", append(p.logAttrs(), "err", ev.err)...)
		} else {
			p.heap.start = ev.start
			m.log.Info("heap snapshot start written", append(p.logAttrs(), "file", ev.start)...)
		}
		if p.heap.endWant && m.procs[p.pid] == p {
			p.heap.endWant = false
			m.heapEnd(p)
		} else if m.procs[p.pid] != p && ev.start != "" {
			os.Remove(ev.start) // exited meanwhile: a start alone never gets its end
		}
		return
	}
	snap := proto.HeapSnapshot{PID: p.pid, Slot: p.slot, Generation: p.gen, Cause: string(p.retireCause),
		Start: p.heap.start, End: ev.endPath, Diff: ev.diff}
	if ev.err != nil {
		snap.Error = ev.err.Error()
		m.log.Warn("heap snapshot end failed", append(p.logAttrs(), "err", ev.err, "end", ev.endPath)...)
	} else {
		m.log.Info("heap snapshots written", append(p.logAttrs(), "cause", p.retireCause, "start", snap.Start,
			"end", snap.End, "diff", snap.Diff, "top_inuse", ev.top)...)
	}
	m.heapSnaps = append(m.heapSnaps, snap)
	if n := len(m.heapSnaps); n > keptHeapSnapshots {
		m.heapSnaps = slices.Delete(m.heapSnaps, 0, n-keptHeapSnapshots)
	}
	m.emit.send(EventHeapSnapshot{PID: p.pid, Slot: p.slot, Generation: p.gen, Cause: p.retireCause,
		Start: snap.Start, End: snap.End, Diff: snap.Diff, Err: ev.err})
	if then := p.heap.then; then != nil && m.procs[p.pid] == p {
		p.heap.then = nil
		then()
	}
}

// onDrained: a retired worker has drained and waits for die; its end is
// taken first, if it has a start (or was retired for memory).
func (m *master) onDrained(p *proc) {
	die := func() {
		if p.peer != nil {
			p.peer.send(proto.TypeDie, &proto.Reason{Reason: "drained"})
		}
	}
	if !m.heapBefore(p, die) {
		die()
	}
}

// heapExited forgets an exited worker's snapshots: a start that never got
// its end is removed (the store keeps starts without an end, as their
// workers run).
func (m *master) heapExited(p *proc) {
	if p.heap.start != "" && !p.heap.ended && !p.heap.inFlight {
		if err := os.Remove(p.heap.start); err != nil && !errors.Is(err, os.ErrNotExist) {
			m.log.Debug("remove heap snapshot start", append(p.logAttrs(), "err", err)...)
		}
	}
}

// adoptHeapStart finds the start an earlier master wrote for an adopted
// worker, so that its end still makes a pair.
func (m *master) adoptHeapStart(p *proc) {
	if m.heaps == nil {
		return
	}
	name := m.heapName(p)
	path := filepath.Join(m.heaps.Dir(), name+"-start.pb.gz")
	if _, err := os.Stat(path); err == nil {
		p.heap.name, p.heap.start, p.heap.tried = name, path, true
	}
}
