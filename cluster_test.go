//go:build linux

package ipcluster_test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	osexec "os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// expectSlot is the slot the rules must pick for a client address: the low
// bits of its first prefix bits.
func expectSlot(a netip.Addr, workers, prefix int) int {
	b := a.As16()
	if a.Is4() {
		prefix += 96
	}
	// bits [prefix-k, prefix) of the 128-bit address, k = log2(workers)
	slot := 0
	for i := 0; (1 << i) < workers; i++ {
		bit := prefix - 1 - i
		if b[bit/8]&(0x80>>(bit%8)) != 0 {
			slot |= 1 << i
		}
	}
	return slot
}

// checkSticky connects from every address `rounds` times on every port and
// checks the answering worker is always the one the address's bits select,
// that the worker sees the real client address, and that every slot is hit.
func checkSticky(t *testing.T, ns *netlab.NS, srcs []netip.Addr, dst netip.Addr, ports []uint16, workers, prefix, rounds int) {
	t.Helper()
	owner := map[netip.Addr]int{} // address → pid
	hits := make([]int, workers)
	for _, port := range ports {
		for r := 0; r < rounds; r++ {
			for _, src := range srcs {
				rep, err := ask(ns, src, netip.AddrPortFrom(dst, port))
				if err != nil {
					t.Fatalf("from %s to port %d: %v", src, port, err)
				}
				if want := expectSlot(src, workers, prefix); rep.Slot != want {
					t.Fatalf("client %s reached slot %d, its bits select slot %d", src, rep.Slot, want)
				}
				if rep.Remote.Addr() != src {
					t.Fatalf("worker saw client address %s, want %s", rep.Remote.Addr(), src)
				}
				if pid, ok := owner[src]; ok && pid != rep.PID {
					t.Fatalf("client %s reached pid %d, earlier pid %d", src, rep.PID, pid)
				}
				owner[src] = rep.PID
				hits[rep.Slot]++
			}
		}
	}
	for slot, n := range hits {
		if n == 0 {
			t.Errorf("slot %d received no traffic", slot)
		}
	}
}

// backends are the rule backends the routing tests run against.
var backends = []ipcluster.Backend{ipcluster.BackendIPTables, ipcluster.BackendNFTables, ipcluster.BackendBPF}

func TestRoutesIPv4BySourceBits(t *testing.T) {
	for _, backend := range backends {
		t.Run(string(backend), func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{})
			c := startCluster(t, lab, specConfig{Workers: 4, Ports: tcpPorts(8080, 8443), Addr: lab.ServerAddr4, Backend: backend})
			st := c.waitReady()
			checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080, 8443}, 4, 32, 10)

			c.checkKernelRules(t)
			if n := len(st.Workers); n != 4 {
				t.Errorf("%d workers, want 4", n)
			}
			if iptablesLeft(t, lab, true, "IPC-t") != "" || strings.Contains(nftRoutes(t, lab, "slots6"), ":") {
				t.Error("an IPv4-only cluster wrote IPv6 rules")
			}
		})
	}
}

