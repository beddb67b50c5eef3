//go:build linux

package ipcluster_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
)

// A second cluster with another Name on a port the first routes, on an
// overlapping address, fails at start with ErrPortInUse naming the first
// and how to remove its rules, whichever backend each uses and in either
// family; it leaves nothing behind, and the first keeps serving.
func TestSecondClusterSamePortRefused(t *testing.T) {
	type combo struct{ first, second ipcluster.Backend }
	combos := []combo{{"nftables", "nftables"}, {"iptables", "nftables"}, {"nftables", "iptables"}, {"iptables", "iptables"}}
	for _, co := range combos {
		for _, fam := range []string{"ipv4", "ipv6", "any-ipv6"} {
			if fam == "any-ipv6" && co.first != co.second {
				continue // the address overlap is the same logic whatever the backends
			}
			t.Run(string(co.first)+"-"+string(co.second)+"-"+fam, func(t *testing.T) {
				lab := netlab.NewT(t, netlab.Options{Clients: 4})
				addr, clients := lab.ServerAddr4, lab.ClientAddrs4
				firstAddr, secondAddr := addr, addr
				switch fam {
				case "ipv6":
					addr, clients = lab.ServerAddr6, lab.ClientAddrs6
					firstAddr, secondAddr = addr, addr
				case "any-ipv6":
					// The first on every address, the second on one.
					addr, clients = lab.ServerAddr6, lab.ClientAddrs6
					firstAddr, secondAddr = netip.Addr{}, addr
				}
				first := startCluster(t, lab, specConfig{Name: "first", Workers: 2, Ports: tcpPorts(8080), Addr: firstAddr, Backend: co.first})
				st := first.waitReady()
				firstPIDs := append(workerPIDs(st), first.cmd.Process.Pid)

				runDir := t.TempDir()
				second := startCluster(t, lab, specConfig{Name: "second", Workers: 2, Ports: tcpPorts(8443, 8080), Addr: secondAddr,
					Backend: co.second, RunDir: runDir})
				if err := second.waitRefused(); err != nil {
					t.Fatalf("second cluster on the same port: %v, want it to fail at start\n%s", err, second.log())
				}
				log := second.log()
				remove := "nft delete table inet ipcluster-first"
				rules := "(nftables table inet ipcluster-first)"
				if co.first == "iptables" {
					cmd := "iptables"
					if fam != "ipv4" {
						cmd = "ip6tables"
					}
					removeCmd := cmd
					if fam == "any-ipv6" {
						// The first routes both families: its chains
						// of both are removed, IPv4 first.
						removeCmd = "iptables"
					}
					remove = removeCmd + " -t nat -D PREROUTING -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW " +
						`-m comment --comment "ipcluster:first" -j IPC-first; ` + removeCmd + ` -t nat -D OUTPUT`
					rules = "(iptables nat chain IPC-first of " + cmd
					if fam == "any-ipv6" {
						rules = "(iptables nat chain IPC-first of ip6tables)"
						remove += " -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW " +
							`-m comment --comment "ipcluster:first" -j IPC-first; iptables -t nat -F IPC-first; iptables -t nat -X IPC-first; ` +
							"ip6tables -t nat -D PREROUTING"
					}
				}
				where := "8080/tcp on " + addr.String()
				if !firstAddr.IsValid() {
					where = "8080/tcp on every local IPv6 address"
				}
				for _, want := range []string{ipcluster.ErrPortInUse.Error(), where + ` is routed by cluster "first" ` + rules,
					`starting cluster "second"`, "remove its stale rules with: " + remove} {
					if !strings.Contains(log, want) {
						t.Errorf("the refused master's log lacks %q:\n%s", want, log)
					}
				}
				if t.Failed() {
					return
				}
				t.Logf("the refused master says: %s", lastLine(log))

				// Nothing of the second is left: no rules, no run
				// directory, no process.
				if _, err := os.Stat(filepath.Join(runDir, "second")); !os.IsNotExist(err) {
					t.Errorf("the refused master left its cluster directory (stat: %v)", err)
				}
				checkNoRulesOf(t, lab, "second")
				ino, _ := lab.Server.Inode()
				for _, pid := range netlab.PIDsIn(ino) {
					if netlab.Running(pid) && !slices.Contains(firstPIDs, pid) {
						t.Errorf("process %d left in the lab, not the first cluster's (%v)", pid, firstPIDs)
					}
				}

				// The first cluster still serves every client.
				for _, src := range clients {
					rep, err := ask(lab.Client, src, netip.AddrPortFrom(addr, 8080))
					if err != nil {
						t.Fatalf("the first cluster stopped answering %s: %v", src, err)
					}
					if !slices.Contains(firstPIDs, rep.PID) {
						t.Errorf("client %s reached pid %d, not a worker of the first cluster (%v)", src, rep.PID, firstPIDs)
					}
				}
				if st, err := first.status(); err != nil || !st.Ready {
					t.Errorf("the first cluster is not ready any more: %v", err)
				}
			})
		}
	}
}

