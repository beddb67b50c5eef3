//go:build linux

package ipcluster

import (
	"log/slog"
	"math"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestHistQuantile(t *testing.T) {
	inf := math.Inf(1)
	// Buckets as runtime/metrics shapes them: len(counts)+1 boundaries,
	// open at both ends.
	buckets := []float64{math.Inf(-1), 0.001, 0.01, 0.1, 1, inf}
	for _, tc := range []struct {
		name   string
		counts []uint64
		q      float64
		want   float64
	}{
		{"empty", []uint64{0, 0, 0, 0, 0}, 0.99, 0},
		{"all in one bucket", []uint64{0, 0, 50, 0, 0}, 0.99, 0.1},
		// 98 fast, 2 slow: the 99th of 100 is slow.
		{"tail counts", []uint64{0, 98, 0, 2, 0}, 0.99, 1},
		// 99 fast, 1 slow: the 99th of 100 is still fast.
		{"tail ignored", []uint64{0, 99, 0, 1, 0}, 0.99, 0.01},
		{"median", []uint64{0, 10, 10, 10, 0}, 0.5, 0.1},
		{"unbounded last bucket gives its lower bound", []uint64{0, 1, 0, 0, 99}, 0.99, 1},
		{"unbounded first bucket gives its upper bound", []uint64{100, 0, 0, 0, 0}, 0.99, 0.001},
		{"max", []uint64{0, 5, 5, 0, 0}, 1, 0.1},
	} {
		if got := histQuantile(tc.counts, buckets, tc.q); got != tc.want {
			t.Errorf("%s: histQuantile(%v, %v) = %v, want %v", tc.name, tc.counts, tc.q, got, tc.want)
		}
	}
	if got := highestBucket([]uint64{0, 3, 1, 0, 0}, buckets); got != 0.1 {
		t.Errorf("highestBucket = %v, want 0.1", got)
	}
	if got := highestBucket([]uint64{0, 0, 0, 0, 0}, buckets); got != 0 {
		t.Errorf("highestBucket of nothing = %v, want 0", got)
	}
}

func TestHistDelta(t *testing.T) {
	got := histDelta([]uint64{5, 7, 9}, []uint64{1, 7, 2})
	if want := []uint64{4, 0, 7}; !equalU64(got, want) {
		t.Errorf("histDelta = %v, want %v", got, want)
	}
	// The first read has no previous one: everything counts.
	if got := histDelta([]uint64{5, 7}, nil); !equalU64(got, []uint64{5, 7}) {
		t.Errorf("histDelta without prev = %v", got)
	}
}

func equalU64(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// The runtime's own histograms feed histQuantile as the worker does: a
// burst of scheduling delay shows in the next interval's p99 and is gone
// from the one after.
func TestRuntimeStatsReadsTheRuntime(t *testing.T) {
	var r runtimeStats
	st := r.read()
	// A pause without a completed cycle is possible: a cycle's first
	// stop-the-world pause comes before it completes (seen in CI).
	if st.HeapBytes == 0 {
		t.Errorf("first read: %+v", st)
	}
	n := st.GCCount
	runtime.GC()
	st = r.read()
	if st.GCCount <= n || st.GCPauseSec <= 0 || st.GCPauseSec > 1 {
		t.Errorf("after a GC: count %d (was %d), pause %vs", st.GCCount, n, st.GCPauseSec)
	}
}

func TestLagProbeSmoothing(t *testing.T) {
	var p lagProbe
	t0 := time.Unix(1000, 0)
	due := t0
	// feed records a wake-up lag late and moves on, as run does.
	feed := func(lag time.Duration) {
		ran := due.Add(lag)
		p.tick(due, ran)
		due = ran.Add(lagProbeEvery)
	}
	feed(10 * time.Millisecond)
	if s, m := p.report(); s != 10*time.Millisecond || m != 10*time.Millisecond {
		t.Fatalf("first sample: smooth %v max %v, want 10ms both", s, m)
	}
	// A single spike moves the smoothed lag by lagSmoothing of the gap,
	// and is the max until reported.
	feed(110 * time.Millisecond)
	s, m := p.report()
	if want := 10*time.Millisecond + time.Duration(lagSmoothing*float64(100*time.Millisecond)); s != want || m != 110*time.Millisecond {
		t.Errorf("after a spike: smooth %v max %v, want %v and 110ms", s, m, want)
	}
	// report resets the max, not the smoothed value.
	if s2, m2 := p.report(); s2 != s || m2 != 0 {
		t.Errorf("second report: smooth %v max %v, want %v and 0", s2, m2, s)
	}
	// A steady lag is approached geometrically: within 1% after 25 samples.
	for range 25 {
		feed(60 * time.Millisecond)
	}
	if s, _ := p.report(); s < 59*time.Millisecond || s > 61*time.Millisecond {
		t.Errorf("steady 60ms lag smoothed to %v", s)
	}
	// Early wake-ups (a coarse clock) count as no lag, never negative.
	p.tick(due, due.Add(-time.Millisecond))
	if _, m := p.report(); m != 0 {
		t.Errorf("early wake-up recorded max %v", m)
	}
}

func TestAppStatsBounded(t *testing.T) {
	var logs strings.Builder
	w := &Worker{log: slog.New(slog.NewTextHandler(&logs, nil))}
	if w.appJSON() != nil {
		t.Error("app stats without a function")
	}
	w.SetStats(func() any { return map[string]int{"rooms": 3} })
	if got := string(w.appJSON()); got != `{"rooms":3}` {
		t.Errorf("app stats %s", got)
	}
	w.SetStats(func() any { return strings.Repeat("x", 20<<10) })
	for range 3 {
		if b := w.appJSON(); b != nil {
			t.Errorf("%d bytes of app stats accepted", len(b))
		}
	}
	if n := strings.Count(logs.String(), "too large"); n != 1 {
		t.Errorf("%d warnings for oversized app stats, want 1 per run:\n%s", n, logs.String())
	}
	// A good report ends the run of bad ones: the next bad one warns again.
	w.SetStats(func() any { return 1 })
	if got := string(w.appJSON()); got != "1" {
		t.Errorf("app stats %s", got)
	}
	w.SetStats(func() any { return func() {} })
	if w.appJSON() != nil || !strings.Contains(logs.String(), "marshal") {
		t.Errorf("unmarshalable app stats not refused with a warning:\n%s", logs.String())
	}
	w.SetStats(nil)
	if w.appJSON() != nil {
		t.Error("app stats after SetStats(nil)")
	}
}
