//go:build linux

package ipcluster_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// cluster is a master process running in a lab's server namespace.
type cluster struct {
	t      testing.TB
	lab    *netlab.Lab
	spec   spec
	cmd    *exec.Cmd
	logf   string
	done   chan struct{}
	err    error // the master's exit, once done is closed
	socket string
}

// startCluster starts a master for cfg in the lab and registers its cleanup:
// the master is stopped (and its log shown if the test failed).
func startCluster(t testing.TB, lab *netlab.Lab, cfg specConfig) *cluster {
	t.Helper()
	return startClusterSpec(t, lab, cfg, nil)
}

// startScenario is startCluster with workers running the named scenario
// (see helperMain).
func startScenario(t testing.TB, lab *netlab.Lab, cfg specConfig, scenario string) *cluster {
	t.Helper()
	return startClusterSpec(t, lab, cfg, func(s *spec) { s.Scenario = scenario })
}

// startClusterSpec is startCluster with a chance to edit the helper's spec.
func startClusterSpec(t testing.TB, lab *netlab.Lab, cfg specConfig, edit func(*spec)) *cluster {
	t.Helper()
	if cfg.Name == "" {
		cfg.Name = "t"
	}
	if cfg.RunDir == "" {
		cfg.RunDir = t.TempDir()
	}
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 5 * time.Second
	}
	c := &cluster{t: t, lab: lab, done: make(chan struct{}),
		socket: filepath.Join(cfg.RunDir, cfg.Name, "control.sock")}
	c.spec = spec{Config: cfg, Scenario: "echo"}
	ino, err := lab.Server.Inode()
	if err != nil {
		t.Fatal(err)
	}
	c.spec.Netns = ino
	if edit != nil {
		edit(&c.spec)
		c.socket = filepath.Join(c.spec.Config.RunDir, c.spec.Config.Name, "control.sock")
	}
	if c.spec.Config.Backend == "" {
		// IPCLUSTER_TEST_BACKEND runs every test that does not name a
		// backend on that one (test.sh runs the suite again on nftables;
		// by default auto picks bpf here).
		c.spec.Config.Backend = ipcluster.Backend(os.Getenv(envTestBackend))
	}
	if c.spec.Config.Backend == "iptables" {
		needIPTables(t)
	}
	c.start(nil)
	t.Cleanup(func() {
		c.stop()
		if t.Failed() {
			b, _ := os.ReadFile(c.logf)
			t.Logf("master log:\n%s", b)
		}
	})
	return c
}

// start runs the master process; prepare, if set, adjusts its command.
func (c *cluster) start(prepare func(*exec.Cmd)) {
	c.t.Helper()
	raw, err := json.Marshal(c.spec)
	if err != nil {
		c.t.Fatal(err)
	}
	c.logf = filepath.Join(c.t.TempDir(), "master.log")
	logFile, err := os.Create(c.logf)
	if err != nil {
		c.t.Fatal(err)
	}
	defer logFile.Close()
	exe := os.Args[0]
	if c.spec.Exe != "" {
		exe = c.spec.Exe
	}
	c.cmd = exec.Command(exe, "-test.run=^$")
	// A test run under systemd must not have every test's master notify
	// the service running it, nor one run from a developer's shell with
	// IPCLUSTER_DEV=1 exported turn every master into development mode:
	// only Env may give a master these.
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		name, _, _ := strings.Cut(kv, "=")
		return name == "NOTIFY_SOCKET" || name == "WATCHDOG_USEC" || name == "WATCHDOG_PID" || name == ipcluster.EnvDev
	})
	c.cmd.Env = append(append(env, c.spec.Env...), envSpec+"="+string(raw))
	// A file, not a pipe: workers outlive the master and keep it open.
	c.cmd.Stdout, c.cmd.Stderr = logFile, logFile
	c.cmd.SysProcAttr = c.spec.SysProcAttr
	if prepare != nil {
		prepare(c.cmd)
	}
	if err := c.lab.Server.Start(c.cmd); err != nil {
		c.t.Fatal(err)
	}
	go func() {
		c.err = c.cmd.Wait()
		close(c.done)
	}()
}

// stop sends SIGTERM and waits for the master to exit.
func (c *cluster) stop() error {
	select {
	case <-c.done:
		return c.err
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(20 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
		c.t.Errorf("master did not stop within 20s of SIGTERM")
	}
	return c.err
}

// wait waits for the master to exit by itself.
func (c *cluster) wait(timeout time.Duration) error {
	select {
	case <-c.done:
		return c.err
	case <-time.After(timeout):
		return fmt.Errorf("master still running after %s", timeout)
	}
}

func (c *cluster) log() string {
	b, _ := os.ReadFile(c.logf)
	return string(b)
}

// status asks the master for its status. A master started as another
// user (spec.SysProcAttr.Credential) is asked as that user: it admits no
// other client.
func (c *cluster) status() (*proto.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var cl *proto.Client
	dial := func() (err error) {
		cl, err = proto.Dial(ctx, c.socket, c.spec.Config.Name)
		return err
	}
	var err error
	if sys := c.spec.SysProcAttr; sys != nil && sys.Credential != nil {
		err = asEUID(int(sys.Credential.Uid), dial)
	} else {
		err = dial()
	}
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	return cl.Status(ctx)
}

// asEUID runs f on an OS thread whose effective uid is uid meanwhile (a
// socket connected there names uid in SO_PEERCRED). Only that thread
// changes (the raw system call, not syscall.Setresuid, which changes every
// thread); one whose switch back failed is never unlocked, so it dies
// with its goroutine.
func asEUID(uid int, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		const keep = ^uintptr(0) // -1: leave the real and saved uids
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, keep, uintptr(uid), keep); e != 0 {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("set effective uid %d: %w", uid, e)
			return
		}
		err := f()
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, keep, 0, keep); e != 0 {
			errc <- fmt.Errorf("set effective uid back to 0: %w", e)
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}

