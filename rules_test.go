//go:build linux

package ipcluster

// Unit tests of the rule sync over the in-memory fakeBackend: no root, no
// namespace, no kernel, no real timer. The backends themselves are tested
// for real in network namespaces (iptables_test.go, nftables_test.go,
// backend_test.go).

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"
)

// ruleSyncForTest is a fake rule sync for a two-slot cluster with one TCP
// and one UDP port, and the events it emitted.
func ruleSyncForTest(t *testing.T) (fakeRuleSync, *[]Event) {
	t.Helper()
	cfg := Config{Name: "t", Workers: 2, Ports: []Port{tcp8080, udp8080}}.withDefaults()
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	var events []Event
	s := newFakeRuleSync(&cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), func(ev Event) { events = append(events, ev) })
	return s, &events
}

// rulesFailed counts the EventRulesFailed among events.
func rulesFailed(events []Event) int {
	n := 0
	for _, ev := range events {
		if _, ok := ev.(EventRulesFailed); ok {
			n++
		}
	}
	return n
}

// A failed write leaves the previous rules, and is retried after 1s, 2s,
// 4s, then every 5s: the timer only sends the loop evRetryRules, and no
// write is tried before it fires. The write that succeeds resets the
// count, so the next failure waits 1s again.
func TestRuleSyncRetryBackoff(t *testing.T) {
	s, events := ruleSyncForTest(t)
	ctx := context.Background()
	targets := targetsForPorts(2, []Port{tcp8080, udp8080})
	s.markDirty()
	if wrote, err := s.write(ctx, targets, targets); !wrote || err != nil {
		t.Fatalf("first write: wrote %v, err %v", wrote, err)
	}

	moved := cloneTargets(targets)
	moved[1] = slotTarget{tcp8080: 41000, udp8080: 41001}
	s.backend.failApply = 5
	s.markDirty()
	for i := range 5 {
		wrote, err := s.write(ctx, moved, moved)
		if wrote || err != nil {
			t.Fatalf("failure %d: wrote %v, err %v; want a retry, not a stop (the rules were installed)", i+1, wrote, err)
		}
		applies := s.backend.applies()
		if wrote, _ := s.write(ctx, moved, moved); wrote || s.backend.applies() != applies {
			t.Fatalf("failure %d: written again before the retry timer fired", i+1)
		}
		*s.sent = nil
		s.timers.fire()
		if !slices.Equal(*s.sent, []event{evRetryRules{}}) {
			t.Fatalf("retry timer sent %v to the loop, want evRetryRules", *s.sent)
		}
		s.retry() // the loop's handling of evRetryRules
	}
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second}
	if !slices.Equal(s.timers.delays, want) {
		t.Errorf("retry delays %v, want %v", s.timers.delays, want)
	}
	if n := rulesFailed(*events); n != 5 {
		t.Errorf("%d EventRulesFailed, want 5", n)
	}
	if got := s.backend.installed[1]; !maps.Equal(got, targets[1]) {
		t.Errorf("after failed writes the backend holds slot 1 → %v, want the previous %v", got, targets[1])
	}

	if wrote, err := s.write(ctx, moved, moved); !wrote || err != nil {
		t.Fatalf("write after the failures: wrote %v, err %v", wrote, err)
	}
	if s.ruleFails != 0 || s.dirty || s.retrying {
		t.Errorf("after a successful rewrite: failures %d, dirty %v, retrying %v; want 0, false, false", s.ruleFails, s.dirty, s.retrying)
	}
	if !maps.Equal(s.backend.installed[1], moved[1]) || !maps.Equal(s.routed[1], moved[1]) {
		t.Errorf("slot 1 routed to %v (backend %v), want %v", s.routed[1], s.backend.installed[1], moved[1])
	}
	// The UDP flow that moved off 40011 is noted for conntrack cleanup.
	if !s.udpMoved[movedFlow{Public: 8080, Worker: 40011}] || len(s.udpMoved) != 1 {
		t.Errorf("moved UDP flows %v, want only 8080→40011", s.udpMoved)
	}

	s.backend.failApply = 1
	s.markDirty()
	s.write(ctx, targets, targets)
	if d := s.timers.delays[len(s.timers.delays)-1]; d != time.Second {
		t.Errorf("first failure after a success waits %s, want 1s: the count was not reset", d)
	}
}

