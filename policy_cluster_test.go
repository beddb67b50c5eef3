//go:build linux

package ipcluster_test

// The health policies end to end: real workers in a lab namespace,
// misbehaving on purpose (see the scenarios in main_test.go), and a master
// that must replace or end them without a client noticing.

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// startPolicyCluster starts a cluster that samples every 100ms and logs its
// events; once lists the slots whose first worker misbehaves.
func startPolicyCluster(t *testing.T, lab *netlab.Lab, cfg specConfig, slotScenarios map[int]string, once ...int) (*cluster, string) {
	t.Helper()
	events := filepath.Join(t.TempDir(), "events.jsonl")
	dir := t.TempDir()
	makeOnce(t, dir, once...)
	cfg.Ports = []uint16{8080}
	cfg.Addr = lab.ServerAddr4.String()
	cfg.HeartbeatInterval = 100 * time.Millisecond
	cfg.MonitorInterval = 100 * time.Millisecond
	c := startClusterSpec(t, lab, cfg, func(s *spec) {
		s.EventsLog, s.OnceDir, s.SlotScenarios = events, dir, slotScenarios
	})
	c.waitReady()
	return c, events
}

// waitRetired waits for pid's EventRetired and checks its cause.
func waitRetired(t *testing.T, events string, pid int, cause ipcluster.RetireCause, timeout time.Duration) (ipcluster.EventRetired, time.Time) {
	t.Helper()
	e := waitEvent(t, events, timeout, func(e loggedEvent) bool {
		return e.Type == "EventRetired" && decodeEvent[ipcluster.EventRetired](t, e).PID == pid
	})
	ev := decodeEvent[ipcluster.EventRetired](t, e)
	if ev.Cause != cause || ev.Replacement == 0 || ev.Replacement == pid {
		t.Fatalf("worker %d retired with %+v, want cause %q and a replacement", pid, ev, cause)
	}
	return ev, e.At
}

// readyAt is when pid's EventWorkerReady was logged.
func readyAt(t *testing.T, events string, pid int) time.Time {
	t.Helper()
	return waitEvent(t, events, time.Second, func(e loggedEvent) bool {
		return e.Type == "EventWorkerReady" && decodeEvent[ipcluster.EventWorkerReady](t, e).PID == pid
	}).At
}

// A worker that leaks is retired and replaced while connections arrive on
// every slot from 16 addresses: none fails, and the leaking worker's
// established connections keep working until it drains and exits.
func TestLeakingWorkerRetiredUnderLoad(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	// 160 MiB: well above an echo worker under load (about 55 MiB with
	// the race detector), reached by the leak (40 MiB/s) in seconds.
	c, events := startPolicyCluster(t, lab, specConfig{Workers: 4, MemoryLimit: 160 << 20, StartupGrace: -1},
		map[int]string{1: "leakonce"}, 1)
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	held := holdConns(t, c, lab.ClientAddrs4, dst)
	leaker := activePID(c.waitReady(), 1)

	stop := startLoad(t, lab.Client, lab.ClientAddrs4, dst, 4, 1_000_000)
	ev, at := waitRetired(t, events, leaker, ipcluster.CauseMemory, 30*time.Second)
	t.Logf("retired: %s, %s from the sample over the limit to the slot moved", ev.Reason, ev.Elapsed)
	if ev.RSSBytes <= 160<<20 {
		t.Errorf("retired at RSS %d MiB, not over the 160 MiB limit", ev.RSSBytes>>20)
	}
	time.Sleep(time.Second) // load on the replacement
	res := stop()
	t.Logf("load: %v", res)
	if res.Failures != 0 || res.ByPID[ev.Replacement] == 0 {
		t.Errorf("load across the retirement at %s: %v", at.Format(time.StampMilli), res)
	}
	if err := probeAll(held); err != nil {
		t.Fatalf("held connections after the retirement: %v", err)
	}
	if !alive(leaker) {
		t.Fatalf("retired worker %d exited with connections open", leaker)
	}
	for _, h := range held {
		h.Close()
	}
	waitGone(t, []int{leaker}, 10*time.Second)
}

