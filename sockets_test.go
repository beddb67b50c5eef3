//go:build linux

package ipcluster_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// A worker killed under load refuses nobody: the master holds its
// sockets, connections wait in their queues, and the replacement inherits
// them. Only the connections the killed worker had accepted (and not yet
// answered) can fail; no dial is refused. Before the master owned the
// sockets, each kill -9 refused 1-3 short connections of its slot.
func TestKillNineRefusesNobody(t *testing.T) {
	for _, backend := range backends {
		t.Run(string(backend), func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{Clients: 64})
			c := startCluster(t, lab, specConfig{Workers: 4, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: backend})
			st := c.waitReady()
			dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
			stop := startLoad(t, lab.Client, lab.ClientAddrs4, dst, 16, 1_000_000)
			const kills = 6
			for i := range kills {
				slot := i % 4
				victim := activePID(st, slot)
				if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				st = c.waitStatus("slot replaced", func(st *proto.Status) bool {
					p := activePID(st, slot)
					return p != 0 && p != victim
				})
				time.Sleep(200 * time.Millisecond) // load on the replacement before the next kill
			}
			res := stop()
			t.Logf("%d kills under load: %s", kills, res)
			if res.Refused > 0 {
				t.Errorf("%d connections refused over %d kills, want 0", res.Refused, kills)
			}
			// A killed worker takes the connections it had accepted and
			// not yet answered: at most the load's share of the slot in
			// flight, 16 loaders over 4 slots. A queue reset (what the
			// held sockets prevent) would take every connection waiting.
			if inFlight := kills * 16 / 4; res.Failures > inFlight {
				t.Errorf("%d failed attempts over %d kills: more than the killed workers' own connections (%d at most)", res.Failures, kills, inFlight)
			}
		})
	}
}

// A worker that dies while no master runs takes the slot's last sockets
// with it. The next master sees that its route points at nothing and
// replaces it at once, instead of waiting ConnectTimeout (here 30s) for a
// worker that cannot come back; the live workers are adopted meanwhile.
func TestWorkerDeadWithoutMasterReplacedAtOnce(t *testing.T) {
	for _, backend := range backends {
		t.Run(string(backend), func(t *testing.T) {
			d := startDeployLab(t, 4, func(s *spec) {
				s.Config.Backend = backend
				s.Config.ConnectTimeout = 30 * time.Second
			})
			st0, _ := d.c.status()
			if err := d.c.cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			<-d.c.done
			victim := activePID(st0, 2)
			if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			waitGone(t, []int{victim}, 5*time.Second)
			t0 := time.Now()
			c2 := startClusterSpec(t, d.lab, d.c.spec.Config, func(s *spec) { *s = d.c.spec })
			st := c2.waitStatus("slot 2 replaced and the others adopted, well before ConnectTimeout", func(st *proto.Status) bool {
				for slot := range st.Slots {
					p := activePID(st, slot)
					if slot == 2 && (p == 0 || p == victim) || slot != 2 && p != activePID(st0, slot) {
						return false
					}
				}
				return st.Ready
			})
			t.Logf("new master: slot 2 replaced and served %s after start", time.Since(t0).Round(time.Millisecond))
			src := d.lab.ClientAddrs4[2]
			if rep, err := ask(d.lab.Client, src, d.dst); err != nil || rep.PID != activePID(st, 2) {
				t.Errorf("slot 2's client reached %+v (%v), want the replacement %d", rep, err, activePID(st, 2))
			}
			c2.checkKernelRules(t)
		})
	}
}

// A deploy on the bpf backend carries the socket arrays with the
// handover: the new master takes the groups over without a gap, even when
// the workers (WorkerUser) keep no copy of them.
func TestBPFDeployCarriesArrays(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the master spawns workers as nobody")
	}
	runDir := openTempDir(t, 0o755)
	d := startDeployLab(t, 4, func(s *spec) {
		s.Config.Backend = ipcluster.BackendBPF
		s.Config.WorkerUser = "nobody"
		s.Config.RunDir = runDir
	})
	st0, _ := d.c.status()
	d.load()
	d.setVersion("v2")
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.waitStatus("the deploy committed", func(st *proto.Status) bool {
		return st.MasterPID != st0.MasterPID && servedBy(st, "v2", workerPIDs(st0)) && strings.HasPrefix(st.Deploy, "committed")
	})
	d.finish() // no failed attempt
	if log := d.c.log(); strings.Contains(log, "device or resource busy") {
		t.Errorf("the new master met sockets held in another array:\n%s", log)
	}
}