// A write that hangs (a held xtables lock, a stuck kernel) is cancelled
// after ruleWriteTimeout: the loop gets control back, the failure is
// reported with the context's error, and retried.
func TestRuleSyncWriteTimeout(t *testing.T) {
	defer func(d time.Duration) { ruleWriteTimeout = d }(ruleWriteTimeout)
	ruleWriteTimeout = 50 * time.Millisecond
	s, events := ruleSyncForTest(t)
	s.backend.hang = true
	s.markDirty()
	targets := targetsForPorts(2, []Port{tcp8080, udp8080})
	wrote, err := s.write(context.Background(), targets, nil)
	if wrote || err != nil {
		t.Fatalf("hung first write: wrote %v, err %v; want a retry", wrote, err)
	}
	if len(*events) != 1 {
		t.Fatalf("events %v, want one EventRulesFailed", *events)
	}
	ev, ok := (*events)[0].(EventRulesFailed)
	if !ok || !errors.Is(ev.Err, context.DeadlineExceeded) {
		t.Fatalf("event %v: want EventRulesFailed wrapping the write's deadline", (*events)[0])
	}
	if s.installed || !s.retrying || !s.dirty || s.ruleFails != 1 || s.installErr != 1 {
		t.Errorf("after a timed-out write: installed %v retrying %v dirty %v failures %d/%d",
			s.installed, s.retrying, s.dirty, s.ruleFails, s.installErr)
	}
	if !slices.Equal(s.timers.delays, []time.Duration{time.Second}) {
		t.Errorf("retry delays %v, want [1s]", s.timers.delays)
	}
}

// The third failed first install stops the master, with the error Run
// returns; the first two are retried.
func TestFirstInstallFailuresStopMaster(t *testing.T) {
	m, events := policyMaster(t, Config{Workers: 2})
	var logs strings.Builder
	m.log = slog.New(slog.NewTextHandler(&logs, nil))
	m.done = make(chan struct{}) // the stop timeout's event is dropped
	t.Cleanup(func() { close(m.done) })
	fake := m.rules.backend.(*fakeBackend)
	fake.failApply = 1 << 20
	timers := &fakeTimers{}
	m.rules.after = timers.after
	m.started = time.Now().Add(-time.Hour) // past the first install's wait
	m.rules.markDirty()
	for i := range 3 {
		m.syncRules(context.Background())
		if stopping := i == 2; (m.phase == phaseStopping) != stopping {
			t.Fatalf("after failed install %d: stopping %v, want %v", i+1, m.phase == phaseStopping, stopping)
		}
		if i < 2 {
			m.rules.retry()
		}
	}
	m.flushEvents()
	if n := rulesFailed(*events); n != 3 {
		t.Errorf("%d EventRulesFailed, want 3", n)
	}
	if len(timers.delays) != 2 {
		t.Errorf("%d retries scheduled, want 2 (the third failure stops)", len(timers.delays))
	}
	if !errors.Is(m.stopErr, errFakeApply) || !strings.Contains(m.stopErr.Error(), "install rules for cluster t") {
		t.Errorf("stopErr %v: want the install error, naming the cluster", m.stopErr)
	}
	if !strings.Contains(logs.String(), `msg="master stopping" reason="rules could not be installed"`) {
		t.Errorf("stop reason not logged:\n%s", logs.String())
	}
	if n := fake.applies(); n != 3 {
		t.Errorf("%d applies, want 3: a master whose rules were never installed withdraws nothing", n)
	}
}