// A worker whose scheduling lag passes LagLimit is retired; its
// replacement is not.
func TestLaggingWorkerRetired(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c, events := startPolicyCluster(t, lab, specConfig{Workers: 2, LagLimit: 50 * time.Millisecond, StartupGrace: -1},
		map[int]string{1: "busyonce"}, 1)
	busy := activePID(c.waitReady(), 1)
	ev, _ := waitRetired(t, events, busy, ipcluster.CauseLag, 15*time.Second)
	t.Logf("retired: %s, %s to move the slot", ev.Reason, ev.Elapsed)
	if ev.Lag <= 50*time.Millisecond {
		t.Errorf("retired with lag %s", ev.Lag)
	}
	rep, err := ask(lab.Client, lab.ClientAddrs4[1], netip.AddrPortFrom(lab.ServerAddr4, 8080))
	if err != nil || rep.PID != ev.Replacement {
		t.Fatalf("slot 1 after the retirement: %+v %v, want pid %d", rep, err, ev.Replacement)
	}
	time.Sleep(time.Second)
	if hasRetired(t, events, ev.Replacement) {
		t.Errorf("the replacement %d was retired too", ev.Replacement)
	}
}

func hasRetired(t *testing.T, events string, pid int) bool {
	for _, e := range readEvents(t, events) {
		if e.Type == "EventRetired" && decodeEvent[ipcluster.EventRetired](t, e).PID == pid {
			return true
		}
	}
	return false
}

// A stopped worker (SIGSTOP) sends no heartbeat: it is declared
// unresponsive, its slot moves to a new worker, and it is killed and reaped
// once silent for twice PingTimeout.
func TestStoppedWorkerReplacedAndKilled(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c, events := startPolicyCluster(t, lab, specConfig{Workers: 2, PingTimeout: time.Second}, nil)
	stopped := activePID(c.waitReady(), 1)
	if err := syscall.Kill(stopped, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(stopped, syscall.SIGCONT) })
	t0 := time.Now()
	waitEvent(t, events, 5*time.Second, func(e loggedEvent) bool {
		return e.Type == "EventUnresponsive" && decodeEvent[ipcluster.EventUnresponsive](t, e).PID == stopped
	})
	ev, at := waitRetired(t, events, stopped, ipcluster.CauseUnresponsive, 5*time.Second)
	t.Logf("unresponsive worker retired %s after SIGSTOP", at.Sub(t0).Round(time.Millisecond))
	rep, err := ask(lab.Client, lab.ClientAddrs4[1], netip.AddrPortFrom(lab.ServerAddr4, 8080))
	if err != nil || rep.PID != ev.Replacement {
		t.Fatalf("slot 1 after the replacement: %+v %v", rep, err)
	}
	e := waitEvent(t, events, 5*time.Second, func(e loggedEvent) bool {
		return e.Type == "EventDismissed" && decodeEvent[ipcluster.EventDismissed](t, e).PID == stopped
	})
	if d := decodeEvent[ipcluster.EventDismissed](t, e); !d.Killed || !strings.Contains(d.Reason, "unresponsive") {
		t.Errorf("dismissal: %+v", d)
	}
	// Gone, not a zombie: the master reaps its children.
	waitGone(t, []int{stopped}, 5*time.Second)
	if _, err := os.Stat("/proc/" + strconv.Itoa(stopped)); err == nil {
		t.Errorf("worker %d left as a zombie", stopped)
	}
}

