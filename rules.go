//go:build linux

package ipcluster

// Rule sync: the part of the master that keeps the kernel's routes equal to
// the workers serving the slots. It owns the rule backend and the routing
// the backend was made for, decides nothing about workers, and is told
// by the master what each slot's listeners are (write); it says back only
// whether the write took effect, so that the master can then tell replaced
// workers they are retired and announce a resize.
//
//	master loop ──write(targets, workers)──▶ ruleSync ──apply──▶ ruleBackend ──▶ kernel
//	      ▲                                     │
//	      └──── evRetryRules (a timer) ◀────────┘ after a failure: 1s, 2s, 4s, then every 5s
//
// What it holds: whether the rules were ever written (installed), whether
// they are to be written again (dirty) or wait for a retry (retrying), the
// failure counts, what the written rules route each slot to (routed), and
// the conntrack entries that write left stale (conntrack.go).
//
// The backends are nftables.go, iptables.go and bpf.go; the
// backend-neutral model they share is rulemodel.go. newRuleBackend below
// picks one.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"time"

	"github.com/ipcluster/ipcluster/internal/steer"
)

// ruleSync is the master's rule writer. Like every part of the master it is
// touched only from the loop goroutine (master.run): no lock guards it. The
// timer it starts for a retry only sends the loop evRetryRules.
//
// The master reads installed and rt; only ruleSync's methods change any
// field, so a resize is one call (resize) rather than a write to shared
// state.
type ruleSync struct {
	// Set by newRuleSync; effectively constant.
	rt        *routing    // the slot count changes, through resize only
	backend   ruleBackend // reads rt
	log       *slog.Logger
	emit      func(Event)                 // the master's emitter: EventRulesFailed
	send      func(event)                 // to the loop: evRetryRules
	after     func(time.Duration, func()) // time.AfterFunc; tests record the delay instead
	observe   func(time.Duration, error)  // each write's duration and outcome, for metrics; may be nil
	written   func([]slotTarget)          // after each write, outside its measured time (the bpf backend's routes file); may be nil
	conntrack conntrackDeleter

	installed  bool // rules written at least once
	installErr int  // failed first installs
	ruleFails  int  // consecutive failed writes, for the retry backoff
	dirty      bool // the rules are to be written
	retrying   bool // a failed write waits for its retry (evRetryRules)

	// routed is what the installed rules point each slot at; udpMoved
	// the UDP flows whose conntrack entries are to be deleted, because the
	// rules moved them away from a worker port (see conntrack.go).
	routed   []slotTarget
	udpMoved map[movedFlow]bool
	deadTCP  map[movedFlow]bool // TCP ports of exited workers (conntrack.go)
}

// newRuleSync drives backend, made for rt. emit receives EventRulesFailed;
// send is how the retry timer reaches the loop.
func newRuleSync(rt *routing, backend ruleBackend, log *slog.Logger, emit func(Event), send func(event)) *ruleSync {
	return &ruleSync{
		rt:        rt,
		backend:   backend,
		log:       log,
		emit:      emit,
		send:      send,
		after:     func(d time.Duration, f func()) { time.AfterFunc(d, f) },
		conntrack: deleteConntrack,
		udpMoved:  map[movedFlow]bool{},
		deadTCP:   map[movedFlow]bool{},
	}
}

// routesTo reports whether the written rules point a slot at t.
func (s *ruleSync) routesTo(t slotTarget) bool {
	return slices.ContainsFunc(s.routed, func(r slotTarget) bool { return r != nil && maps.Equal(r, t) })
}

// markDirty asks for a write: a slot's worker changed, or the ports refused
// to direct connections did.
func (s *ruleSync) markDirty() { s.dirty = true }

// retry is the retry timer's evRetryRules: write again now.
func (s *ruleSync) retry() {
	s.retrying = false
	s.dirty = true
}

