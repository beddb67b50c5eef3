//go:build linux

package ipcluster

import (
	"io"
	"log/slog"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// policyMaster is a master with no processes, rules or socket: enough to
// run the policy decisions over hand-made procs. Their processes are fakes
// (fakeProc) that record signals, so nothing outside the test is touched.
func policyMaster(t *testing.T, cfg Config) (*master, *[]Event) {
	t.Helper()
	cfg.Name, cfg.Ports = "t", []Port{{Public: 1}}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	var events []Event
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	m := newState(&cfg, "")
	m.emit = &emitter{fn: func(ev Event) { events = append(events, ev) }}
	m.rules = newFakeRuleSync(&cfg, m.log, m.emit.send).ruleSync
	// Events stay in the emitter's queue until flushEvents.
	return m, &events
}

// flushEvents delivers queued events.
func (m *master) flushEvents() {
	q := m.emit.queue
	m.emit.queue = nil
	for _, ev := range q {
		m.emit.fn(ev)
	}
}

func addProc(m *master, pid int, st procState, conns int64, rss uint64, age time.Duration) *proc {
	now := time.Now()
	p := fakeProc(pid, pid%len(m.slots), 0)
	p.state, p.spawned, p.activeSince = st, now.Add(-age), now.Add(-age)
	p.mem.at, p.mem.RSSBytes = now, rss
	p.beat = beatReport{at: now, stats: proto.Stats{Connections: conns}}
	if st == stateRetired {
		p.retiredAt = now
	}
	m.procs[pid] = p
	return p
}

// Kill order: already ending first, then fewest connections, then largest
// RSS, then oldest.
func TestKillOrder(t *testing.T) {
	m, _ := policyMaster(t, Config{})
	const mb = 1 << 20
	a := addProc(m, 10, stateRetired, 5, 100*mb, time.Hour)
	b := addProc(m, 11, stateRetired, 1, 50*mb, time.Hour)
	c := addProc(m, 12, stateRetired, 1, 80*mb, time.Minute)
	d := addProc(m, 13, stateRetired, 1, 80*mb, time.Hour) // as c, but older
	e := addProc(m, 14, stateRetired, 9, 10*mb, time.Minute)
	e.unresponsive = true
	f := addProc(m, 15, stateRetired, 9, 10*mb, time.Minute)
	f.dismissedAt = time.Now()
	got := []*proc{a, b, c, d, e, f}
	slices.SortFunc(got, killOrder)
	var pids []int
	for _, p := range got {
		pids = append(pids, p.pid)
	}
	if want := []int{14, 15, 13, 12, 11, 10}; !slices.Equal(pids, want) {
		t.Errorf("kill order %v, want %v", pids, want)
	}
}

// Above the low watermark retired workers are asked to finish, just enough
// of them, in kill order; above the high one they are killed; active
// workers are never touched.
func TestMemoryBudgetWatermarks(t *testing.T) {
	const mb = 1 << 20
	m, events := policyMaster(t, Config{Workers: 2, MemoryBudget: 1000 * mb})
	live := addProc(m, 1, stateActive, 0, 300*mb, time.Hour)
	addProc(m, 2, stateActive, 0, 300*mb, time.Hour)
	r1 := addProc(m, 10, stateRetired, 1, 40*mb, time.Hour) // kill order: r3, r1, r2
	r2 := addProc(m, 11, stateRetired, 3, 40*mb, time.Hour)
	r3 := addProc(m, 12, stateRetired, 1, 60*mb, time.Hour)

	// 740 MiB: below the low watermark (800).
	m.checkBudget()
	m.flushEvents()
	if len(*events) != 0 || !r1.dismissedAt.IsZero() {
		t.Fatalf("below the low watermark: events %v", *events)
	}

	// 840 MiB: r3 (60) brings it to 780.
	live.mem.RSSBytes += 100 * mb
	m.checkBudget()
	m.flushEvents()
	want := EventMemoryPressure{Watermark: "low", UsedBytes: 840 * mb, BudgetBytes: 1000 * mb, Asked: []int{12}}
	if len(*events) != 2 || !equalPressure((*events)[1], want) {
		t.Fatalf("low watermark: events %+v, want a dismissal and %+v", *events, want)
	}
	if r3.dismissedAt.IsZero() || r3.killed || !r1.dismissedAt.IsZero() {
		t.Fatalf("low watermark: r3 asked %v killed %v, r1 asked %v", !r3.dismissedAt.IsZero(), r3.killed, !r1.dismissedAt.IsZero())
	}
	*events = nil

	// The same sample again: r3 is finishing, nothing more to do.
	m.checkBudget()
	m.flushEvents()
	if len(*events) != 0 {
		t.Fatalf("repeat: events %+v", *events)
	}

	// 990 MiB, r3 still there: above high (950). Killing r3 (already
	// finishing, so first) leaves 930; then the low pass asks r1 (890)
	// and r2 (850): still above 800, and no retired worker is left.
	live.mem.RSSBytes += 150 * mb
	m.checkBudget()
	m.flushEvents()
	if !r3.killed || r1.killed || r2.killed || r1.dismissedAt.IsZero() || r2.dismissedAt.IsZero() {
		t.Fatalf("high watermark: killed r3 %v r1 %v r2 %v; asked r1 %v r2 %v", r3.killed, r1.killed, r2.killed,
			!r1.dismissedAt.IsZero(), !r2.dismissedAt.IsZero())
	}
	last := (*events)[len(*events)-1]
	want = EventMemoryPressure{Watermark: "high", UsedBytes: 990 * mb, BudgetBytes: 1000 * mb, Asked: []int{10, 11}, Killed: []int{12}}
	if !equalPressure(last, want) {
		t.Fatalf("high watermark: %+v, want %+v", last, want)
	}
	for _, p := range m.procs {
		if p.state.serving() && (p.killed || !p.dismissedAt.IsZero()) {
			t.Errorf("active worker %d ended for the budget", p.pid)
		}
	}
	// Without a connection, asking is a SIGTERM; the fakes saw them all.
	term, kill := syscall.SIGTERM, syscall.SIGKILL
	for p, want := range map[*proc][]syscall.Signal{live: nil, r1: {term}, r2: {term}, r3: {term, kill}} {
		if got := signals(p); !slices.Equal(got, want) {
			t.Errorf("worker %d got signals %v, want %v", p.pid, got, want)
		}
	}
}

func equalPressure(ev Event, want EventMemoryPressure) bool {
	got, ok := ev.(EventMemoryPressure)
	return ok && got.Watermark == want.Watermark && got.UsedBytes == want.UsedBytes && got.BudgetBytes == want.BudgetBytes &&
		slices.Equal(got.Asked, want.Asked) && slices.Equal(got.Killed, want.Killed)
}

// The (N+1)th policy retirement in a window is held back, reported once,
// and goes ahead once the window has moved on.
func TestRetireRateLimit(t *testing.T) {
	const mb = 1 << 20
	m, events := policyMaster(t, Config{Workers: 4, MemoryLimit: 100 * mb, StartupGrace: -1, RetireLimit: 2, RetireWindow: time.Minute})
	for pid := 1; pid <= 3; pid++ {
		p := addProc(m, pid, stateActive, 0, 200*mb, time.Hour)
		m.slots[p.slot] = p
		m.pending[p.slot] = fakeProc(100+pid, p.slot, 0) // a replacement "starting": nothing is spawned
	}
	now := time.Now()
	for range 3 { // three samples
		for _, p := range m.procs {
			p.mem.at = now
		}
		m.enforce(now)
	}
	m.flushEvents()
	var retiring, held []int
	for pid := 1; pid <= 3; pid++ {
		if p := m.procs[pid]; p.retireCause == CauseMemory {
			retiring = append(retiring, pid)
		}
	}
	for _, ev := range *events {
		if h, ok := ev.(EventRetireHeld); ok {
			held = append(held, h.PID)
		}
	}
	if !slices.Equal(retiring, []int{1, 2}) || !slices.Equal(held, []int{3}) {
		t.Fatalf("retiring %v held %v; want [1 2] and [3], reported once", retiring, held)
	}
	later := now.Add(time.Minute + time.Second)
	m.procs[3].mem.at, m.procs[3].beat.at = later, later
	m.enforce(later)
	if m.procs[3].retireCause != CauseMemory {
		t.Fatalf("held retirement not retried after the window")
	}
}

// A worker inside its start-up grace is not retired for memory or lag.
func TestStartupGrace(t *testing.T) {
	const mb = 1 << 20
	m, _ := policyMaster(t, Config{Workers: 2, MemoryLimit: 100 * mb, LagLimit: 10 * time.Millisecond, StartupGrace: time.Minute})
	young := addProc(m, 1, stateActive, 0, 200*mb, time.Second)
	old := addProc(m, 2, stateActive, 0, 10*mb, 2*time.Minute)
	old.beat.stats.LagSec = 0.5
	for _, p := range []*proc{young, old} {
		m.slots[p.slot] = p
		m.pending[p.slot] = fakeProc(100+p.pid, p.slot, 0)
	}
	m.enforce(young.mem.at)
	if young.retireCause != "" {
		t.Errorf("worker 1s old retired inside a 1m grace: %s", young.retireReason)
	}
	if old.retireCause != CauseLag {
		t.Errorf("worker 2m old with 500ms lag: cause %q, want lag", old.retireCause)
	}
}