// checkKernelRules checks the kernel holds exactly the IPv4 rules the
// master believes in: for iptables, the chain hooked once from each
// built-in chain; for nftables (the default here), the map's elements.
func (c *cluster) checkKernelRules(t *testing.T) {
	t.Helper()
	backend := c.spec.Config.Backend
	if backend == ipcluster.BackendAuto {
		st, err := c.status()
		if err != nil {
			t.Fatal(err)
		}
		backend = ipcluster.Backend(st.Backend)
	}
	if backend == ipcluster.BackendBPF {
		// No rule at all: the public port is the workers' sockets.
		if out := iptablesLeft(t, c.lab, false, "IPC-t"); out != "" {
			t.Errorf("the bpf backend wrote iptables rules:\n%s", out)
		}
		if out := runIn(t, c.lab.Server, "nft", "list", "ruleset"); strings.Contains(out, "ipcluster") {
			t.Errorf("the bpf backend wrote nftables rules:\n%s", out)
		}
		st, err := c.status()
		if err != nil {
			t.Fatal(err)
		}
		for slot := range st.Slots {
			if !strings.Contains(st.Rules["bpf"], fmt.Sprintf("slot %d → socket ", slot)) || strings.Contains(st.Rules["bpf"], fmt.Sprintf("slot %d → socket 0 ", slot)) {
				t.Errorf("slot %d not steered:\n%s", slot, st.Rules["bpf"])
			}
		}
		return
	}
	if backend != "iptables" { // nftables
		if got, want := nftRoutes(t, c.lab, "slots4"), c.statusRules(t, "ipv4"); got != want {
			t.Errorf("kernel routes:\n%s\nwant:\n%s", got, want)
		}
		if out := iptablesLeft(t, c.lab, false, "IPC-t"); out != "" {
			t.Errorf("the nftables backend wrote iptables rules:\n%s", out)
		}
		return
	}
	got := clusterRules(nat(t, c.lab, false), "IPC-t")
	want := []string{
		":IPC-t - [0:0]",
		`-A PREROUTING -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW -m comment --comment "ipcluster:t" -j IPC-t`,
		`-A OUTPUT -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW -m comment --comment "ipcluster:t" -j IPC-t`,
	}
	want = append(want, strings.Split(c.statusRules(t, "ipv4"), "\n")...)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("kernel rules:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func (c *cluster) statusRules(t *testing.T, fam string) string {
	t.Helper()
	st, err := c.status()
	if err != nil {
		t.Fatal(err)
	}
	return st.Rules[fam]
}

func TestRoutesIPv6ByPrefixBits(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{})
	// Addr unset: both families, any local address.
	c := startCluster(t, lab, specConfig{Workers: 8, Ports: tcpPorts(8080)})
	c.waitReady()
	// Each client sits in its own /64: by default the slot comes from the
	// low bits of the prefix.
	checkSticky(t, lab.Client, lab.ClientAddrs6, lab.ServerAddr6, []uint16{8080}, 8, 64, 3)
	// A client's other addresses in the same /64 (privacy addresses) keep
	// its worker.
	base := lab.ClientAddrs6[5]
	extra := addAddrs(t, lab.Client, base, 4)
	first, err := ask(lab.Client, base, netip.AddrPortFrom(lab.ServerAddr6, 8080))
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range extra {
		rep, err := ask(lab.Client, a, netip.AddrPortFrom(lab.ServerAddr6, 8080))
		if err != nil {
			t.Fatal(err)
		}
		if rep.PID != first.PID {
			t.Errorf("address %s in the /64 of %s reached pid %d, not %d", a, base, rep.PID, first.PID)
		}
	}
	// The same cluster serves IPv4 too.
	checkSticky(t, lab.Client, lab.ClientAddrs4[:16], lab.ServerAddr4, []uint16{8080}, 8, 32, 1)
}

func TestRoutesIPv6ByOwnLowBits(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startCluster(t, lab, specConfig{Workers: 4, Ports: tcpPorts(8080), Addr: lab.ServerAddr6, IPv6SlotPrefix: 128})
	c.waitReady()
	// 16 addresses in one /64 whose own low bits differ.
	srcs := addAddrs(t, lab.Client, lab.ClientAddrs6[0], 16)
	checkSticky(t, lab.Client, srcs, lab.ServerAddr6, []uint16{8080}, 4, 128, 3)
}