// installDeadline is evInstallDeadline: the first install waits no longer
// for every slot's worker.
func (s *ruleSync) installDeadline() {
	if !s.installed {
		s.dirty = true
	}
}

// due reports whether a write is wanted and not waiting for a retry.
func (s *ruleSync) due() bool { return s.dirty && !s.retrying }

// write places targets (one per slot the rules are written for, see
// rt.workers) if a write is due. It reports whether it wrote them: then,
// and only then, no new connection reaches a worker the targets no longer
// name. A failed write leaves the previous rules in force, is logged and
// sent as EventRulesFailed, and is retried after ruleRetryDelay; the third
// failed first install instead returns the error the master stops with.
func (s *ruleSync) write(ctx context.Context, targets, workers []slotTarget) (wrote bool, stop error) {
	if !s.due() {
		return false, nil
	}
	t0 := time.Now()
	// The loop waits for the write: bound it, so that a hung
	// iptables-restore (a held xtables lock, a stuck kernel) cannot stall
	// the master for good. A killed iptables-restore commits nothing.
	wctx, cancel := context.WithTimeout(ctx, ruleWriteTimeout)
	err := s.backend.apply(wctx, targets, workers)
	cancel()
	elapsed := time.Since(t0)
	if s.observe != nil {
		s.observe(elapsed, err)
	}
	if err != nil {
		s.ruleFails++
		delay := ruleRetryDelay(s.ruleFails)
		s.log.Error("writing rules failed; previous rules stay in force", "err", err, "retry", delay, "failures", s.ruleFails)
		s.emit(EventRulesFailed{Err: err})
		if !s.installed {
			s.installErr++
		}
		if !s.installed && s.installErr >= 3 {
			return false, fmt.Errorf("install rules for cluster %s: %w", s.rt.name, err)
		}
		s.retrying = true
		s.after(delay, func() { s.send(evRetryRules{}) })
		return false, nil
	}
	if s.ruleFails > 0 {
		s.log.Info("rules written again after failed writes", "failures", s.ruleFails)
		s.ruleFails = 0
	}
	s.dirty = false
	s.installed = true
	s.noteMovedUDP(s.routed, targets)
	s.routed = targets
	if s.written != nil {
		s.written(targets)
	}
	s.log.Debug("rules written", "elapsed", elapsed)
	return true, nil
}

// ruleWriteTimeout bounds one rule write (every family's iptables-save and
// iptables-restore, or one nf_tables transaction). iptables-restore --wait
// waits this long at most for the xtables lock. A variable for tests.
var ruleWriteTimeout = 10 * time.Second

// ruleRetryDelay is how long the master waits before writing the rules
// again after n consecutive failures: 1s, 2s, 4s, then every 5s.
func ruleRetryDelay(n int) time.Duration {
	if n < 1 {
		n = 1
	}
	return min(time.Second<<min(n-1, 3), 5*time.Second)
}

// ruleCheckInterval is how often the master compares the kernel's rules
// with its own view (see ruleBackend.check).
const ruleCheckInterval = 2 * time.Second

// check asks for a rewrite when the kernel has lost the rules.
func (s *ruleSync) check(ctx context.Context) {
	if !s.installed || s.retrying {
		return
	}
	err := s.backend.check(ctx)
	switch {
	case err == nil:
	case errors.Is(err, ErrRulesLost):
		s.log.Warn("the kernel lost the cluster's rules; writing them again", "err", err)
		s.emit(EventRulesFailed{Err: err})
		s.dirty = true
	default:
		s.log.Warn("checking the cluster's rules in the kernel", "err", err)
	}
}

