//go:build linux

package ipcluster

// Health measurement. Workers report what only they can see (Go heap, GC,
// scheduling lag, their connections, the application's own figures); the
// master measures what it must not take on trust (RSS and PSS, from /proc)
// and how fresh each heartbeat is. Nothing here acts on the figures yet:
// policies (memory or lag limits, heartbeat timeouts) are to read
// proc.mem and workerStats in the master's loop.

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"math"
	"runtime"
	"runtime/metrics"
	"sync"
	"time"

	"github.com/ipcluster/ipcluster/internal/procfs"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// ---- worker side ----

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
		HeartbeatAge: -1,
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
