package ipcluster

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

// TestHistoryRing: the status page's history keeps at most histSamples
// samples and histEvents events, oldest first, whatever the uptime, and
// its rate of new connections counts each worker from its previous sample
// (from 0 for a worker it had not seen).
func TestHistoryRing(t *testing.T) {
	h := newHistory()
	t0 := time.Unix(1_700_000_000, 0)
	const n = 3*histSamples + 7
	for i := range n {
		ws := []histWorker{
			{pid: 10, slot: 0, conns: 5, accepted: uint64(2 * i), ok: true}, // 2 new per second
			{pid: 11, slot: 1, conns: 1, accepted: uint64(i), ok: true},
			{pid: 12, slot: -1, ok: true}, // a spare counts nowhere
			{pid: 13, slot: 1},            // no heartbeat yet
		}
		if i == n-1 { // slot 1's worker replaced by one that accepted 3 so far
			ws[1] = histWorker{pid: 14, slot: 1, conns: 2, accepted: 3, ok: true}
		}
		h.sample(t0.Add(time.Duration(i)*time.Second), 2, ws)
	}
	for i := range 2*histEvents + 3 {
		h.note(t0, EventRetired{PID: i, Slot: 0, Reason: "memory"})
	}
	h.note(t0, EventRulesFailed{Err: errors.New(strings.Repeat("x", 5000))})
	h.note(t0, EventStats{}) // not drawn
	h.noteRules(t0)

	v := h.view(time.Second)
	if len(v.Samples) != histSamples {
		t.Fatalf("%d samples kept after %d, want the ring's %d", len(v.Samples), n, histSamples)
	}
	for i, s := range v.Samples {
		want := float64(t0.Unix() + int64(n-histSamples+i))
		if s.At != want {
			t.Fatalf("sample %d at %v, want %v (oldest first)", i, s.At, want)
		}
		if len(s.Conns) != 2 || len(s.NewPerSec) != 2 {
			t.Fatalf("sample %d has %d/%d slots, want 2", i, len(s.Conns), len(s.NewPerSec))
		}
	}
	last, prev := v.Samples[histSamples-1], v.Samples[histSamples-2]
	if prev.Conns[0] != 5 || prev.Conns[1] != 1 || prev.NewPerSec[0] != 2 || prev.NewPerSec[1] != 1 {
		t.Errorf("sample before last = %+v, want conns [5 1] and new/s [2 1]", prev)
	}
	if last.Conns[1] != 2 || last.NewPerSec[1] != 3 {
		t.Errorf("last sample = %+v, want slot 1 at 2 conns and 3 new/s (the new worker counted from 0)", last)
	}
	if len(h.accepted) != 3 {
		t.Errorf("%d workers' counters kept, want the 3 with a heartbeat in the last sample", len(h.accepted))
	}

	if len(v.Events) != histEvents {
		t.Fatalf("%d events kept, want the ring's %d", len(v.Events), histEvents)
	}
	if e := v.Events[0]; e.Kind != "retire" || e.PID != histEvents+5 {
		t.Errorf("oldest event = %+v, want the retirement of pid %d", e, histEvents+5)
	}
	if e := v.Events[histEvents-2]; e.Kind != "rules-failed" || len(e.Text) > histTextMax+len("…") {
		t.Errorf("rule failure = %q (%d bytes), want it cut to %d bytes", e.Kind, len(e.Text), histTextMax)
	}
	if e := v.Events[histEvents-1]; e.Kind != "rules" {
		t.Errorf("newest event = %+v, want the rule write", e)
	}
}

// TestHistoryHandover: a master hands its history to the next one within
// the frame budget, so the page after a deploy still shows what came
// before it.
func TestHistoryHandover(t *testing.T) {
	h := newHistory()
	t0 := time.Unix(1_700_000_000, 0)
	for i := range histSamples {
		ws := make([]histWorker, 0, 256)
		for s := range 256 {
			ws = append(ws, histWorker{pid: 100 + s, slot: s, conns: 123456, accepted: uint64(i * 1000), ok: true})
		}
		h.sample(t0.Add(time.Duration(i)*time.Second), 256, ws)
	}
	h.note(t0, EventWorkerExited{PID: 7, Slot: 3, State: "active", Status: "signal: killed"})
	const budget = 64 << 10
	v := h.handover(time.Second, budget)
	b, err := json.Marshal(v)
	if err != nil || len(b) > budget {
		t.Fatalf("handover history is %d bytes (%v), want at most %d", len(b), err, budget)
	}
	if len(v.Samples) == 0 || v.Samples[len(v.Samples)-1].At != float64(t0.Unix()+histSamples-1) {
		t.Fatalf("handover kept %d samples, want the newest ones", len(v.Samples))
	}
	n := newHistory()
	n.adopt(v)
	got := n.view(time.Second)
	if len(got.Samples) != len(v.Samples) || len(got.Events) != 1 || got.Events[0].Kind != "crash" {
		t.Fatalf("adopted %d samples and events %+v, want %d and the crash", len(got.Samples), got.Events, len(v.Samples))
	}
}