// withdraw, for a graceful stop, points every slot at nothing, so that no
// new connection reaches a finishing worker; workers are the listeners of
// every worker. The rules themselves (the nat chains) stay until the
// workers are gone: once the last nat hook of a namespace is unregistered,
// the kernel stops translating established connections too, and the
// finishing workers' clients would be cut mid-connection. If the routes
// cannot be withdrawn the rules are removed instead; the error is
// remove's.
func (s *ruleSync) withdraw(workers []slotTarget) error {
	if !s.installed {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.backend.apply(ctx, make([]slotTarget, s.rt.workers), workers); err != nil {
		s.log.Error("withdrawing routes; removing the rules instead", "err", err)
		return s.remove()
	}
	s.noteStoppingUDP(workers)
	s.cleanConntrack()
	return nil
}

// remove deletes everything the cluster wrote; safe to call more than
// once.
func (s *ruleSync) remove() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.backend.remove(ctx); err != nil {
		s.log.Error("removing rules", "err", err)
		return fmt.Errorf("remove rules of cluster %s: %w", s.rt.name, err)
	}
	return nil
}

// resize switches the rules to n slots: a new slot mask, so the next write
// replaces them whole (one transaction). The UDP flows of serving (the
// listeners of the active workers) are re-routed too: conntrack pins them,
// and their slot may have changed.
func (s *ruleSync) resize(n int, serving []slotTarget) {
	s.rt.workers = n
	s.backend.invalidate()
	s.dirty = true
	for _, t := range serving {
		s.noteAdoptedUDP(t)
	}
}

// routes reads the routes the kernel holds (see ruleBackend.routes).
func (s *ruleSync) routes(ctx context.Context) ([]slotTarget, error) { return s.backend.routes(ctx) }

// text renders the rules in force per family, for the status.
func (s *ruleSync) text() map[string]string { return s.backend.rulesText() }

// newRuleBackend picks the rule writer Config.Backend asks for, checking
// before anything is touched that it can work here, and says which it
// picked and why. The writer also clears, once its own rules are in force,
// what the other backend may have left for this cluster: a crashed master
// of an earlier release, or one configured with the other backend.
func newRuleBackend(cfg *Config, rt *routing, log *slog.Logger) (ruleBackend, backendChoice, error) {
	bpfErr := errNotAsked
	if cfg.Backend == BackendBPF || cfg.Backend == BackendAuto {
		bpfErr = bpfCheck()
	}
	conn, err := nftNewConn()
	if err == nil {
		if err = nftProbe(conn, rt); err != nil {
			_ = conn.CloseLasting()
		}
	}
	nftErr := err
	var nft ruleBackend
	if nftErr == nil {
		nft = newNFTWriter(rt, conn)
	}
	var ipt ruleBackend
	iptErr := findBinaries(rt)
	if iptErr == nil {
		ipt = newRuleWriter(rt, execRunner{})
	}
	choice, err := chooseBackend(cfg.Backend, bpfErr, nftErr, iptErr)
	switch {
	case err != nil:
		if nft != nil {
			_ = conn.CloseLasting()
		}
		return nil, choice, err
	case choice.name == BackendBPF:
		// A crashed DNAT master's rules would take the clients before any
		// socket sees them: the bpf backend clears both kinds.
		rt.bpf, rt.guard = true, false
		var b ruleBackend = newBPFWriter(rt)
		if nft != nil {
			b = &clearsOther{ruleBackend: b, other: nft, log: log}
		}
		if ipt != nil {
			b = &clearsOther{ruleBackend: b, other: ipt, log: log}
		}
		return b, choice, nil
	case choice.name == BackendNFTables:
		return &clearsOther{ruleBackend: nft, other: ipt, log: log}, choice, nil
	case cfg.Backend == BackendIPTables:
		return &clearsOther{ruleBackend: ipt, other: nft, log: log}, choice, nil
	}
	return ipt, choice, nil // auto's fallback: nf_tables is not there to clear
}

// errNotAsked is the bpf check's result when Config.Backend names a nat
// backend: the check is not made.
var errNotAsked = errors.New("not asked for")

