//go:build linux

package ipcluster

// Health, the worker's half: what only a worker can see (Go heap, GC,
// scheduling lag, its connections, the application's own figures), read
// for each heartbeat without stopping the world. The master's half, what
// it measures itself and the policies it applies, is monitor.go.

import (
	"context"
	"encoding/json"
	"math"
	"runtime"
	"runtime/metrics"
	"sync"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// Metrics read by every report, without stopping the world (unlike
// runtime.ReadMemStats).
const (
	heapMetric      = "/memory/classes/heap/objects:bytes"
	gcCyclesMetric  = "/gc/cycles/total:gc-cycles"
	gcPausesMetric  = "/sched/pauses/total/gc:seconds"
	schedLatMetric  = "/sched/latencies:seconds"
	lagProbeEvery   = 100 * time.Millisecond
	lagSmoothing    = 0.2 // weight of a new lag sample in the smoothed lag
	schedLatPercent = 0.99
)

// SetStats registers a function whose result the worker adds to each
// heartbeat, as JSON, for the master's status and EventStats (the App
// field). It is called on the worker's control goroutine once per
// heartbeat: it must be quick and must not block, or heartbeats stop (which
// the master sees). A result that does not marshal, or marshals to more than
// 16 KiB, is left out with a logged warning. nil unregisters. Safe to call
// from any goroutine, more than once; the last call wins.
func (w *Worker) SetStats(fn func() any) {
	if fn == nil {
		w.appStats.Store(nil)
		return
	}
	w.appStats.Store(&fn)
}

// stats samples the worker's own figures for a report. Called only from
// runWorker's goroutine.
func (w *Worker) stats() proto.Stats {
	st := w.rt.read()
	st.Goroutines = runtime.NumGoroutine()
	st.Connections = w.conns.Load()
	st.Accepted = w.accepted.Load()
	st.UptimeSec = time.Since(w.started).Seconds()
	st.Retired = w.isRetired()
	lag, lagMax := w.probe.report()
	st.LagSec, st.LagMaxSec = lag.Seconds(), lagMax.Seconds()
	st.App = w.appJSON()
	return st
}

// appJSON calls the application's stats function, if any.
func (w *Worker) appJSON() json.RawMessage {
	fn := w.appStats.Load()
	if fn == nil {
		return nil
	}
	b, err := json.Marshal((*fn)())
	switch {
	case err != nil:
		w.warnApp("application stats do not marshal to JSON; leaving them out", "err", err)
		return nil
	case len(b) > proto.MaxApp:
		w.warnApp("application stats too large; leaving them out", "bytes", len(b), "limit", proto.MaxApp)
		return nil
	}
	w.appWarned = false
	return b
}

// warnApp logs once per run of bad reports, not once a second.
func (w *Worker) warnApp(msg string, args ...any) {
	if !w.appWarned {
		w.appWarned = true
		w.log.Warn(msg, args...)
	}
}

// runtimeStats reads the runtime's metrics. The histograms are cumulative
// since the process started; reports want the last interval, so the
// previous counts are kept and subtracted.
type runtimeStats struct {
	samples   []metrics.Sample
	prevPause []uint64
	prevLat   []uint64
	lastPause float64
}

func (r *runtimeStats) read() proto.Stats {
	if r.samples == nil {
		r.samples = []metrics.Sample{{Name: heapMetric}, {Name: gcCyclesMetric}, {Name: gcPausesMetric}, {Name: schedLatMetric}}
	}
	metrics.Read(r.samples)
	var st proto.Stats
	if v := r.samples[0].Value; v.Kind() == metrics.KindUint64 {
		st.HeapBytes = v.Uint64()
	}
	if v := r.samples[1].Value; v.Kind() == metrics.KindUint64 {
		st.GCCount = v.Uint64()
	}
	if v := r.samples[2].Value; v.Kind() == metrics.KindFloat64Histogram {
		h := v.Float64Histogram()
		d := histDelta(h.Counts, r.prevPause)
		if top := highestBucket(d, h.Buckets); top > 0 {
			r.lastPause = top
		}
		r.prevPause = append(r.prevPause[:0], h.Counts...)
	}
	st.GCPauseSec = r.lastPause
	if v := r.samples[3].Value; v.Kind() == metrics.KindFloat64Histogram {
		h := v.Float64Histogram()
		st.SchedP99Sec = histQuantile(histDelta(h.Counts, r.prevLat), h.Buckets, schedLatPercent)
		// Counts is reused by the next metrics.Read: keep a copy.
		r.prevLat = append(r.prevLat[:0], h.Counts...)
	}
	return st
}

// histDelta returns cur minus prev, bucket by bucket; a missing prev counts
// as zeros.
func histDelta(cur, prev []uint64) []uint64 {
	d := make([]uint64, len(cur))
	for i, c := range cur {
		if i < len(prev) && prev[i] <= c {
			c -= prev[i]
		}
		d[i] = c
	}
	return d
}

// bucketValue is the value reported for bucket i of a runtime/metrics
// histogram (whose len(counts)+1 boundaries may start at -Inf and end at
// +Inf): its upper bound, or its lower one for the unbounded last bucket.
func bucketValue(buckets []float64, i int) float64 {
	if hi := buckets[i+1]; !math.IsInf(hi, 1) {
		return hi
	}
	if lo := buckets[i]; !math.IsInf(lo, -1) {
		return lo
	}
	return 0
}

// histQuantile returns the q-quantile (0 < q <= 1) of a histogram as the
// bound of the bucket holding it; 0 for an empty histogram. Over-estimating
// by up to one bucket is the honest choice for a latency: the runtime's
// buckets are a few percent wide.
func histQuantile(counts []uint64, buckets []float64, q float64) float64 {
	var total uint64
	for _, c := range counts {
		total += c
	}
	if total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(total)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i, c := range counts {
		seen += c
		if seen >= rank {
			return bucketValue(buckets, i)
		}
	}
	return bucketValue(buckets, len(counts)-1)
}

// highestBucket returns the value of the highest non-empty bucket, 0 if
// all are empty.
func highestBucket(counts []uint64, buckets []float64) float64 {
	for i := len(counts) - 1; i >= 0; i-- {
		if counts[i] > 0 {
			return bucketValue(buckets, i)
		}
	}
	return 0
}

// lagProbe measures how late a goroutine runs after it is due: the
// worker's scheduling lag, the delay every request of the worker suffers
// on top of its own work when the process is short of CPU (a busy loop,
// GOMAXPROCS too low, a CPU quota, a loaded host).
type lagProbe struct {
	mu     sync.Mutex
	smooth time.Duration // exponentially smoothed
	max    time.Duration // largest since the last report
	seen   bool
}

// run wakes every lagProbeEvery until ctx is done.
func (p *lagProbe) run(ctx context.Context) {
	t := time.NewTimer(lagProbeEvery)
	defer t.Stop()
	due := time.Now().Add(lagProbeEvery)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// A goroutine woken by its timer is run next, ahead of the
		// run queue; one woken by the network (a request) waits in the
		// queue behind every runnable goroutine. Go round the queue
		// once so the probe waits as a request would.
		runtime.Gosched()
		now := time.Now()
		p.tick(due, now)
		due = now.Add(lagProbeEvery)
		t.Reset(lagProbeEvery)
	}
}

// tick records a wake-up that was due at due and ran at ran.
func (p *lagProbe) tick(due, ran time.Time) {
	lag := max(ran.Sub(due), 0)
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.seen {
		p.smooth, p.seen = lag, true
	} else {
		p.smooth += time.Duration(lagSmoothing * float64(lag-p.smooth))
	}
	p.max = max(p.max, lag)
}

// report returns the smoothed lag and the largest since the previous
// report.
func (p *lagProbe) report() (smooth, largest time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	smooth, largest = p.smooth, p.max
	p.max = 0
	return smooth, largest
}