// addAddrs adds n addresses to the client veth in the /64 of base, whose
// last byte counts from 0x40.
func addAddrs(t *testing.T, ns *netlab.NS, base netip.Addr, n int) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	err := ns.Do(func() error {
		link, err := netlink.LinkByName("ipcc0")
		if err != nil {
			return err
		}
		for i := 0; i < n; i++ {
			b := base.As16()
			b[14], b[15] = 0x10, byte(0x40+i)
			a := netip.AddrFrom16(b)
			addr, _ := netlink.ParseAddr(a.String() + "/32")
			addr.Flags = unix.IFA_F_NODAD
			if err := netlink.AddrAdd(link, addr); err != nil {
				return err
			}
			out = append(out, a)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Clients on the host itself go through OUTPUT.
func TestRoutesSameHostClients(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startCluster(t, lab, specConfig{Workers: 4, Ports: tcpPorts(8080)})
	c.waitReady()
	checkSticky(t, lab.Server, lab.LocalAddrs4, lab.ServerAddr4, []uint16{8080}, 4, 32, 5)
	checkSticky(t, lab.Server, lab.LocalAddrs6, lab.ServerAddr6, []uint16{8080}, 4, 64, 2)
}

// holdOne opens one long-lived connection per slot.
func holdOne(t *testing.T, c *cluster, dst netip.AddrPort, workers int) map[int]*echoConn {
	t.Helper()
	held := map[int]*echoConn{}
	for _, src := range c.lab.ClientAddrs4 {
		if len(held) == workers {
			break
		}
		if _, ok := held[expectSlot(src, workers, 32)]; ok {
			continue
		}
		conn, err := c.dial(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		held[conn.first.Slot] = conn
	}
	return held
}

func TestKilledWorkerIsReplaced(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	c := startCluster(t, lab, specConfig{Workers: 4, Ports: tcpPorts(8080), Addr: lab.ServerAddr4})
	st := c.waitReady()
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	held := holdOne(t, c, dst, 4)

	victim := activePID(st, 2)
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st = c.waitStatus("slot 2 replaced", func(st *ipStatus) bool {
		p := activePID(st, 2)
		return p != 0 && p != victim
	})
	// The replacement serves the slot's clients...
	src := held[2].first.Remote.Addr()
	rep, err := ask(lab.Client, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	if rep.PID != activePID(st, 2) || rep.Slot != 2 {
		t.Errorf("client of slot 2 reached pid %d slot %d, want replacement %d", rep.PID, rep.Slot, activePID(st, 2))
	}
	// ...and every other slot's established connection is untouched.
	for slot, conn := range held {
		if slot == 2 {
			continue
		}
		rep, err := conn.probe()
		if err != nil || rep.PID != conn.first.PID {
			t.Errorf("slot %d's established connection broke after slot 2's worker was killed: %v %+v", slot, err, rep)
		}
		if activePID(st, slot) != conn.first.PID {
			t.Errorf("slot %d changed worker", slot)
		}
	}
}

func TestSlotMoveKeepsEstablishedConnections(t *testing.T) {
	for _, backend := range backends {
		t.Run(string(backend), func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{Clients: 8})
			c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: backend})
			st := c.waitReady()
			dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
			src := lab.ClientAddrs4[1] // slot 1
			old, err := c.dial(src, dst)
			if err != nil {
				t.Fatal(err)
			}
			defer old.Close()
			oldPID := activePID(st, 1)
			if old.first.PID != oldPID {
				t.Fatalf("connected to pid %d, slot 1 is pid %d", old.first.PID, oldPID)
			}
			// The worker asks to be retired (SIGUSR1): the master starts a
			// replacement, points the slot at it, and retires the old one.
			if err := syscall.Kill(oldPID, syscall.SIGUSR1); err != nil {
				t.Fatal(err)
			}
			st = c.waitStatus("slot 1 moved", func(st *ipStatus) bool {
				p := activePID(st, 1)
				return p != 0 && p != oldPID
			})
			newPID := activePID(st, 1)
			c.checkKernelRules(t) // the slot's rules were replaced in place
			rep, err := ask(lab.Client, src, dst)
			if err != nil || rep.PID != newPID {
				t.Fatalf("new connection from %s reached pid %d (%v), want the new worker %d", src, rep.PID, err, newPID)
			}
			for i := 0; i < 3; i++ {
				rep, err := old.probe()
				if err != nil || rep.PID != oldPID {
					t.Fatalf("established connection after the slot moved: pid %d, err %v; want the old worker %d", rep.PID, err, oldPID)
				}
				time.Sleep(100 * time.Millisecond)
			}
			// The retired worker leaves once its last connection closes.
			old.Close()
			waitGone(t, []int{oldPID}, 5*time.Second)
		})
	}
}

func TestGracefulStopLeavesNothing(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startCluster(t, lab, specConfig{Workers: 4, Ports: tcpPorts(8080, 8443)})
	st := c.waitReady()
	pids := workerPIDs(st)
	if err := c.stop(); err != nil {
		t.Fatalf("master exit: %v\n%s", err, c.log())
	}
	checkNoRules(t, lab)
	waitGone(t, pids, 5*time.Second)
	dir := strings.TrimSuffix(c.socket, "/control.sock")
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(dir)
		t.Errorf("run directory %s left behind (%v): %v", dir, err, entries)
	}
}

