//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// cluster is a running cluster under test: this binary in the -serve
// role, started in the lab's server namespace.
type cluster struct {
	lab     *netlab.Lab // the lab whose server namespace it runs in
	name    string
	workers int
	runDir  string
	exe     string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed when the master has exited
	public  uint16        // the public port
	ports   []uint16      // slot → the worker's own port (the one the nat rules DNAT to)
	pids    []int         // every worker pid seen in the status, for cleanup
}

// serverCPUs, from -server-cpus, is the CPU list the cluster and HAProxy
// run on; "" for any.
var serverCPUs string

// serverCmd is exec.Command for a server-side process: under taskset when
// -server-cpus is given, so the process and every thread and child it
// starts are confined from their first instruction (taskset sets the
// affinity, then execs; the pid stays the same).
func serverCmd(name string, args ...string) *exec.Cmd {
	if serverCPUs == "" {
		return exec.Command(name, args...)
	}
	return exec.Command("taskset", append([]string{"-c", serverCPUs, name}, args...)...)
}

// clusterOpts are the Config choices a bench cluster varies.
type clusterOpts struct {
	backend string // Config.Backend; "" for the library's default
	// allowDirect sets Config.AllowDirect: the direct path needs it, since
	// by default the cluster refuses connections to its workers' own ports.
	allowDirect bool
	port        uint16 // the public port; natPort if 0
	kind        string // in the cluster's name, to tell clusters apart in logs
}

// startCluster starts a master with n workers and waits until every slot
// has a ready worker and the rules are installed.
func startCluster(ctx context.Context, lab *netlab.Lab, exe, tmp string, n int, co clusterOpts) (*cluster, error) {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("pick a cluster name: %w", err)
	}
	// Unique per run and per cluster, so its chain IPC-<name> never meets
	// another's, even in a lab that somehow outlived an earlier run.
	if co.port == 0 {
		co.port = natPort
	}
	c := &cluster{name: "dp" + co.kind + strconv.Itoa(n) + "-" + hex.EncodeToString(b[:]), workers: n, exe: exe, public: co.port, lab: lab, done: make(chan struct{})}
	c.runDir = filepath.Join(tmp, "run-"+c.name)
	c.logPath = filepath.Join(tmp, c.name+".log")
	logf, err := os.Create(c.logPath)
	if err != nil {
		return nil, fmt.Errorf("create cluster log: %w", err)
	}
	defer logf.Close() // the children hold their own copies
	c.cmd = serverCmd(exe, "-serve", "-name", c.name, "-rundir", c.runDir, "-workers", strconv.Itoa(n),
		"-backend", co.backend, "-port", strconv.Itoa(int(co.port)), "-allow-direct="+strconv.FormatBool(co.allowDirect))
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	// Own process group: a terminal's ^C reaches the bench, which stops
	// the cluster itself, in order (the workers run in their own sessions
	// anyway).
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := lab.Server.Start(c.cmd); err != nil {
		return nil, fmt.Errorf("start cluster master in %s: %w", lab.Server.Name, err)
	}
	go func() { _ = c.cmd.Wait(); close(c.done) }()
	if err := c.waitReady(ctx, 90*time.Second+time.Duration(n)*200*time.Millisecond); err != nil {
		return c, fmt.Errorf("cluster %s (%d workers) not ready: %w; log %s:\n%s", c.name, n, err, c.logPath, tail(c.logPath))
	}
	return c, nil
}

// waitReady polls the master's status until every slot is served.
func (c *cluster) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	sock := filepath.Join(c.runDir, c.name, "control.sock")
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-c.done:
			return fmt.Errorf("master exited: %v", c.cmd.ProcessState)
		case <-time.After(200 * time.Millisecond):
		}
		st, err := c.status(ctx, sock)
		if err != nil {
			last = err
			continue
		}
		if !st.Ready {
			last = errors.New("master not ready yet")
			continue
		}
		ports, err := slotPorts(st, c.workers, c.public)
		if err != nil {
			last = err
			continue
		}
		c.ports = ports
		return nil
	}
	return fmt.Errorf("timeout after %s: %w", timeout, last)
}

