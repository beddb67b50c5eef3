//go:build linux

package ipcluster_test

import (
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// crashLoopWindow is how long TestCrashAtStartBackoff watches a slot whose
// workers fail right after start, and crashLoopMaxSpawns the most spawns
// of that slot the backoff allows in it: at once, then 200ms, 400ms, ...
// 6.4s apart, 9 in 20s at best. A busy machine only spawns fewer.
const (
	crashLoopWindow    = 20 * time.Second
	crashLoopMaxSpawns = 12
)

// A worker that fails right after it starts (its function panics at once,
// panics after 1s, or returns at once) is respawned with backoff, not at
// once forever, however soon after its ready report it fails; the other
// slot serves throughout.
func TestCrashAtStartBackoff(t *testing.T) {
	for _, scenario := range []string{"panic", "panic1s", "return"} {
		t.Run(scenario, func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{Clients: 2})
			c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4},
				func(s *spec) { s.SlotScenarios = map[int]string{1: scenario} })
			time.Sleep(crashLoopWindow)
			n := countSpawns(c.log(), 1)
			t.Logf("%s: %d spawns of slot 1 in %s", scenario, n, crashLoopWindow)
			if n > crashLoopMaxSpawns {
				t.Errorf("%s: %d spawns of slot 1 in %s, want at most %d (backoff 100ms..6.4s)", scenario, n, crashLoopWindow, crashLoopMaxSpawns)
			}
			// Slot 0 (198.18.1.0: low bit 0) is served all along.
			dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
			if rep, err := ask(lab.Client, lab.ClientAddrs4[0], dst); err != nil || rep.Slot != 0 {
				t.Errorf("slot 0's client: %+v %v", rep, err)
			}
		})
	}
}

// A worker killed soon after it became ready is a failed start: the second
// in a row is replaced after the backoff. One that served StableAfter is
// replaced at once, whatever failed before it: its service cleared them.
func TestStableWorkerReplacedAtOnce(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 2})
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, StableAfter: 3 * time.Second})
	st := c.waitReady()
	kill := func(what string) {
		t.Helper()
		victim := activePID(st, 1)
		if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		st = c.waitStatus(what, func(st *proto.Status) bool { p := activePID(st, 1); return p != 0 && p != victim })
	}
	// At once, twice: well within StableAfter of their ready reports.
	kill("slot 1 replaced after a crash at start")
	kill("slot 1 replaced after a second crash at start")
	log := c.log()
	if n := strings.Count(log, "counted as a failed start"); n != 2 {
		t.Errorf("%d crashes counted as failed starts, want 2", n)
	}
	if !strings.Contains(log, `msg="respawning worker" cluster=t slot=1 in=200ms failures=2`) {
		t.Errorf("the second failed start in a row was not respawned after 200ms")
	}
	// Serve past StableAfter, then crash: replaced at once.
	time.Sleep(4 * time.Second)
	kill("slot 1 replaced after a crash of a worker that served")
	after := c.log()[len(log):]
	if strings.Contains(after, "counted as a failed start") || strings.Contains(after, `msg="respawning worker"`) {
		t.Errorf("a worker that served StableAfter was counted as a failed start, or its replacement backed off:\n%s", after)
	}
}

// countSpawns counts the master's "worker spawned" log lines for slot.
func countSpawns(log string, slot int) int {
	n := 0
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, `msg="worker spawned"`) && strings.Contains(l, " slot="+itoa(slot)+" ") {
			n++
		}
	}
	return n
}
