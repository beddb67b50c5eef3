//go:build linux

package ipcluster_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// lagLimit separates a worker starved of CPU from a healthy one.
const lagLimit = 50 * time.Millisecond

// The master measures a worker holding 64 MiB as 50 MiB bigger than the
// others, by its own reading of /proc, and a worker whose one P is kept
// busy reports a scheduling lag that healthy workers do not; both in the
// status and in EventStats.
func TestHealthMeasured(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{})
	events := filepath.Join(t.TempDir(), "events.jsonl")
	c := startClusterSpec(t, lab, specConfig{Workers: 4, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		HeartbeatInterval: 100 * time.Millisecond, MonitorInterval: 100 * time.Millisecond}, func(s *spec) {
		s.SlotScenarios = map[int]string{0: "ballast", 1: "busy"}
		s.EventsLog = events
	})
	c.waitReady()

	bySlot := func(st *proto.Status) map[int]proto.WorkerStatus {
		m := map[int]proto.WorkerStatus{}
		for _, w := range st.Workers {
			if w.State == "active" {
				m[w.Slot] = w
			}
		}
		return m
	}
	var why string
	defer func() {
		if t.Failed() {
			t.Logf("last status check: %s", why)
		}
	}()
	st := c.waitStatus("ballast RSS and busy lag", func(st *proto.Status) bool {
		ws := bySlot(st)
		if len(ws) != 4 {
			why = "not 4 active workers"
			return false
		}
		for slot, w := range ws {
			// A second of reports: the smoothed lag then covers ten
			// probe wake-ups, not the first one.
			if w.RSSBytes == 0 || w.Stats == nil || w.HeartbeatAgeSec <= 0 || w.Stats.UptimeSec < 1 {
				why = "no sample or a second of heartbeats yet for slot " + itoa(slot)
				return false
			}
		}
		for _, slot := range []int{1, 2, 3} {
			if ws[0].RSSBytes < ws[slot].RSSBytes+50<<20 {
				why = "ballast RSS " + itoa(int(ws[0].RSSBytes>>20)) + " MiB, slot " + itoa(slot) + " " + itoa(int(ws[slot].RSSBytes>>20)) + " MiB"
				return false
			}
		}
		busy := time.Duration(ws[1].Stats.LagSec * float64(time.Second))
		if busy <= lagLimit {
			why = "busy worker's lag " + busy.String()
			return false
		}
		for _, slot := range []int{0, 2, 3} {
			if lag := time.Duration(ws[slot].Stats.LagSec * float64(time.Second)); lag >= lagLimit {
				why = "slot " + itoa(slot) + " lag " + lag.String()
				return false
			}
		}
		return true
	})
	ws := bySlot(st)
	for slot, w := range ws {
		t.Logf("slot %d: rss %d MiB, pss %d MiB, heartbeat age %.3fs, lag %.1fms (max %.1fms), sched p99 %.1fms, gc %d (pause %.3fms), heap %d MiB",
			slot, w.RSSBytes>>20, w.PSSBytes>>20, w.HeartbeatAgeSec, w.Stats.LagSec*1e3, w.Stats.LagMaxSec*1e3,
			w.Stats.SchedP99Sec*1e3, w.Stats.GCCount, w.Stats.GCPauseSec*1e3, w.Stats.HeapBytes>>20)
		if w.Stats.Goroutines == 0 || w.Stats.HeapBytes == 0 {
			t.Errorf("slot %d reports no goroutines or heap: %+v", slot, w.Stats)
		}
		if w.HeartbeatAgeSec > 5 {
			t.Errorf("slot %d: heartbeat %.1fs old with a 100ms interval", slot, w.HeartbeatAgeSec)
		}
	}
	if _, err := os.Stat("/proc/self/smaps_rollup"); err == nil && ws[0].PSSBytes < 50<<20 {
		t.Errorf("ballast worker's PSS %d MiB, want 50 MiB or more", ws[0].PSSBytes>>20)
	}
	// The busy worker's runtime sees its goroutines wait too.
	if p99 := ws[1].Stats.SchedP99Sec; p99 < lagLimit.Seconds() {
		t.Logf("busy worker's sched p99 %.1fms (informational)", p99*1e3)
	}

	// EventStats carries the same measurements, for every worker.
	detail := "no EventStats yet"
	defer func() {
		if t.Failed() {
			t.Logf("last EventStats check: %s", detail)
		}
	}()
	waitEvent(t, events, 10*time.Second, func(e loggedEvent) bool {
		if e.Type != "EventStats" {
			return false
		}
		var ok bool
		ok, detail = checkStats(t, decodeEvent[ipcluster.EventStats](t, e), ws[0].PID, ws[1].PID)
		return ok
	})
}

// checkStats checks that an EventStats covers 4 workers, sorted by PID,
// with the ballast worker's RSS 50 MiB above every other and the busy
// worker's lag above lagLimit.
func checkStats(t *testing.T, ev ipcluster.EventStats, ballastPID, busyPID int) (ok bool, detail string) {
	t.Helper()
	var ballast, busy *ipcluster.WorkerStats
	var otherRSS uint64
	sorted := true
	for i := range ev.Workers {
		w := &ev.Workers[i]
		if i > 0 && ev.Workers[i-1].PID >= w.PID {
			sorted = false
		}
		switch w.PID {
		case ballastPID:
			ballast = w
		case busyPID:
			busy = w
		}
		if w.PID != ballastPID {
			otherRSS = max(otherRSS, w.RSSBytes)
		}
	}
	if !sorted {
		t.Errorf("EventStats workers not sorted by PID: %+v", ev.Workers)
	}
	if ev.At.IsZero() || len(ev.Workers) != 4 || ballast == nil || busy == nil {
		return false, "event without the 4 workers"
	}
	if busy.HeartbeatAge < 0 || ballast.HeartbeatAge < 0 {
		return false, "no heartbeat yet"
	}
	if ballast.RSSBytes >= otherRSS+50<<20 && busy.Lag > lagLimit {
		return true, ""
	}
	return false, "ballast rss " + itoa(int(ballast.RSSBytes>>20)) + " MiB vs " + itoa(int(otherRSS>>20)) + " MiB, busy lag " + busy.Lag.String()
}
