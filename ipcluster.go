package ipcluster

// The package's entry points (Run, IsWorker, DialWorker), the worker's
// environment and the errors. Config and its defaults are in config.go,
// the events in events.go; the package doc is doc.go.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// Environment variables. All but EnvDev mark a process as a worker: the
// master sets them when it spawns a worker, and nobody else should. EnvDev
// is the developer's (see Config.Dev).
const (
	EnvDev        = "IPCLUSTER_DEV"        // "1" (or "true"): development mode, whatever Config.Dev says; "0" (or "false", or unset): Config.Dev decides
	EnvWorker     = "IPCLUSTER_WORKER"     // the cluster name
	EnvSlot       = "IPCLUSTER_SLOT"       // the worker's slot, or "spare"
	EnvGeneration = "IPCLUSTER_GENERATION" // the master generation that spawned it
	EnvSocket     = "IPCLUSTER_SOCKET"     // the master's control socket
	EnvBuild      = "IPCLUSTER_BUILD"      // the code version it was spawned as (Worker.Version)
	EnvWorkers    = "IPCLUSTER_WORKERS"    // the cluster's slot count when it was spawned (a resize changes it)
	EnvSockets    = "IPCLUSTER_SOCKETS"    // the listening sockets it inherits, from descriptor 3 on: "8080/tcp,5353/udp"
	EnvOperator   = "IPCLUSTER_OPS"        // its operator socket: "<descriptor>:<path>" (Worker.SetOperatorHandler)
)

// envSlotSpare is EnvSlot's value for a spare (Config.Spares).
const envSlotSpare = "spare"

// Errors. The failures a caller may act on wrap one of these, so callers can
// test with errors.Is: a bad Config, missing privileges or binaries, a
// cluster already running. Other errors (a system call that failed, a rule
// write the kernel refused) wrap the underlying error and say what was
// being done.
var (
	// ErrNotSupported: the platform is not Linux (and Config.Dev is off:
	// development mode runs anywhere).
	ErrNotSupported = errors.New("ipcluster: only supported on Linux")
	// ErrInvalidConfig: a Config field is out of range; see ConfigError.
	ErrInvalidConfig = errors.New("ipcluster: invalid config")
	// ErrNoPrivilege: the master lacks CAP_NET_ADMIN, or (with
	// Config.WorkerUser) the capabilities to spawn workers as another
	// user.
	ErrNoPrivilege = errors.New("ipcluster: missing privilege")
	// ErrMissingBinary: iptables, iptables-restore or iptables-save (or the
	// ip6tables ones) is not on PATH, or iptables does not answer
	// `iptables --version`.
	ErrMissingBinary = errors.New("ipcluster: missing iptables binary")
	// ErrNoNFTables: Config.Backend is BackendNFTables but the kernel does
	// not answer nf_tables requests.
	ErrNoNFTables = errors.New("ipcluster: nf_tables unavailable")
	// ErrRulesLost: the kernel no longer holds the rules the master wrote
	// (say, after `nft flush ruleset`, or `iptables -t nat -F` with the
	// iptables backend). The master writes them again; EventRulesFailed
	// reports it.
	ErrRulesLost = errors.New("ipcluster: rules lost from the kernel")
	// ErrPortInUse: another cluster's rules in the master's network
	// namespace (another Name, either backend) already route a public
	// port of this cluster on an overlapping address; see PortInUseError.
	// Checked at start and at a deploy, before anything is touched.
	ErrPortInUse = errors.New("ipcluster: public port already routed by another cluster")
	// ErrAlreadyRunning: another master holds the cluster's lock.
	ErrAlreadyRunning = errors.New("ipcluster: another master owns this cluster")
	// ErrHandoff: a state handoff failed (Worker.Handoff's reader returns
	// it, wrapped): a timeout or a state too large, naming the Config
	// field to raise, or the previous worker's error.
	ErrHandoff = errors.New("ipcluster: state handoff failed")
	// ErrNotStartedByMaster: the process carries the worker environment but
	// no master accepts it.
	ErrNotStartedByMaster = errors.New("ipcluster: worker not started by a master")
)

// ConfigError names the Config field at fault, what is wrong and the fix.
type ConfigError struct {
	Field   string
	Problem string
	Fix     string
}

func (e *ConfigError) Error() string {
	return fmt.Sprintf("ipcluster: Config.%s: %s; %s", e.Field, e.Problem, e.Fix)
}

func (e *ConfigError) Unwrap() error { return ErrInvalidConfig }