// Inside its start-up grace a leaking worker is not retired; after it,
// it is. With RetireLimit 1, a second leaking worker is then held back and
// reported, not retired.
func TestStartupGraceAndRetireLimit(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	const grace = 3 * time.Second
	// Both leakers pass 80 MiB within 2s of starting.
	c, events := startPolicyCluster(t, lab, specConfig{Workers: 4, MemoryLimit: 80 << 20, StartupGrace: grace,
		RetireLimit: 1, RetireWindow: time.Minute}, map[int]string{0: "leakonce", 1: "leakonce"}, 0, 1)
	st := c.waitReady()
	leakers := []int{activePID(st, 0), activePID(st, 1)}
	first := waitEvent(t, events, 15*time.Second, func(e loggedEvent) bool { return e.Type == "EventRetired" })
	ev := decodeEvent[ipcluster.EventRetired](t, first)
	other := leakers[0]
	if ev.PID == other {
		other = leakers[1]
	}
	if ev.Cause != ipcluster.CauseMemory || (ev.PID != leakers[0] && ev.PID != leakers[1]) {
		t.Fatalf("first retirement %+v, want one of the leakers %v for memory", ev, leakers)
	}
	if young := first.At.Sub(readyAt(t, events, ev.PID)); young < grace {
		t.Errorf("worker %d retired %s after it was ready, inside its %s grace", ev.PID, young, grace)
	}
	e := waitEvent(t, events, 5*time.Second, func(e loggedEvent) bool {
		return e.Type == "EventRetireHeld" && decodeEvent[ipcluster.EventRetireHeld](t, e).PID == other
	})
	held := decodeEvent[ipcluster.EventRetireHeld](t, e)
	t.Logf("held: %+v", held)
	if held.Cause != ipcluster.CauseMemory || held.Limit != 1 {
		t.Errorf("held: %+v", held)
	}
	time.Sleep(time.Second) // more samples: still held, reported once
	n := 0
	for _, e := range readEvents(t, events) {
		switch {
		case e.Type == "EventRetired" && decodeEvent[ipcluster.EventRetired](t, e).PID == other:
			t.Errorf("worker %d retired past the rate limit", other)
		case e.Type == "EventRetireHeld":
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d EventRetireHeld, want 1", n)
	}
}

// A retired worker that still holds an idle connection when DrainTimeout
// passes is told to finish, and goes. It was reniced on retirement.
func TestDrainDeadline(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	const drain = 1500 * time.Millisecond
	c, events := startPolicyCluster(t, lab, specConfig{Workers: 2, DrainTimeout: drain}, nil)
	held := holdConns(t, c, lab.ClientAddrs4[:1], netip.AddrPortFrom(lab.ServerAddr4, 8080))[0]
	pid := held.first.PID
	if _, err := held.command("retire"); err != nil {
		t.Fatal(err)
	}
	_, retiredAt := waitRetired(t, events, pid, ipcluster.CauseRequested, 5*time.Second)
	if nice := niceness(t, pid); nice != ipcluster.DefaultRetiredNice {
		t.Errorf("retired worker's threads have niceness %v, want %d", nice, ipcluster.DefaultRetiredNice)
	}
	if err := probeAll([]*echoConn{held}); err != nil {
		t.Fatalf("held connection while draining: %v", err)
	}
	e := waitEvent(t, events, 10*time.Second, func(e loggedEvent) bool {
		return e.Type == "EventDismissed" && decodeEvent[ipcluster.EventDismissed](t, e).PID == pid
	})
	d := decodeEvent[ipcluster.EventDismissed](t, e)
	if d.Killed || !strings.Contains(d.Reason, "drain deadline") {
		t.Errorf("dismissal: %+v", d)
	}
	if after := e.At.Sub(retiredAt); after < drain {
		t.Errorf("told to finish %s after retirement, before the %s deadline", after, drain)
	}
	waitGone(t, []int{pid}, 10*time.Second)
}

// niceness returns the distinct niceness values of pid's threads, one
// value if they agree.
func niceness(t *testing.T, pid int) any {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, task.Name(), "stat"))
		if err != nil {
			continue
		}
		// Field 19 is nice; fields start after the ") " closing comm.
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
		n, _ := strconv.Atoi(f[16])
		seen[n] = true
	}
	if len(seen) == 1 {
		for n := range seen {
			return n
		}
	}
	return seen
}

