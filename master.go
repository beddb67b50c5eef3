//go:build linux

package ipcluster

// The master's state machine. One goroutine, run(), owns every field of
// master; the helpers (acceptor, one reader per peer, one waiter per worker
// process, signals) only send it events. A newcomer reading the lifecycle
// should start at handle(). A worker's hello and messages are taken in
// control.go (onHello, onMsg), the run directory in rundir.go.
//
// A worker goes through these states:
//
//	starting ──ready──▶ active ──replacement ready──▶ retired ──drained──▶ (exit)
//	    │    ╲              │                            │
//	    │     ╲ready        │                            └─drain deadline, memory
//	    │      ▼            │                              budget, unresponsive:
//	    │    spare ──given a slot (crash, retirement)      told to finish, killed
//	    │                   │
//	    └──exit/timeout──▶ respawn (with backoff)     active ──exit──▶ its slot to a
//	                                                   spare, or respawn at once
//
// where "replacement ready" goes through replacing when the retirement is
// decided before the replacement exists (a policy, a restart, a rolled
// back deploy: retire):
//
//	active ──retire──▶ replacing ──replacement ready──▶ retired
//	                       └──exit──▶ its slot to a spare, or respawn
//
// A replacing worker still serves its slot, and is reported as "active"
// (status, events, metrics, logs: procState.String). A deploy's old worker
// goes to standby instead of retired, until the deploy commits (retired)
// or rolls back (active again). When the cluster stops, every worker
// becomes stopping. The health policies that retire active workers and end
// retired ones are in monitor.go.
//
// The master itself is in one phase at a time (masterPhase, m.phase):
//
//	starting ──every slot served at once, rules written──▶ serving
//	    │                                                    │
//	    └──stop: signal, ctx, request, failed install────────┴──▶ stopping ──last worker gone──▶ (run returns)
//	starting or serving ──handed over to a new master──▶ handed over ──▶ (run returns)
//
// Starting ends with EventReady and systemd's READY; restarts (SIGUSR2)
// and resizes are refused until then. Stopping and handed over are final:
// stop does nothing after a handover. What runs alongside a phase is not
// one, and keeps its own state: an adoption (adoptRoutes; in start-up,
// but an adopted worker that dies may be replaced and the cluster served
// before the adoption's deadline, and a stop does not end it), a deploy
// (dep, successor), a resize (resizing, resized). tookOver says how this
// master got the cluster (from a running master), not where it is;
// sampling and spareRetry say a PSS sample or a spare restart is in
// flight.
//
// "Ready" is the worker's word: with Config.WorkerReady, the application's
// (Worker.Ready), otherwise the library's once it listens. A worker that
// exits, or whose function returns, within Config.StableAfter of becoming
// ready has failed to start, like one that never got there: its slot's
// replacement then waits out the backoff (respawnLater), spares included.
// Only a worker that served StableAfter clears its slot's failures, so a
// long-lived worker's crash is still replaced at once.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ipcluster/ipcluster/internal/bgpreg"
	"github.com/ipcluster/ipcluster/internal/heapsnap"
	"github.com/ipcluster/ipcluster/internal/procfs"
	"github.com/ipcluster/ipcluster/internal/proto"
)

type procState int

const (
	stateStarting  procState = iota // spawned, not yet ready
	stateActive                     // serves its slot
	stateRetired                    // replaced; drains its connections
	stateStopping                   // told to die because the cluster stops
	stateSpare                      // ready, in no slot (Config.Spares)
	stateStandby                    // replaced by a deploy's new worker; kept listening until the deploy commits or rolls back
	stateReplacing                  // active, its retirement decided (retireCause); serves until its slot moves
)

// String is the state's reported name: the status, events, metrics labels
// and logs. A replacing worker is reported "active": it serves its slot.
func (s procState) String() string {
	return [...]string{"starting", "active", "retired", "stopping", "spare", "standby", "active"}[s]
}

// serving reports whether a worker in state s serves its slot: active, or
// active and being replaced.
func (s procState) serving() bool { return s == stateActive || s == stateReplacing }

// masterPhase is where the master is in its life (drawn in the header).
type masterPhase int

const (
	phaseStarting   masterPhase = iota // until every slot has been served at once
	phaseServing                       // start-up over: EventReady sent, systemd told
	phaseStopping                      // stop: workers told to die; run returns once they are gone
	phaseHandedOver                    // a new master has the cluster; run returns
)

func (ph masterPhase) String() string {
	return [...]string{"starting", "serving", "stopping", "handed over"}[ph]
}

// spareSlot is the slot of a spare: a worker spawned for no slot.
const spareSlot = -1

// proc is one worker process.
type proc struct {
	pid, slot, gen int
	build          string // the code it runs (Config.Version of its master)
	state          procState
	spawned        time.Time
	started        time.Time // the process's start, uptime's origin; read from /proc for an adopted worker
	process        process   // spawned or adopted (process.go); pid is its pid
	peer           *peer     // nil until its hello
	ports          slotTarget
	socks          *sockSet  // the master's copy of its sockets (sockets.go); nil once retired, and for a spare until assigned
	ops            string    // its operator socket's path (ops.go); "" if it has none
	heap           heapState // its heap snapshots (heap.go)
	mem            procMem   // as of the last monitor sample
	// beat is the last heartbeat while connected; after a disconnect,
	// the last one received.
	beat  beatReport
	timer *time.Timer // connect timeout while starting
	// retirePending: replaced in its slot; told it is retired once the
	// rules that point the slot away from it are written.
	retirePending bool
	retireCause   RetireCause // set when its retirement is decided
	retireReason  string
	retireAt      time.Time // when its retirement was decided
	retiredAt     time.Time // when the rules moved its slot away

	// Health policy state (monitor.go).
	activeSince  time.Time // when it began serving its slot (a spare: became one)
	settled      bool      // served StableAfter since activeSince; its slot's failures were cleared
	unresponsive bool      // no heartbeat for PingTimeout
	held         bool      // a retirement held back by RetireLimit was reported
	dismissedAt  time.Time // told to finish while not serving a slot
	killed       bool      // SIGKILLed by a policy; its memory is as good as freed
	checking     bool      // a HealthCheck call is in flight
	healthFails  int       // consecutive HealthCheck failures
	verified     bool      // passed its readiness check (deploys with a HealthCheck)

	// State handoff (handoff.go): whether its hello said it knows
	// handoff-send; the worker it replaced in its slot (nil: none, or a
	// crash's; never a chain: activate clears the old one's own), and
	// the slot a resize split its slot from (-1: none); the handoff set
	// up for it.
	handoffOK   bool
	predecessor *proc
	splitFrom   int
	handoff     *handoffRecord
}