// NFTablesError is a failed nf_tables request, the nftables backend's
// RuleError. It names what was being done, the table (with its family, as
// in `nft list table inet ipcluster-chat`) and the map or set if the
// request was about one, and unwraps to the netlink error, so that
// errors.Is(err, unix.ENOENT) and the like see through it.
type NFTablesError struct {
	Op     string // e.g. "install", "update routes in", "read ipv4 map"
	Family string // the table's family: "inet"; "" if no table was involved
	Table  string // e.g. "ipcluster-chat"; "" if no table was involved
	Set    string // the map or set, e.g. "slots4"; "" if none
	Err    error
}

func (e *NFTablesError) Error() string {
	if e.Table == "" {
		return e.Op + ": " + e.Err.Error()
	}
	var of string
	if e.Set != "" {
		of = e.Set + " of "
	}
	return fmt.Sprintf("%s %snf_tables table %s %s: %v", e.Op, of, e.Family, e.Table, e.Err)
}

func (e *NFTablesError) Unwrap() error { return e.Err }

// routing derives the rule generator's view of a valid config.
func (c *Config) routing() *routing {
	r := &routing{
		name:    c.Name,
		chain:   "IPC-" + c.Name,
		addr:    c.Addr,
		workers: c.Workers,
		prefix:  map[*family]int{familyIPv4: c.IPv4SlotPrefix, familyIPv6: c.IPv6SlotPrefix},
		guard:   !c.AllowDirect,
	}
	switch {
	case !c.Addr.IsValid():
		r.families = []*family{familyIPv4, familyIPv6}
	case c.Addr.Is4():
		r.families = []*family{familyIPv4}
	default:
		r.families = []*family{familyIPv6}
	}
	r.ports = slices.Clone(c.Ports)
	return r
}

// WorkerDialMark is the packet mark (SO_MARK) of connections made with
// DialWorker. The nftables backend's guard, which refuses connections to a
// worker's own port that did not come through the cluster's routes, lets
// packets with this mark through. It is 0x69706300 ("ipc\0"); a host whose
// firewall gives marks other meanings must leave this one alone.
const WorkerDialMark = 0x69706300

// DialWorker connects to a worker's own port, as a Config.HealthCheck
// does to check the worker itself rather than whichever worker the routes
// pick: address is the worker's address and port (say Config.Addr, or
// 127.0.0.1, and a port from WorkerStats.Ports). Its packets carry
// WorkerDialMark, so the guard lets them through; setting the mark needs
// CAP_NET_ADMIN, which the master has.
func DialWorker(ctx context.Context, network, address string) (net.Conn, error) {
	return dialMarked(ctx, network, address)
}

// ControlSocket is the path of the control socket of cluster name under
// runDir (Config.RunDir, "" for DefaultRunDir): the socket ipclusterctl and
// other control clients speak to (docs/protocol.md).
func ControlSocket(runDir, name string) string {
	if runDir == "" {
		runDir = DefaultRunDir
	}
	return proto.SocketPath(runDir, name)
}

// IsWorker reports whether this process was started by a master as a worker.
func IsWorker() bool { return os.Getenv(EnvWorker) != "" }

// Run runs the cluster. In the process started by hand it becomes the
// master: it validates cfg, spawns the workers (this same binary, with the
// same arguments), routes clients to them and blocks until ctx is done or
// the process receives SIGTERM or SIGINT, then stops gracefully: rules
// removed, workers told to finish, killed after StopTimeout.
//
// The master makes its process not dumpable (PR_SET_DUMPABLE 0) and
// starts workers without any capability and with no_new_privs, whatever
// its own privileges: a worker cannot change the rules, and an exec in a
// worker (a setuid binary, one with file capabilities) grants it nothing.
//
// In a worker process, Run takes the sockets its master made for it (one
// per public port, on an OS-chosen port; on the bpf backend, in the public
// port's reuseport group), reports to the master and calls work, then
// returns once the worker is done: told to die, or retired with its
// connections drained.
//
// In development mode (Config.Dev, or IPCLUSTER_DEV=1 in the environment)
// Run instead calls work in this process, as slot 0, on sockets bound to
// the public ports themselves, with no master, rules or privilege, on any
// OS; it blocks until ctx is done or SIGINT or SIGTERM, then stops as a
// worker told to finish does, and returns work's error if work returned
// one before that.
func Run(ctx context.Context, cfg Config, work func(*Worker) error) (err error) {
	if !IsWorker() {
		// A master started for a deploy tells the one that started it
		// why it failed.
		report := deployReporter()
		defer func() { report(err) }()
	}
	if work == nil {
		return &ConfigError{Field: "work (Run's argument)", Problem: "nil", Fix: "pass the function workers run"}
	}
	dev, why, err := devMode(&cfg)
	if err != nil {
		return err
	}
	set := cfg // before defaults: the fields the caller set
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return err
	}
	if dev {
		return runDev(ctx, &cfg, &set, why, work)
	}
	if IsWorker() {
		return runWorker(ctx, &cfg, work)
	}
	return runMaster(ctx, &cfg)
}