// A worker whose HealthCheck fails (it keeps its heartbeats but accepts
// nothing) is retired after HealthCheckFailures failures; the check
// reaches the worker's own port through the guard.
func TestFailingHealthCheckRetires(t *testing.T) {
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{Clients: 4})
			events := filepath.Join(t.TempDir(), "events.jsonl")
			dir := t.TempDir()
			makeOnce(t, dir, 1)
			c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: []uint16{8080}, Addr: lab.ServerAddr4.String(), Backend: backend,
				MonitorInterval: 100 * time.Millisecond, HealthCheckInterval: 300 * time.Millisecond, HealthCheckFailures: 2}, func(s *spec) {
				s.EventsLog, s.OnceDir, s.HealthCheck = events, dir, "dial"
				s.SlotScenarios = map[int]string{1: "deafonce"}
			})
			st := c.waitReady()
			deaf := activePID(st, 1)
			ev, _ := waitRetired(t, events, deaf, ipcluster.CauseHealthCheck, 10*time.Second)
			t.Logf("retired: %s", ev.Reason)
			rep, err := ask(lab.Client, lab.ClientAddrs4[1], netip.AddrPortFrom(lab.ServerAddr4, 8080))
			if err != nil || rep.PID != ev.Replacement {
				t.Fatalf("slot 1 after the retirement: %+v %v", rep, err)
			}
			if hasRetired(t, events, activePID(st, 0)) {
				t.Errorf("healthy worker of slot 0 retired")
			}
		})
	}
}

// spares returns the pids of the status's spare workers.
func spares(st *proto.Status) []int {
	var pids []int
	for _, w := range st.Workers {
		if w.State == "spare" {
			pids = append(pids, w.PID)
		}
	}
	return pids
}

// With a spare, a killed worker's slot moves to the spare with one rule
// write, and a new spare is started; a retirement takes the next spare.
func TestSpareTakesOverCrashedSlot(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c, events := startPolicyCluster(t, lab, specConfig{Workers: 2, Spares: 1}, nil)
	st := c.waitStatus("a spare", func(st *proto.Status) bool { return len(spares(st)) == 1 })
	spare, victim := spares(st)[0], activePID(st, 1)
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)

	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	var rep reply
	for {
		var err error
		if rep, err = ask(lab.Client, lab.ClientAddrs4[1], dst); err == nil && rep.PID != victim {
			break
		}
		if time.Since(t0) > 10*time.Second {
			t.Fatalf("slot 1 not answered again: %v", err)
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("kill -9 → slot answered by the spare: %s", time.Since(t0))
	if rep.PID != spare || rep.Slot != 1 {
		t.Fatalf("slot 1 answered by %+v, want the spare %d with slot 1", rep, spare)
	}
	st = c.waitStatus("a new spare", func(st *proto.Status) bool {
		s := spares(st)
		return len(s) == 1 && s[0] != spare
	})
	next := spares(st)[0]

	held := holdConns(t, c, lab.ClientAddrs4[:1], dst)[0]
	if _, err := held.command("retire"); err != nil {
		t.Fatal(err)
	}
	ev, _ := waitRetired(t, events, held.first.PID, ipcluster.CauseRequested, 5*time.Second)
	t.Logf("retirement onto a spare: %s from request to the slot moved", ev.Elapsed)
	if ev.Replacement != next {
		t.Errorf("slot 0 moved to %d, want the spare %d", ev.Replacement, next)
	}
	if rep, err := ask(lab.Client, lab.ClientAddrs4[0], dst); err != nil || rep.PID != next || rep.Slot != 0 {
		t.Errorf("slot 0 after the retirement: %+v %v", rep, err)
	}
}