func (p *proc) logAttrs() []any {
	return []any{"pid", p.pid, "slot", p.slot, "generation", p.gen}
}

// event is what helpers send the loop (m.send); handle takes each type.
// Sealed: only this package's ev* types are events.
type event interface{ isEvent() }

func (evExit) isEvent()             {}
func (evHello) isEvent()            {}
func (evMsg) isEvent()              {}
func (evClosed) isEvent()           {}
func (evConnectTimeout) isEvent()   {}
func (evRespawn) isEvent()          {}
func (evRetryRules) isEvent()       {}
func (evHealth) isEvent()           {}
func (evInstallDeadline) isEvent()  {}
func (evStopTimeout) isEvent()      {}
func (evWithdrawn) isEvent()        {}
func (evPSS) isEvent()              {}
func (evSuccessorExit) isEvent()    {}
func (evSuccessorTimeout) isEvent() {}
func (evAdoptDeadline) isEvent()    {}
func (evSnapshot) isEvent()         {}

// Events sent to the loop.
type (
	evExit struct {
		p      *proc
		status string
	}
	evHello struct {
		peer  *peer
		hello *proto.Hello
		fds   []int // its sockets (SCM_RIGHTS); onHello keeps or closes them
	}
	evMsg struct {
		peer *peer
		msg  proto.Msg
	}
	evClosed struct {
		peer *peer
		err  error
	}
	evConnectTimeout struct{ p *proc }
	evRespawn        struct{ slot int }
	evRetryRules     struct{}
	evHealth         struct {
		p   *proc
		err error
	}
	evInstallDeadline struct{} // ConnectTimeout after start: install with the slots that are ready
	evStopTimeout     struct{}
	evWithdrawn       struct{} // BGPConfig.WithdrawDelay after a stop withdrew: go on stopping
)

type master struct {
	cfg   *Config
	rules *ruleSync // the rules and their backend (rules.go)
	log   *slog.Logger
	emit  *emitter
	sd    *notifier // systemd (systemd.go)

	dir, sock string
	lock      *os.File
	ln        *net.UnixListener
	exe       string
	args      []string
	env       []string // the master's environment without worker variables
	uid       int
	worker    *workerCred // Config.WorkerUser; nil: workers run as the master's user
	spawner   *spawner    // starts every worker, from a thread without capabilities
	gen       int
	opsSeq    int // the last operator socket's number (ops.go)
	started   time.Time

	events chan event
	done   chan struct{} // closed when run returns: late events are dropped

	slots    []*proc       // the active worker of each slot, nil if none
	pending  []*proc       // the worker starting for each slot, nil if none
	spares   []*proc       // ready spares, oldest first
	failures map[int]int   // consecutive failed starts per slot (spareSlot for spares), for backoff
	procs    map[int]*proc // every worker process, by pid
	peers    map[*peer]bool

	// Sockets (sockets.go): held, the sockets of each slot whose serving
	// worker exited, for its next worker; unrouted, sockets to close once
	// the next rule write points away from them.
	held     map[int]*sockSet
	unrouted []*sockSet

	// respawnAt: the slots waiting out their backoff (respawnLater), and
	// until when; no spare is given to them nor worker spawned meanwhile.
	respawnAt map[int]time.Time

	// Health policies (monitor.go): when the recent policy retirements
	// happened, for RetireLimit; the memory watermark last crossed.
	retireTimes []time.Time
	spareRetry  bool // a spare restart is scheduled (respawnLater)
	memLevel    int  // 0 below the low watermark, 1 above it, 2 above the high one

	// Deploys and takeover (deploy.go).
	build       string   // this master's own build
	target      *codeGen // the code new workers are spawned from
	dep         *deployState
	lastDeploy  string        // the last deploy's phase, for the status
	deployPhase DeployOutcome // and its phase
	successor   *exec.Cmd     // the new master started on SIGHUP
	tookOver    bool          // openRunDir took the cluster over from a running master
	// adoptRoutes: the routes a previous master left, while its workers
	// are waited for (startAdoption); nil when no adoption is under way.
	adoptRoutes []slotTarget
	resizing    *resizeState // a growth waiting for its new workers (resize.go)
	resized     *resizeState // a resize whose new routes are still to be written: announced then

	obs *observer // HTTP endpoints and metrics (http.go, metrics.go); nil without Config.HTTPAddr

	scale *scaler // the autoscale policy (scale.go); nil without Config.Autoscale

	// The front tier (bgp.go): the BGP speaker, nil without Config.BGP;
	// drained, an operator's drain (ipclusterctl drain), which makes the
	// master not ready; stopPending, why a graceful stop waits out
	// BGPConfig.WithdrawDelay after withdrawing ("" if none does).
	bgp         bgpreg.Speaker
	bgpOn       bool      // the service addresses are announced
	bgpSince    time.Time // when bgpOn last changed
	drained     bool
	stopPending string

	// Heap snapshots (heap.go): the store, nil without
	// Config.HeapProfileDir; the latest pairs written, for the status.
	heaps     *heapsnap.Store
	heapSnaps []proto.HeapSnapshot
	// hist is the status page's history (history.go).
	hist *history

	backend backendChoice // the rule backend rules is, and why (nftables.go)
	steer   *bpfWriter    // the bpf backend inside rules, or nil (bpf.go)

	// Monitor sampling (monitor.go): the loop's /proc reader, and PSS
	// requests to the PSS sampler goroutine, one at a time.
	memSampler  procfs.Sampler
	pssReqs     chan []int
	sampling    bool
	sampleCount int

	phase   masterPhase // starting until every slot has been served at once; notReady says if the cluster is ready now
	stopErr error
}

func runMaster(ctx context.Context, cfg *Config) error {
	m, err := newMaster(ctx, cfg)
	if err != nil {
		return err
	}
	return m.run(ctx)
}

// newState is the master's state before anything is touched: every map
// and channel the loop needs, for cfg (build: this master's own).
// newMaster fills in the rest from the system (the rule sync, the spawner);
// tests that run the loop's handlers on a master of their own start from
// it too, with a fake rule sync (rules_fake_test.go), and give their procs
// a fakeProcess (process_test.go).
func newState(cfg *Config, build string) *master {
	m := &master{
		cfg:      cfg,
		log:      cfg.Logger.With("cluster", cfg.Name),
		uid:      os.Geteuid(),
		gen:      1,
		started:  time.Now(),
		events:   make(chan event, 64),
		pssReqs:  make(chan []int, 1),
		done:     make(chan struct{}),
		slots:    make([]*proc, cfg.Workers),
		pending:  make([]*proc, cfg.Workers),
		failures: map[int]int{},
		hist:     newHistory(),
		procs:    map[int]*proc{},
		peers:    map[*peer]bool{},
		held:     map[int]*sockSet{},
		dir:      filepath.Join(cfg.RunDir, cfg.Name),

		respawnAt: map[int]time.Time{},
		build:     build,
		target:    &codeGen{build: build},
	}
	m.sock = ControlSocket(cfg.RunDir, cfg.Name)
	return m
}

// newMaster checks everything that can be checked before the system is
// touched, then takes the cluster's lock and socket. On error nothing is
// left behind.
func newMaster(ctx context.Context, cfg *Config) (*master, error) {
	st, err := procfs.ReadStatus(0)
	if err != nil {
		return nil, fmt.Errorf("read own capabilities: %w", err)
	}
	// The bpf backend needs CAP_BPF instead (its check says so): auto
	// takes it where it works.
	bpf := cfg.Backend == BackendBPF || cfg.Backend == BackendAuto && bpfCheck() == nil
	if !st.HasCap(procfs.CapNetAdmin) && !bpf {
		return nil, fmt.Errorf("%w: the master needs CAP_NET_ADMIN to write nat rules (or CAP_BPF, for the bpf backend); run it as root, or grant it with "+
			"setcap cap_net_admin+ep <binary> or AmbientCapabilities=CAP_NET_ADMIN in its systemd unit; "+
			"to develop without root, run it in development mode (%s=1 or Config.Dev: one worker, no rules)", ErrNoPrivilege, EnvDev)
	}
	var wc *workerCred
	if cfg.WorkerUser != "" {
		if wc, err = lookupWorkerCred(cfg); err != nil {
			return nil, err
		}
		if err := checkSpawnAs(st, wc, "/proc/self/exe"); err != nil {
			return nil, err
		}
	} else {
		self, err := selfCred()
		if err != nil {
			return nil, err
		}
		if err := self.checkExec("/proc/self/exe"); err != nil {
			return nil, err
		}
	}
	if cfg.MemoryBudget == 0 {
		cfg.MemoryBudget = defaultMemoryBudget()
	}
	heaps, err := openHeapStore(cfg)
	if err != nil {
		return nil, err
	}
	build := selfBuild(cfg)
	if n := resizedWorkers(cfg); n > 0 && n != cfg.Workers {
		cfg.Logger.Info("the cluster was resized while running; keeping its size", "cluster", cfg.Name, "workers", n, "config", cfg.Workers)
		cfg.Workers = n
	}
	rt := cfg.routing()
	// Before the backend's probe writes its test table: a refused start
	// leaves nothing behind.
	if err := checkRoutesFree(ctx, rt, cfg.Logger); err != nil {
		return nil, err
	}
	backendRules, backend, err := newRuleBackend(cfg, rt, cfg.Logger)
	if err != nil {
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable to spawn workers: %w", err)
	}
	// Workers hold no capability: they start from a thread that has none
	// (spawner.go).
	sp, err := newSpawner(wc != nil)
	if err != nil {
		return nil, err
	}
	m := newState(cfg, build)
	m.spawner, m.backend, m.heaps = sp, backend, heaps
	m.exe, m.args, m.worker = exe, os.Args[1:], wc
	// The emitter is made by run, and the observer below: the rule sync
	// reaches them when it writes, not now.
	m.rules = newRuleSync(rt, backendRules, m.log, func(ev Event) { m.emit.send(ev) }, m.send)
	inner := backendRules
	if c, ok := inner.(*clearsOther); ok {
		inner = c.unwrap()
	}
	if w, ok := inner.(*bpfWriter); ok {
		m.steer = w
		w.resolve, w.routesPath = m.findSockets, filepath.Join(m.dir, "routes")
		m.rules.written = w.record
		m.rules.conntrack = noConntrack // no NAT: conntrack pins nothing
	}
	m.rules.observe = func(d time.Duration, err error) {
		m.obs.ruleWrite(d, err)
		if err == nil {
			m.hist.noteRules(time.Now())
		}
	}
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case EnvWorker, EnvSlot, EnvGeneration, EnvSocket, EnvBuild, EnvWorkers, EnvSockets, EnvOperator:
		case envNotifySocket, envWatchdogUSec, envWatchdogPID: // the master's alone (systemd.go)
		default:
			m.env = append(m.env, kv)
		}
	}
	if err := m.openRunDir(); err != nil {
		sp.close()
		return nil, err
	}
	if m.steer != nil && !m.tookOver {
		if _, err := os.Stat(m.steer.routesPath); errors.Is(err, os.ErrNotExist) {
			if err := checkPortsUnbound(cfg, rt); err != nil {
				m.releaseRunDir()
				sp.close()
				return nil, err
			}
		}
	}
	if m.obs, err = listenHTTP(cfg, m.log, m.tookOver); err != nil {
		m.releaseRunDir()
		sp.close()
		return nil, err
	}
	return m, nil
}

func (m *master) run(ctx context.Context) error {
	defer m.spawner.close()
	m.emit = newEmitter(m.obs.observe(m.cfg.OnEvent))
	m.emit.record = func(ev Event) { m.hist.note(time.Now(), ev) }
	defer m.emit.close()
	m.sd = newNotifier(m.log)
	defer m.sd.close()
	if err := m.startBGP(); err != nil {
		return err
	}
	if m.bgp != nil {
		defer m.bgp.Stop() // on every way out; a no-op after Stop or Abandon
	}
	defer m.obs.serve(m)() // shut down after close(m.done): waiting handlers give up at once
	defer close(m.done)
	m.log.Info("master starting", "pid", os.Getpid(), "workers", m.cfg.Workers,
		"ports", m.rules.rt.ports, "families", len(m.rules.rt.families), "socket", m.sock,
		"backend", m.backend.name, "backend_reason", m.backend.reason)
	m.obs.ruleBackend(m.backend)

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGHUP)
	defer signal.Stop(sigs)

	go m.accept()
	m.startAdoption(ctx)
	for slot := range m.slots {
		if !m.adopting() || m.adoptRoutes[slot] == nil {
			m.spawn(slot)
		}
	}
	m.fillSpares()
	// Until every slot is ready (or the connect timeout passes) the rules of
	// a crashed predecessor, if any, keep serving: install once, at the end.
	// Not ReadyTimeout, with WorkerReady: the slots whose workers are
	// ready then are served, the others as theirs get ready.
	firstInstall := time.AfterFunc(m.cfg.ConnectTimeout, func() { m.send(evInstallDeadline{}) })
	defer firstInstall.Stop()

	checkRules := time.NewTicker(ruleCheckInterval)
	defer checkRules.Stop()

	go m.pssSampler(m.pssReqs)
	defer close(m.pssReqs)
	monitor := time.NewTicker(m.cfg.MonitorInterval)
	defer monitor.Stop()
	var healthC <-chan time.Time
	if m.cfg.HealthCheck != nil {
		health := time.NewTicker(m.cfg.HealthCheckInterval)
		defer health.Stop()
		healthC = health.C
	}

	watchdog, stopWatchdog := m.sd.watchdogTicker()
	defer stopWatchdog()

	ctxDone := ctx.Done()
	for {
		select {
		case <-watchdog:
			m.sd.ping()
		case <-checkRules.C:
			if m.phase != phaseStopping {
				m.rules.check(ctx)
			}
		case <-monitor.C:
			m.sample()
			m.sampleLoad(time.Now())
			m.sampleHistory(time.Now())
			m.noteSettled(time.Now())
			m.takeHeapStarts(time.Now())
		case <-healthC:
			m.startHealthChecks()
		case <-ctxDone:
			ctxDone = nil
			m.stop("context done")
		case sig := <-sigs:
			switch sig {
			case syscall.SIGUSR1:
				m.killRetired()
			case syscall.SIGUSR2:
				m.restartAll("SIGUSR2: restart every worker")
			case syscall.SIGHUP:
				m.startSuccessor()
			default:
				if m.phase == phaseStopping {
					m.log.Warn("second stop signal: killing workers now", "signal", sig.String())
					m.killAll()
				} else {
					m.stop(sig.String())
				}
			}
		case ev := <-m.events:
			m.handle(ev)
			// Coalesce a burst (parallel start, several exits) into one
			// rule write.
			for drained := false; !drained; {
				select {
				case ev := <-m.events:
					m.handle(ev)
				default:
					drained = true
				}
			}
		}
		if m.phase == phaseHandedOver {
			m.letGo()
			return nil
		}
		m.progressDeploy(time.Now())
		m.progressResize()
		m.syncRules(ctx)
		m.rules.cleanConntrack()
		m.syncBGP()
		if m.phase == phaseStopping && len(m.procs) == 0 {
			if m.bgp != nil {
				m.bgp.Stop()
			}
			m.removeRules()
			m.removeOpsDir()
			m.closeRunDir()
			m.log.Info("master stopped")
			return m.stopErr
		}
	}
}

// send is how helper goroutines talk to the loop. Once the loop has
// returned, events are dropped rather than left blocking their goroutine.
func (m *master) send(ev event) {
	select {
	case m.events <- ev:
	case <-m.done:
	}
}

// handle takes one event. An event it does not know is a programming
// error (a new ev* type without its case): it panics, naming the type.
func (m *master) handle(ev event) {
	switch ev := ev.(type) {
	case evExit:
		m.onExit(ev.p, ev.status)
	case evHello:
		m.onHello(ev.peer, ev.hello, ev.fds)
	case evMsg:
		m.onMsg(ev.peer, ev.msg)
	case evClosed:
		m.onClosed(ev.peer, ev.err)
	case evConnectTimeout:
		p := ev.p
		if m.procs[p.pid] == p && p.state == stateStarting {
			m.log.Warn("worker did not report ready in time; killing it", append(p.logAttrs(), "timeout", m.readyTimeout(p), "fix", m.notReadyFix(p))...)
			m.kill(p)
		}
	case evRespawn:
		switch {
		case m.phase == phaseStopping:
		case ev.slot == spareSlot:
			m.spareRetry = false
			m.fillSpares()
		case ev.slot < len(m.pending) && m.pending[ev.slot] == nil: // a resize may have dropped it
			delete(m.respawnAt, ev.slot)
			// A slot without a worker, or whose worker is being
			// replaced, may take a spare; otherwise (a deploy's new
			// worker failed) it needs this build's own.
			if q := m.slots[ev.slot]; (q == nil || q.state == stateReplacing) && m.giveSpare(ev.slot) {
				break
			}
			m.spawn(ev.slot)
		}
	case evRetryRules:
		m.rules.retry()
	case evInstallDeadline:
		m.rules.installDeadline()
		m.sweepOps() // every earlier master's worker that lives has said hello by now
	case evPSS:
		m.onPSS(ev)
	case evHealth:
		m.onHealth(ev.p, ev.err)
	case evSuccessorExit:
		m.onSuccessorExit(ev)
	case evSuccessorTimeout:
		m.onSuccessorTimeout(ev)
	case evAdoptDeadline:
		m.endAdoption()
	case evSnapshot:
		st := m.status()
		st.History = m.hist.view(m.cfg.MonitorInterval)
		ev.reply <- st
	case evHeap:
		m.onHeap(ev)
	case evWithdrawn:
		if m.stopPending != "" {
			m.stopNow(m.stopPending)
		}
	case evStopTimeout:
		if len(m.procs) > 0 {
			m.log.Warn("stop timeout: killing remaining workers", "remaining", len(m.procs), "timeout", m.cfg.StopTimeout)
			m.killAll()
		}
	default:
		panic(fmt.Sprintf("ipcluster: master.handle: unknown event %T", ev))
	}
}

// spawn starts a worker for slot, or a spare for spareSlot.
func (m *master) spawn(slot int) {
	slotEnv := strconv.Itoa(slot)
	if slot == spareSlot {
		slotEnv = envSlotSpare
	}
	// The target's executable as the master holds it, not the path on
	// disk: a deploy replaces that file before it signals the master, and
	// a crashed worker must come back as the code it was.
	cmd := &exec.Cmd{Path: m.target.path(), Args: append([]string{m.exe}, m.args...)}
	cmd.Env = append(slices.Clip(m.env),
		EnvWorker+"="+m.cfg.Name,
		EnvSlot+"="+slotEnv,
		EnvGeneration+"="+strconv.Itoa(m.gen),
		EnvSocket+"="+m.sock,
		EnvBuild+"="+m.target.build,
		EnvWorkers+"="+strconv.Itoa(len(m.slots)),
	)
	// A slot's worker gets its sockets: the slot's held ones if its last
	// worker died serving, fresh ones otherwise. A spare gets its slot's
	// with the assign.
	var socks *sockSet
	failed := func(err error) {
		m.log.Error("spawn worker", "slot", slot, "err", err)
		if socks != nil && socks != m.held[slot] {
			socks.close()
		}
		m.failures[slot]++
		m.respawnLater(slot)
	}
	if slot != spareSlot {
		if socks = m.held[slot]; socks == nil {
			var err error
			if socks, err = openSockets(m.cfg, m.rules.rt, m.steer); err != nil {
				failed(err)
				return
			}
		}
		arrays, err := m.workerArrays()
		if err != nil {
			failed(err)
			return
		}
		cmd.ExtraFiles = append(socks.all(), arrays...)
		cmd.Env = append(cmd.Env, EnvSockets+"="+socks.env(m.rules.rt, len(arrays) > 0))
	}
	// Its operator socket comes last, its descriptor named in the
	// environment; the master's copy is closed once the worker has it.
	opsFile, opsPath, err := m.openOperatorSocket()
	if err != nil {
		m.log.Warn("worker spawned without an operator socket: its /debug/pprof and operator handler are out of reach", "slot", slot, "err", err)
	} else {
		defer opsFile.Close()
		cmd.Env = append(cmd.Env, EnvOperator+"="+strconv.Itoa(3+len(cmd.ExtraFiles))+":"+opsPath)
		cmd.ExtraFiles = append(cmd.ExtraFiles, opsFile)
	}
	// Real files, never pipes: a worker outlives the master, and a pipe
	// whose reader died would block or kill it (SIGPIPE) on its next log.
	cmd.Stdout = m.cfg.WorkerStdout
	cmd.Stderr = m.cfg.WorkerStderr
	// Own session: a terminal's ^C or a dying master's process group must
	// not take the workers down with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if m.worker != nil {
		// Set in the child between fork and exec, with the CAP_SETUID
		// and CAP_SETGID the spawner thread kept for it; the change from
		// root to another uid then clears them. No AmbientCaps.
		cmd.SysProcAttr.Credential = m.worker.credential()
	}
	if err := m.spawner.start(cmd); err != nil {
		if opsPath != "" {
			os.Remove(opsPath)
		}
		failed(err)
		return
	}
	p := newProc(&childProcess{cmd}, slot, m.gen, m.target.build)
	p.ops = opsPath
	if socks != nil {
		socks.unblock()
		p.socks, p.ports = socks, maps.Clone(socks.ports)
	}
	m.procs[p.pid] = p
	m.obs.spawned()
	if slot != spareSlot {
		m.pending[slot] = p
	}
	if r := m.resizing; r != nil && slot >= r.from {
		p.splitFrom = slot % r.from // its clients are that slot's until the growth switches
	}
	p.timer = time.AfterFunc(m.readyTimeout(p), func() { m.send(evConnectTimeout{p}) })
	m.watch(p)
	m.log.Debug("worker spawned", p.logAttrs()...)
}

// respawnLater schedules a spawn for a slot whose last start failed, backing
// off exponentially (capped) so a crash-looping worker does not spin.
func (m *master) respawnLater(slot int) {
	n := min(m.failures[slot], 7)
	delay := time.Duration(1<<n) * 50 * time.Millisecond // 100ms .. 6.4s
	if m.failures[slot] <= 1 {
		delay = 0
	}
	if slot == spareSlot {
		if m.spareRetry {
			return // one timer refills them all
		}
		m.spareRetry = true
		m.log.Info("restarting spare", "in", delay, "failures", m.failures[slot])
	} else {
		if _, ok := m.respawnAt[slot]; ok {
			return // one timer is enough
		}
		m.respawnAt[slot] = time.Now().Add(delay)
		m.log.Info("respawning worker", "slot", slot, "in", delay, "failures", m.failures[slot])
	}
	time.AfterFunc(delay, func() { m.send(evRespawn{slot}) })
}

func (m *master) onExit(p *proc, status string) {
	if m.procs[p.pid] != p {
		return
	}
	delete(m.procs, p.pid)
	if p.timer != nil {
		p.timer.Stop()
	}
	p.process.close()
	if p.peer != nil {
		p.peer.close()
	}
	m.removeOperatorSocket(p)
	m.heapExited(p)
	lvl := slog.LevelInfo
	if p.state.serving() || p.state == stateStarting {
		lvl = slog.LevelWarn
	}
	m.log.Log(context.Background(), lvl, "worker exited", append(p.logAttrs(), "state", p.state.String(), "status", status)...)
	m.emit.send(EventWorkerExited{PID: p.pid, Slot: p.slot, Generation: p.gen, State: p.state.String(), Status: status})
	if m.phase == phaseStopping {
		p.socks.close()
		return
	}
	m.releaseSockets(p)
	if p.ports != nil && m.rules.rt.guard && !p.state.serving() {
		// Its ports leave the guard set: the OS may hand them to anyone.
		// (An active worker's leave with the write that points its slot
		// at the replacement: writing now would leave the slot without a
		// route meanwhile.)
		m.rules.markDirty()
	}
	switch p.state {
	case stateStarting:
		m.deployTrouble(p, false, "exited before ready: "+status)
		m.resizeTrouble(p)
		if p.slot == spareSlot {
			m.failures[spareSlot]++
			m.respawnLater(spareSlot)
		} else if p.slot < len(m.pending) && m.pending[p.slot] == p {
			m.pending[p.slot] = nil
			m.failures[p.slot]++
			m.respawnLater(p.slot)
		}
	case stateSpare:
		m.spares = slices.DeleteFunc(m.spares, func(q *proc) bool { return q == p })
		if m.countStart(p, spareSlot) > 1 {
			m.respawnLater(spareSlot)
		} else {
			m.fillSpares()
		}
	case stateActive, stateReplacing:
		if m.deployTrouble(p, true, "new worker exited while serving: "+status) {
			return // its slot is back on its old worker
		}
		// Its slot keeps pointing at its sockets, which the slot now
		// holds (releaseSockets): their queues keep the clients until
		// the slot's next worker inherits them.
		if m.slots[p.slot] == p {
			m.slots[p.slot] = nil
			if p.state == stateActive { // replacing: its replacement is under way, and counted
				m.countStart(p, p.slot)
			}
			m.replace(p.slot)
		}
	}
}

// countStart counts, for the backoff of slot (spareSlot for a spare), how
// p's service ended: within StableAfter of becoming ready it was a failed
// start; after, a crash of a worker that worked, which clears the slot's
// failures. It returns the slot's failures.
func (m *master) countStart(p *proc, slot int) int {
	if p.settled || time.Since(p.activeSince) >= m.cfg.StableAfter {
		m.failures[slot] = 0
	} else {
		m.failures[slot]++
		m.log.Info("worker failed soon after it became ready; counted as a failed start",
			append(p.logAttrs(), "served", time.Since(p.activeSince), "stable_after", m.cfg.StableAfter, "failures", m.failures[slot])...)
	}
	return m.failures[slot]
}

// noteSettled clears the failed starts of every slot (and of the spares)
// whose worker has now been ready for StableAfter, and is not being
// replaced (a worker whose function returned waits in its slot for its
// replacement: it does not serve). Each worker does so once: a slot
// whose long-lived worker is being replaced keeps counting its
// replacements' failures.
func (m *master) noteSettled(now time.Time) {
	for _, p := range m.procs {
		if p.settled || p.retireCause != "" || p.state != stateActive && p.state != stateSpare || now.Sub(p.activeSince) < m.cfg.StableAfter {
			continue
		}
		p.settled = true
		slot := p.slot
		if p.state == stateSpare {
			slot = spareSlot
		}
		if m.failures[slot] > 0 {
			m.log.Info("worker stable; its slot's failed starts are forgotten", append(p.logAttrs(), "failures", m.failures[slot])...)
			m.failures[slot] = 0
		}
	}
}

// replace finds slot a worker, its own having exited or being retired: a
// spare, or a new worker, at once; or, while its recent starts keep
// failing, after the backoff.
func (m *master) replace(slot int) {
	switch {
	case m.inBackoff(slot):
		// evRespawn gives it a spare or a worker then.
	case m.failures[slot] > 1:
		m.respawnLater(slot)
	case !m.giveSpare(slot) && m.pending[slot] == nil:
		m.spawn(slot)
	}
}

// inBackoff reports whether slot waits out its backoff (respawnLater).
func (m *master) inBackoff(slot int) bool {
	at, ok := m.respawnAt[slot]
	return ok && time.Now().Before(at)
}

// readyTimeout is how long p has from now to report ready.
func (m *master) readyTimeout(p *proc) time.Duration {
	if p.slot == spareSlot {
		return m.cfg.ConnectTimeout // a spare reports ready as soon as it listens
	}
	return m.cfg.startTimeout()
}

// notReadyFix says, for the log, what to do about a worker that did not
// report ready within readyTimeout.
func (m *master) notReadyFix(p *proc) string {
	switch {
	case p.peer == nil:
		return "it never said hello on the control socket: whatever main does before ipcluster.Run must finish within Config.ConnectTimeout"
	case m.cfg.WorkerReady && p.slot != spareSlot:
		return "with Config.WorkerReady the work function must call Worker.Ready once it can serve, within Config.ReadyTimeout: call it, or raise ReadyTimeout"
	default:
		return "it said hello but not ready: raise Config.ConnectTimeout if the host is overloaded"
	}
}

// onReady moves a starting worker into its slot, or among the spares.
func (m *master) onReady(p *proc) {
	if p.timer != nil {
		p.timer.Stop()
	}
	// The slot's failures are not cleared here: a worker that fails right
	// after its ready report has not started (see noteSettled).
	if p.slot == spareSlot {
		p.state = stateSpare
		p.activeSince = time.Now()
		m.spares = append(m.spares, p)
		m.log.Info("spare ready", append(p.logAttrs(), "elapsed", time.Since(p.spawned))...)
		// A slot that lost its worker, or whose worker is being retired,
		// takes the spare rather than wait for its own replacement.
		for slot, q := range m.slots {
			if (q == nil && m.phase == phaseServing) || (q != nil && q.state == stateReplacing) {
				if m.giveSpare(slot) {
					break
				}
			}
		}
		return
	}
	if p.slot >= len(m.slots) {
		m.kill(p) // its slot was merged away by a resize while it started
		return
	}
	if m.dep != nil && p.gen == m.dep.gen && m.cfg.HealthCheck != nil && !p.verified {
		// A deploy's new worker must pass the application's check once
		// before its slot moves to it (onHealth).
		m.checkHealth(p)
		return
	}
	if m.pending[p.slot] == p {
		m.pending[p.slot] = nil
	}
	m.activate(p, p.slot)
}

// activate makes p the active worker of slot. The rule write happens in
// syncRules, after this burst of events; the slot's previous worker is
// retired there, once the kernel points the slot away from it.
func (m *master) activate(p *proc, slot int) {
	old := m.slots[slot]
	if h := m.held[slot]; h != nil {
		delete(m.held, slot)
		if h != p.socks {
			m.unroute(h) // p came with sockets of its own
		}
	}
	p.slot = slot
	p.state = stateActive
	p.activeSince, p.settled = time.Now(), false
	m.slots[slot] = p
	m.rules.markDirty()
	switch {
	case old == nil:
	case m.dep != nil && p.gen == m.dep.gen && old.gen != m.dep.gen && old.state == stateActive:
		// A deploy moved the slot: the old worker stands by, listening,
		// until the deploy commits (retired) or rolls back (active again).
		old.state = stateStandby
		m.dep.standby[slot] = old
		p.predecessor, old.predecessor = old, nil
	default:
		p.predecessor, old.predecessor = old, nil
		old.state = stateRetired
		if old.retireCause == "" {
			old.retireCause, old.retireReason, old.retireAt = CauseReplaced, "replaced", time.Now()
		}
		old.retirePending = true
	}
	elapsed := time.Since(p.spawned)
	m.log.Info("worker ready", append(p.logAttrs(), "ports", portsString(p.ports, m.rules.rt.ports), "elapsed", elapsed)...)
	m.emit.send(EventWorkerReady{PID: p.pid, Slot: p.slot, Generation: p.gen, Ports: maps.Clone(p.ports), Elapsed: elapsed})
}

// giveSpare moves the oldest ready spare into slot, if there is one: the
// slot's clients are then served after one rule write. A replacement still
// starting for the slot is no longer needed and is killed.
func (m *master) giveSpare(slot int) bool {
	if len(m.spares) == 0 || m.phase == phaseStopping || m.inBackoff(slot) {
		return false
	}
	if m.cfg.WorkerReady && m.pending[slot] != nil {
		return false // the spare would have to get ready too: no quicker
	}
	i := slices.IndexFunc(m.spares, func(q *proc) bool { return q.peer != nil && q.build == m.target.build })
	if i < 0 {
		return false // none can be told its slot now; they reconnect
	}
	// The spare takes the slot's held sockets, where its last worker
	// died serving (their queues hold its waiting clients), or fresh
	// ones, where its worker is being replaced.
	socks := m.held[slot]
	if socks == nil {
		var err error
		if socks, err = openSockets(m.cfg, m.rules.rt, m.steer); err != nil {
			m.log.Error("giving a spare a slot", "slot", slot, "err", err)
			return false
		}
	}
	sp := m.spares[i]
	m.spares = slices.Delete(m.spares, i, i+1)
	if q := m.pending[slot]; q != nil {
		m.pending[slot] = nil // its exit then respawns nothing
		if q.socks == socks {
			q.socks = nil // the slot's held sockets: the spare's now
		}
		m.kill(q)
	}
	sp.socks, sp.ports = socks, maps.Clone(socks.ports)
	fds := socks.fds()
	if arrays, err := m.workerArrays(); err == nil {
		fds = append(fds, rawFDs(arrays)...)
	}
	sp.peer.sendFDs(proto.TypeAssign, &proto.Assign{Slot: slot, Ports: protoPorts(socks.ports, m.rules.rt.ports)}, fds)
	if m.cfg.WorkerReady {
		// The application starts now, and the slot moves once it says
		// it is ready (onReady): until then the slot keeps its route,
		// to its retiring worker or to none.
		sp.slot, sp.state = slot, stateStarting
		m.pending[slot] = sp
		sp.timer = time.AfterFunc(m.readyTimeout(sp), func() { m.send(evConnectTimeout{sp}) })
		m.log.Info("spare given a slot; waiting for the application to be ready", sp.logAttrs()...)
	} else {
		// The spare's listeners are open: connections routed to it wait
		// in their accept queues until the application, called now,
		// accepts.
		m.activate(sp, slot)
	}
	m.fillSpares()
	return true
}

// fillSpares starts spares until Config.Spares are ready or starting,
// unless the cluster is above its low memory watermark or stopping.
func (m *master) fillSpares() {
	if m.phase == phaseStopping || m.memLevel > 0 || m.spareRetry || m.dep != nil || m.adopting() {
		return
	}
	n := len(m.spares)
	for _, p := range m.procs {
		if p.state == stateStarting && p.slot == spareSlot {
			n++
		}
	}
	for ; n < m.cfg.Spares; n++ {
		m.spawn(spareSlot)
	}
}

// retire replaces an active worker: its slot goes to a spare, or to a new
// worker spawned for it once that one is ready; then this one is told.
func (m *master) retire(p *proc, cause RetireCause, reason string) {
	if m.phase == phaseStopping || p.state != stateActive || m.slots[p.slot] != p {
		return
	}
	p.state = stateReplacing
	p.retireCause, p.retireReason, p.retireAt = cause, reason, time.Now()
	if cause == CauseMemory {
		m.heapStart(p) // a memory retirement leaves a pair, warm or not
	}
	m.replace(p.slot)
}

func (m *master) onClosed(pr *peer, err error) {
	delete(m.peers, pr)
	if p := pr.proc; p != nil && p.peer == pr {
		p.beat = pr.beat.get()
		p.peer = nil
		if m.procs[p.pid] == p {
			m.log.Debug("worker control connection closed", append(p.logAttrs(), "err", err)...)
		}
	}
}

// syncRules has the rules written if they changed (rules.go), then tells
// replaced workers they are retired: only once no new connection can
// reach them.
func (m *master) syncRules(ctx context.Context) {
	if !m.rules.due() || m.phase == phaseStopping {
		return
	}
	// During a growth the new slots are not routed until all are ready.
	n := m.rules.rt.workers
	targets := make([]slotTarget, n)
	routed := true
	for i, p := range m.slots[:n] {
		switch {
		case p != nil:
			targets[i] = p.ports
		case m.held[i] != nil:
			targets[i] = m.held[i].ports // no worker yet: the slot's clients wait in its sockets' queues
		case m.adopting() && m.adoptRoutes[i] != nil && m.steer == nil:
			// Its worker, alive, is still to reconnect: a nat rule can
			// point at its port meanwhile. (The bpf backend needs its
			// sockets, and the arrays it may bring: offerArrays.)
			targets[i] = m.adoptRoutes[i]
		default:
			routed = false
		}
	}
	// The first install waits until every slot can be routed (or for
	// ConnectTimeout): until then a crashed predecessor's rules serve.
	if !m.rules.installed && !routed && time.Since(m.started) < m.cfg.ConnectTimeout {
		return
	}
	wrote, err := m.rules.write(ctx, targets, m.workerPorts())
	if err != nil {
		m.stopErr = err
		m.stop("rules could not be installed")
		return
	}
	if !wrote {
		return
	}
	m.resizeWritten()
	for _, s := range m.unrouted {
		s.close()
	}
	m.unrouted = nil
	now := time.Now()
	for _, p := range m.procs {
		if p.retirePending {
			p.retirePending = false
			m.retired(p, now)
		}
	}
	if m.phase == phaseStarting && m.allSlotsReady() {
		m.phase = phaseServing
		elapsed := time.Since(m.started)
		m.log.Info("all slots ready", "workers", len(m.slots), "elapsed", elapsed)
		m.emit.send(EventReady{Workers: len(m.slots), Elapsed: elapsed})
		m.notifyReady()
	}
}

// retired tells a worker whose slot the rules no longer point at that it is
// retired, and lowers its priority.
func (m *master) retired(p *proc, now time.Time) {
	p.retiredAt = now
	// The worker's copy of its sockets is now the last: it closes it
	// once its accept queues are empty.
	p.socks.close()
	p.socks = nil
	if p.peer != nil {
		p.peer.send(proto.TypeRetire, &proto.Reason{Reason: p.retireReason})
	}
	if m.cfg.RetiredNice > 0 {
		if err := renice(p.pid, m.cfg.RetiredNice); err != nil {
			m.log.Debug("renice retired worker", append(p.logAttrs(), "err", err)...)
		}
	}
	replacement := 0
	// A slot a resize merged away went to the slot its clients are in now.
	if repl := m.slots[p.slot%len(m.slots)]; repl != nil {
		replacement = repl.pid
	}
	elapsed := now.Sub(p.retireAt)
	lag := seconds(p.lastBeat().stats.LagSec)
	m.log.Info("worker retired", append(p.logAttrs(), "cause", p.retireCause, "reason", p.retireReason,
		"replacement", replacement, "elapsed", elapsed, "rss", p.mem.RSSBytes, "lag", lag)...)
	m.emit.send(EventRetired{PID: p.pid, Slot: p.slot, Generation: p.gen, Replacement: replacement,
		Cause: p.retireCause, Reason: p.retireReason, Elapsed: elapsed, RSSBytes: p.mem.RSSBytes, Lag: lag})
}

// workerPorts returns the port maps of every worker that has reported its
// ports, in any state: the ports refused to direct connections.
func (m *master) workerPorts() []slotTarget {
	out := make([]slotTarget, 0, len(m.procs))
	for _, p := range m.procs {
		if p.ports != nil {
			out = append(out, p.ports)
		}
	}
	for _, s := range m.held {
		out = append(out, s.ports)
	}
	for _, s := range m.unrouted {
		out = append(out, s.ports)
	}
	return out
}

// notReady says why the cluster should not be sent clients now, or "" if
// it may: every slot has an active worker, the rules are written, and the
// master is not stopping. It is the one notion of ready: the status (and
// so ipclusterctl and /status), /readyz, the ipcluster_ready metric and
// systemd's STATUS line all show it.
func (m *master) notReady() string {
	switch {
	case m.phase == phaseStopping || m.stopPending != "":
		return "the master is stopping"
	case !m.rules.installed:
		return "the rules are not installed yet (waiting for the first worker of every slot)"
	}
	// During a growth the new slots are not routed yet: clients are
	// served by the old ones.
	for slot, p := range m.slots[:m.rules.rt.workers] {
		if p == nil {
			return "slot " + strconv.Itoa(slot) + " has no active worker"
		}
	}
	if m.drained {
		// Last: a drained cluster that says why is otherwise ready.
		return proto.NotReadyDrained
	}
	return ""
}

