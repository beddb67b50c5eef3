package ipcluster

// The autoscale policy (Config.Autoscale): the decision, a pure function of
// the load the master sampled, so that it can be tested on recorded
// samples. The master (a later change) samples open connections and CPU
// per active worker every MonitorInterval, asks decide, and acts on its
// answer with the live resize, one step at a time.
//
//	grow:   every sample of the last UpAfter over a target (connections or
//	        CPU per worker, averaged over the active workers)
//	shrink: every sample of the last DownAfter such that, halved, the
//	        cluster would stay under ShrinkBelow of every target
//	        (per-worker load doubles when the workers halve)
//	else:   nothing; between the two is the hysteresis band
//
// An action it would take but must not (a cooldown since the last resize,
// a deploy or a resize under way, the size limits, the memory budget) is a
// refusal, which the master reports as it reports a decision.

import (
	"fmt"
	"time"
)

// AutoscaleConfig sizes the cluster by its load: the master grows it (to
// twice the workers) when the connections or the CPU per active worker
// stay over their target for UpAfter, and shrinks it (to half) when half
// the workers would stay well under both for DownAfter. MaxWorkers 0 (the
// zero value) is off.
type AutoscaleConfig struct {
	// MinWorkers and MaxWorkers bound the size, powers of two. Default
	// MinWorkers: 1. MaxWorkers 0: no autoscaling.
	MinWorkers, MaxWorkers int
	// ConnsPerWorker is the target of open connections per active worker;
	// 0: not a target.
	ConnsPerWorker int
	// CPUPerWorker is the target of CPU per active worker, in cores (0.5:
	// half a core), as the master measures it from /proc; 0: not a target.
	CPUPerWorker float64
	// UpAfter is how long a target must stay exceeded before the cluster
	// grows. Default 60s.
	UpAfter time.Duration
	// DownAfter is how long half the workers must have been enough before
	// the cluster shrinks. Default 10m.
	DownAfter time.Duration
	// Cooldown follows every resize, the policy's or an operator's: no
	// decision meanwhile. Default 5m.
	Cooldown time.Duration
	// ShrinkBelow is the fraction of each target that half the workers
	// must stay under for a shrink. Default 0.7.
	ShrinkBelow float64
}

// Enabled reports whether autoscaling is configured.
func (a *AutoscaleConfig) Enabled() bool { return a.MaxWorkers > 0 }

// loadSample is the cluster's load at one moment: its size and, averaged
// over its active workers, open connections and CPU (cores).
type loadSample struct {
	At      time.Time
	Workers int
	Conns   float64
	CPU     float64
}

// Autoscale actions.
const (
	scaleGrow   = "grow"
	scaleShrink = "shrink"
)

// scaleDecision is what decide says: an Action ("" for none) to To
// workers, and why; or, with Refused set, the action it would take and
// why it must not.
type scaleDecision struct {
	Action  string
	From    int
	To      int
	Reason  string
	Refused string
}

// scaleHold is what stops the policy acting: a deploy or resize under way
// (its description), the time of the last resize, and whether the memory
// budget would take a cluster of a given size.
type scaleHold struct {
	Busy       string
	LastResize time.Time
	MemoryFits func(workers int) bool
}

// decide says what the policy makes of samples (oldest first, those of
// the current size only counting) at now.
func (a *AutoscaleConfig) decide(samples []loadSample, workers int, now time.Time, hold scaleHold) scaleDecision {
	d := scaleDecision{From: workers}
	if !a.Enabled() || len(samples) == 0 {
		return d
	}
	if over, why := a.sustained(samples, workers, now, a.UpAfter, a.breach); over {
		d.Action, d.To, d.Reason = scaleGrow, workers*2, why
	} else if under, why := a.sustained(samples, workers, now, a.DownAfter, a.roomToHalve); under && workers > 1 {
		d.Action, d.To, d.Reason = scaleShrink, workers/2, why
	} else {
		return d
	}
	switch {
	case d.Action == scaleGrow && d.To > a.MaxWorkers:
		d.Refused = fmt.Sprintf("at the maximum, %d workers (Autoscale.MaxWorkers)", a.MaxWorkers)
	case d.Action == scaleShrink && d.To < a.MinWorkers:
		d.Refused = fmt.Sprintf("at the minimum, %d workers (Autoscale.MinWorkers)", a.MinWorkers)
	case hold.Busy != "":
		d.Refused = hold.Busy
	case !hold.LastResize.IsZero() && now.Sub(hold.LastResize) < a.Cooldown:
		d.Refused = fmt.Sprintf("cooling down: the last resize was %s ago (Autoscale.Cooldown %s)", now.Sub(hold.LastResize).Round(time.Second), a.Cooldown)
	case d.Action == scaleGrow && hold.MemoryFits != nil && !hold.MemoryFits(d.To):
		d.Refused = fmt.Sprintf("%d workers would not fit the memory budget (Config.MemoryBudget's low watermark)", d.To)
	}
	return d
}

