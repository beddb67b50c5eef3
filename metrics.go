//go:build linux

package ipcluster

// The master's Prometheus metrics, served on /metrics (http.go).
//
// Counters and histograms are fed from the events (observer.event, on the
// emitter's goroutine) and from two calls in the loop (spawn, rule
// writes); prometheus types are safe for concurrent use, so no state is
// shared with the loop beyond them. Gauges are read from a status snapshot
// taken for each scrape (statusCollector), and the conntrack table's fill
// from /proc (conntrackCollector).

import (
	"errors"
	"io/fs"
	"log/slog"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/ipcluster/ipcluster/internal/procfs"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// newObserver registers the master's counters and histograms.
func newObserver(log *slog.Logger) *observer {
	o := &observer{log: log, reg: prometheus.NewRegistry()}
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
		o.reg.MustRegister(c)
		return c
	}
	// Label values known in advance are created at zero: a rate() over a
	// series that appears only with its first increment misses it.
	counterVec := func(name, help, label string, values ...string) *prometheus.CounterVec {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, []string{label})
		for _, v := range values {
			c.WithLabelValues(v)
		}
		o.reg.MustRegister(c)
		return c
	}
	histogram := func(name, help string, buckets []float64) prometheus.Histogram {
		h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets})
		o.reg.MustRegister(h)
		return h
	}
	o.spawns = counter("ipcluster_worker_spawns_total", "Worker processes started by this master.")
	o.crashes = counter("ipcluster_worker_crashes_total",
		"Workers that exited while active or starting (a start that failed or timed out counts).")
	o.unresponsive = counter("ipcluster_worker_unresponsive_total", "Workers declared unresponsive: no heartbeat for PingTimeout.")
	o.rulesLost = counter("ipcluster_rules_lost_total", "Times the kernel was found to have lost the cluster's rules.")
	o.exits = counterVec("ipcluster_worker_exits_total", "Worker processes that exited, by the state they were in.", "state",
		"starting", "active", "retired", "stopping", "spare", "standby")
	o.retirements = counterVec("ipcluster_retirements_total", "Active workers retired, by cause.", "cause",
		string(CauseMemory), string(CauseLag), string(CauseUnresponsive), string(CauseHealthCheck),
		string(CauseRequested), string(CauseAdopted), string(CauseReplaced))
	o.retireHolds = counterVec("ipcluster_retire_holds_total",
		"Retirements held back by RetireLimit (once per worker), by cause.", "cause",
		string(CauseMemory), string(CauseLag), string(CauseUnresponsive), string(CauseHealthCheck))
	// Outcomes only: a deploy in progress is ipcluster_deploy_in_progress,
	// and a master that handed the cluster over returns at once.
	o.deploys = counterVec("ipcluster_deploys_total", "Deploys (and restarts) ended, by outcome.", "outcome",
		string(DeployCommitted), string(DeployRolledBack), string(DeployFailed))
	o.ruleWrites = counterVec("ipcluster_rule_writes_total", "Rule writes, by result (ok or error).", "result", "ok", "error")
	o.dismissals = counterVec("ipcluster_dismissals_total",
		"Workers not serving a slot that the master ended, by action (asked to finish, or killed).", "action", "asked", "killed")
	o.handoffs = counterVec("ipcluster_handoffs_total",
		"State handoffs from a slot's old worker to its new one, by outcome (ok, or failed: a timeout, a state too large, the old worker's error).", "outcome", "ok", "failed")
	o.autoscales = counterVec("ipcluster_autoscale_decisions_total",
		"The autoscale policy's decisions (Config.Autoscale), by outcome: grow or shrink carried out, or refused (a limit, a deploy, the cooldown, the memory budget; counted once per reason).",
		"outcome", scaleGrow, scaleShrink, "refused")
	o.memoryPressure = counterVec("ipcluster_memory_pressure_total",
		"MemoryBudget watermarks crossed, by watermark.", "watermark", "low", "high")
	o.workerScrapeErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ipcluster_worker_scrape_errors_total",
		Help: "Fetches of an active worker's own /metrics, for a scrape of the master's, that failed or timed out, by slot."}, []string{"slot"})
	o.reg.MustRegister(o.workerScrapeErrors)
	o.ruleWriteSeconds = histogram("ipcluster_rule_write_duration_seconds", "Time to write the cluster's rules to the kernel.",
		prometheus.ExponentialBuckets(0.0005, 2, 14)) // 0.5ms .. 4s
	o.readySeconds = histogram("ipcluster_worker_ready_duration_seconds",
		"Time from a worker's spawn to serving a slot (for a spare, to being given one).",
		prometheus.ExponentialBuckets(0.01, 2, 12)) // 10ms .. 20s
	o.retireSeconds = histogram("ipcluster_retirement_duration_seconds",
		"Time from the decision to retire a worker to the rule write that moved its slot.",
		prometheus.ExponentialBuckets(0.01, 2, 14)) // 10ms .. 80s
	o.backend = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "ipcluster_rule_backend_info",
		Help: "1 for the rule backend in force (backend) and Config.Backend as set (config: auto, nftables or iptables)."},
		[]string{"backend", "config"})
	o.reg.MustRegister(o.backend)
	o.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		conntrackCollector{dir: procfs.ConntrackDir, log: log})
	return o
}