// Until the first install, a bpf cluster's public port routes nobody to
// the wrong worker: the program is on the group from its first socket,
// with every slot empty, so early clients are refused, as with no nat
// rule yet. (Without it the kernel hashed them over whichever workers'
// sockets were in the group.) Slot 3's worker is held back, so the first
// install waits while slots 0 to 2 are ready and accepting.
func TestBPFNoRouteBeforeInstall(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 64})
	gates := t.TempDir()
	c := startClusterSpec(t, lab, specConfig{Workers: 4, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: ipcluster.BackendBPF,
		WorkerReady: true, ReadyTimeout: time.Minute, ConnectTimeout: 30 * time.Second}, func(s *spec) {
		s.Scenario, s.ReportDir = "readyecho", gates
		s.SlotScenarios = map[int]string{3: "gated"}
	})
	st := c.waitStatus("slot 3 held back, the others ready", func(st *proto.Status) bool {
		return starting(st, 3) != 0 && activePID(st, 0) != 0 && activePID(st, 1) != 0 && activePID(st, 2) != 0
	})
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	for _, src := range lab.ClientAddrs4 {
		if rep, err := ask(lab.Client, src, dst); err == nil {
			t.Errorf("client %s of slot %d answered by slot %d (pid %d) before the first install", src, expectSlot(src, 4, 32), rep.Slot, rep.PID)
		}
	}
	if err := os.WriteFile(filepath.Join(gates, "ready-"+strconv.Itoa(starting(st, 3))), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c.waitReady()
	checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 4, 32, 1)
}

// The bpf backend's drift check: a slot emptied behind the master's back
// (here by root, through the array's id) is noticed within the check's
// period, reported as EventRulesFailed wrapping ErrRulesLost, and written
// again.
func TestBPFDriftRewritten(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	events := filepath.Join(t.TempDir(), "events.jsonl")
	// A name of its own: its array's, among any other cluster's.
	c := startClusterSpec(t, lab, specConfig{Name: "drift", Workers: 4, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: ipcluster.BackendBPF},
		func(s *spec) { s.EventsLog = events })
	st := c.waitReady()
	array := clusterArray(t, "ipc_drift")
	defer array.Close()
	if err := array.Delete(uint32(0)); err != nil {
		t.Fatalf("empty slot 0 of the array: %v", err)
	}
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	if _, err := ask(lab.Client, lab.ClientAddrs4[0], dst); err == nil {
		t.Fatal("slot 0 answered with its slot emptied")
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		rep, err := ask(lab.Client, lab.ClientAddrs4[0], dst)
		if err == nil && rep.PID == activePID(st, 0) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot 0 not written again within 10s: %+v %v\n%s", rep, err, c.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !hasEvent(t, events, "EventRulesFailed") || !strings.Contains(c.log(), "the kernel lost the cluster's rules") {
		t.Errorf("the drift was not reported:\n%s", c.log())
	}
	c.checkKernelRules(t)
}

// clusterArray opens the one REUSEPORT_SOCKARRAY of that name, by its id:
// root's way in.
func clusterArray(t *testing.T, name string) *ebpf.Map {
	t.Helper()
	var found *ebpf.Map
	for id := ebpf.MapID(0); ; {
		next, err := ebpf.MapGetNextID(id)
		if err != nil {
			break
		}
		id = next
		m, err := ebpf.NewMapFromID(id)
		if err != nil {
			continue
		}
		info, err := m.Info()
		if err == nil && info.Name == name && m.Type() == ebpf.ReusePortSockArray {
			if found != nil {
				found.Close()
				m.Close()
				t.Fatalf("two arrays named %s", name)
			}
			found = m
			continue
		}
		m.Close()
	}
	if found == nil {
		t.Fatalf("no array named %s", name)
	}
	return found
}