// A second cluster on another port, or on an address the first does not
// route (another local address, the other family), starts and serves
// beside it.
func TestSecondClusterOtherPortOrAddrStarts(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	first := startCluster(t, lab, specConfig{Name: "first", Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4})
	first.waitReady()
	for _, cfg := range []specConfig{
		{Name: "port", Ports: tcpPorts(8081), Addr: lab.ServerAddr4},
		{Name: "addr", Ports: tcpPorts(8080), Addr: lab.LocalAddrs4[1], Backend: "iptables"},
		{Name: "family", Ports: tcpPorts(8080), Addr: lab.ServerAddr6},
		{Name: "udp", Ports: udpPorts(8080)},
	} {
		cfg.Workers = 2
		c := startCluster(t, lab, cfg)
		c.waitReady()
		if strings.Contains(c.log(), ipcluster.ErrPortInUse.Error()) {
			t.Errorf("cluster %s: %s", cfg.Name, c.log())
		}
	}
	for _, dst := range []netip.AddrPort{netip.AddrPortFrom(lab.ServerAddr4, 8080), netip.AddrPortFrom(lab.ServerAddr4, 8081),
		netip.AddrPortFrom(lab.ServerAddr6, 8080)} {
		src := lab.ClientAddrs4[1]
		if dst.Addr().Is6() {
			src = lab.ClientAddrs6[1]
		}
		if _, err := ask(lab.Client, src, dst); err != nil {
			t.Errorf("%s: %v", dst, err)
		}
	}
}

// Another program's nat rule that redirects a public port draws a warning
// naming it, not a refusal (see the README, "Other clusters on the same
// port").
func TestForeignRedirectWarns(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	runIn(t, lab.Server, "iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "8080", "-j", "REDIRECT", "--to-ports", "9999")
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4})
	c.waitReady()
	log := c.log()
	for _, want := range []string{"a nat rule outside ipcluster already redirects a public port of this cluster",
		"iptables nat chain PREROUTING", "-A PREROUTING -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 9999"} {
		if !strings.Contains(log, want) {
			t.Errorf("master log lacks %q:\n%s", want, log)
		}
	}
}

// waitRefused waits for the master to fail at start: nil once it exited
// with an error, an error if it exited cleanly, became ready, or is still
// running after 30s.
func (c *cluster) waitRefused() error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-c.done:
			if c.err == nil {
				return fmt.Errorf("master exited with status 0")
			}
			return nil
		case <-time.After(50 * time.Millisecond):
		}
		if st, err := c.status(); err == nil && st.Ready {
			return fmt.Errorf("master started and is ready")
		}
	}
	return fmt.Errorf("master still running after 30s")
}

// checkNoRulesOf checks the namespace holds no rules of cluster name.
func checkNoRulesOf(t *testing.T, lab *netlab.Lab, name string) {
	t.Helper()
	for _, v6 := range []bool{false, true} {
		if out := nat(t, lab, v6); strings.Contains(out, "IPC-"+name) {
			t.Errorf("iptables rules of %s left (v6=%v):\n%s", name, v6, out)
		}
	}
	tables, err := nftConn(t, lab).ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if strings.Contains(tb.Name, name) {
			t.Errorf("nf_tables table %s left", tb.Name)
		}
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// The bpf backend binds the public port itself: a second cluster there is
// refused before it binds anything, whichever backend the first uses, and
// the first serves on.
func TestSecondClusterSamePortRefusedBPF(t *testing.T) {
	for _, first := range []ipcluster.Backend{"bpf", "nftables"} {
		t.Run(string(first)+"-bpf", func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{Clients: 4})
			c1 := startCluster(t, lab, specConfig{Name: "first", Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: first})
			st := c1.waitReady()
			firstPIDs := append(workerPIDs(st), c1.cmd.Process.Pid)
			runDir := t.TempDir()
			second := startCluster(t, lab, specConfig{Name: "second", Workers: 2, Ports: tcpPorts(8443, 8080), Backend: "bpf", RunDir: runDir})
			if err := second.waitRefused(); err != nil {
				t.Fatalf("second cluster on the same port: %v, want it to fail at start\n%s", err, second.log())
			}
			log := second.log()
			want := []string{ipcluster.ErrPortInUse.Error(), "8080/tcp is already bound in this network namespace (on 198.18.0.1)", "ss -ltnp 'sport = :8080'"}
			if first != "bpf" {
				want = []string{ipcluster.ErrPortInUse.Error(), `is routed by cluster "first"`}
			}
			for _, w := range want {
				if !strings.Contains(log, w) {
					t.Errorf("the refused master's log lacks %q:\n%s", w, log)
				}
			}
			t.Logf("the refused master says: %s", lastLine(log))
			if _, err := os.Stat(filepath.Join(runDir, "second")); !os.IsNotExist(err) {
				t.Errorf("the refused master left its cluster directory (stat: %v)", err)
			}
			ino, _ := lab.Server.Inode()
			for _, pid := range netlab.PIDsIn(ino) {
				if netlab.Running(pid) && !slices.Contains(firstPIDs, pid) {
					t.Errorf("process %d left in the lab, not the first cluster's (%v)", pid, firstPIDs)
				}
			}
			for _, src := range lab.ClientAddrs4 {
				if rep, err := ask(lab.Client, src, netip.AddrPortFrom(lab.ServerAddr4, 8080)); err != nil || !slices.Contains(firstPIDs, rep.PID) {
					t.Errorf("client %s reached %+v (%v), want a worker of the first cluster", src, rep, err)
				}
			}
		})
	}
}