// waitStatus polls the status until ok accepts it.
func (c *cluster) waitStatus(what string, ok func(*proto.Status) bool) *proto.Status {
	c.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-c.done:
			c.t.Fatalf("master exited while waiting for %s: %v\n%s", what, c.err, c.log())
		default:
		}
		st, err := c.status()
		if err == nil && ok(st) {
			return st
		}
		last = err
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatalf("timed out waiting for %s (last error %v)", what, last)
	return nil
}

func (c *cluster) waitReady() *proto.Status {
	c.t.Helper()
	return c.waitStatus("all slots ready", func(st *proto.Status) bool { return st.Ready })
}

// dial connects from the client namespace with source address src.
func (c *cluster) dial(src netip.Addr, dst netip.AddrPort) (*echoConn, error) {
	return dialFrom(c.lab.Client, src, dst)
}

func dialFrom(ns *netlab.NS, src netip.Addr, dst netip.AddrPort) (*echoConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := ns.Dial(ctx, "tcp", src, dst)
	if err != nil {
		return nil, err
	}
	return readFirst(conn)
}

// ask opens a connection, reads the worker's line and closes.
func ask(ns *netlab.NS, src netip.Addr, dst netip.AddrPort) (reply, error) {
	c, err := dialFrom(ns, src, dst)
	if err != nil {
		return reply{}, err
	}
	c.Close()
	return c.first, nil
}

// needIPTables skips the test (or fails it, under IPCLUSTER_REQUIRE_TOOLS=1)
// unless the iptables binaries are installed: the iptables backend runs
// them, and so do the tests that read its rules.
func needIPTables(t testing.TB) {
	t.Helper()
	for _, bin := range []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"} {
		netlab.Tool(t, "iptables", bin)
	}
}

// nat returns the server namespace's nat table for a family, as
// iptables-save prints it, for the iptables backend's tests: without
// iptables installed, it skips the test (see needIPTables).
func nat(t *testing.T, lab *netlab.Lab, v6 bool) string {
	t.Helper()
	needIPTables(t)
	bin := "iptables-save"
	if v6 {
		bin = "ip6tables-save"
	}
	var rules []string
	// Drop the "# Generated ... on <time>" comments: they change every
	// second and are not rules.
	for _, l := range strings.Split(runIn(t, lab.Server, bin, "-t", "nat"), "\n") {
		if !strings.HasPrefix(l, "#") {
			rules = append(rules, l)
		}
	}
	return strings.Join(rules, "\n")
}

// runIn runs a command inside ns and returns its output.
func runIn(t *testing.T, ns *netlab.NS, name string, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := ns.Start(cmd); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, errb.String())
	}
	return out.String()
}

// iptablesLeft returns the lines of the server namespace's nat table for a
// family that mention substr (a chain name, e.g. "IPC-t"), for the checks
// that a cluster wrote or left no iptables rules, whatever its backend.
// With iptables installed it reads them with iptables-save, which sees
// either of iptables' variants; without, nothing can have written legacy
// rules, and it lists over netlink what iptables-nft would have written:
// chains in the family's nf_tables tables, and rules jumping to them.
func iptablesLeft(t *testing.T, lab *netlab.Lab, v6 bool, substr string) string {
	t.Helper()
	bin, family := "iptables-save", nftables.TableFamilyIPv4
	if v6 {
		bin, family = "ip6tables-save", nftables.TableFamilyIPv6
	}
	if _, err := exec.LookPath(bin); err == nil {
		return strings.Join(clusterRules(nat(t, lab, v6), substr), "\n")
	}
	conn := nftConn(t, lab)
	chains, err := conn.ListChainsOfTableFamily(family)
	if err != nil {
		t.Fatalf("list nf_tables chains: %v", err)
	}
	var lines []string
	for _, ch := range chains {
		if strings.Contains(ch.Name, substr) {
			lines = append(lines, fmt.Sprintf("table %s: chain %s", ch.Table.Name, ch.Name))
		}
		rules, err := conn.GetRules(ch.Table, ch)
		if err != nil {
			t.Fatalf("list rules of chain %s in table %s: %v", ch.Name, ch.Table.Name, err)
		}
		for _, r := range rules {
			for _, e := range r.Exprs {
				if v, ok := e.(*expr.Verdict); ok && strings.Contains(v.Chain, substr) {
					lines = append(lines, fmt.Sprintf("table %s: chain %s: rule to %s", ch.Table.Name, ch.Name, v.Chain))
				}
			}
		}
	}
	return strings.Join(lines, "\n")
}