func (c *cluster) status(ctx context.Context, sock string) (*proto.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	cl, err := proto.Dial(ctx, sock, c.name)
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	st, err := cl.Status(ctx)
	if err != nil {
		return nil, err
	}
	for _, w := range st.Workers {
		c.pids = append(c.pids, w.PID)
	}
	return st, nil
}

// slotPorts maps each slot to its active worker's own port for the public
// port public.
func slotPorts(st *proto.Status, n int, public uint16) ([]uint16, error) {
	if len(st.Slots) != n {
		return nil, fmt.Errorf("status lists %d slots, want %d", len(st.Slots), n)
	}
	byPID := map[int]proto.WorkerStatus{}
	for _, w := range st.Workers {
		byPID[w.PID] = w
	}
	ports := make([]uint16, n)
	for _, s := range st.Slots {
		if s.Slot < 0 || s.Slot >= n || s.Active == 0 {
			return nil, fmt.Errorf("slot %d has no active worker", s.Slot)
		}
		for _, p := range byPID[s.Active].Ports {
			if p.Public == public {
				ports[s.Slot] = p.Worker
			}
		}
		if ports[s.Slot] == 0 {
			return nil, fmt.Errorf("slot %d: worker %d reports no port for %d", s.Slot, s.Active, public)
		}
	}
	return ports, nil
}

// stop stops the master gracefully (it removes its rules and stops its
// workers), kills it if it hangs, and then kills, by pid, any worker of
// this cluster still alive.
func (c *cluster) stop() error {
	if c == nil || c.cmd == nil || c.cmd.Process == nil {
		return nil
	}
	var errs []error
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(20 * time.Second):
		errs = append(errs, fmt.Errorf("cluster master %d did not stop in 20s: killed", c.cmd.Process.Pid))
		_ = c.cmd.Process.Kill()
		<-c.done
	}
	// Workers run in their own sessions and outlive a killed master. A
	// pid is only signalled while it still runs this very binary, so a
	// recycled pid is never hit.
	for _, pid := range c.pids {
		if exe, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe"); err == nil && exe == c.exe {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return errors.Join(errs...)
}

// haproxy is a running HAProxy in the server namespace.
type haproxy struct {
	cmd     *exec.Cmd
	done    chan struct{}
	cfgText string
	logPath string
}

// haproxySettings is printed with the results.
const haproxySettings = "mode tcp, balance source, maxconn 8000 (global and frontend), timeout connect 3s, client/server 5s, nbthread default, no logging"

// startHAProxy starts HAProxy in front of the cluster's workers, on
// haproxyPort of the server address, and waits until it accepts.
func startHAProxy(ctx context.Context, lab *netlab.Lab, tmp string, ports []uint16) (*haproxy, error) {
	var b strings.Builder
	// maxconn far above the bench's concurrency (so never a queue);
	// timeouts of a few seconds, as a production TCP balancer has; the
	// thread count left at HAProxy's default (one per CPU).
	b.WriteString(`global
	maxconn 8000

defaults
	mode tcp
	timeout connect 3s
	timeout client 5s
	timeout server 5s

frontend fe
	bind ` + netip.AddrPortFrom(serverAddr, haproxyPort).String() + `
	maxconn 8000
	default_backend workers

backend workers
	balance source
`)
	for slot, p := range ports {
		fmt.Fprintf(&b, "\tserver slot%d %s\n", slot, netip.AddrPortFrom(serverAddr, p))
	}
	h := &haproxy{cfgText: b.String(), done: make(chan struct{}), logPath: filepath.Join(tmp, "haproxy.log")}
	cfgPath := filepath.Join(tmp, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(h.cfgText), 0o600); err != nil {
		return nil, fmt.Errorf("write haproxy config: %w", err)
	}
	logf, err := os.Create(h.logPath)
	if err != nil {
		return nil, fmt.Errorf("create haproxy log: %w", err)
	}
	defer logf.Close()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return nil, fmt.Errorf("find haproxy (apt-get install haproxy): %w", err)
	}
	// -db: foreground, no daemon, so the pid we hold is HAProxy's.
	h.cmd = serverCmd(bin, "-db", "-f", cfgPath)
	h.cmd.Stdout, h.cmd.Stderr = logf, logf
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := lab.Server.Start(h.cmd); err != nil {
		return nil, fmt.Errorf("start haproxy in %s: %w", lab.Server.Name, err)
	}
	go func() { _ = h.cmd.Wait(); close(h.done) }()
	dst := netip.AddrPortFrom(serverAddr, haproxyPort)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := probe(ctx, lab, lab.ClientAddrs4[0], dst)
		if err == nil {
			return h, nil
		}
		select {
		case <-h.done:
			return h, fmt.Errorf("haproxy exited: %v; log:\n%s", h.cmd.ProcessState, tail(h.logPath))
		case <-ctx.Done():
			return h, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return h, fmt.Errorf("haproxy not answering on %s: %w; log:\n%s", dst, err, tail(h.logPath))
		}
	}
}