// ruleBackend records the rule backend in force.
func (o *observer) ruleBackend(c backendChoice) {
	if o != nil {
		o.backend.Reset()
		o.backend.WithLabelValues(string(c.name), c.config).Set(1)
	}
}

// spawned counts a worker process started.
func (o *observer) spawned() {
	if o != nil {
		o.spawns.Inc()
	}
}

// ruleWrite records a rule write's duration and result.
func (o *observer) ruleWrite(d time.Duration, err error) {
	if o == nil {
		return
	}
	o.ruleWriteSeconds.Observe(d.Seconds())
	result := "ok"
	if err != nil {
		result = "error"
	}
	o.ruleWrites.WithLabelValues(result).Inc()
}

// observe returns an OnEvent function that counts every event, then passes
// it on to fn (which may be nil: the metrics must not depend on the host
// program asking for events).
func (o *observer) observe(fn func(Event)) func(Event) {
	if o == nil {
		return fn
	}
	return func(ev Event) {
		o.event(ev)
		if fn != nil {
			fn(ev)
		}
	}
}

func (o *observer) event(ev Event) {
	switch ev := ev.(type) {
	case EventWorkerReady:
		o.readySeconds.Observe(ev.Elapsed.Seconds())
	case EventWorkerExited:
		o.exits.WithLabelValues(ev.State).Inc()
		if ev.State == stateActive.String() || ev.State == stateStarting.String() {
			o.crashes.Inc()
		}
	case EventRetired:
		o.retirements.WithLabelValues(string(ev.Cause)).Inc()
		o.retireSeconds.Observe(ev.Elapsed.Seconds())
	case EventRetireHeld:
		o.retireHolds.WithLabelValues(string(ev.Cause)).Inc()
	case EventDeploy:
		switch ev.Outcome {
		case DeployCommitted, DeployRolledBack, DeployFailed:
			o.deploys.WithLabelValues(string(ev.Outcome)).Inc()
		}
	case EventRulesFailed:
		// Failed writes are counted where they happen (ruleWrite).
		if errors.Is(ev.Err, ErrRulesLost) {
			o.rulesLost.Inc()
		}
	case EventUnresponsive:
		o.unresponsive.Inc()
	case EventDismissed:
		action := "asked"
		if ev.Killed {
			action = "killed"
		}
		o.dismissals.WithLabelValues(action).Inc()
	case EventMemoryPressure:
		o.memoryPressure.WithLabelValues(ev.Watermark).Inc()
	case EventAutoscale:
		outcome := ev.Action
		if ev.Refused != "" {
			outcome = "refused"
		}
		o.autoscales.WithLabelValues(outcome).Inc()
	case EventHandoff:
		outcome := "ok"
		if ev.Err != "" {
			outcome = "failed"
		}
		o.handoffs.WithLabelValues(outcome).Inc()
	}
}

