//go:build linux

package ipcluster

// The autoscale policy in the master (Config.Autoscale; the decision is
// autoscale.go's): every MonitorInterval the loop samples the load of the
// active workers, open connections from their heartbeats and CPU from
// /proc, asks the policy, and resizes the cluster one step when it says
// so, through the same live resize an operator's ipclusterctl resize
// starts. Every resize, the policy's or an operator's, starts a cooldown.

import (
	"fmt"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// scaler is the policy's state, owned by the master's loop.
type scaler struct {
	samples    []loadSample
	cpu        map[int]cpuMark // an active worker's CPU time at its last sample
	lastResize time.Time       // by the policy or an operator
	last       scaleDecision   // the latest decision or refusal reported
	lastAt     time.Time
}

type cpuMark struct {
	secs float64
	at   time.Time
}

// sampleLoad takes one load sample and acts on the policy's decision.
// Called by the loop after each monitor sample.
func (m *master) sampleLoad(now time.Time) {
	if !m.cfg.Autoscale.Enabled() {
		return
	}
	if m.scale == nil {
		m.scale = &scaler{cpu: map[int]cpuMark{}}
	}
	s := m.scale
	var conns, cpu float64
	n, withCPU := 0, 0
	seen := map[int]bool{}
	for _, p := range m.slots {
		if p == nil {
			continue
		}
		n++
		conns += float64(p.lastBeat().stats.Connections)
		seen[p.pid] = true
		t, err := m.memSampler.CPUTime(p.pid)
		if err != nil {
			continue
		}
		if prev, ok := s.cpu[p.pid]; ok && now.After(prev.at) {
			cpu += (t - prev.secs) / now.Sub(prev.at).Seconds()
			withCPU++
		}
		s.cpu[p.pid] = cpuMark{t, now}
	}
	for pid := range s.cpu {
		if !seen[pid] {
			delete(s.cpu, pid)
		}
	}
	if n == 0 {
		return
	}
	sample := loadSample{At: now, Workers: len(m.slots), Conns: conns / float64(n)}
	if withCPU > 0 {
		sample.CPU = cpu / float64(withCPU)
	}
	s.samples = append(s.samples, sample)
	keep := max(m.cfg.Autoscale.UpAfter, m.cfg.Autoscale.DownAfter) + 2*m.cfg.MonitorInterval
	for len(s.samples) > 0 && now.Sub(s.samples[0].At) > keep {
		s.samples = s.samples[1:]
	}
	d := m.cfg.Autoscale.decide(s.samples, len(m.slots), now, scaleHold{Busy: m.scaleBusy(), LastResize: s.lastResize, MemoryFits: m.memoryFits})
	m.actOn(d, sample, now)
}

// scaleBusy says what keeps the policy from resizing now, if anything.
func (m *master) scaleBusy() string {
	switch {
	case m.phase != phaseServing:
		return "the master is not serving (starting, adopting or stopping)"
	case m.dep != nil || m.successor != nil:
		return "a deploy is under way"
	case m.resizing != nil || m.resized != nil:
		return "a resize is under way"
	}
	return ""
}

// memoryFits reports whether a cluster of n workers would stay under the
// memory budget's low watermark: today's workers (spares and draining
// ones included) plus the new ones at the active workers' mean RSS.
func (m *master) memoryFits(n int) bool {
	if m.cfg.MemoryBudget <= 0 || n <= len(m.slots) {
		return true
	}
	var used, active uint64
	count := 0
	for _, p := range m.procs {
		used += p.mem.RSSBytes
	}
	for _, p := range m.slots {
		if p != nil {
			active += p.mem.RSSBytes
			count++
		}
	}
	if count == 0 {
		return true
	}
	predicted := used + uint64(n-len(m.slots))*(active/uint64(count))
	return float64(predicted) <= float64(m.cfg.MemoryBudget)*m.cfg.MemoryLowWatermark
}

// actOn carries a decision out, or reports a refusal once per reason.
func (m *master) actOn(d scaleDecision, s loadSample, now time.Time) {
	sc := m.scale
	if d.Action == "" {
		sc.last = scaleDecision{}
		return
	}
	ev := EventAutoscale{Action: d.Action, From: d.From, To: d.To, Reason: d.Reason, Refused: d.Refused, Conns: s.Conns, CPU: s.CPU}
	if d.Refused == "" {
		if err := m.startResize(d.To); err != nil {
			ev.Refused = "resize refused: " + err.Error()
		}
	}
	if ev.Refused != "" {
		if sc.last.Action == d.Action && sc.last.Refused == ev.Refused {
			return // said already
		}
		m.log.Info("autoscale: would "+d.Action+", refused", "from", d.From, "to", d.To, "why", ev.Refused, "load", d.Reason)
	} else {
		m.log.Info(fmt.Sprintf("autoscale: %s %d → %d workers", d.Action, d.From, d.To), "why", d.Reason)
	}
	sc.last, sc.lastAt = scaleDecision{Action: d.Action, From: d.From, To: d.To, Reason: d.Reason, Refused: ev.Refused}, now
	m.emit.send(ev) // counted by the observer: ipcluster_autoscale_decisions_total
}

// noteResize starts the policy's cooldown: called at every resize.
func (m *master) noteResize(now time.Time) {
	if m.scale != nil {
		m.scale.lastResize = now
		m.scale.samples = nil
	} else if m.cfg.Autoscale.Enabled() {
		m.scale = &scaler{cpu: map[int]cpuMark{}, lastResize: now}
	}
}

// autoscaleStatus is the policy's part of the status.
func (m *master) autoscaleStatus() *proto.AutoscaleStatus {
	a := m.cfg.Autoscale
	if !a.Enabled() {
		return nil
	}
	st := &proto.AutoscaleStatus{MinWorkers: a.MinWorkers, MaxWorkers: a.MaxWorkers, ConnsPerWorker: a.ConnsPerWorker, CPUPerWorker: a.CPUPerWorker}
	if sc := m.scale; sc != nil {
		d := sc.last
		st.Action, st.From, st.To, st.Reason, st.Refused = d.Action, d.From, d.To, d.Reason, d.Refused
		if !sc.lastAt.IsZero() && d.Action != "" {
			st.At = float64(sc.lastAt.UnixNano()) / 1e9
		}
		if !sc.lastResize.IsZero() {
			st.LastResize = float64(sc.lastResize.UnixNano()) / 1e9
		}
	}
	return st
}
