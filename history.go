package ipcluster

// The status page's history: per slot, open connections and new
// connections per second, one sample every MonitorInterval, and the recent
// events (exits, retirements, deploy phases, resizes, rule writes) drawn
// against them.
//
// The loop owns a history: sample runs from its monitor tick, note from
// emitter.send and the rule sync's observe callback, both on the loop, and
// view copies it into the snapshot the HTTP handlers get (evSnapshot). Both
// rings are fixed in size, so the memory is bounded whatever the uptime:
// histSamples samples of 16 bytes per slot and 56 of their own (at most
// 300 × (256 × 16 + 56) B = 1.2 MiB at MaxWorkers, 35 KiB at 4 slots), and
// histEvents events of at most histTextMax bytes of text and 64 of their
// own (60 KiB), plus each live worker's
// last accepted count.

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

const (
	// histSamples is the length of the sample ring: 5 minutes at the
	// default MonitorInterval of 1s.
	histSamples = 300
	// histEvents is the length of the event ring.
	histEvents = 200
	// histTextMax bounds an event's text (an error from the kernel can be
	// long).
	histTextMax = 240
)

// history is owned by the loop goroutine; see the file comment.
type history struct {
	samples []proto.HistorySample // ring: next is the oldest once full
	next    int
	events  []proto.HistoryEvent // ring: enext is the oldest once full
	enext   int
	// accepted is each worker's accepted-connections counter at the
	// previous sample, by pid, for the per-second rate; pruned to the live
	// workers at each sample.
	accepted map[int]uint64
	last     time.Time
}

func newHistory() *history {
	return &history{accepted: map[int]uint64{}}
}

// histWorker is what sample needs of one worker: its slot, and its last
// heartbeat's figures (ok false before the first).
type histWorker struct {
	pid, slot int
	conns     int64
	accepted  uint64
	ok        bool
}

// sample records one sample of slots slots at now. A worker's new
// connections count towards its slot (retired workers draining count
// towards the slot they served); a worker seen for the first time counts
// from 0, so the rate stays right across a respawn.
func (h *history) sample(now time.Time, slots int, workers []histWorker) {
	s := proto.HistorySample{At: unixSec(now), Conns: make([]int64, slots), NewPerSec: make([]float64, slots)}
	dt := now.Sub(h.last).Seconds()
	seen := make(map[int]uint64, len(workers))
	for _, w := range workers {
		if !w.ok {
			continue
		}
		seen[w.pid] = w.accepted
		if w.slot < 0 || w.slot >= slots {
			continue
		}
		s.Conns[w.slot] += w.conns
		if prev, had := h.accepted[w.pid]; !h.last.IsZero() && dt > 0 {
			if !had || w.accepted < prev {
				prev = 0
			}
			s.NewPerSec[w.slot] += float64(w.accepted-prev) / dt
		}
	}
	h.accepted, h.last = seen, now
	if len(h.samples) < histSamples {
		h.samples = append(h.samples, s)
		return
	}
	h.samples[h.next] = s
	h.next = (h.next + 1) % histSamples
}

// note records ev at now if the page draws its kind.
func (h *history) note(now time.Time, ev Event) {
	e := proto.HistoryEvent{At: unixSec(now), Slot: -1}
	switch ev := ev.(type) {
	case EventWorkerExited:
		e.Kind, e.Slot, e.PID = "exit", ev.Slot, ev.PID
		if ev.State == "active" || ev.State == "starting" {
			e.Kind = "crash"
		}
		e.Text = fmt.Sprintf("worker %d (%s, slot %d) exited: %s", ev.PID, ev.State, ev.Slot, ev.Status)
	case EventRetired:
		e.Kind, e.Slot, e.PID = "retire", ev.Slot, ev.PID
		e.Text = fmt.Sprintf("worker %d (slot %d) retired: %s", ev.PID, ev.Slot, ev.Reason)
	case EventDeploy:
		e.Kind = "deploy"
		e.Text = fmt.Sprintf("deploy %s: %s → %s", ev.Outcome, ev.From, ev.To)
		if ev.Reason != "" {
			e.Text += " (" + ev.Reason + ")"
		}
	case EventResized:
		e.Kind = "resize"
		e.Text = fmt.Sprintf("resized from %d to %d slots", ev.From, ev.To)
		if ev.Err != nil {
			e.Text += ": " + ev.Err.Error()
		}
	case EventUnresponsive:
		e.Kind, e.Slot, e.PID = "unresponsive", ev.Slot, ev.PID
		e.Text = fmt.Sprintf("worker %d (slot %d) unresponsive", ev.PID, ev.Slot)
	case EventRulesFailed:
		e.Kind = "rules-failed"
		e.Text = "writing rules failed: " + ev.Err.Error()
	default:
		return
	}
	h.add(e)
}

// noteRules records a rule write that succeeded.
func (h *history) noteRules(now time.Time) {
	h.add(proto.HistoryEvent{At: unixSec(now), Slot: -1, Kind: "rules", Text: "rules rewritten"})
}

func (h *history) add(e proto.HistoryEvent) {
	if len(e.Text) > histTextMax {
		e.Text = e.Text[:histTextMax] + "…"
	}
	if len(h.events) < histEvents {
		h.events = append(h.events, e)
		return
	}
	h.events[h.enext] = e
	h.enext = (h.enext + 1) % histEvents
}

// view copies the rings, oldest first, for a snapshot: the handlers read
// it on their own goroutines.
func (h *history) view(interval time.Duration) *proto.History {
	v := &proto.History{IntervalSec: interval.Seconds()}
	// The slices of a sample are never written after sample made them,
	// so the copy can share them.
	v.Samples = append(append(v.Samples, h.samples[h.next:]...), h.samples[:h.next]...)
	v.Events = append(append(v.Events, h.events[h.enext:]...), h.events[:h.enext]...)
	return v
}

// handover is view trimmed for a Handover: its oldest samples left out
// until the JSON fits budget bytes (the events are bounded in text, so
// they always fit).
func (h *history) handover(interval time.Duration, budget int) *proto.History {
	v := h.view(interval)
	for len(v.Samples) > 0 {
		b, err := json.Marshal(v)
		if err == nil && len(b) <= budget {
			return v
		}
		v.Samples = v.Samples[(len(v.Samples)+1)/2:]
	}
	return v
}

// adopt starts the history with the one a previous master handed over
// (nil from a master of an earlier release). The workers' counters start
// afresh: the first sample after it has no rate.
func (h *history) adopt(v *proto.History) {
	if v == nil {
		return
	}
	h.samples = append(h.samples[:0], v.Samples[max(0, len(v.Samples)-histSamples):]...)
	h.next = 0
	h.events, h.enext = h.events[:0], 0
	for _, e := range v.Events[max(0, len(v.Events)-histEvents):] {
		h.add(e)
	}
}

func unixSec(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }
