package ipcluster

// Config: what a cluster is and how it behaves, the defaults of its zero
// fields (withDefaults) and the checks run before anything is touched
// (validate).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// Defaults for the zero fields of Config.
const (
	DefaultRunDir            = proto.DefaultRunDir
	DefaultConnectTimeout    = 3 * time.Second
	DefaultHeartbeatInterval = time.Second
	DefaultStopTimeout       = 30 * time.Second
	DefaultMonitorInterval   = time.Second
	DefaultStableAfter       = 5 * time.Second
	DefaultReadyTimeout      = 30 * time.Second
	DefaultIPv4SlotPrefix    = 32 // the client address's own low bits
	DefaultIPv6SlotPrefix    = 64 // the low bits of the client's /64 prefix
	MaxWorkers               = 256
	MaxNameLen               = 16

	// Health policies (see monitor.go and the README's Health section).
	DefaultMemoryLimit         = 448 << 20 // bytes of RSS
	DefaultLagLimit            = 150 * time.Millisecond
	DefaultPingTimeout         = 10 * time.Second
	DefaultStartupGrace        = 45 * time.Second
	DefaultRetireLimit         = 10
	DefaultRetireWindow        = 2 * time.Minute
	DefaultDrainTimeout        = 10 * time.Minute
	DefaultMemoryLowWatermark  = 0.80
	DefaultMemoryHighWatermark = 0.95
	DefaultRetiredNice         = 1
	DefaultHealthCheckInterval = 5 * time.Second
	DefaultHealthCheckFailures = 3

	// Deploys (see deploy.go and the README's Deploys section).
	DefaultCanaryPeriod = 5 * time.Second

	// Heap snapshots (Config.HeapProfileDir; heap.go).
	DefaultHeapProfileWarmup   = time.Minute
	DefaultHeapProfileMaxBytes = 256 << 20
	// State handoff (handoff.go, and the README's State handoff section).
	DefaultHandoffTimeout  = 5 * time.Second
	DefaultHandoffMaxBytes = 64 << 20
)

// Backend selects how the master routes clients to their slot's worker:
// nat rules (nftables, iptables) or a BPF program over the workers' sockets
// (bpf). All route the same way and change atomically; they differ in cost,
// in the privileges they need and in the tools that show the routes.
type Backend string

const (
	// BackendAuto, the zero value, picks BackendBPF where the master can
	// load and attach its program (CAP_BPF, Linux 4.19), else
	// BackendNFTables when the kernel answers nf_tables requests, and
	// BackendIPTables otherwise; the status, the metric
	// ipcluster_rule_backend_info and the start-up log say which and why.
	BackendAuto Backend = ""
	// BackendNFTables keeps the routes in an nf_tables inet table,
	// ipcluster-<Name>, written over netlink (see `nft list table inet
	// ipcluster-<Name>`): a new connection costs one hash lookup whatever
	// the number of slots, and a change is one transaction for both
	// families, with no helper process. Needs nf_tables with nat and fib
	// (Linux 5.2 or later).
	BackendNFTables Backend = "nftables"
	// BackendIPTables keeps the routes in a nat chain per family,
	// IPC-<Name>, written with iptables-restore (see `iptables-save -t
	// nat`): a new connection walks the chain, one rule per slot and port,
	// and a change is one process per family. Needs the iptables binaries.
	BackendIPTables Backend = "iptables"
	// BackendBPF routes without NAT or conntrack: each public port is an
	// SO_REUSEPORT group of the workers' sockets bound to the public
	// address and port themselves (`ss -ltn` shows the service there),
	// and an SK_REUSEPORT BPF program picks the slot's socket by the same
	// source bits (see the README). A re-point is one map update; a
	// closing socket's queued connections move to its slot's new socket.
	// Needs Linux 4.19 (5.14 for that migration) and CAP_BPF, plus
	// CAP_NET_BIND_SERVICE for public ports below 1024; no CAP_NET_ADMIN.
	// A worker's own port (WorkerStats.Ports, for DialWorker) is a second
	// socket where a DNAT backend's worker would listen; as with
	// iptables, nothing refuses direct connections to it.
	BackendBPF Backend = "bpf"
)

// Protocol is the transport protocol of a public port. The zero value is
// TCP.
type Protocol uint8

// Protocols.
const (
	TCP Protocol = iota // the zero value
	UDP
)

// String returns "tcp" or "udp", as in iptables rules and the control
// protocol, or "Protocol(n)" for a value that is neither.
func (p Protocol) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return "Protocol(" + strconv.Itoa(int(p)) + ")"
}

// parseProtocol is the inverse of String for the valid protocols.
func parseProtocol(s string) (Protocol, bool) {
	switch s {
	case "tcp":
		return TCP, true
	case "udp":
		return UDP, true
	}
	return 0, false
}

// Port is a public port served by the cluster. It is comparable and names
// one port unambiguously: TCP 443 and UDP 443 are two Ports.
type Port struct {
	// Public is the port clients send to, 1..65535.
	Public uint16
	// Proto is the port's protocol. Default TCP. A TCP port is served
	// through Worker.Listener, a UDP port through Worker.PacketConn.
	Proto Protocol
}

// String returns e.g. "443/udp".
func (p Port) String() string { return strconv.Itoa(int(p.Public)) + "/" + p.Proto.String() }

// MarshalText returns the String form, so that maps keyed by Port (as in
// EventWorkerReady and WorkerStats) marshal to JSON objects.
func (p Port) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText parses "443/tcp" or "53/udp"; a bare number is TCP.
func (p *Port) UnmarshalText(b []byte) error {
	num, proto, found := strings.Cut(string(b), "/")
	n, err := strconv.ParseUint(num, 10, 16)
	if err != nil || n == 0 {
		return fmt.Errorf("ipcluster: port %q: want a number from 1 to 65535, then /tcp or /udp", b)
	}
	pr := TCP
	if found {
		var ok bool
		if pr, ok = parseProtocol(proto); !ok {
			return fmt.Errorf("ipcluster: port %q: protocol %q is not tcp or udp", b, proto)
		}
	}
	*p = Port{Public: uint16(n), Proto: pr}
	return nil
}

// Config describes a cluster. The zero value of every field but Name and
// Ports is usable.
type Config struct {
	// Name names the cluster: its nat chain is IPC-<Name>, its run
	// directory RunDir/<Name>; logs carry it. Required: 1 to 16 of a-z,
	// 0-9, '-' and '_', starting with a letter.
	Name string

	// Workers is the number of slots, each served by one worker process: a
	// power of two from 1 to 256. Default: the largest power of two not
	// above the number of CPUs.
	Workers int

	// Ports are the public ports, TCP or UDP. Required; a port number may
	// be listed once per protocol (TCP 443 and UDP 443 may both be). A
	// port that another cluster (another Name) in the same network
	// namespace already routes on an overlapping Addr is refused at start
	// with ErrPortInUse.
	Ports []Port

	// Addr is the public destination address clients connect to. The zero
	// value means any local address of both IPv4 and IPv6; 0.0.0.0 (or ::)
	// means any local address of that family only.
	Addr netip.Addr

	// IPv4SlotPrefix picks the bits of an IPv4 client address that select
	// its slot: the low log2(Workers) bits of its first IPv4SlotPrefix bits.
	// Default 32 (the address's own low bits); 24 would keep a whole /24 on
	// one worker.
	IPv4SlotPrefix int

	// IPv6SlotPrefix is the same for IPv6. Default 64: the low bits of the
	// /64 prefix, so a client's rotating privacy addresses keep their slot.
	// 128 selects the address's own low bits.
	IPv6SlotPrefix int

	// Backend selects the rule writer. Default BackendAuto: bpf where the
	// master may load BPF programs, else nftables where the kernel has
	// it, else iptables. The start-up log line, the status and the metric
	// ipcluster_rule_backend_info say which is in force, and why.
	Backend Backend

	// AllowDirect lets clients connect to a worker's own port, bypassing
	// the routes. By default (false) the nftables backend refuses new
	// connections and UDP flows to worker ports that did not come through
	// the cluster's routes: a client must not choose its worker, and a
	// direct connection's leftover conntrack entry would make the kernel
	// rewrite the client port of a routed connection from the same client
	// port, which can meet a worker TIME_WAIT socket and stall that
	// connection for a 1-second SYN retransmission. Set it to reach
	// workers directly for debugging or to benchmark the routes against
	// direct connections. The iptables backend never refuses them.
	AllowDirect bool

	// Dev runs the cluster in development mode, for a laptop: Run calls
	// the work function in this process, once, on sockets bound to Addr
	// (every address if unset) and Ports themselves, TCP and UDP. There
	// is no master, no rule, no RunDir, and no privilege is needed (a
	// port below 1024 still needs what the OS asks for it: the error says
	// so), on any OS Go supports, Linux included. Run logs once, at Warn,
	// that stickiness, deploys, health retirements and rules are off, and
	// blocks until ctx is done or SIGINT or SIGTERM; then the worker is
	// told to finish (Retired closed, listeners closed, Context
	// cancelled) and Run returns once the work function has returned and
	// its connections are closed, or after StopTimeout (or at a second
	// signal).
	//
	// The Worker handle works as in a worker process: Slot is 0,
	// Generation 0, Version is Config.Version or "dev"; Ready does
	// nothing; SetStats is kept but no master reads it; RequestRetire is
	// logged and ignored (a retirement's point is a fresh process, which
	// an in-process restart would not give: restart the program). One
	// work function runs whatever Workers says (logged), on the public
	// ports: every client reaches it, as every client of a slot reaches
	// one worker in production, and the ports are the ones the program
	// is known by. A work function that returns ends Run, with its error.
	//
	// Run still validates the whole Config (a bad one is still an
	// error), but checks nothing that needs root; the fields that mean
	// nothing without a master (WorkerUser, Backend, RunDir, Spares,
	// HTTPAddr, the health policies...) are ignored with one log line
	// naming them, so the same main runs in both modes.
	//
	// The environment variable IPCLUSTER_DEV=1 (EnvDev; "true" too) turns
	// development mode on whatever Dev says; IPCLUSTER_DEV=0 ("false"),
	// empty or unset leaves it to Dev: the variable turns the mode on,
	// never off. Any other value is an error. A process a master started
	// (a worker, a deploy's new master) refuses development mode.
	// Default false.
	Dev bool

	// RunDir holds one directory per cluster with its control socket and
	// lock. Default /run/ipcluster.
	RunDir string

	// ConnectTimeout is how long a new worker has to connect and report
	// ready before it is killed and spawned again (with WorkerReady, see
	// ReadyTimeout). Default 3s.
	ConnectTimeout time.Duration

	// StableAfter is how long a worker must serve after it became ready
	// before its exit counts as a crash rather than a failed start. A
	// worker that exits, or whose function returns, sooner has failed to
	// start, and its slot's next worker is started with backoff (at once,
	// then 200ms, doubling to 6.4s), as for one that never became ready;
	// a spare is not given to the slot meanwhile. Only a worker that has
	// served StableAfter clears its slot's count, so a worker that served
	// longer is replaced at once when it crashes. The same holds for
	// spares, from the time they are ready. Default 5s.
	StableAfter time.Duration

	// WorkerReady, if set, lets the application say when a worker can
	// take traffic (caches warm, connections to its backends open): the
	// worker calls the work function first, and reports ready to the
	// master only when the function calls Worker.Ready. No slot moves to
	// a worker before that: at start, on a crash, a retirement or a
	// deploy, the slot keeps its previous route (or none) until the new
	// worker is ready. A spare, given a slot, is called then and takes
	// the route once it calls Ready. A worker whose function returns
	// before calling Ready exits, a failed start. Default false: a worker
	// reports ready as soon as it listens, before its function is called.
	WorkerReady bool

	// ReadyTimeout, with WorkerReady, is how long a new worker has from
	// its start (a spare: from being given a slot) to call Worker.Ready
	// before it is killed and started again with backoff; ConnectTimeout
	// if that is longer. A deploy whose new workers are not ready in time
	// three times rolls back. Default 30s; only valid with WorkerReady.
	ReadyTimeout time.Duration

	// HeartbeatInterval is how often workers report their stats.
	// Default 1s (the original pinged every 500ms): a crash is seen at
	// once from the process exit, not from missing heartbeats, so these
	// serve only stats and hang detection, and a second is as fresh as
	// the health monitor samples. Each heartbeat costs the master a
	// wake-up per worker.
	HeartbeatInterval time.Duration

	// MonitorInterval is how often the master measures every worker
	// (RSS from /proc; PSS every tenth time, as it costs more) and
	// delivers EventStats. Default 1s; at least 10ms.
	MonitorInterval time.Duration

	// StopTimeout is how long workers get to finish their connections when
	// the cluster stops before they are killed. Default 30s.
	StopTimeout time.Duration

	// Logger receives the library's logs. Default slog.Default().
	Logger *slog.Logger

	// WorkerStdout and WorkerStderr are handed to workers as their standard
	// output and error. Default: the master's own. They are real files, not
	// pipes the master reads: workers outlive the master and must never
	// block on a reader that is gone.
	WorkerStdout, WorkerStderr *os.File

	// WorkerUser, if set, is the user workers run as: a name or a numeric
	// uid, looked up (os/user) when the master starts. Workers hold no
	// capability either way (see Run); with WorkerUser a root master also
	// spawns them with that uid, its primary group (or WorkerGroup) and its
	// supplementary groups, so a compromised worker can neither signal
	// the master nor take the cluster over (the control socket admits
	// that uid as a worker only). The master must then run as root, with
	// CAP_SETUID, CAP_SETGID and CAP_KILL, and the user must be able to
	// search every directory above RunDir/<Name> and to execute the
	// binary. Default "": workers run as the master's user.
	WorkerUser string
	// WorkerGroup, if set, replaces WorkerUser's primary group: a name or
	// a numeric gid. It needs WorkerUser. Default "": the user's own.
	WorkerGroup string

	// OnEvent, if set, receives the cluster's events in order, from one
	// goroutine; a slow handler delays later events, never the master.
	OnEvent func(Event)

	// HTTPAddr, if set, is a host:port (say "127.0.0.1:9100", or ":9100"
	// for every address) where the master serves Prometheus metrics
	// (/metrics), probes for a load balancer or Kubernetes (/healthz,
	// /readyz) and a status page (/status, /status.json). Default "":
	// none. The endpoints have no authentication: bind them to an
	// address only operators and the monitoring system reach.
	HTTPAddr string

	// Health policies. The master checks them every MonitorInterval with
	// its own measurements (see monitor.go). For each limit below, a
	// negative value turns the policy off.

	// MemoryLimit retires a worker whose RSS, as the master reads it
	// from /proc, exceeds this many bytes. Default 448 MiB.
	MemoryLimit int64

	// LagLimit retires a worker whose smoothed scheduling lag (see
	// WorkerStats.Lag) exceeds it. Default 150ms.
	LagLimit time.Duration

	// StartupGrace exempts a worker from MemoryLimit and LagLimit for
	// this long after it starts serving its slot, so start-up spikes
	// (loading data, warming caches) do not retire it. Default 45s;
	// negative for none.
	StartupGrace time.Duration

	// PingTimeout declares a worker unresponsive when no heartbeat has
	// arrived for this long: hung, deadlocked, or stopped (SIGSTOP). An
	// active one is retired (its slot moves to a new worker); a retired,
	// spare or unresponsive one is killed once silent for twice as long.
	// Default 10s; at least twice HeartbeatInterval.
	PingTimeout time.Duration

	// RetireLimit and RetireWindow bound the retirements the health
	// policies start (memory, lag, unresponsive, health check): at most
	// RetireLimit in any RetireWindow. One held back is retried at the
	// next sample and reported once with EventRetireHeld. Retirements a
	// worker asks for itself are not limited. Defaults 10 and 2m.
	RetireLimit  int
	RetireWindow time.Duration

	// DrainTimeout bounds a retired worker's drain: once it has been
	// retired this long with connections still open, it is told to
	// finish (Worker.Context is cancelled), and killed StopTimeout later
	// if it has not exited. Default 10m.
	DrainTimeout time.Duration

	// MemoryBudget is the most memory, in bytes of RSS summed over every
	// worker process (active, retired, spare), the cluster should use.
	// Above MemoryLowWatermark of it, retired workers are told to finish,
	// most killable first (already unresponsive or finishing, then fewest
	// connections, then largest RSS, then oldest), until the total would
	// fall below it; above MemoryHighWatermark, they are killed the same
	// way. Active workers are never stopped for the budget. Default: half
	// the memory of the machine, or of the master's cgroup if that is
	// less (the original's fixed 512 MB would stop a 16-worker cluster's
	// drains as soon as they began).
	MemoryBudget int64

	// MemoryLowWatermark and MemoryHighWatermark are fractions of
	// MemoryBudget, 0 < low <= high <= 1. Defaults 0.80 and 0.95.
	MemoryLowWatermark, MemoryHighWatermark float64

	// RetiredNice is added to a retired worker's niceness, so that new
	// connections, on the active workers, win the CPU from the drains.
	// Default 1; at most 19.
	RetiredNice int

	// Spares is the number of standby workers kept ready, in no slot. A
	// crashed or retired worker's slot then moves to a spare with one
	// rule write, without waiting for a process to start, and a new spare
	// is started in the background. A spare runs no application code
	// until it is given a slot: the work function is called then. Spares
	// count against MemoryBudget; none is started while the cluster is
	// above its low watermark. Default 0.
	Spares int

	// HealthCheck, if set, is the application's check of a worker, called
	// by the master every HealthCheckInterval for each active worker with
	// the worker's latest WorkerStats (whose Ports say where to reach
	// it), and a context that ends after HealthCheckInterval. A worker
	// whose check fails HealthCheckFailures times in a row is retired.
	// Calls for different workers run concurrently; never two for one
	// worker.
	HealthCheck func(context.Context, WorkerStats) error

	// HealthCheckInterval is how often HealthCheck runs per worker, and
	// its timeout. Default 5s; at least 10ms.
	HealthCheckInterval time.Duration

	// HealthCheckFailures is how many consecutive failures retire a
	// worker. Default 3.
	HealthCheckFailures int

	// Version names the application's code. A master that takes over a
	// cluster (a deploy: SIGHUP, or a second master started) keeps the
	// workers of its own Version and rolls the others to it, slot by
	// slot. Default: the Go build ID of the executable, which changes
	// with any change to the code or its build.
	Version string

	// CanaryPeriod is how long a deploy watches its first moved slot (the
	// canary) before it moves the others. A canary that crashes, stops
	// answering heartbeats or trips a health policy meanwhile rolls the
	// deploy back. Default 5s; negative for no canary.
	CanaryPeriod time.Duration

	// DeployPace is the least time between two slots' new workers being
	// started, after the canary. Default 0: all at once.
	DeployPace time.Duration

	// HeapProfileDir, if set, turns heap snapshots on: the master takes a
	// heap profile of each worker (/debug/pprof/heap?gc=1 on its
	// operator socket) once it has served its slot for
	// HeapProfileWarmup (the start), and another once it has retired and
	// drained, or just before it is ended for the memory budget or its
	// drain deadline (the end), and writes both with their difference to
	// this directory (created 0700): <Name>-slot<s>-pid<p>-gen<g>-start,
	// -end and -diff.pb.gz, for go tool pprof (-diff_base works on the
	// pair too). A worker retired for memory (MemoryLimit) always leaves
	// a pair: its start is taken at the retirement if its warm-up had not
	// passed. EventHeapSnapshot and the status name the files. A drained
	// worker waits (at most 30s) for its end to be taken before it exits.
	// Default "": off.
	HeapProfileDir string

	// HeapProfileWarmup is how long a worker serves before its start
	// snapshot. Default 1m.
	HeapProfileWarmup time.Duration

	// HeapProfileMaxBytes caps the files in HeapProfileDir: the oldest
	// complete pairs are deleted first. Default 256 MiB.
	HeapProfileMaxBytes int64
	// HandoffTimeout bounds a state handoff (Worker.OnHandoff,
	// Worker.Handoff): the new worker's Handoff returns within it of
	// being called, with the state or an error, and the old worker's
	// writer fails once it has passed. With WorkerReady it must be below
	// ReadyTimeout, as the application reads its state before it calls
	// Ready. Default 5s; with WorkerReady, at most half the time a new
	// worker has to be ready (ReadyTimeout, or ConnectTimeout if longer).
	HandoffTimeout time.Duration

	// HandoffMaxBytes bounds the state one handoff carries: a write past
	// it fails in the old worker, a read past it in the new one. Default
	// 64 MiB.
	HandoffMaxBytes int64

	// BGP, if it has Peers, makes the master announce the service
	// addresses to routers while the cluster is ready, and withdraw them
	// before it stops or when drained (see BGPConfig, and "Beyond one
	// host" in the README). Default: off.
	BGP BGPConfig

	// Autoscale, if its MaxWorkers is set, has the master size the
	// cluster by its load: open connections and CPU per active worker
	// (see AutoscaleConfig). Default: off; the cluster keeps Workers
	// until an operator resizes it.
	Autoscale AutoscaleConfig
}

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9_-]*$`)

// Validate reports what Run would refuse in c, its fields and the
// IPCLUSTER_DEV variable, without touching anything: a *ConfigError
// (wrapping ErrInvalidConfig) that names the field and the fix. An
// application that starts something of its own before Run (a sidecar
// process, a listener, a cache to warm) calls it first, so that bad input
// stops everything before anything starts. Run also checks the machine
// when it starts (privileges, the rule backend, the ports), still before
// it touches a rule or a process; those Validate cannot know.
func (c Config) Validate() error {
	if _, _, err := devMode(&c); err != nil {
		return err
	}
	c = c.withDefaults()
	return c.validate()
}

// withDefaults returns a copy of c with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.Workers == 0 {
		n := runtime.NumCPU()
		if n > MaxWorkers {
			n = MaxWorkers
		}
		c.Workers = 1 << (bits.Len(uint(n)) - 1)
	}
	if c.IPv4SlotPrefix == 0 {
		c.IPv4SlotPrefix = DefaultIPv4SlotPrefix
	}
	if c.IPv6SlotPrefix == 0 {
		c.IPv6SlotPrefix = DefaultIPv6SlotPrefix
	}
	if c.RunDir == "" {
		c.RunDir = DefaultRunDir
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = DefaultStopTimeout
	}
	if c.MonitorInterval == 0 {
		c.MonitorInterval = DefaultMonitorInterval
	}
	setDefault(&c.StableAfter, DefaultStableAfter)
	if c.WorkerReady {
		setDefault(&c.ReadyTimeout, DefaultReadyTimeout)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	setDefault(&c.MemoryLimit, DefaultMemoryLimit)
	setDefault(&c.LagLimit, DefaultLagLimit)
	setDefault(&c.StartupGrace, DefaultStartupGrace)
	setDefault(&c.PingTimeout, DefaultPingTimeout)
	setDefault(&c.RetireLimit, DefaultRetireLimit)
	setDefault(&c.RetireWindow, DefaultRetireWindow)
	setDefault(&c.DrainTimeout, DefaultDrainTimeout)
	setDefault(&c.MemoryLowWatermark, DefaultMemoryLowWatermark)
	setDefault(&c.MemoryHighWatermark, DefaultMemoryHighWatermark)
	setDefault(&c.RetiredNice, DefaultRetiredNice)
	setDefault(&c.HealthCheckInterval, DefaultHealthCheckInterval)
	setDefault(&c.HealthCheckFailures, DefaultHealthCheckFailures)
	setDefault(&c.CanaryPeriod, DefaultCanaryPeriod)
	if c.HeapProfileDir != "" {
		setDefault(&c.HeapProfileWarmup, DefaultHeapProfileWarmup)
		setDefault(&c.HeapProfileMaxBytes, DefaultHeapProfileMaxBytes)
	}
	if c.HandoffTimeout == 0 {
		c.HandoffTimeout = DefaultHandoffTimeout
		if c.WorkerReady {
			c.HandoffTimeout = min(DefaultHandoffTimeout, c.startTimeout()/2)
		}
	}
	setDefault(&c.HandoffMaxBytes, DefaultHandoffMaxBytes)
	// MemoryBudget's default depends on the machine: the master sets it
	// (see defaultMemoryBudget), so validation stays free of the system.
	if c.WorkerStdout == nil {
		c.WorkerStdout = os.Stdout
	}
	if c.WorkerStderr == nil {
		c.WorkerStderr = os.Stderr
	}
	c.BGP = c.BGP.withDefaults(c.Addr)
	c.Autoscale = c.Autoscale.withDefaults()
	return c
}

// setDefault sets *v to def if it is zero.
func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// validate checks c (with defaults applied) without touching the system.
// It reports every problem, each a *ConfigError.
func (c *Config) validate() error {
	var errs []error
	bad := func(field, problem, fix string) {
		errs = append(errs, &ConfigError{Field: field, Problem: problem, Fix: fix})
	}
	switch {
	case c.Name == "":
		bad("Name", "empty", "name the cluster: 1 to 16 of a-z, 0-9, '-', '_', starting with a letter")
	case len(c.Name) > MaxNameLen:
		bad("Name", fmt.Sprintf("%q is %d characters", c.Name, len(c.Name)),
			fmt.Sprintf("use at most %d: it names the nat chain IPC-<Name>, and iptables limits chain names to 28 characters", MaxNameLen))
	case !nameRE.MatchString(c.Name):
		bad("Name", fmt.Sprintf("%q has characters unsafe in a chain name or path", c.Name),
			"use only a-z, 0-9, '-' and '_', starting with a letter")
	}
	if c.Workers < 1 || c.Workers > MaxWorkers || c.Workers&(c.Workers-1) != 0 {
		bad("Workers", fmt.Sprintf("%d is not a power of two from 1 to %d", c.Workers, MaxWorkers),
			"use 1, 2, 4, ... 256: a client's slot is the low bits of its address")
	}
	if len(c.Ports) == 0 {
		bad("Ports", "no ports", "list at least one public port, e.g. []ipcluster.Port{{Public: 8080}}")
	}
	seen := map[Port]bool{}
	for i, p := range c.Ports {
		switch {
		case p.Proto != TCP && p.Proto != UDP:
			bad(fmt.Sprintf("Ports[%d].Proto", i), fmt.Sprintf("%s is not a protocol the cluster routes", p.Proto),
				"use ipcluster.TCP (the zero value) or ipcluster.UDP")
		case p.Public == 0:
			bad(fmt.Sprintf("Ports[%d].Public", i), "port 0 is out of range", "use a port from 1 to 65535")
		case seen[p]:
			bad(fmt.Sprintf("Ports[%d].Public", i), fmt.Sprintf("%s port %d is listed twice", p.Proto, p.Public),
				"list each public port once per protocol")
		}
		seen[p] = true
	}
	if c.Addr.IsValid() {
		if c.Addr.Zone() != "" || c.Addr.Is4In6() || c.Addr.IsMulticast() {
			bad("Addr", fmt.Sprintf("%s is not a unicast address clients can connect to", c.Addr),
				"use a local unicast IPv4 or IPv6 address without a zone, or leave Addr unset for any local address")
		}
	}
	k := bits.Len(uint(c.Workers)) - 1
	if k < 0 {
		k = 0
	}
	if c.IPv4SlotPrefix < k || c.IPv4SlotPrefix > 32 {
		bad("IPv4SlotPrefix", fmt.Sprintf("%d is outside %d..32", c.IPv4SlotPrefix, k),
			"slot bits are taken below this prefix length; use 32 for the address's own low bits")
	}
	if c.IPv6SlotPrefix < k || c.IPv6SlotPrefix > 128 {
		bad("IPv6SlotPrefix", fmt.Sprintf("%d is outside %d..128", c.IPv6SlotPrefix, k),
			"use 64 for the low bits of the /64 prefix or 128 for the address's own low bits")
	}
	if c.ConnectTimeout < 0 || c.HeartbeatInterval < 0 || c.StopTimeout < 0 {
		bad("ConnectTimeout/HeartbeatInterval/StopTimeout", "negative duration", "use a positive duration or zero for the default")
	}
	switch {
	case c.HeapProfileWarmup < 0:
		bad("HeapProfileWarmup", fmt.Sprintf("%s is negative", c.HeapProfileWarmup),
			"use a positive duration (how long a worker serves before its first heap snapshot), or zero for the default of 1m")
	case c.HeapProfileMaxBytes < 0:
		bad("HeapProfileMaxBytes", fmt.Sprintf("%d is negative", c.HeapProfileMaxBytes),
			"use a positive size in bytes for the heap snapshot directory, or zero for the default of 256 MiB")
	case c.HeapProfileDir == "" && (c.HeapProfileWarmup != 0 || c.HeapProfileMaxBytes != 0):
		bad("HeapProfileWarmup/HeapProfileMaxBytes", "set without HeapProfileDir",
			"set HeapProfileDir too (heap snapshots are off without it), or leave them zero")
	case c.HeapProfileDir != "" && !filepath.IsAbs(c.HeapProfileDir):
		bad("HeapProfileDir", fmt.Sprintf("%q is not an absolute path", c.HeapProfileDir),
			"use an absolute path: a deploy's new master may start in another directory")
	}
	if c.StableAfter < 0 {
		bad("StableAfter", fmt.Sprintf("%s is negative", c.StableAfter),
			"use a positive duration (how long a worker must serve before its exit is a crash, not a failed start), or zero for the default of 5s")
	}
	switch {
	case c.ReadyTimeout < 0:
		bad("ReadyTimeout", fmt.Sprintf("%s is negative", c.ReadyTimeout), "use a positive duration, or zero for the default of 30s")
	case c.ReadyTimeout > 0 && !c.WorkerReady:
		bad("ReadyTimeout", fmt.Sprintf("%s is set without WorkerReady", c.ReadyTimeout),
			"set WorkerReady too (the application then calls Worker.Ready), or leave ReadyTimeout zero: without it ConnectTimeout applies")
	}
	if c.HeartbeatInterval > 0 && c.HeartbeatInterval < 10*time.Millisecond {
		bad("HeartbeatInterval", fmt.Sprintf("%s is below 10ms", c.HeartbeatInterval), "use 10ms or more")
	}
	if c.MonitorInterval < 10*time.Millisecond {
		bad("MonitorInterval", fmt.Sprintf("%s is below 10ms", c.MonitorInterval), "use 10ms or more, or zero for the default of 1s")
	}
	if c.PingTimeout > 0 && c.PingTimeout < 2*c.HeartbeatInterval {
		bad("PingTimeout", fmt.Sprintf("%s is less than twice HeartbeatInterval (%s): one late heartbeat would declare a healthy worker unresponsive", c.PingTimeout, c.HeartbeatInterval),
			"use at least twice HeartbeatInterval, or a negative value to turn hang detection off")
	}
	if c.RetireLimit > 0 && c.RetireWindow <= 0 {
		bad("RetireWindow", fmt.Sprintf("%s with RetireLimit %d", c.RetireWindow, c.RetireLimit), "use a positive window, or a negative RetireLimit to turn the limit off")
	}
	low, high := c.MemoryLowWatermark, c.MemoryHighWatermark
	if !(low > 0 && low <= high && high <= 1) {
		bad("MemoryLowWatermark/MemoryHighWatermark", fmt.Sprintf("%g and %g are not 0 < low <= high <= 1", low, high),
			"use fractions of MemoryBudget such as 0.80 and 0.95, or zero for those defaults")
	}
	if c.RetiredNice > 19 {
		bad("RetiredNice", fmt.Sprintf("%d is above 19, the lowest priority", c.RetiredNice), "use 1 to 19, or a negative value to leave retired workers' priority alone")
	}
	if c.Spares < 0 || c.Spares > MaxWorkers {
		bad("Spares", fmt.Sprintf("%d is outside 0..%d", c.Spares, MaxWorkers), "use a small number of standby workers, such as 1, or 0 for none")
	}
	if c.HealthCheckInterval < 10*time.Millisecond {
		bad("HealthCheckInterval", fmt.Sprintf("%s is below 10ms", c.HealthCheckInterval), "use 10ms or more, or zero for the default of 5s")
	}
	if c.DeployPace < 0 {
		bad("DeployPace", fmt.Sprintf("%s is negative", c.DeployPace), "use a positive duration, or zero to start every slot's new worker at once")
	}
	if len(c.Version) > 128 || strings.ContainsAny(c.Version, "\x00\n") {
		bad("Version", fmt.Sprintf("%.20q... is over 128 bytes or holds a newline or NUL", c.Version), "use a short version string such as a release tag or commit hash")
	}
	switch {
	case c.HandoffTimeout < 0:
		bad("HandoffTimeout", fmt.Sprintf("%s is negative", c.HandoffTimeout), "use a positive duration, or zero for the default of 5s")
	case c.WorkerReady && c.HandoffTimeout >= c.startTimeout():
		bad("HandoffTimeout", fmt.Sprintf("%s is not below ReadyTimeout (%s): a worker reading its state before Ready would be killed first", c.HandoffTimeout, c.startTimeout()),
			"lower HandoffTimeout, or raise ReadyTimeout")
	}
	if c.HandoffMaxBytes < 0 {
		bad("HandoffMaxBytes", fmt.Sprintf("%d is negative", c.HandoffMaxBytes), "use a positive size in bytes, or zero for the default of 64 MiB")
	}
	if c.HealthCheckFailures < 1 {
		bad("HealthCheckFailures", fmt.Sprintf("%d is below 1", c.HealthCheckFailures), "use 1 or more consecutive failures, or zero for the default of 3")
	}
	switch c.Backend {
	case BackendAuto, BackendNFTables, BackendIPTables, BackendBPF:
	default:
		bad("Backend", fmt.Sprintf("%q is not a rule backend", c.Backend),
			`use ipcluster.BackendNFTables ("nftables"), ipcluster.BackendIPTables ("iptables"), ipcluster.BackendBPF ("bpf"), or leave it empty to pick one`)
	}
	if c.WorkerGroup != "" && c.WorkerUser == "" {
		bad("WorkerGroup", fmt.Sprintf("%q is set without WorkerUser", c.WorkerGroup), "set WorkerUser too (the user workers run as), or leave WorkerGroup empty")
	}
	if c.HTTPAddr != "" {
		if problem := checkHostPort(c.HTTPAddr); problem != "" {
			bad("HTTPAddr", fmt.Sprintf("%q %s", c.HTTPAddr, problem),
				`use an IP address and port such as "127.0.0.1:9100" (or ":9100" for every address), or leave it empty for no HTTP endpoints`)
		}
	}
	if c.RunDir != "" && c.RunDir[0] != '/' {
		bad("RunDir", fmt.Sprintf("%q is not an absolute path", c.RunDir), "use an absolute path such as /run/ipcluster")
	}
	c.BGP.validate(bad)
	c.Autoscale.validate(bad)
	if c.Autoscale.Enabled() && (c.Workers < c.Autoscale.MinWorkers || c.Workers > c.Autoscale.MaxWorkers) {
		bad("Workers", fmt.Sprintf("%d is outside Autoscale's %d to %d", c.Workers, c.Autoscale.MinWorkers, c.Autoscale.MaxWorkers),
			"start the cluster at a size the policy allows")
	}
	return errors.Join(errs...)
}

// checkHostPort says what is wrong with a listen address, or "". The host
// must be an IP address, or empty for every address: the master resolves
// no names before it starts, and a name could resolve differently later.
func checkHostPort(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "is not host:port"
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "has no port number from 1 to 65535"
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return "has a host that is not an IP address"
		}
	}
	return ""
}

// startTimeout is how long a new worker has from its start to report
// ready: ConnectTimeout, or with WorkerReady, ReadyTimeout if longer.
func (c *Config) startTimeout() time.Duration {
	if c.WorkerReady {
		return max(c.ReadyTimeout, c.ConnectTimeout)
	}
	return c.ConnectTimeout
}

// listenNetwork returns the network and address a worker listens on for a
// protocol: an OS-chosen port on the public address, or on any address of
// the families served. DNAT keeps the client's destination address, so this
// must accept it.
// groupNetwork is where the bpf backend's sockets for public port p
// listen: the public address and port themselves, or every address (a
// dual-stack socket) without Config.Addr.
func (c *Config) groupNetwork(p Port) (network, addr string) {
	network, addr = c.listenNetwork(p.Proto)
	host, _, _ := net.SplitHostPort(addr)
	return network, net.JoinHostPort(host, strconv.Itoa(int(p.Public)))
}

func (c *Config) listenNetwork(p Protocol) (network, addr string) {
	network = p.String() // "tcp" or "udp"
	switch {
	case !c.Addr.IsValid():
		return network, ":0"
	case c.Addr.Is4():
		return network + "4", netip.AddrPortFrom(c.Addr, 0).String()
	default:
		return network + "6", netip.AddrPortFrom(c.Addr, 0).String()
	}
}
