package ipcluster

import (
	"strings"
	"testing"
	"time"
)

// samples makes one sample a second ending at now, of workers, with the
// per-worker connections conns (oldest first).
func samples(now time.Time, workers int, conns ...float64) []loadSample {
	var out []loadSample
	for i, c := range conns {
		out = append(out, loadSample{At: now.Add(time.Duration(i-len(conns)+1) * time.Second), Workers: workers, Conns: c})
	}
	return out
}

func repeat(v float64, n int) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = v
	}
	return out
}

func TestAutoscaleDecide(t *testing.T) {
	a := AutoscaleConfig{MinWorkers: 2, MaxWorkers: 8, ConnsPerWorker: 10, UpAfter: 10 * time.Second, DownAfter: 30 * time.Second}.withDefaults()
	now := time.Unix(1_800_000_000, 0)
	for _, tc := range []struct {
		name    string
		workers int
		s       []loadSample
		hold    scaleHold
		action  string
		to      int
		refused string
	}{
		{"a breach for the whole period grows", 4, samples(now, 4, repeat(12, 11)...), scaleHold{}, scaleGrow, 8, ""},
		{"a breach shorter than the period does nothing", 4, samples(now, 4, append(repeat(5, 3), repeat(12, 8)...)...), scaleHold{}, "", 0, ""},
		{"a window not yet covered does nothing", 4, samples(now, 4, repeat(12, 5)...), scaleHold{}, "", 0, ""},
		{"one dip inside the period does nothing", 4, samples(now, 4, append(append(repeat(12, 5), 9), repeat(12, 5)...)...), scaleHold{}, "", 0, ""},
		{"samples from before a resize do not count", 4, append(samples(now.Add(-20*time.Second), 2, repeat(12, 10)...), samples(now, 4, repeat(12, 5)...)...), scaleHold{}, "", 0, ""},
		{"room to halve for DownAfter shrinks", 4, samples(now, 4, repeat(3, 31)...), scaleHold{}, scaleShrink, 2, ""},
		{"inside the hysteresis band: nothing", 4, samples(now, 4, repeat(4, 31)...), scaleHold{}, "", 0, ""}, // halved: 8 ≥ 7
		{"at the maximum: refused", 8, samples(now, 8, repeat(12, 11)...), scaleHold{}, scaleGrow, 16, "maximum"},
		{"at the minimum: refused", 2, samples(now, 2, repeat(1, 31)...), scaleHold{}, scaleShrink, 1, "minimum"},
		{"a deploy holds it", 4, samples(now, 4, repeat(12, 11)...), scaleHold{Busy: "a deploy is under way"}, scaleGrow, 8, "deploy"},
		{"cooling down", 4, samples(now, 4, repeat(12, 11)...), scaleHold{LastResize: now.Add(-time.Minute)}, scaleGrow, 8, "cooling down"},
		{"the memory budget stops growth", 4, samples(now, 4, repeat(12, 11)...), scaleHold{MemoryFits: func(n int) bool { return n <= 4 }}, scaleGrow, 8, "memory budget"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := a.decide(tc.s, tc.workers, now, tc.hold)
			if d.Action != tc.action || (tc.action != "" && d.To != tc.to) || !strings.Contains(d.Refused, tc.refused) || (tc.refused == "") != (d.Refused == "") {
				t.Fatalf("decide = %+v, want %s to %d refused %q", d, tc.action, tc.to, tc.refused)
			}
			if d.Action != "" && d.Reason == "" {
				t.Errorf("a decision without its figures: %+v", d)
			}
		})
	}
}

// CPU is a target as connections are: either grows; both must leave room
// to shrink.
func TestAutoscaleDecideCPU(t *testing.T) {
	a := AutoscaleConfig{MaxWorkers: 8, ConnsPerWorker: 10, CPUPerWorker: 0.5, UpAfter: 5 * time.Second, DownAfter: 5 * time.Second}.withDefaults()
	now := time.Unix(1_800_000_000, 0)
	burn := samples(now, 4, repeat(1, 6)...)
	for i := range burn {
		burn[i].CPU = 0.8
	}
	if d := a.decide(burn, 4, now, scaleHold{}); d.Action != scaleGrow || !strings.Contains(d.Reason, "cores") {
		t.Errorf("a CPU breach: %+v", d)
	}
	quietConnsBusyCPU := samples(now, 4, repeat(1, 6)...)
	for i := range quietConnsBusyCPU {
		quietConnsBusyCPU[i].CPU = 0.3 // halved: 0.6 ≥ 0.35
	}
	if d := a.decide(quietConnsBusyCPU, 4, now, scaleHold{}); d.Action != "" {
		t.Errorf("few connections but the CPU to halve: %+v, want nothing", d)
	}
}

func TestAutoscaleValidate(t *testing.T) {
	for _, tc := range []struct {
		field string
		a     AutoscaleConfig
	}{
		{"Autoscale.MaxWorkers", AutoscaleConfig{ConnsPerWorker: 5}},
		{"Autoscale.MaxWorkers", AutoscaleConfig{MaxWorkers: 6, ConnsPerWorker: 5}},
		{"Autoscale.MinWorkers", AutoscaleConfig{MinWorkers: 16, MaxWorkers: 8, ConnsPerWorker: 5}},
		{"Autoscale.ConnsPerWorker/CPUPerWorker", AutoscaleConfig{MaxWorkers: 8}},
		{"Autoscale.ShrinkBelow", AutoscaleConfig{MaxWorkers: 8, ConnsPerWorker: 5, ShrinkBelow: 1.5}},
		{"Autoscale.Cooldown", AutoscaleConfig{MaxWorkers: 8, ConnsPerWorker: 5, Cooldown: -time.Second}},
	} {
		var got []string
		a := tc.a.withDefaults()
		a.validate(func(field, problem, fix string) { got = append(got, field) })
		if len(got) == 0 || got[0] != tc.field {
			t.Errorf("%+v: errors for %v, want %s", tc.a, got, tc.field)
		}
	}
	var none []string
	ok := AutoscaleConfig{MinWorkers: 2, MaxWorkers: 8, ConnsPerWorker: 5}.withDefaults()
	ok.validate(func(field, problem, fix string) { none = append(none, field) })
	if len(none) != 0 {
		t.Errorf("a valid policy refused: %v", none)
	}
}