func (h *haproxy) stop() {
	if h == nil || h.cmd == nil || h.cmd.Process == nil {
		return
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.done:
	case <-time.After(5 * time.Second):
		_ = h.cmd.Process.Kill()
		<-h.done
	}
}

// conntrack reads and flushes the server namespace's connection tracking.
type conntrack struct {
	count *os.File // nf_conntrack_count, opened in the server namespace
	max   int
	nl    *netlink.Handle // NETLINK_NETFILTER socket in the server namespace
}

// openConntrack must be called once the cluster's nat rules exist, so that
// conntrack is active in the namespace.
func openConntrack(ns *netlab.NS) (*conntrack, error) {
	ct := &conntrack{}
	err := ns.Do(func() error {
		// /proc/sys/net resolves to the network namespace of the thread
		// that opens it; the open file keeps reading that namespace's
		// value from any thread afterwards.
		var err error
		ct.count, err = os.Open("/proc/sys/net/netfilter/nf_conntrack_count")
		if err != nil {
			return err
		}
		b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_max")
		if err != nil {
			return err
		}
		if ct.max, err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil {
			return err
		}
		// Only the netfilter family: the netlink package would open a
		// socket for any other family on the calling thread, i.e. in
		// whatever namespace that happens to be.
		ct.nl, err = netlink.NewHandle(unix.NETLINK_NETFILTER)
		return err
	})
	if err != nil {
		ct.close()
		return nil, fmt.Errorf("open conntrack of %s: %w", ns.Name, err)
	}
	return ct, nil
}

func (ct *conntrack) read() int {
	var b [32]byte
	n, _ := ct.count.ReadAt(b[:], 0)
	v, _ := strconv.Atoi(string(bytes.TrimSpace(b[:n])))
	return v
}

// flush empties the table, so a cell never inherits the TIME_WAIT entries
// of the one before.
func (ct *conntrack) flush() error {
	if err := ct.nl.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
		return fmt.Errorf("flush conntrack: %w", err)
	}
	return nil
}

// remapped counts the entries whose client source port NAT rewrote (the
// reply goes to another port than the client sent from): the implicit
// source-port remapping the kernel does when a connection's reply tuple is
// already held by another entry.
func (ct *conntrack) remapped() (int, error) {
	flows, err := ct.nl.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	if err != nil {
		return 0, fmt.Errorf("list conntrack: %w", err)
	}
	n := 0
	for _, f := range flows {
		if f.Forward.Protocol == unix.IPPROTO_TCP && f.Forward.SrcPort != f.Reverse.DstPort {
			n++
		}
	}
	return n, nil
}

func (ct *conntrack) close() {
	if ct == nil {
		return
	}
	if ct.count != nil {
		ct.count.Close()
	}
	if ct.nl != nil {
		ct.nl.Close()
	}
}

// tail returns the end of a log file, for error messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}
