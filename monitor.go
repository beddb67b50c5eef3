//go:build linux

package ipcluster

// Health: measurement and policies. Workers report what only they can see
// (Go heap, GC, scheduling lag, their connections, the application's own
// figures: worker_stats.go); the master measures what it must not take on
// trust (RSS and PSS, from /proc) and how fresh each heartbeat is, and
// after each sample applies the policies (enforce):
//
//   - an active worker over MemoryLimit or LagLimit (after StartupGrace),
//     silent for PingTimeout, or failing HealthCheck is retired, at most
//     RetireLimit per RetireWindow;
//   - a retired worker is told to finish after DrainTimeout; a retired or
//     spare one silent for twice PingTimeout is killed, and so is one told
//     to finish that is still there StopTimeout later;
//   - above the memory budget's watermarks, retired workers are told to
//     finish, then killed, most killable first (killOrder).

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math"
	"os"
	"slices"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/procfs"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// ---- master side ----

// pssEvery: the master reads PSS on every pssEvery-th sample only. The
// kernel computes smaps_rollup by walking the worker's page tables, about
// 7 times the cost of reading status (~85µs against ~11µs for a small Go
// process), and PSS serves reporting, not limits.
const pssEvery = 10

// procMem is a worker's memory as the master last measured it.
type procMem struct {
	at time.Time // zero before the first sample
	procfs.Memory
}

// Events between the loop and the PSS sampler.
type (
	pssSample struct {
		pid int
		pss uint64
	}
	evPSS struct{ samples []pssSample }
)

// pssSampler reads PSS for the loop, off the loop: the kernel builds
// smaps_rollup under the worker's mmap lock, and a worker stuck in the
// kernel while holding it (say, faulting on a hung FUSE mount) must stall
// this goroutine, never the master. (status, read in the loop, takes no
// such lock: its counters are read locklessly.)
func (m *master) pssSampler(reqs <-chan []int) {
	var s procfs.Sampler
	for pids := range reqs {
		out := make([]pssSample, 0, len(pids))
		for _, pid := range pids {
			if mem, err := s.Memory(pid); err == nil {
				out = append(out, pssSample{pid: pid, pss: mem.PSSBytes})
			}
		}
		m.send(evPSS{samples: out})
	}
}

// sample measures every worker's RSS, asks for their PSS every pssEvery
// samples, and reports. It runs in the loop: reading status costs ~11µs
// per worker, 2.8ms a second for 256 workers, and a round trip to another
// goroutine for it would cost an idle master more than the reads.
func (m *master) sample() {
	now := time.Now()
	for _, p := range m.procs {
		rss, err := m.memSampler.RSS(p.pid)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				m.log.Debug("reading worker RSS", append(p.logAttrs(), "err", err)...)
			}
			continue
		}
		p.mem.at, p.mem.RSSBytes = now, rss
	}
	if m.sampleCount%pssEvery == 0 && !m.sampling {
		pids := make([]int, 0, len(m.procs))
		for pid := range m.procs {
			pids = append(pids, pid)
		}
		m.sampling = true
		m.pssReqs <- pids // buffered, and empty while !sampling
	}
	m.sampleCount++
	m.enforce(now)
	if m.cfg.OnEvent == nil {
		return
	}
	ws := make([]WorkerStats, 0, len(m.procs))
	for _, p := range m.procs {
		ws = append(ws, m.workerStats(p, now))
	}
	sortWorkerStats(ws)
	m.emit.send(EventStats{At: now, Workers: ws})
}

// onPSS records PSS samples. A pid no longer in procs exited meanwhile;
// one reused by a new worker within the sample would be measured a little
// early, which is harmless.
func (m *master) onPSS(ev evPSS) {
	m.sampling = false
	for _, s := range ev.samples {
		if p := m.procs[s.pid]; p != nil {
			p.mem.PSSBytes = s.pss
		}
	}
}

// lastBeat is a worker's latest heartbeat: live from its peer while
// connected, else the last one received.
func (p *proc) lastBeat() beatReport {
	if p.peer != nil {
		return p.peer.beat.get()
	}
	return p.beat
}

