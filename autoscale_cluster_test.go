//go:build linux

package ipcluster_test

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// autoscaleEvents are the policy's events in the log, in order.
func autoscaleEvents(t *testing.T, d *deployLab) []ipcluster.EventAutoscale {
	t.Helper()
	var out []ipcluster.EventAutoscale
	for _, e := range readEvents(t, d.events) {
		if e.Type == "EventAutoscale" {
			out = append(out, decodeEvent[ipcluster.EventAutoscale](t, e))
		}
	}
	return out
}

// eventAt is when the first event of type typ (matching ok) after since
// was logged.
func eventAt(t *testing.T, d *deployLab, typ string, since time.Time, ok func(loggedEvent) bool) time.Time {
	t.Helper()
	for _, e := range readEvents(t, d.events) {
		if e.Type == typ && e.At.After(since) && (ok == nil || ok(e)) {
			return e.At
		}
	}
	return time.Time{}
}

// The cluster grows 4 → 8 when more connections are held than the target
// for UpAfter, refuses to grow past MaxWorkers, and shrinks back 8 → 4
// once they are released for DownAfter; a load of new connections all
// along, and the connections held meanwhile, see no failure.
func TestAutoscaleGrowsAndShrinks(t *testing.T) {
	d := startDeployLab(t, 4, func(s *spec) {
		s.Config.Autoscale = ipcluster.AutoscaleConfig{MinWorkers: 4, MaxWorkers: 8, ConnsPerWorker: 6,
			UpAfter: time.Second, DownAfter: 2 * time.Second, Cooldown: time.Second}
	})
	d.load() // 4 loaders: up to 4 short connections open at a time

	// 8 held already (2 a worker); 48 more: 14 a worker, over the target.
	breach := time.Now()
	more := holdConns(t, d.c, d.lab.ClientAddrs4[8:56], d.dst)
	st := d.waitStatus("grown to 8 slots", func(st *proto.Status) bool {
		return len(st.Slots) == 8 && activePID(st, 7) != 0 && countEvents(t, d.events, "EventResized") >= 1
	})
	grown := time.Now()
	decided := eventAt(t, d, "EventAutoscale", breach, nil)
	resized := eventAt(t, d, "EventResized", breach, nil)
	if err := probeAll(append(d.held, more...)); err != nil {
		t.Fatalf("held connections after growing: %v", err)
	}
	// 7 a worker, still over: the policy would grow again, to 16, and
	// must not.
	d.waitStatus("a refusal at the maximum", func(st *proto.Status) bool {
		return st.Autoscale != nil && strings.Contains(st.Autoscale.Refused, "maximum")
	})

	// Released: 1.5 a worker at most; half the workers would have 3,
	// under 70% of 6.
	release := time.Now()
	for _, c := range more {
		c.Close()
	}
	d.waitStatus("shrunk to 4 slots", func(st *proto.Status) bool {
		return len(st.Slots) == 4 && countEvents(t, d.events, "EventResized") >= 2
	})
	shrunk := time.Now()
	shrinkDecided := eventAt(t, d, "EventAutoscale", release, func(e loggedEvent) bool {
		return decodeEvent[ipcluster.EventAutoscale](t, e).Action == "shrink"
	})
	res := d.finish()

	var lines []string
	for _, e := range autoscaleEvents(t, d) {
		what := fmt.Sprintf("%s %d → %d", e.Action, e.From, e.To)
		if e.Refused != "" {
			what += " refused: " + e.Refused
		}
		lines = append(lines, fmt.Sprintf("%s (%.1f conns/worker; %s)", what, e.Conns, e.Reason))
	}
	t.Logf("policy: %s", strings.Join(lines, "; "))
	t.Logf("grow: breach → decision %s → new routes %s → 8 slots served %s; shrink: release → decision %s → 4 slots %s; load: %d attempts, %d failed",
		decided.Sub(breach).Round(time.Millisecond), resized.Sub(breach).Round(time.Millisecond), grown.Sub(breach).Round(time.Millisecond),
		shrinkDecided.Sub(release).Round(time.Millisecond), shrunk.Sub(release).Round(time.Millisecond), res.Attempts, res.Failures)
	if decided.IsZero() || shrinkDecided.IsZero() {
		t.Errorf("no EventAutoscale for the grow (%v) or the shrink (%v)", decided, shrinkDecided)
	}
	_ = st
}