// Descriptions of the metrics read from a status snapshot.
var (
	slotLabels   = []string{"slot"}
	workerLabels = []string{"slot", "state"}

	descReady      = prometheus.NewDesc("ipcluster_ready", "1 when the cluster is ready, as /readyz says: every slot has an active worker, the rules are installed, and the master is not stopping.", nil, nil)
	descStopping   = prometheus.NewDesc("ipcluster_stopping", "1 while the master stops gracefully.", nil, nil)
	descDrained    = prometheus.NewDesc("ipcluster_drained", "1 while an operator has drained the host (ipclusterctl drain).", nil, nil)
	descAnnounced  = prometheus.NewDesc("ipcluster_bgp_announced", "1 while the master announces the service addresses over BGP (Config.BGP).", nil, nil)
	descBGPPeer    = prometheus.NewDesc("ipcluster_bgp_session_established", "1 for each BGP peer whose session is established, 0 for the others.", []string{"peer"}, nil)
	descSlots      = prometheus.NewDesc("ipcluster_slots", "Number of slots (Workers, or the size after a resize).", nil, nil)
	descWorkers    = prometheus.NewDesc("ipcluster_workers", "Worker processes, by state.", []string{"state"}, nil)
	descGeneration = prometheus.NewDesc("ipcluster_master_generation", "This master's generation.", nil, nil)
	descBuild      = prometheus.NewDesc("ipcluster_build_info", "The build (Config.Version) new workers are spawned from.", []string{"build"}, nil)
	descDeploying  = prometheus.NewDesc("ipcluster_deploy_in_progress", "1 while a deploy (or restart) rolls the slots.", nil, nil)

	descSlotUp          = prometheus.NewDesc("ipcluster_slot_up", "1 when the slot has an active worker.", slotLabels, nil)
	descSlotGeneration  = prometheus.NewDesc("ipcluster_slot_generation", "Generation of the slot's active worker.", slotLabels, nil)
	descSlotRSS         = prometheus.NewDesc("ipcluster_slot_rss_bytes", "RSS of the slot's active worker.", slotLabels, nil)
	descSlotLag         = prometheus.NewDesc("ipcluster_slot_lag_seconds", "Smoothed scheduling lag of the slot's active worker.", slotLabels, nil)
	descSlotConnections = prometheus.NewDesc("ipcluster_slot_connections",
		"Open connections of the slot's workers: its active worker and those still draining from it.", slotLabels, nil)

	descWorkerInfo = prometheus.NewDesc("ipcluster_worker_info", "1 for each worker process, with what identifies it.",
		[]string{"slot", "state", "pid", "generation", "build"}, nil)
	descWorkerStart        = prometheus.NewDesc("ipcluster_worker_start_time_seconds", "When the worker process started (read from /proc for a worker adopted from an earlier master), in seconds since the Unix epoch; the earliest of several.", workerLabels, nil)
	descWorkerRSS          = prometheus.NewDesc("ipcluster_worker_rss_bytes", "Worker RSS, read by the master from /proc.", workerLabels, nil)
	descWorkerPSS          = prometheus.NewDesc("ipcluster_worker_pss_bytes", "Worker PSS, read by the master from /proc (0 before the first read).", workerLabels, nil)
	descWorkerHeartbeatAge = prometheus.NewDesc("ipcluster_worker_heartbeat_age_seconds", "Time since the worker's last heartbeat arrived; the oldest of several.", workerLabels, nil)
	descWorkerLag          = prometheus.NewDesc("ipcluster_worker_lag_seconds", "Worker's smoothed scheduling lag; the largest of several.", workerLabels, nil)
	descWorkerSchedP99     = prometheus.NewDesc("ipcluster_worker_sched_latency_p99_seconds", "p99 of the worker's goroutine scheduling latency over its last heartbeat interval; the largest of several.", workerLabels, nil)
	descWorkerConnections  = prometheus.NewDesc("ipcluster_worker_connections", "Worker's open connections.", workerLabels, nil)
	descWorkerAccepted     = prometheus.NewDesc("ipcluster_worker_accepted_connections_total", "Connections the worker accepted since it started.", workerLabels, nil)
	descWorkerHeap         = prometheus.NewDesc("ipcluster_worker_heap_bytes", "Worker's Go heap in use.", workerLabels, nil)
	descWorkerGoroutines   = prometheus.NewDesc("ipcluster_worker_goroutines", "Worker's goroutines.", workerLabels, nil)
)