func (m *master) allSlotsReady() bool {
	for _, p := range m.slots {
		if p == nil {
			return false
		}
	}
	return true
}

// stop begins a graceful stop: rules out first, so no new connection reaches
// a worker that is about to finish; then every worker is told to die, and
// killed after StopTimeout.
func (m *master) stop(why string) {
	if m.phase == phaseStopping || m.phase == phaseHandedOver {
		return // stopping already, or no longer this master's cluster to stop
	}
	if m.bgp != nil && m.bgpOn && m.stopPending == "" {
		// The routers first: once they send no new client here, the
		// local routes may go (evWithdrawn). A second stop goes on at
		// once.
		m.stopPending = why
		m.announce(false, "stopping: "+why)
		m.log.Info("master stopping: routes withdrawn from the routers; the workers stop taking clients after the withdraw delay",
			"reason", why, "withdraw_delay", m.cfg.BGP.WithdrawDelay)
		time.AfterFunc(m.cfg.BGP.WithdrawDelay, func() { m.send(evWithdrawn{}) })
		return
	}
	m.stopNow(why)
}

// stopNow is the graceful stop itself (see stop).
func (m *master) stopNow(why string) {
	if m.phase == phaseStopping || m.phase == phaseHandedOver {
		return
	}
	m.stopPending = ""
	m.phase = phaseStopping
	m.log.Info("master stopping", "reason", why, "workers", len(m.procs))
	m.notifyStopping(why)
	// Routes out first, so no new connection reaches a finishing worker;
	// the rules themselves stay until the workers are gone (withdraw).
	if err := m.rules.withdraw(m.workerPorts()); err != nil {
		m.stopErr = errors.Join(m.stopErr, err)
	}
	m.closeSockets()
	m.ln.Close() // no new peers; accept() ends
	for _, p := range m.procs {
		p.state = stateStopping
		if p.timer != nil {
			p.timer.Stop()
		}
		if p.peer != nil {
			p.peer.send(proto.TypeDie, &proto.Reason{Reason: "cluster stopping"})
		} else {
			m.signal(p, syscall.SIGTERM)
		}
	}
	for pr := range m.peers {
		if pr.role == proto.RoleClient {
			pr.close()
		}
	}
	time.AfterFunc(m.cfg.StopTimeout, func() { m.send(evStopTimeout{}) })
}

// removeRules deletes everything the cluster wrote; safe to call more than
// once.
func (m *master) removeRules() {
	if err := m.rules.remove(); err != nil {
		m.stopErr = errors.Join(m.stopErr, err)
	}
}

// killRetired kills every retired worker (SIGUSR1, or a client's
// kill-retired) and returns how many.
func (m *master) killRetired() int {
	n := 0
	for _, p := range m.procs {
		if p.state == stateRetired {
			m.kill(p)
			n++
		}
	}
	m.log.Info("killed retired workers", "count", n)
	return n
}

// activeWorker is the active worker with pid, or if pid is 0 of slot.
func (m *master) activeWorker(slot, pid int) *proc {
	if pid != 0 {
		if p := m.procs[pid]; p != nil && p.state.serving() {
			return p
		}
		return nil
	}
	if slot >= 0 && slot < len(m.slots) {
		return m.slots[slot]
	}
	return nil
}

// successorPID is the pid of the master started for a deploy, until it
// takes over or fails; 0 if none.
func (m *master) successorPID() int {
	if m.successor == nil {
		return 0
	}
	return m.successor.Process.Pid
}

func (m *master) killAll() {
	for _, p := range m.procs {
		m.kill(p)
	}
}

func (m *master) kill(p *proc) { m.signal(p, syscall.SIGKILL) }

func (m *master) signal(p *proc, sig syscall.Signal) {
	if err := p.process.signal(sig); err != nil {
		m.log.Warn("signal worker", append(p.logAttrs(), "signal", sig.String(), "err", err)...)
	}
}

// status is the reply to a client's status request.
func (m *master) status() *proto.Status {
	notReady := m.notReady()
	st := &proto.Status{
		Cluster:     m.cfg.Name,
		MasterPID:   os.Getpid(),
		Generation:  m.gen,
		Ready:       notReady == "",
		NotReady:    notReady,
		Rules:       m.rules.text(),
		Build:       m.target.build,
		Deploy:      m.lastDeploy,
		DeployPhase: string(m.deployPhase),
		Successor:   m.successorPID(),
		Stopping:    m.phase == phaseStopping,

		HeapSnapshots: slices.Clone(m.heapSnaps),
		Drained:       m.drained,
		BGP:           m.bgpStatus(),
		Autoscale:     m.autoscaleStatus(),
	}
	st.Backend, st.BackendReason = string(m.backend.name), m.backend.reason
	for i, p := range m.slots {
		s := proto.SlotStatus{Slot: i}
		if p != nil {
			s.Active = p.pid
		}
		st.Slots = append(st.Slots, s)
	}
	now := time.Now()
	// The application's stats are bounded per worker, not in total: leave
	// out those that would take the reply past a quarter of MaxFrame.
	appBudget := proto.MaxFrame / 4
	for _, p := range m.procs {
		ws := proto.WorkerStatus{PID: p.pid, Slot: p.slot, Generation: p.gen, State: p.state.String(), Unresponsive: p.unresponsive, Build: p.build,
			UptimeSec: now.Sub(p.started).Seconds(), RSSBytes: p.mem.RSSBytes, PSSBytes: p.mem.PSSBytes, OperatorSocket: p.ops, HeapStart: p.heap.start}
		ws.StartTime = float64(p.started.UnixNano()) / 1e9
		for _, pub := range m.rules.rt.ports {
			if w, ok := p.ports[pub]; ok {
				ws.Ports = append(ws.Ports, proto.Port{Public: pub.Public, Proto: pub.Proto.String(), Worker: w})
			}
		}
		if beat := p.lastBeat(); !beat.at.IsZero() {
			s := beat.stats
			if appBudget -= len(s.App); appBudget < 0 {
				s.App = nil
			}
			ws.Stats = &s
			ws.HeartbeatAgeSec = now.Sub(beat.at).Seconds()
		}
		st.Workers = append(st.Workers, ws)
	}
	slices.SortFunc(st.Workers, func(a, b proto.WorkerStatus) int { return a.PID - b.PID })
	return st
}