// Workers that burn a fifth of a core each, over a target of a tenth,
// grow the cluster (2 → 4), with no connection at all.
func TestAutoscaleGrowsOnCPU(t *testing.T) {
	d := startDeployLab(t, 2, func(s *spec) {
		s.Scenario = "cpu20"
		s.Config.Autoscale = ipcluster.AutoscaleConfig{MinWorkers: 2, MaxWorkers: 4, CPUPerWorker: 0.1, UpAfter: time.Second}
	})
	st := d.waitStatus("grown to 4 slots on CPU", func(st *proto.Status) bool {
		return len(st.Slots) == 4 && st.Autoscale != nil && st.Autoscale.Action == "grow" && st.Autoscale.Refused == ""
	})
	t.Logf("policy: %s", st.Autoscale.Reason)
	if !strings.Contains(st.Autoscale.Reason, "cores per worker") {
		t.Errorf("grew for %q, want the CPU target", st.Autoscale.Reason)
	}
}

// Load that swings inside the hysteresis band (over 70% of the target
// when halved, under the target) resizes nothing.
func TestAutoscaleHysteresis(t *testing.T) {
	d := startDeployLab(t, 4, func(s *spec) {
		s.Config.Autoscale = ipcluster.AutoscaleConfig{MinWorkers: 2, MaxWorkers: 8, ConnsPerWorker: 4,
			UpAfter: time.Second, DownAfter: time.Second, Cooldown: time.Second}
	})
	// 8 held (2 a worker): halved 4 ≥ 2.8, not over 4. Swing to 3 a
	// worker and back for a few periods.
	for range 3 {
		extra := holdConns(t, d.c, d.lab.ClientAddrs4[8:12], d.dst)
		time.Sleep(1500 * time.Millisecond)
		for _, c := range extra {
			c.Close()
		}
		time.Sleep(1500 * time.Millisecond)
	}
	st, err := d.c.status()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Slots) != 4 || countEvents(t, d.events, "EventResized") != 0 {
		t.Errorf("load inside the band resized the cluster: %d slots, %d resizes", len(st.Slots), countEvents(t, d.events, "EventResized"))
	}
	for _, e := range autoscaleEvents(t, d) {
		t.Errorf("the policy said %+v inside the band", e)
	}
}

// A deploy under way holds the policy back, and says so; the budget
// refuses a growth the memory would not take.
func TestAutoscaleHeld(t *testing.T) {
	t.Run("budget", func(t *testing.T) {
		d := startDeployLab(t, 4, func(s *spec) {
			s.Config.Autoscale = ipcluster.AutoscaleConfig{MinWorkers: 4, MaxWorkers: 8, ConnsPerWorker: 1, UpAfter: time.Second}
			s.Config.MemoryBudget = 64 << 20 // 4 workers of the test binary fit; 8 do not
		})
		_ = holdConns(t, d.c, d.lab.ClientAddrs4[8:24], d.dst)
		st := d.waitStatus("a refusal for the memory budget", func(st *proto.Status) bool {
			return st.Autoscale != nil && strings.Contains(st.Autoscale.Refused, "memory budget")
		})
		if len(st.Slots) != 4 {
			t.Errorf("grew to %d slots past the memory budget", len(st.Slots))
		}
	})
	t.Run("deploy", func(t *testing.T) {
		d := startDeployLab(t, 4, func(s *spec) {
			s.Config.Autoscale = ipcluster.AutoscaleConfig{MinWorkers: 4, MaxWorkers: 8, ConnsPerWorker: 1, UpAfter: time.Second}
			s.Config.CanaryPeriod = 10 * time.Second
		})
		_ = holdConns(t, d.c, d.lab.ClientAddrs4[8:24], d.dst)
		// A restart rolls every slot as a deploy does (canary first).
		if err := d.c.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
			t.Fatal(err)
		}
		st := d.waitStatus("a refusal for the deploy", func(st *proto.Status) bool {
			return st.Autoscale != nil && strings.Contains(st.Autoscale.Refused, "deploy")
		})
		if len(st.Slots) != 4 {
			t.Errorf("grew to %d slots during a deploy", len(st.Slots))
		}
	})
}