// backendChoice is the rule backend in force and why, for the status, the
// metrics and the start-up log.
type backendChoice struct {
	name Backend // BackendBPF, BackendNFTables or BackendIPTables
	// config is Config.Backend as set: "auto" when left empty.
	config string
	// reason is why: "Config.Backend", "auto: SK_REUSEPORT programs load
	// here", or auto's fallback, naming what the preferred backends lacked:
	// "auto: bpf unavailable (<the check's error>); nf_tables answers".
	reason string
}

// chooseBackend decides from Config.Backend and what each backend's check
// found (nil: it can work here). Auto prefers bpf, then nftables, then
// iptables.
func chooseBackend(want Backend, bpfErr, nftErr, iptErr error) (backendChoice, error) {
	c := backendChoice{name: want, config: string(want), reason: "Config.Backend"}
	switch {
	case want == BackendBPF && errors.Is(bpfErr, steer.ErrPermission):
		return c, fmt.Errorf("%w: Config.Backend %q: %w", ErrNoPrivilege, BackendBPF, bpfErr)
	case want == BackendBPF && bpfErr != nil:
		return c, fmt.Errorf("Config.Backend %q: %w", BackendBPF, bpfErr)
	case want == BackendBPF:
		return c, nil
	case want == BackendIPTables && iptErr != nil:
		return c, iptErr
	case want == BackendIPTables:
		return c, nil
	case want == BackendNFTables && nftErr != nil:
		return c, fmt.Errorf("%w: %w; load the nf_tables modules (nf_tables, nft_nat, nft_fib_inet), "+
			"or set Config.Backend to ipcluster.BackendIPTables", ErrNoNFTables, nftErr)
	case want == BackendNFTables:
		return c, nil
	}
	c.config = "auto"
	if bpfErr == nil {
		c.name, c.reason = BackendBPF, "auto: SK_REUSEPORT programs load here"
		return c, nil
	}
	bpfWhy := "bpf unavailable (" + bpfErr.Error() + ")"
	switch {
	case nftErr == nil:
		c.name, c.reason = BackendNFTables, "auto: "+bpfWhy+"; nf_tables answers"
		return c, nil
	case iptErr != nil:
		return c, fmt.Errorf("no rule backend: bpf: %w; nf_tables: %w; iptables: %w", bpfErr, nftErr, iptErr)
	}
	c.name, c.reason = BackendIPTables, "auto: "+bpfWhy+"; nf_tables unavailable: "+nftErr.Error()
	return c, nil
}

// clearsOther is a rule backend that, after its first successful apply,
// removes the cluster's rules written by the other backend. Removing them
// only once the new rules are in force means a slot is never without a
// route; until then both route, and the master's rules are consulted
// first or second depending on registration order, both to live workers.
type clearsOther struct {
	ruleBackend
	other   ruleBackend // nil when the other backend is unavailable here
	cleared bool
	log     *slog.Logger
}

// unwrap returns the backend that does the work.
func (c *clearsOther) unwrap() ruleBackend {
	if inner, ok := c.ruleBackend.(*clearsOther); ok {
		return inner.unwrap()
	}
	return c.ruleBackend
}

// routes reads this backend's routes or, if it has none, the other's: a
// master of the other backend may have written them.
func (c *clearsOther) routes(ctx context.Context) ([]slotTarget, error) {
	t, err := c.ruleBackend.routes(ctx)
	if err != nil || c.other == nil || slices.ContainsFunc(t, func(s slotTarget) bool { return s != nil }) {
		return t, err
	}
	return c.other.routes(ctx)
}

func (c *clearsOther) apply(ctx context.Context, targets, workers []slotTarget) error {
	if err := c.ruleBackend.apply(ctx, targets, workers); err != nil {
		return err
	}
	if !c.cleared && c.other != nil {
		c.cleared = true
		// A failure here leaves stale rules that only shadow ours for the
		// connections they match first: worth a warning, not a stop.
		if err := c.other.remove(ctx); err != nil {
			c.log.Warn("removing this cluster's rules left by the other rule backend", "err", err)
		}
	}
	return nil
}
