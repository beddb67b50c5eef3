package ipcluster

// Events: what the master reports to Config.OnEvent, and the emitter that
// delivers them in order from its own goroutine, off the master's loop.

import (
	"encoding/json"
	"slices"
	"sync"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// Event is something that happened in the cluster; see the Event* types.
type Event interface{ eventName() string }

// EventReady: every slot has a ready worker and the rules are installed.
type EventReady struct {
	Workers int
	Elapsed time.Duration // since the master started
}

// EventWorkerReady: a worker connected, reported ready and now serves Slot.
type EventWorkerReady struct {
	PID, Slot, Generation int
	Ports                 map[Port]uint16 // public port → the worker's port
	Elapsed               time.Duration   // since it was spawned
}

// EventWorkerExited: a worker process ended.
type EventWorkerExited struct {
	PID, Slot, Generation int
	State                 string // what it was: starting, active, retired, stopping, spare or standby
	Status                string // exit status or signal
}

// EventRetired: a worker was retired; its slot now points at Replacement.
type EventRetired struct {
	PID, Slot, Generation, Replacement int
	Cause                              RetireCause
	Reason                             string // Cause with its figures, for humans
	// Elapsed is the time from the decision to retire the worker (the
	// sample that found it over a limit, its request, ...) to the rule
	// write that moved its slot.
	Elapsed time.Duration
	// The worker's figures when it was retired.
	RSSBytes uint64
	Lag      time.Duration
}

// EventHeapSnapshot: a worker's heap snapshots were written
// (Config.HeapProfileDir): Start after its warm-up ("" if it had none),
// End once it had retired and drained or just before the master ended it,
// and Diff, their difference (End minus Start: go tool pprof -top Diff
// lists what grew). Sent after EventRetired, once the end is written; Err
// says what failed, if anything did.
type EventHeapSnapshot struct {
	PID, Slot, Generation int
	Cause                 RetireCause // the worker's retirement
	Start, End, Diff      string
	Err                   error
}

// RetireCause says why a worker was retired.
type RetireCause string

// Retirement causes.
const (
	CauseMemory       RetireCause = "memory"       // RSS over Config.MemoryLimit
	CauseLag          RetireCause = "lag"          // scheduling lag over Config.LagLimit
	CauseUnresponsive RetireCause = "unresponsive" // no heartbeat for Config.PingTimeout
	CauseHealthCheck  RetireCause = "health-check" // Config.HealthCheck failed
	CauseRequested    RetireCause = "requested"    // Worker.RequestRetire, SIGUSR1 or SIGTERM to the worker, or its function returned
	CauseAdopted      RetireCause = "adopted"      // a worker of an earlier master
	CauseDeploy       RetireCause = "deploy"       // a deploy (or a restart) committed: its slot runs the new build
	CauseReplaced     RetireCause = "replaced"     // its slot was given to another worker for any other reason
)

// EventDeploy: a deploy (a new build rolled over the slots, or every worker
// restarted) changed phase.
type EventDeploy struct {
	Outcome DeployOutcome
	// From and To are the builds (Config.Version) replaced and deployed;
	// equal for a restart.
	From, To string
	Reason   string        // why it started, or why it failed or rolled back
	Slots    int           // slots rolled (or to roll, when started)
	Elapsed  time.Duration // since the deploy started
}

// DeployOutcome is a deploy's phase or end.
type DeployOutcome string

// Deploy outcomes.
const (
	DeployStarted    DeployOutcome = proto.PhaseStarted    // new workers are being started; the canary goes first
	DeployCommitted  DeployOutcome = proto.PhaseCommitted  // every slot runs the new build; the old workers are retired
	DeployRolledBack DeployOutcome = proto.PhaseRolledBack // every slot runs the old build again; the new workers are retired
	// DeployFailed: the new master started for a deploy (SIGHUP) exited or
	// did not take over in time; this master carries on.
	DeployFailed DeployOutcome = proto.PhaseFailed
	// DeployHandedOver: this master gave the cluster to a new master (the
	// one started by SIGHUP, or started by hand) and returns from Run.
	DeployHandedOver DeployOutcome = proto.PhaseHandedOver
)

// EventResized: the cluster's slot count changed (a control client asked),
// sent once the rules that route the new slot count are written; Err is set, and To equals From, if a growth was abandoned because its
// new workers kept failing to start.
type EventResized struct {
	From, To int
	Elapsed  time.Duration
	Err      error
}

// EventHandoff: a slot's new worker (To) took the state its slot's
// previous worker (From) wrote with Worker.OnHandoff, or failed to: Err
// says why (it names the Config field to raise for a timeout or a state
// too large), empty on success. Bytes and Elapsed, from the new worker's
// Handoff call to the end of the state, are as the new worker reports
// them. Slot is the new worker's; for a slot a resize split, From served
// the slot it split from. A new worker with no previous worker to take
// state from (a first start, a crash) sends none.
type EventHandoff struct {
	Slot     int
	From, To int // pids
	Bytes    int64
	Elapsed  time.Duration
	Err      string
}

// EventAutoscale: the autoscale policy (Config.Autoscale) resized the
// cluster from From to To workers (Action "grow" or "shrink"), or would
// have and must not (Refused says why: a limit, a deploy or resize under
// way, the cooldown, the memory budget). Conns and CPU are the load that
// drove it: open connections and cores per active worker, at the latest
// sample; Reason says it with the target and the period. A refusal is
// reported once, and again only when its reason changes.
type EventAutoscale struct {
	Action   string
	From, To int
	Reason   string
	Refused  string
	Conns    float64
	CPU      float64
}

// EventUnresponsive: no heartbeat has arrived from a worker for
// Config.PingTimeout. An active worker is then retired; any other is
// killed when silent for twice PingTimeout.
type EventUnresponsive struct {
	PID, Slot, Generation int
	State                 string
	HeartbeatAge          time.Duration
}

// EventRetireHeld: a health policy wanted to retire a worker but
// Config.RetireLimit retirements already happened in the last
// Config.RetireWindow. The master tries again every MonitorInterval; this
// event comes once per worker.
type EventRetireHeld struct {
	PID, Slot, Generation int
	Cause                 RetireCause
	Reason                string
	Limit                 int
	Window                time.Duration
}

// EventMemoryPressure: the workers' summed RSS crossed a watermark of
// Config.MemoryBudget and the master acted: Asked lists the retired
// workers told to finish (low watermark), Killed those killed (high), in
// the order they were chosen. Also sent, with both empty, when a
// watermark is crossed and no retired worker is left to stop.
type EventMemoryPressure struct {
	Watermark     string // "low" or "high"
	UsedBytes     uint64
	BudgetBytes   uint64
	Asked, Killed []int
}

// EventDismissed: the master ended a worker that was not serving a slot:
// told it to finish (Killed false) or killed it (Killed true), for Reason
// (drain deadline, memory budget, unresponsive, ignored a stop request).
type EventDismissed struct {
	PID, Slot, Generation int
	Reason                string
	Killed                bool
}

// EventRulesFailed: the rules could not be written (the previous rules stay
// in force and the master retries after 1s, 2s, 4s, then every 5s; a write
// that takes longer than 10s is abandoned), or the kernel lost them (Err wraps
// ErrRulesLost; the master writes them again at once).
type EventRulesFailed struct{ Err error }

// EventStats: every MonitorInterval, each worker's health as the master
// sees it, sorted by PID.
type EventStats struct {
	At      time.Time
	Workers []WorkerStats
}

// WorkerStats is one worker's health. RSSBytes, PSSBytes and HeartbeatAge
// are measured by the master; the rest is what the worker last reported
// (zero before its first report).
type WorkerStats struct {
	PID, Slot, Generation int
	State                 string // starting, active, retired, stopping, spare or standby (see the README's status)

	// Read by the master from /proc/<pid>: RSS every MonitorInterval, PSS
	// every tenth (0 where the kernel has no smaps_rollup). 0 before the
	// first sample.
	RSSBytes, PSSBytes uint64
	// HeartbeatAge is the time since the worker's last heartbeat arrived,
	// by the master's clock; -1 before the first.
	HeartbeatAge time.Duration

	HeapBytes   uint64 // Go heap in use
	Goroutines  int
	Connections int64  // open connections accepted through Worker.Listener
	Accepted    uint64 // connections accepted since the worker started
	Uptime      time.Duration
	GCCount     uint64        // completed GC cycles
	GCPause     time.Duration // longest stop-the-world pause of the latest GCs
	// Lag is the worker's scheduling lag, smoothed: how late a goroutine
	// runs after it becomes due, as a request would wait for a CPU.
	// LagMax is the largest since the previous heartbeat.
	Lag, LagMax time.Duration
	// SchedP99 is the 99th percentile of the time the worker's
	// goroutines spent runnable before running, over the last heartbeat
	// interval (runtime/metrics /sched/latencies:seconds).
	SchedP99 time.Duration
	// App is the JSON of the worker's Worker.SetStats function, if any.
	App json.RawMessage

	// Ports maps each public port to the worker's own port: where a
	// HealthCheck reaches it. Nil before its hello.
	Ports map[Port]uint16
	// Unresponsive: no heartbeat for Config.PingTimeout.
	Unresponsive bool
}

func sortWorkerStats(ws []WorkerStats) {
	slices.SortFunc(ws, func(a, b WorkerStats) int { return a.PID - b.PID })
}

func (EventReady) eventName() string        { return "ready" }
func (EventWorkerReady) eventName() string  { return "worker-ready" }
func (EventWorkerExited) eventName() string { return "worker-exited" }
func (EventRetired) eventName() string      { return "retired" }
func (EventRulesFailed) eventName() string  { return "rules-failed" }
func (EventStats) eventName() string        { return "stats" }
func (EventUnresponsive) eventName() string { return "unresponsive" }
func (EventRetireHeld) eventName() string   { return "retire-held" }
func (EventMemoryPressure) eventName() string {
	return "memory-pressure"
}
func (EventDismissed) eventName() string { return "dismissed" }
func (EventDeploy) eventName() string    { return "deploy" }
func (EventResized) eventName() string   { return "resized" }
func (EventHeapSnapshot) eventName() string {
	return "heap-snapshot"
}
func (EventHandoff) eventName() string   { return "handoff" }
func (EventAutoscale) eventName() string { return "autoscale" }

// emitter delivers events to Config.OnEvent in order from its own goroutine,
// queueing without bound so the master's loop never waits for the host
// program.
type emitter struct {
	fn func(Event)
	// record, if set, sees every event first, on the sender's goroutine
	// (the loop's): the status page's history.
	record func(Event)
	mu     sync.Mutex
	queue  []Event
	wake   chan struct{}
	done   chan struct{}
}

func newEmitter(fn func(Event)) *emitter {
	e := &emitter{fn: fn, wake: make(chan struct{}, 1), done: make(chan struct{})}
	if fn == nil {
		close(e.done)
		return e
	}
	go e.loop()
	return e
}

func (e *emitter) send(ev Event) {
	if e.record != nil {
		e.record(ev)
	}
	if e.fn == nil {
		return
	}
	e.mu.Lock()
	e.queue = append(e.queue, ev)
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

func (e *emitter) loop() {
	defer close(e.done)
	for range e.wake {
		for {
			e.mu.Lock()
			q := e.queue
			e.queue = nil
			e.mu.Unlock()
			if len(q) == 0 {
				break
			}
			for _, ev := range q {
				e.fn(ev)
			}
		}
	}
}

// close delivers what is queued and waits for the handler to return.
func (e *emitter) close() {
	if e.fn != nil {
		close(e.wake)
	}
	<-e.done
}