// An operator's `nft flush ruleset` (nftables.service does one on every
// reload) deletes the cluster's table; the master notices within its check
// interval and writes the rules again.
func TestLostRulesAreRewritten(t *testing.T) {
	natBackendTest(t) // flushes the nftables ruleset
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4})
	c.waitReady()
	conn := nftConn(t, lab)
	conn.FlushRuleset()
	if err := conn.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := ask(lab.Client, lab.ClientAddrs4[0], netip.AddrPortFrom(lab.ServerAddr4, 8080)); err == nil {
		t.Fatal("the cluster still answered with its table flushed; the test cannot tell a rewrite")
	}
	deadline := time.Now().Add(10 * time.Second)
	for nftRoutes(t, lab, "slots4") == "" {
		if time.Now().After(deadline) {
			t.Fatal("the master did not rewrite its flushed rules within 10s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.checkKernelRules(t)
	checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)
	if !strings.Contains(c.log(), "lost the cluster's rules") {
		t.Error("the master did not log the lost rules")
	}
}

// The iptables backend's check reads the nat table back every
// ruleCheckInterval: a hook deleted, the chain flushed or a rule changed
// behind the master's back is found, logged and rewritten, and the slots
// route as before. Addr is unset, so that the checks of the IPv6 chain,
// left alone, show it as written too.
func TestLostIPTablesRulesAreRewritten(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	needIPTables(t)
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Backend: ipcluster.BackendIPTables})
	c.waitReady()
	c.checkKernelRules(t)
	written := clusterRules(nat(t, lab, false), "IPC-t")
	slices.Sort(written)
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	hook := []string{"-m", "addrtype", "--dst-type", "LOCAL", "-m", "conntrack", "--ctstate", "NEW",
		"-m", "comment", "--comment", "ipcluster:t", "-j", "IPC-t"}
	for _, tc := range []struct {
		name   string
		args   func() []string // an iptables command, run in the server's namespace
		broken bool            // new connections fail until the rewrite
		logged string
	}{
		{"hook deleted", func() []string { return append([]string{"-t", "nat", "-D", "PREROUTING"}, hook...) }, true, "the hook from PREROUTING to chain IPC-t is gone"},
		{"chain flushed", func() []string { return []string{"-t", "nat", "-F", "IPC-t"} }, true, "chain IPC-t holds 0 rules"},
		{"rule changed", func() []string {
			// The first slot's rule, sent to a port nothing listens on.
			for _, l := range clusterRules(nat(t, lab, false), "IPC-t") {
				if spec, ok := strings.CutPrefix(l, "-A IPC-t "); ok {
					f := strings.Fields(spec)
					f[len(f)-1] = ":1"
					return append([]string{"-t", "nat", "-R", "IPC-t", "1"}, f...)
				}
			}
			t.Fatal("no rule in chain IPC-t")
			return nil
		}, false, "rule 1 of chain IPC-t is"},
	} {
		runIn(t, lab.Server, "iptables", tc.args()...)
		if tc.broken {
			if _, err := ask(lab.Client, lab.ClientAddrs4[0], dst); err == nil {
				t.Fatalf("%s: the cluster still answered; the test cannot tell a rewrite", tc.name)
			}
		}
		deadline := time.Now().Add(15 * time.Second)
		for {
			got := clusterRules(nat(t, lab, false), "IPC-t")
			slices.Sort(got)
			if slices.Equal(got, written) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the master did not rewrite its rules within 15s:\n%s", tc.name, strings.Join(got, "\n"))
			}
			time.Sleep(100 * time.Millisecond)
		}
		c.checkKernelRules(t)
		checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)
		if log := c.log(); !strings.Contains(log, tc.logged) {
			t.Errorf("%s: the master did not log %q:\n%s", tc.name, tc.logged, log)
		}
	}
	// One rewrite per change: a check of the rules as written finds
	// nothing to rewrite.
	if n := strings.Count(c.log(), "lost the cluster's rules"); n != 3 {
		t.Errorf("the master found its rules lost %d times, want 3:\n%s", n, c.log())
	}
}

// A graceful stop withdraws the routes at once, but a finishing worker's
// established connections keep working until they close: the rules that
// translate them stay until the last worker is gone. (With nftables, the
// cluster's table may hold the namespace's only nat hooks; deleting it
// first would cut every open connection.)
func TestGracefulStopDrainsEstablishedConnections(t *testing.T) {
	for _, backend := range backends {
		t.Run(string(backend), func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{Clients: 4})
			c := startScenario(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
				Backend: backend, StopTimeout: 10 * time.Second}, "linger")
			c.waitReady()
			dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
			held, err := c.dial(lab.ClientAddrs4[0], dst)
			if err != nil {
				t.Fatal(err)
			}
			defer held.Close()
			if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			// New connections find no route once the master has withdrawn
			// them; poll, since the signal is handled asynchronously.
			deadline := time.Now().Add(5 * time.Second)
			for {
				if _, err := ask(lab.Client, lab.ClientAddrs4[1], dst); err != nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("new connections still reach the cluster 5s after SIGTERM")
				}
				time.Sleep(20 * time.Millisecond)
			}
			for range 3 {
				if rep, err := held.probe(); err != nil || rep.PID != held.first.PID {
					t.Fatalf("established connection during the stop: pid %d, err %v; want %d", rep.PID, err, held.first.PID)
				}
				time.Sleep(100 * time.Millisecond)
			}
			held.Close()
			if err := c.wait(5 * time.Second); err != nil {
				t.Fatalf("master after its last connection closed: %v", err)
			}
			checkNoRules(t, lab)
		})
	}
}