// workerStats is one worker's health as the loop sees it at now.
func (m *master) workerStats(p *proc, now time.Time) WorkerStats {
	ws := WorkerStats{
		PID: p.pid, Slot: p.slot, Generation: p.gen, State: p.state.String(),
		RSSBytes: p.mem.RSSBytes, PSSBytes: p.mem.PSSBytes,
		HeartbeatAge: -1, Ports: maps.Clone(p.ports), Unresponsive: p.unresponsive,
	}
	beat := p.lastBeat()
	if beat.at.IsZero() {
		return ws
	}
	st := beat.stats
	ws.HeartbeatAge = now.Sub(beat.at)
	ws.HeapBytes = st.HeapBytes
	ws.Goroutines = st.Goroutines
	ws.Connections = st.Connections
	ws.Accepted = st.Accepted
	ws.Uptime = seconds(st.UptimeSec)
	ws.GCCount = st.GCCount
	ws.GCPause = seconds(st.GCPauseSec)
	ws.Lag = seconds(st.LagSec)
	ws.LagMax = seconds(st.LagMaxSec)
	ws.SchedP99 = seconds(st.SchedP99Sec)
	ws.App = st.App
	return ws
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// ---- master side: policies ----

// enforce applies the health policies after a sample at now.
func (m *master) enforce(now time.Time) {
	if m.phase == phaseStopping {
		return
	}
	procs := slices.SortedFunc(maps.Values(m.procs), func(a, b *proc) int { return a.pid - b.pid })
	for _, p := range procs {
		if p.state == stateStarting || p.state == stateStopping && p.dismissedAt.IsZero() {
			continue // ConnectTimeout and StopTimeout watch these
		}
		silence := m.checkResponsive(p, now)
		switch {
		case p.state == stateReplacing:
			// Already being replaced: no policy retires it again, nor
			// ends it as unresponsive.
		case p.state == stateActive:
			m.checkActive(p, now)
		case p.unresponsive && silence > 2*m.cfg.PingTimeout:
			m.dismiss(p, fmt.Sprintf("unresponsive: no heartbeat for %s", silence.Round(time.Millisecond)), true)
		case p.state == stateRetired && m.cfg.DrainTimeout > 0 && p.dismissedAt.IsZero() &&
			!p.retiredAt.IsZero() && now.Sub(p.retiredAt) > m.cfg.DrainTimeout:
			m.dismiss(p, fmt.Sprintf("drain deadline: retired for %s with %d connections open",
				m.cfg.DrainTimeout, p.lastBeat().stats.Connections), false)
		case !p.dismissedAt.IsZero() && now.Sub(p.dismissedAt) > m.cfg.StopTimeout:
			m.dismiss(p, fmt.Sprintf("told to finish %s ago and still running", m.cfg.StopTimeout), true)
		}
	}
	m.checkBudget()
	m.fillSpares()
}

// checkResponsive marks a worker unresponsive once it has been silent for
// PingTimeout, and responsive again when a heartbeat arrives. It returns
// how long the worker has been silent.
func (m *master) checkResponsive(p *proc, now time.Time) time.Duration {
	last := p.lastBeat().at
	if last.Before(p.spawned) {
		last = p.spawned // adopted, no heartbeat yet
	}
	silence := now.Sub(last)
	if m.cfg.PingTimeout <= 0 {
		return silence
	}
	switch silent := silence > m.cfg.PingTimeout; {
	case silent && !p.unresponsive:
		p.unresponsive = true
		m.log.Warn("worker unresponsive: no heartbeat", append(p.logAttrs(), "state", p.state.String(), "silence", silence, "timeout", m.cfg.PingTimeout)...)
		m.emit.send(EventUnresponsive{PID: p.pid, Slot: p.slot, Generation: p.gen, State: p.state.String(), HeartbeatAge: silence})
	case !silent && p.unresponsive:
		p.unresponsive = false
		m.log.Info("worker responsive again", p.logAttrs()...)
	}
	return silence
}

// checkActive retires an active worker that breaks a limit.
func (m *master) checkActive(p *proc, now time.Time) {
	if p.state != stateActive {
		return // already being replaced
	}
	beat := p.lastBeat()
	lag := seconds(beat.stats.LagSec)
	young := m.cfg.StartupGrace > 0 && now.Sub(p.activeSince) < m.cfg.StartupGrace
	switch {
	case p.unresponsive:
		m.policyRetire(p, CauseUnresponsive, fmt.Sprintf("no heartbeat for %s", now.Sub(beat.at).Round(time.Millisecond)), now)
	case young:
	case m.cfg.MemoryLimit > 0 && p.mem.at.Equal(now) && p.mem.RSSBytes > uint64(m.cfg.MemoryLimit):
		m.policyRetire(p, CauseMemory, fmt.Sprintf("RSS %.1f MiB over the limit of %.1f MiB",
			mib(p.mem.RSSBytes), mib(uint64(m.cfg.MemoryLimit))), now)
	case m.cfg.LagLimit > 0 && beat.at.After(p.activeSince) && lag > m.cfg.LagLimit:
		m.policyRetire(p, CauseLag, fmt.Sprintf("scheduling lag %s over the limit of %s",
			lag.Round(time.Microsecond), m.cfg.LagLimit), now)
	}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// policyRetire retires p for a health policy, unless RetireLimit
// retirements already happened in the last RetireWindow.
func (m *master) policyRetire(p *proc, cause RetireCause, reason string, now time.Time) {
	if m.deployTrouble(p, true, fmt.Sprintf("new worker %d would be retired: %s: %s", p.pid, cause, reason)) {
		return // the deploy is rolled back instead
	}
	if m.cfg.RetireLimit > 0 {
		cut := now.Add(-m.cfg.RetireWindow)
		m.retireTimes = slices.DeleteFunc(m.retireTimes, func(t time.Time) bool { return !t.After(cut) })
		if len(m.retireTimes) >= m.cfg.RetireLimit {
			if !p.held {
				p.held = true
				m.log.Warn("retirement held back by the rate limit", append(p.logAttrs(), "cause", cause, "reason", reason,
					"limit", m.cfg.RetireLimit, "window", m.cfg.RetireWindow)...)
				m.emit.send(EventRetireHeld{PID: p.pid, Slot: p.slot, Generation: p.gen, Cause: cause, Reason: reason,
					Limit: m.cfg.RetireLimit, Window: m.cfg.RetireWindow})
			}
			return
		}
		m.retireTimes = append(m.retireTimes, now)
	}
	m.log.Warn("retiring worker", append(p.logAttrs(), "cause", cause, "reason", reason)...)
	m.retire(p, cause, reason)
}

// dismiss ends a worker that serves no slot: tells it to finish, or kills
// it. Safe to call more than once.
func (m *master) dismiss(p *proc, reason string, kill bool) {
	if p.killed || !kill && !p.dismissedAt.IsZero() {
		return
	}
	// A retired worker's last heap snapshot first (heap.go, bounded).
	if p.state == stateRetired && m.heapBefore(p, func() { m.dismiss(p, reason, kill) }) {
		return
	}
	if kill {
		p.killed = true
		m.kill(p)
	} else {
		p.dismissedAt = time.Now()
		if p.peer != nil {
			p.peer.send(proto.TypeDie, &proto.Reason{Reason: reason})
		} else {
			m.signal(p, syscall.SIGTERM)
		}
	}
	if p.state == stateSpare {
		m.spares = slices.DeleteFunc(m.spares, func(q *proc) bool { return q == p })
		p.state = stateStopping
	}
	if p.dismissedAt.IsZero() {
		p.dismissedAt = time.Now()
	}
	m.log.Warn("ending worker", append(p.logAttrs(), "state", p.state.String(), "reason", reason, "killed", kill)...)
	m.emit.send(EventDismissed{PID: p.pid, Slot: p.slot, Generation: p.gen, Reason: reason, Killed: kill})
}

// checkBudget holds the workers' summed RSS under the memory budget's
// watermarks by ending retired workers, never active ones: above the high
// watermark it kills them, most killable first, until the total would be
// below it; then, above the low watermark, it tells the rest to finish
// until the total would be below that. Workers already killed, or already
// told to finish, count as gone.
func (m *master) checkBudget() {
	if m.cfg.MemoryBudget <= 0 {
		return
	}
	budget := uint64(m.cfg.MemoryBudget)
	low := uint64(float64(budget) * m.cfg.MemoryLowWatermark)
	high := uint64(float64(budget) * m.cfg.MemoryHighWatermark)
	var used, killedRSS, askedRSS uint64
	var victims []*proc
	for _, p := range m.procs {
		used += p.mem.RSSBytes
		switch {
		case p.killed:
			killedRSS += p.mem.RSSBytes
		case p.state == stateRetired:
			victims = append(victims, p)
			if !p.dismissedAt.IsZero() {
				askedRSS += p.mem.RSSBytes
			}
		}
	}
	level := 0
	switch {
	case used > high:
		level = 2
	case used > low:
		level = 1
	}
	slices.SortFunc(victims, killOrder)
	var killed, asked []int
	left := used - killedRSS
	for _, v := range victims {
		if left <= high {
			break
		}
		if !v.dismissedAt.IsZero() {
			askedRSS -= v.mem.RSSBytes
		}
		m.dismiss(v, "memory budget: above the high watermark", true)
		killed = append(killed, v.pid)
		left -= v.mem.RSSBytes
	}
	left -= askedRSS
	for _, v := range victims {
		if left <= low {
			break
		}
		if v.killed || !v.dismissedAt.IsZero() {
			continue
		}
		m.dismiss(v, "memory budget: above the low watermark", false)
		asked = append(asked, v.pid)
		left -= v.mem.RSSBytes
	}
	rose := level > m.memLevel
	if level == 0 && m.memLevel > 0 {
		m.log.Info("workers' memory back below the low watermark", "used", used, "budget", budget)
	}
	m.memLevel = level
	if len(killed)+len(asked) == 0 && !rose {
		return
	}
	name := "low"
	if level == 2 {
		name = "high"
	}
	m.log.Warn("workers' memory above the "+name+" watermark", "used", used, "budget", budget,
		"killed", killed, "asked_to_finish", asked, "retired_left", len(victims)-len(killed)-len(asked))
	m.emit.send(EventMemoryPressure{Watermark: name, UsedBytes: used, BudgetBytes: budget, Asked: asked, Killed: killed})
}

// killOrder sorts retired workers most killable first: those already
// unresponsive or told to finish, then fewest connections, then largest
// RSS, then oldest.
func killOrder(a, b *proc) int {
	ending := func(p *proc) int {
		if p.unresponsive || !p.dismissedAt.IsZero() {
			return 0
		}
		return 1
	}
	return cmp.Or(
		cmp.Compare(ending(a), ending(b)),
		cmp.Compare(a.lastBeat().stats.Connections, b.lastBeat().stats.Connections),
		cmp.Compare(b.mem.RSSBytes, a.mem.RSSBytes),
		a.spawned.Compare(b.spawned),
		cmp.Compare(a.pid, b.pid),
	)
}

// startHealthChecks runs Config.HealthCheck for each active worker that is
// not being checked or replaced already, off the loop.
func (m *master) startHealthChecks() {
	if m.phase == phaseStopping {
		return
	}
	for _, p := range m.procs {
		if p.state != stateActive || p.checking {
			continue
		}
		m.checkHealth(p)
	}
}

// checkHealth runs Config.HealthCheck for p off the loop; onHealth gets the
// result.
func (m *master) checkHealth(p *proc) {
	p.checking = true
	ws := m.workerStats(p, time.Now())
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), m.cfg.HealthCheckInterval)
		defer cancel()
		m.send(evHealth{p: p, err: m.cfg.HealthCheck(ctx, ws)})
	}()
}

