//go:build linux

package ipcluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
)

// fakeBackend is an in-memory ruleBackend, for unit tests of the rule sync
// and the master's use of it that need no root and touch no kernel (as
// kube-proxy's knftables.NewFake, tailscale's linuxfw fake.go). It records
// what it was told to apply, and can be told to fail, to hang until its
// context ends, or to report that the kernel lost its rules.
//
// The rule sync calls it from one goroutine; the lock is there for a test
// that looks at it from another.
type fakeBackend struct {
	mu sync.Mutex

	// What it was asked, in order.
	applied     [][]slotTarget // each apply's targets, copied
	workers     [][]slotTarget // each apply's workers, copied
	removes     int
	invalidates int
	checks      int

	// What it holds: the last applied targets, nil before the first or
	// after remove. kernel is what routes returns.
	installed []slotTarget
	kernel    []slotTarget

	// failApply: the next failApply applies fail with failErr (default
	// errFakeApply) and change nothing.
	failApply int
	failErr   error
	// hang: the next apply blocks until its context ends, and fails
	// with the context's error, as a hung iptables-restore killed by the
	// write timeout does.
	hang bool
	// lost: the next check reports ErrRulesLost, once.
	lost bool
	// removeErr: remove fails with it.
	removeErr error
}

var errFakeApply = errors.New("fake backend: apply refused")

func (b *fakeBackend) apply(ctx context.Context, targets, workers []slotTarget) error {
	b.mu.Lock()
	hang := b.hang
	b.hang = false
	b.mu.Unlock()
	if hang {
		<-ctx.Done()
		return fmt.Errorf("fake backend: apply hung: %w", ctx.Err())
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.applied = append(b.applied, cloneTargets(targets))
	b.workers = append(b.workers, cloneTargets(workers))
	if b.failApply > 0 {
		b.failApply--
		if b.failErr != nil {
			return b.failErr
		}
		return errFakeApply
	}
	b.installed = cloneTargets(targets)
	b.kernel = cloneTargets(targets)
	return nil
}

func (b *fakeBackend) remove(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.removes++
	if b.removeErr != nil {
		return b.removeErr
	}
	b.installed, b.kernel = nil, nil
	return nil
}

func (b *fakeBackend) check(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.checks++
	if b.lost {
		b.lost = false
		b.kernel = nil
		return fmt.Errorf("%w: fake backend told to lose them", ErrRulesLost)
	}
	return nil
}

func (b *fakeBackend) routes(context.Context) ([]slotTarget, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return cloneTargets(b.kernel), nil
}

func (b *fakeBackend) invalidate() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.invalidates++
}

func (b *fakeBackend) rulesText() map[string]string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.installed == nil {
		return map[string]string{}
	}
	lines := make([]string, 0, len(b.installed))
	for slot, t := range b.installed {
		lines = append(lines, fmt.Sprintf("slot %d: %s", slot, portsString(t, slices.SortedFunc(maps.Keys(t), func(a, b Port) int { return strings.Compare(a.String(), b.String()) }))))
	}
	return map[string]string{"fake": strings.Join(lines, "\n")}
}

func (b *fakeBackend) changes() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.applied) + b.removes
}

// applies returns how many applies it was asked for.
func (b *fakeBackend) applies() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.applied)
}

func cloneTargets(ts []slotTarget) []slotTarget {
	if ts == nil {
		return nil
	}
	out := make([]slotTarget, len(ts))
	for i, t := range ts {
		out[i] = maps.Clone(t)
	}
	return out
}

// fakeTimers stands in for time.AfterFunc in a ruleSync: it records each
// delay and keeps the function, which the test fires when it likes.
type fakeTimers struct {
	delays []time.Duration
	fns    []func()
}

func (f *fakeTimers) after(d time.Duration, fn func()) {
	f.delays = append(f.delays, d)
	f.fns = append(f.fns, fn)
}

// fire runs the last timer's function, as its expiry would.
func (f *fakeTimers) fire() { f.fns[len(f.fns)-1]() }

// fakeRuleSync is a ruleSync over a fakeBackend for a valid cfg, whose
// retry timers are recorded in timers and whose loop events go to sent;
// emit receives its events. No conntrack entry is ever deleted.
type fakeRuleSync struct {
	*ruleSync
	backend *fakeBackend
	timers  *fakeTimers
	sent    *[]event
}

func newFakeRuleSync(cfg *Config, log *slog.Logger, emit func(Event)) fakeRuleSync {
	b := &fakeBackend{}
	var sent []event
	s := newRuleSync(cfg.routing(), b, log, emit, func(ev event) { sent = append(sent, ev) })
	timers := &fakeTimers{}
	s.after = timers.after
	s.conntrack = func(*family, netlink.CustomConntrackFilter) (uint, error) { return 0, nil }
	return fakeRuleSync{ruleSync: s, backend: b, timers: timers, sent: &sent}
}