// workerStates lists every state, so ipcluster_workers has a zero series
// for each rather than gaps.
var workerStates = []procState{stateStarting, stateActive, stateRetired, stateStopping, stateSpare, stateStandby}

// workerKey labels the per-worker series: slot and state, not pid, so a
// worker crashing in a loop does not make a dozen new series each time;
// the pid (with generation and build) is in the one ipcluster_worker_info
// series of each worker. A spare has no slot: "spare". The series stay
// bounded by slots × states, which is why workers sharing a key (the
// retired workers of a slot still draining, say) share the series: their
// sizes and counts add up, lag and heartbeat age take the worst, the
// start time the earliest.
type workerKey struct{ slot, state string }

// workerSum is the per-worker figures of the workers of one key.
type workerSum struct {
	start, beatAge, lag, schedP99 float64
	rss, pss, heap, accepted      uint64
	conns                         int64
	goroutines                    int
	beats                         bool // any of them has sent a heartbeat
}

func slotLabel(slot int) string {
	if slot < 0 {
		return "spare"
	}
	return strconv.Itoa(slot)
}

// statusCollector turns one status snapshot into const metrics.
type statusCollector struct{ st *proto.Status }

func (c statusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descReady, descStopping, descDrained, descAnnounced, descBGPPeer, descSlots, descWorkers, descGeneration, descBuild, descDeploying,
		descSlotUp, descSlotGeneration, descSlotRSS, descSlotLag, descSlotConnections,
		descWorkerInfo, descWorkerStart, descWorkerRSS, descWorkerPSS, descWorkerHeartbeatAge,
		descWorkerLag, descWorkerSchedP99, descWorkerConnections, descWorkerAccepted, descWorkerHeap, descWorkerGoroutines} {
		ch <- d
	}
}