// onHealth records a health check's result. For a deploy's new worker
// that reported ready, it is the readiness check: pass, and its slot moves
// to it; fail, and it is killed (a failed start).
func (m *master) onHealth(p *proc, err error) {
	p.checking = false
	if m.procs[p.pid] != p {
		return
	}
	if p.state == stateStarting {
		if err != nil {
			m.log.Warn("new worker failed its readiness check; killing it", append(p.logAttrs(), "err", err)...)
			m.kill(p) // its exit counts as a failed start
			return
		}
		p.verified = true
		m.onReady(p)
		return
	}
	if !p.state.serving() {
		return
	}
	if err == nil {
		if p.healthFails > 0 {
			m.log.Info("health check passes again", append(p.logAttrs(), "after_failures", p.healthFails)...)
		}
		p.healthFails = 0
		return
	}
	p.healthFails++
	m.log.Warn("health check failed", append(p.logAttrs(), "failures", p.healthFails, "limit", m.cfg.HealthCheckFailures, "err", err)...)
	if p.healthFails >= m.cfg.HealthCheckFailures && p.state == stateActive {
		m.policyRetire(p, CauseHealthCheck, fmt.Sprintf("health check failed %d times in a row: %v", p.healthFails, err), time.Now())
	}
}

// renice adds inc to the niceness of every thread of pid. Linux keeps a
// niceness per thread, and setpriority(PRIO_PROCESS, pid) changes only the
// thread whose id is pid. Threads started later inherit the niceness of
// the thread that starts them, so renicing those that exist covers them,
// but for one started between the listing and the renicing. (A worker that
// exited since the last event may have had its pid reused: the cost of
// that race is one process's niceness raised by one.)
func renice(pid, inc int) error {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("list threads of %d: %w", pid, err)
	}
	var errs []error
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		// The raw system call returns 20 - nice.
		prio, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
		if err != nil {
			continue // the thread ended
		}
		if err := unix.Setpriority(unix.PRIO_PROCESS, tid, min(20-prio+inc, 19)); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("renice thread %d of %d: %w", tid, pid, err))
		}
	}
	return errors.Join(errs...)
}

// defaultMemoryBudget is half the memory the master may use, or 0 (no
// budget) if that cannot be read.
func defaultMemoryBudget() int64 {
	limit, err := procfs.MemoryLimit()
	if err != nil {
		return 0
	}
	return int64(min(limit/2, math.MaxInt64))
}

// sampleHistory adds a sample of every worker's connections to the status
// page's history (history.go).
func (m *master) sampleHistory(now time.Time) {
	ws := make([]histWorker, 0, len(m.procs))
	for _, p := range m.procs {
		b := p.lastBeat()
		ws = append(ws, histWorker{pid: p.pid, slot: p.slot, conns: b.stats.Connections, accepted: b.stats.Accepted, ok: !b.at.IsZero()})
	}
	m.hist.sample(now, len(m.slots), ws)
}
