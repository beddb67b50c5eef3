//go:build linux

package ipcluster

// Live resize: change the number of slots, a power of two, while serving.
//
// A client's slot is the low bits of its address, so going from n to 2n
// slots splits each slot s in two: clients whose new bit is 0 stay in s,
// with its worker; the others move to slot s+n, served by a new worker.
// Growing starts the new workers first and switches to the new slot mask in
// one rule write once they are all ready. Shrinking merges slot s+n into s
// in one rule write, and retires the workers of the slots that went.
// Either way established connections keep their worker (conntrack), and
// clients that move reach their new worker from their next connection.
//
// The new size outlives a master restart or deploy (RunDir/<Name>/workers)
// and is forgotten on a graceful stop: a fresh start uses Config.Workers.

import (
	"fmt"
	"math/bits"
	"os"
	"strconv"
	"strings"
	"time"
)

// resizeState is a growth waiting for its new workers.
type resizeState struct {
	from, to int
	started  time.Time
	failures int
}

// resizedWorkers returns the slot count a previous master of this cluster
// resized it to, or 0.
func resizedWorkers(cfg *Config) int {
	b, err := os.ReadFile(workersPath(cfg))
	if err != nil {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || checkWorkers(cfg, n) != nil {
		return 0
	}
	return n
}

// checkWorkers says what is wrong with n as the cluster's slot count.
func checkWorkers(cfg *Config, n int) error {
	if n < 1 || n > MaxWorkers || n&(n-1) != 0 {
		return fmt.Errorf("%d workers is not a power of two from 1 to %d", n, MaxWorkers)
	}
	k := bits.Len(uint(n)) - 1
	if k > cfg.IPv4SlotPrefix || k > cfg.IPv6SlotPrefix {
		return fmt.Errorf("%d workers need %d slot bits, more than IPv4SlotPrefix %d or IPv6SlotPrefix %d", n, k, cfg.IPv4SlotPrefix, cfg.IPv6SlotPrefix)
	}
	return nil
}

// startResize changes the slot count to n; the error, for the requester,
// says why it cannot.
func (m *master) startResize(n int) error {
	cur := len(m.slots)
	switch {
	case m.phase == phaseStopping:
		return fmt.Errorf("the master is stopping")
	case m.adopting() || m.phase == phaseStarting:
		return fmt.Errorf("the cluster is not ready yet; try again once every slot is served")
	case m.dep != nil:
		return fmt.Errorf("a deploy is under way; resize once it is over")
	case m.resizing != nil:
		return fmt.Errorf("a resize to %d workers is under way", m.resizing.to)
	case n == cur:
		return fmt.Errorf("the cluster already has %d workers", n)
	}
	if err := checkWorkers(m.cfg, n); err != nil {
		return err
	}
	m.log.Info("resize started", "from", cur, "to", n)
	m.noteResize(time.Now())
	if n < cur {
		m.shrink(n)
		return nil
	}
	m.resizing = &resizeState{from: cur, to: n, started: time.Now()}
	m.slots = append(m.slots, make([]*proc, n-cur)...)
	m.pending = append(m.pending, make([]*proc, n-cur)...)
	for slot := cur; slot < n; slot++ {
		delete(m.failures, slot) // a slot merged away earlier may have left its count
		delete(m.respawnAt, slot)
		m.spawn(slot)
	}
	return nil
}

// progressResize switches to the grown slot mask once every new slot has
// its worker.
func (m *master) progressResize() {
	r := m.resizing
	if r == nil {
		return
	}
	for _, p := range m.slots {
		if p == nil {
			return
		}
	}
	m.resizing = nil
	m.setWorkers(r.to)
	m.resized = r
}

// resizeWritten announces a resize once the rule write that switched the
// slot mask has succeeded: only then do clients reach their new slots.
func (m *master) resizeWritten() {
	r := m.resized
	if r == nil {
		return
	}
	m.resized = nil
	elapsed := time.Since(r.started)
	m.log.Info("resize done", "from", r.from, "to", r.to, "elapsed", elapsed)
	m.emit.send(EventResized{From: r.from, To: r.to, Elapsed: elapsed})
}

// resizeTrouble abandons a growth whose new workers keep failing to start.
func (m *master) resizeTrouble(p *proc) {
	r := m.resizing
	if r == nil || p.slot < r.from {
		return
	}
	if r.failures++; r.failures < deployMaxFailures {
		return
	}
	m.resizing = nil
	for slot := r.from; slot < r.to; slot++ {
		if q := m.pending[slot]; q != nil {
			m.kill(q)
		}
		if q := m.slots[slot]; q != nil {
			q.state = stateRetired
			q.retireCause, q.retireReason, q.retireAt = CauseReplaced, "resize abandoned", time.Now()
			m.retired(q, time.Now())
		}
		if h := m.held[slot]; h != nil {
			delete(m.held, slot)
			m.unroute(h)
		}
	}
	m.slots, m.pending = m.slots[:r.from], m.pending[:r.from]
	m.log.Error("resize abandoned: new workers keep failing to start", "from", r.from, "to", r.to, "failures", r.failures)
	m.emit.send(EventResized{From: r.from, To: r.from, Err: fmt.Errorf("%d new workers failed to start", r.failures)})
}

// shrink merges the slots from n up into the first n, at once.
func (m *master) shrink(n int) {
	from := len(m.slots)
	now := time.Now()
	for slot := n; slot < from; slot++ {
		if q := m.pending[slot]; q != nil {
			m.kill(q)
		}
		if p := m.slots[slot]; p != nil {
			p.state = stateRetired
			p.retireCause, p.retireReason, p.retireAt = CauseReplaced, "slot merged by a resize", now
			p.retirePending = true // told once the rules no longer point at it
		}
		if h := m.held[slot]; h != nil {
			delete(m.held, slot)
			m.unroute(h)
		}
	}
	m.slots, m.pending = m.slots[:n], m.pending[:n]
	m.setWorkers(n)
	m.resized = &resizeState{from: from, to: n, started: now}
}

// setWorkers switches the routes to n slots (ruleSync.resize: a new slot
// mask, written whole by the next rule write, and the active workers' UDP
// flows re-routed), and records the new size.
func (m *master) setWorkers(n int) {
	var serving []slotTarget
	for _, p := range m.slots {
		if p != nil {
			serving = append(serving, p.ports)
		}
	}
	m.rules.resize(n, serving)
	path := m.workersPath()
	if n == m.cfg.Workers {
		os.Remove(path)
	} else if err := os.WriteFile(path, []byte(strconv.Itoa(n)+"\n"), 0o600); err != nil {
		m.log.Warn("recording the new size; a master started after this one will use Config.Workers", "err", err)
	}
}