// clusterRules returns the lines of nat that mention the cluster's chain.
func clusterRules(natOut, chain string) []string {
	var lines []string
	for _, l := range strings.Split(natOut, "\n") {
		if strings.Contains(l, chain) {
			lines = append(lines, l)
		}
	}
	return lines
}

// waitGone waits for pids to disappear.
func waitGone(t testing.TB, pids []int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for _, pid := range pids {
		for netlab.Running(pid) {
			if time.Now().After(deadline) {
				t.Errorf("process %d still exists after %s", pid, timeout)
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func workerPIDs(st *proto.Status) []int {
	var pids []int
	for _, w := range st.Workers {
		pids = append(pids, w.PID)
	}
	return pids
}

func activePID(st *proto.Status, slot int) int { return st.Slots[slot].Active }

// nftRoutes renders the elements of a map of the cluster's nf_tables table
// in the server namespace, in key order, as the master's status does: "" if
// there is no such map. It decodes the kernel's bytes itself rather than
// trusting the writer's encoder.
func nftRoutes(t *testing.T, lab *netlab.Lab, mapName string) string {
	t.Helper()
	conn := nftConn(t, lab)
	tbl := &nftables.Table{Name: "ipcluster-t", Family: nftables.TableFamilyINet}
	set, err := conn.GetSetByName(tbl, mapName)
	if err != nil {
		return ""
	}
	elems, err := conn.GetSetElements(set)
	if err != nil {
		t.Fatalf("read map %s: %v", mapName, err)
	}
	slices.SortFunc(elems, func(a, b nftables.SetElement) int { return bytes.Compare(a.Key, b.Key) })
	var lines []string
	for _, e := range elems {
		n := len(e.Key) - 8 // address, then protocol and port, each in a 4-byte register
		addr, _ := netip.AddrFromSlice(e.Key[:n])
		proto := map[byte]string{6: "tcp", 17: "udp"}[e.Key[n]]
		port := binary.BigEndian.Uint16(e.Key[n+4:])
		lines = append(lines, fmt.Sprintf("%s . %s . %d : %d", addr, proto, port, binary.BigEndian.Uint16(e.Val)))
	}
	return strings.Join(lines, "\n")
}

// nftConn is a netlink connection to nf_tables in the lab's server
// namespace.
func nftConn(t *testing.T, lab *netlab.Lab) *nftables.Conn {
	t.Helper()
	conn, err := lab.Server.NFTables()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.CloseLasting() })
	return conn
}

// checkNoRules checks the cluster left no rules of either backend.
func checkNoRules(t *testing.T, lab *netlab.Lab) {
	t.Helper()
	for _, v6 := range []bool{false, true} {
		if out := iptablesLeft(t, lab, v6, "IPC-t"); out != "" {
			t.Errorf("iptables rules left (v6=%v):\n%s", v6, out)
		}
	}
	tables, err := nftConn(t, lab).ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if tb.Name == "ipcluster-t" {
			t.Errorf("nf_tables table inet %s left", tb.Name)
		}
	}
}

// Without iptables-save on PATH, iptablesLeft still finds what iptables-nft
// wrote, over netlink: a chain of the cluster's name and a rule jumping
// to it.
func TestIPTablesLeftOverNetlink(t *testing.T) {
	needIPTables(t)
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	if v := runIn(t, lab.Server, "iptables", "--version"); !strings.Contains(v, "nf_tables") {
		t.Skipf("iptables is not iptables-nft (%s): its rules are not in nf_tables", strings.TrimSpace(v))
	}
	restore := exec.Command("iptables-restore", "--noflush")
	restore.Stdin = strings.NewReader("*nat\n:IPC-t - [0:0]\n-A OUTPUT -j IPC-t\nCOMMIT\n")
	if err := lab.Server.Start(restore); err != nil {
		t.Fatal(err)
	}
	if err := restore.Wait(); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", t.TempDir()) // no iptables-save
	got := iptablesLeft(t, lab, false, "IPC-t")
	for _, want := range []string{"table nat: chain IPC-t", "table nat: chain OUTPUT: rule to IPC-t"} {
		if !strings.Contains(got, want) {
			t.Errorf("iptablesLeft without iptables-save:\n%s\nwant a line %q", got, want)
		}
	}
	if got := iptablesLeft(t, lab, true, "IPC-t"); got != "" {
		t.Errorf("IPv6 rules found where only IPv4 ones were written:\n%s", got)
	}
}

// envTestBackend names the backend of every cluster whose test names none.
const envTestBackend = "IPCLUSTER_TEST_BACKEND"

// natBackendTest marks a test about the nftables backend's own behaviour
// (its rules, conntrack): its clusters use nftables whatever
// envTestBackend says, and whatever auto would pick.
func natBackendTest(t *testing.T) { t.Setenv(envTestBackend, string(ipcluster.BackendNFTables)) }