// sustained reports whether cond held for every sample of the current
// size in the window of length win ending at now, the window being
// covered (a sample at or before its start), and the reason cond gave for
// the latest.
func (a *AutoscaleConfig) sustained(samples []loadSample, workers int, now time.Time, win time.Duration, cond func(loadSample) (bool, string)) (bool, string) {
	start := now.Add(-win)
	covered := false
	why := ""
	for i := len(samples) - 1; i >= 0; i-- {
		s := samples[i]
		if s.Workers != workers {
			return false, "" // the window reaches back past the last resize
		}
		ok, w := cond(s)
		if !ok {
			return false, ""
		}
		if why == "" {
			why = w
		}
		if !s.At.After(start) {
			covered = true
			break
		}
	}
	return covered, why
}

// breach: a target exceeded.
func (a *AutoscaleConfig) breach(s loadSample) (bool, string) {
	if a.ConnsPerWorker > 0 && s.Conns > float64(a.ConnsPerWorker) {
		return true, fmt.Sprintf("%.1f connections per worker, over the target %d for %s", s.Conns, a.ConnsPerWorker, a.UpAfter)
	}
	if a.CPUPerWorker > 0 && s.CPU > a.CPUPerWorker {
		return true, fmt.Sprintf("%.2f cores per worker, over the target %.2f for %s", s.CPU, a.CPUPerWorker, a.UpAfter)
	}
	return false, ""
}

// roomToHalve: half the workers would stay under ShrinkBelow of every
// target.
func (a *AutoscaleConfig) roomToHalve(s loadSample) (bool, string) {
	if a.ConnsPerWorker > 0 && 2*s.Conns >= a.ShrinkBelow*float64(a.ConnsPerWorker) {
		return false, ""
	}
	if a.CPUPerWorker > 0 && 2*s.CPU >= a.ShrinkBelow*a.CPUPerWorker {
		return false, ""
	}
	return true, fmt.Sprintf("%.1f connections and %.2f cores per worker: half the workers stay under %.0f%% of the targets for %s",
		s.Conns, s.CPU, 100*a.ShrinkBelow, a.DownAfter)
}

const (
	defaultScaleUpAfter   = time.Minute
	defaultScaleDownAfter = 10 * time.Minute
	defaultScaleCooldown  = 5 * time.Minute
	defaultShrinkBelow    = 0.7
)

func (a AutoscaleConfig) withDefaults() AutoscaleConfig {
	if !a.Enabled() {
		return a
	}
	setDefault(&a.MinWorkers, 1)
	setDefault(&a.UpAfter, defaultScaleUpAfter)
	setDefault(&a.DownAfter, defaultScaleDownAfter)
	setDefault(&a.Cooldown, defaultScaleCooldown)
	setDefault(&a.ShrinkBelow, defaultShrinkBelow)
	return a
}

// validate reports the problems of an AutoscaleConfig with defaults
// applied.
func (a *AutoscaleConfig) validate(bad func(field, problem, fix string)) {
	if !a.Enabled() {
		if a.MinWorkers != 0 || a.ConnsPerWorker != 0 || a.CPUPerWorker != 0 {
			bad("Autoscale.MaxWorkers", "0 while other Autoscale fields are set", "set the largest size the policy may grow to (a power of two), or leave Config.Autoscale zero")
		}
		return
	}
	pow2 := func(n int) bool { return n >= 1 && n <= MaxWorkers && n&(n-1) == 0 }
	if !pow2(a.MaxWorkers) {
		bad("Autoscale.MaxWorkers", fmt.Sprint(a.MaxWorkers), fmt.Sprintf("use a power of two from 1 to %d", MaxWorkers))
	}
	if !pow2(a.MinWorkers) || a.MinWorkers > a.MaxWorkers {
		bad("Autoscale.MinWorkers", fmt.Sprint(a.MinWorkers), "use a power of two no larger than Autoscale.MaxWorkers")
	}
	if a.ConnsPerWorker <= 0 && a.CPUPerWorker <= 0 {
		bad("Autoscale.ConnsPerWorker/CPUPerWorker", "neither is set", "set a target of connections or of CPU per worker (or both)")
	}
	if a.ConnsPerWorker < 0 || a.CPUPerWorker < 0 {
		bad("Autoscale.ConnsPerWorker/CPUPerWorker", "negative", "use positive targets, or 0 for none")
	}
	if a.ShrinkBelow <= 0 || a.ShrinkBelow >= 1 {
		bad("Autoscale.ShrinkBelow", fmt.Sprint(a.ShrinkBelow), "use a fraction between 0 and 1, such as 0.7 (the hysteresis band: a shrink must leave room)")
	}
	for field, d := range map[string]time.Duration{"Autoscale.UpAfter": a.UpAfter, "Autoscale.DownAfter": a.DownAfter, "Autoscale.Cooldown": a.Cooldown} {
		if d < 0 {
			bad(field, d.String(), "use a positive duration, or 0 for the default")
		}
	}
}