// A crashed master leaves its chain with stale targets and a duplicate
// hook; the next master reconciles: with iptables, one hook and only live
// targets; with nftables, its own table in force and the chain gone; with
// bpf, the chain gone (it would take the clients before the sockets).
func TestStaleChainsAreReconciled(t *testing.T) {
	for _, backend := range backends {
		t.Run(string(backend), func(t *testing.T) {
			needIPTables(t) // for the crashed master's chain, whatever the backend
			lab := netlab.NewT(t, netlab.Options{Clients: 4})
			stale := "*nat\n:IPC-t - [0:0]\n" +
				"-A IPC-t -s 0.0.0.1/0.0.0.1 -p tcp -m tcp --dport 8080 -j DNAT --to-destination :1\n" +
				"-A PREROUTING -j IPC-t\n" +
				"-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment \"ipcluster:t\" -j IPC-t\n" +
				"-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment \"ipcluster:t\" -j IPC-t\nCOMMIT\n"
			restore := osexec.Command("iptables-restore", "--noflush")
			restore.Stdin = strings.NewReader(stale)
			if err := lab.Server.Start(restore); err != nil {
				t.Fatal(err)
			}
			if err := restore.Wait(); err != nil {
				t.Fatal(err)
			}
			c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: backend})
			c.waitReady()
			out := nat(t, lab, false)
			if backend != "iptables" {
				if strings.Contains(out, "IPC-t") {
					t.Errorf("the iptables chain of a crashed master survived a %s master:\n%s", backend, out)
				}
			} else {
				if n := strings.Count(out, "-A PREROUTING"); n != 1 {
					t.Errorf("%d PREROUTING hooks after reconcile, want 1:\n%s", n, out)
				}
				if strings.Contains(out, "--to-destination :1\n") {
					t.Errorf("stale target survived:\n%s", out)
				}
			}
			c.checkKernelRules(t)
			checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)
		})
	}
}

type ipStatus = proto.Status

// SIGTERM to a worker hands its slot over first: its clients are never
// refused while it leaves.
func TestSignalledWorkerHandsOverItsSlot(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4})
	st := c.waitReady()
	old := activePID(st, 1)
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	if err := syscall.Kill(old, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	attempts := 0
	for netlab.Running(old) && time.Now().Before(deadline) {
		attempts++
		rep, err := ask(lab.Client, lab.ClientAddrs4[1], dst)
		if err != nil {
			t.Fatalf("attempt %d refused while slot 1's worker was leaving: %v", attempts, err)
		}
		if rep.Slot != 1 {
			t.Fatalf("reached slot %d", rep.Slot)
		}
	}
	if netlab.Running(old) {
		t.Fatalf("signalled worker %d still running", old)
	}
	rep, err := ask(lab.Client, lab.ClientAddrs4[1], dst)
	if err != nil || rep.PID == old {
		t.Fatalf("after the handover: %+v %v", rep, err)
	}
	t.Logf("%d connection attempts during the handover, none refused", attempts)
}

// A client whose connection a crashed worker reset reuses its source port
// soon after (as it may: a reset leaves no TIME_WAIT). Conntrack does not
// reopen an entry closed by the server's reset, so without the master's
// cleanup the new SYN would follow the old translation to the dead port
// and be refused for the entry's 10s, long after the slot moved.
func TestCrashedWorkerClientPortReuse(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4})
	st := c.waitReady()
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	src := netip.AddrPortFrom(lab.ClientAddrs4[1], 41234) // slot 1, a fixed port
	dial := func() (*echoConn, error) {
		var ec *echoConn
		err := lab.Client.Do(func() error {
			d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(src), Timeout: 3 * time.Second,
				Control: func(_, _ string, rc syscall.RawConn) error {
					return rc.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1) })
				}}
			conn, err := d.Dial("tcp", dst.String())
			if err != nil {
				return err
			}
			ec, err = readFirst(conn)
			return err
		})
		return ec, err
	}
	held, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	victim := held.first.PID
	if victim != activePID(st, 1) {
		t.Fatalf("reached %d, want slot 1's %d", victim, activePID(st, 1))
	}
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, err := held.probe(); err == nil {
		t.Fatal("the killed worker's connection still answers")
	}
	held.Close()
	c.waitStatus("slot 1 replaced", func(s *proto.Status) bool { return activePID(s, 1) != 0 && activePID(s, 1) != victim })
	time.Sleep(100 * time.Millisecond) // the cleanup follows the rule write
	again, err := dial()
	if err != nil {
		t.Fatalf("the same client port, after the slot moved: %v", err)
	}
	defer again.Close()
	if again.first.PID == victim || again.first.Slot != 1 {
		t.Fatalf("reached %+v", again.first)
	}
}