func (c statusCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.st
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gauge(descReady, boolValue(st.Ready))
	gauge(descStopping, boolValue(st.Stopping))
	gauge(descDrained, boolValue(st.Drained))
	if b := st.BGP; b != nil {
		gauge(descAnnounced, boolValue(b.Announced))
		for _, p := range b.Peers {
			gauge(descBGPPeer, boolValue(p.State == "established"), p.Addr)
		}
	}
	gauge(descSlots, float64(len(st.Slots)))
	gauge(descGeneration, float64(st.Generation))
	gauge(descBuild, 1, st.Build)
	gauge(descDeploying, boolValue(st.DeployPhase == string(DeployStarted)))
	byState := map[string]int{}
	slotConns := make([]int64, len(st.Slots))
	byPID := map[int]*proto.WorkerStatus{}
	sums := map[workerKey]*workerSum{}
	for i := range st.Workers {
		w := &st.Workers[i]
		byPID[w.PID] = w
		byState[w.State]++
		k := workerKey{slotLabel(w.Slot), w.State}
		gauge(descWorkerInfo, 1, k.slot, k.state, strconv.Itoa(w.PID), strconv.Itoa(w.Generation), w.Build)
		sum := sums[k]
		if sum == nil {
			sum = &workerSum{start: w.StartTime}
			sums[k] = sum
		}
		sum.start = min(sum.start, w.StartTime)
		sum.rss += w.RSSBytes
		sum.pss += w.PSSBytes
		if s := w.Stats; s != nil {
			sum.beats = true
			sum.beatAge = max(sum.beatAge, w.HeartbeatAgeSec)
			sum.lag = max(sum.lag, s.LagSec)
			sum.schedP99 = max(sum.schedP99, s.SchedP99Sec)
			sum.conns += s.Connections
			sum.accepted += s.Accepted
			sum.heap += s.HeapBytes
			sum.goroutines += s.Goroutines
			if w.Slot >= 0 && w.Slot < len(slotConns) {
				slotConns[w.Slot] += s.Connections
			}
		}
	}
	for k, sum := range sums {
		gauge(descWorkerStart, sum.start, k.slot, k.state)
		gauge(descWorkerRSS, float64(sum.rss), k.slot, k.state)
		gauge(descWorkerPSS, float64(sum.pss), k.slot, k.state)
		if sum.beats {
			gauge(descWorkerHeartbeatAge, sum.beatAge, k.slot, k.state)
			gauge(descWorkerLag, sum.lag, k.slot, k.state)
			gauge(descWorkerSchedP99, sum.schedP99, k.slot, k.state)
			gauge(descWorkerConnections, float64(sum.conns), k.slot, k.state)
			ch <- prometheus.MustNewConstMetric(descWorkerAccepted, prometheus.CounterValue, float64(sum.accepted), k.slot, k.state)
			gauge(descWorkerHeap, float64(sum.heap), k.slot, k.state)
			gauge(descWorkerGoroutines, float64(sum.goroutines), k.slot, k.state)
		}
	}
	for _, s := range workerStates {
		gauge(descWorkers, float64(byState[s.String()]), s.String())
	}
	for _, s := range st.Slots {
		slot := strconv.Itoa(s.Slot)
		gauge(descSlotUp, boolValue(s.Active != 0), slot)
		gauge(descSlotConnections, float64(slotConns[s.Slot]), slot)
		if w := byPID[s.Active]; w != nil {
			gauge(descSlotGeneration, float64(w.Generation), slot)
			gauge(descSlotRSS, float64(w.RSSBytes), slot)
			if w.Stats != nil {
				gauge(descSlotLag, w.Stats.LagSec, slot)
			}
		}
	}
}

// conntrackCollector reads the conntrack table's fill at each scrape,
// from the master's network namespace, which is the cluster's: a full
// table drops every new connection, whatever the workers' health.
// Without the nf_conntrack module (no nat rule was ever written on this
// host) there is no table and no series.
type conntrackCollector struct {
	dir string
	log *slog.Logger
}

var (
	descConntrackEntries = prometheus.NewDesc("ipcluster_nf_conntrack_entries",
		"Entries in the conntrack table of the cluster's network namespace (nf_conntrack_count).", nil, nil)
	descConntrackLimit = prometheus.NewDesc("ipcluster_nf_conntrack_entries_limit",
		"Size of the conntrack table (nf_conntrack_max): new connections are dropped once the entries reach it.", nil, nil)
)

func (c conntrackCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descConntrackEntries
	ch <- descConntrackLimit
}

func (c conntrackCollector) Collect(ch chan<- prometheus.Metric) {
	n, limit, err := procfs.Conntrack(c.dir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			c.log.Debug("reading the conntrack table's size", "err", err)
		}
		return
	}
	ch <- prometheus.MustNewConstMetric(descConntrackEntries, prometheus.GaugeValue, float64(n))
	ch <- prometheus.MustNewConstMetric(descConntrackLimit, prometheus.GaugeValue, float64(limit))
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