// A rules-lost report from check is an EventRulesFailed wrapping
// ErrRulesLost and makes the next write put the same rules back. Before
// the first install, and while a retry is pending, nothing is checked.
func TestRuleSyncRewritesLostRules(t *testing.T) {
	s, events := ruleSyncForTest(t)
	ctx := context.Background()
	s.check(ctx)
	if s.backend.checks != 0 {
		t.Errorf("checked %d times before the first install", s.backend.checks)
	}
	targets := targetsForPorts(2, []Port{tcp8080, udp8080})
	s.markDirty()
	s.write(ctx, targets, nil)

	s.check(ctx)
	if s.due() || len(*events) != 0 {
		t.Fatalf("a check that found the rules: due %v, events %v", s.due(), *events)
	}
	s.backend.lost = true
	s.check(ctx)
	if len(*events) != 1 {
		t.Fatalf("events %v, want one EventRulesFailed", *events)
	}
	if ev, ok := (*events)[0].(EventRulesFailed); !ok || !errors.Is(ev.Err, ErrRulesLost) {
		t.Fatalf("event %v: want EventRulesFailed wrapping ErrRulesLost", (*events)[0])
	}
	if !s.due() {
		t.Fatal("lost rules are not to be written again")
	}
	if routes, _ := s.routes(ctx); routes != nil {
		t.Fatalf("the fake kept its routes after losing them: %v", routes)
	}
	if wrote, err := s.write(ctx, targets, nil); !wrote || err != nil {
		t.Fatalf("rewrite: wrote %v, err %v", wrote, err)
	}
	if routes, _ := s.routes(ctx); !slices.EqualFunc(routes, targets, maps.Equal) {
		t.Errorf("after the rewrite the kernel routes %v, want %v", routes, targets)
	}

	s.backend.failApply = 1
	s.markDirty()
	s.write(ctx, targets, nil)
	checks := s.backend.checks
	s.check(ctx)
	if s.backend.checks != checks {
		t.Error("checked while a retry was pending")
	}
}

// A replaced worker is told it is retired only once a write pointing its
// slot away from it has succeeded: a failed write keeps it pending.
func TestRetiredToldAfterSuccessfulWrite(t *testing.T) {
	m, events := policyMaster(t, Config{Workers: 2})
	fake := m.rules.backend.(*fakeBackend)
	m.rules.after = (&fakeTimers{}).after
	m.rules.installed = true
	// Pids past pid_max: nothing real is reniced.
	const oldPID, newPID = 1 << 30, 1<<30 + 1
	old := addProc(m, oldPID, stateRetired, 0, 0, time.Hour)
	old.slot, old.retirePending = 0, true
	old.retireCause, old.retireReason, old.retireAt = CauseReplaced, "replaced", time.Now()
	old.retiredAt = time.Time{}
	repl := addProc(m, newPID, stateActive, 0, 0, time.Minute)
	repl.slot, repl.ports = 0, slotTarget{{Public: 1}: 41000}
	m.slots[0] = repl // slot 1 has no worker: start-up is not over
	m.rules.markDirty()

	fake.failApply = 1
	m.syncRules(context.Background())
	m.flushEvents()
	if !old.retirePending || !old.retiredAt.IsZero() {
		t.Fatal("the replaced worker was told it is retired after a failed write")
	}
	for _, ev := range *events {
		if _, ok := ev.(EventRetired); ok {
			t.Fatalf("EventRetired after a failed write: %v", *events)
		}
	}

	m.rules.retry()
	m.syncRules(context.Background())
	m.flushEvents()
	if old.retirePending || old.retiredAt.IsZero() {
		t.Fatal("the replaced worker was not told after the write succeeded")
	}
	var retired []EventRetired
	for _, ev := range *events {
		if ev, ok := ev.(EventRetired); ok {
			retired = append(retired, ev)
		}
	}
	if len(retired) != 1 || retired[0].PID != oldPID || retired[0].Replacement != newPID {
		t.Errorf("EventRetired %v, want one for pid %d replaced by %d", retired, oldPID, newPID)
	}
	if got := fake.applied[len(fake.applied)-1]; !maps.Equal(got[0], repl.ports) || got[1] != nil {
		t.Errorf("last write routed %v, want slot 0 to the replacement and slot 1 nowhere", got)
	}
}

// A resize is one call: the slot count the rules are written for, the
// backend told to write them whole, a write due, and the serving workers'
// UDP flows noted for re-routing.
func TestRuleSyncResize(t *testing.T) {
	s, _ := ruleSyncForTest(t)
	serving := targetsForPorts(2, []Port{tcp8080, udp8080})
	s.resize(4, serving)
	if s.rt.workers != 4 || s.backend.invalidates != 1 || !s.due() {
		t.Errorf("after resize(4): workers %d, invalidates %d, due %v", s.rt.workers, s.backend.invalidates, s.due())
	}
	want := map[movedFlow]bool{{Public: 8080, Worker: 40001}: true, {Public: 8080, Worker: 40011}: true}
	if !maps.Equal(s.udpMoved, want) {
		t.Errorf("UDP flows to re-route %v, want %v", s.udpMoved, want)
	}
}
