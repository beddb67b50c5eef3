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
	cfg.Ports = tcpPorts(8080)
	cfg.Addr = lab.ServerAddr4
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
	if !netlab.Running(leaker) {
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
	fds := countFDs(t, c.cmd.Process.Pid)
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
	// Gone, not a zombie: the master reaps its children (waitGone
	// returns once the process has died; the reaping follows).
	waitGone(t, []int{stopped}, 5*time.Second)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat("/proc/" + strconv.Itoa(stopped)); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("worker %d left as a zombie", stopped)
			break
		}
	}
	// And the master holds no more descriptors than before, for as many
	// workers: none of the killed worker's is left.
	deadline := time.Now().Add(5 * time.Second)
	for n := countFDs(t, c.cmd.Process.Pid); n > fds; n = countFDs(t, c.cmd.Process.Pid) {
		if time.Now().After(deadline) {
			t.Fatalf("master holds %d descriptors, %d before the worker was replaced", n, fds)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func countFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
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
		t.Run(string(backend), func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{Clients: 4})
			events := filepath.Join(t.TempDir(), "events.jsonl")
			dir := t.TempDir()
			makeOnce(t, dir, 1)
			c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: backend,
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

// Retired workers with ballast and different numbers of connections. Past
// the low watermark the master asks just enough of them to finish, in kill
// order (fewest connections, then largest RSS); past the high one it kills;
// the active workers, which hold most of the memory, are never touched.
// The workers linger: a connection outlives the request to finish, so a
// worker asked to finish is still there when the high watermark comes.
func TestMemoryWatermarks(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	const budget = 1000 << 20
	c, events := startPolicyCluster(t, lab, specConfig{Workers: 2, MemoryLimit: -1, MemoryBudget: budget},
		map[int]string{0: "linger", 1: "linger"})
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	src0, src1 := lab.ClientAddrs4[0], lab.ClientAddrs4[1]

	// retire makes slot 0's worker a retired one holding conns connections
	// and mib MiB of ballast.
	retire := func(conns, mib int) (int, []*echoConn) {
		t.Helper()
		var held []*echoConn
		for range conns {
			h, err := c.dial(src0, dst)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { h.Close() })
			held = append(held, h)
		}
		pid := held[0].first.PID
		if _, err := held[0].command("alloc " + itoa(mib)); err != nil {
			t.Fatal(err)
		}
		if _, err := held[0].command("retire"); err != nil {
			t.Fatal(err)
		}
		waitRetired(t, events, pid, ipcluster.CauseRequested, 5*time.Second)
		return pid, held
	}
	// Ballasts small beside the watermarks' gap (150 MiB): the low
	// watermark's step below passes low by r3 and half of r1 while both
	// still run, and must stay clear of the high one (with 40 and 60 MiB
	// it came within 12 MiB of it, and RSS noise crossed it).
	r1, _ := retire(1, 20)
	r2, held2 := retire(2, 20)
	r3, _ := retire(1, 45) // kill order: r3, r1, r2
	live, err := c.dial(src1, dst)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	lp := live.first.PID // no ballast yet: the base a worker's RSS starts from

	// rss waits for a sample that has every worker's ballast, then
	// returns the total and each worker's RSS.
	rss := func(ok func(map[int]uint64) bool) (uint64, map[int]uint64) {
		t.Helper()
		var total uint64
		by := map[int]uint64{}
		c.waitStatus("RSS samples", func(st *proto.Status) bool {
			total, by = 0, map[int]uint64{}
			for _, w := range st.Workers {
				total += w.RSSBytes
				by[w.PID] = w.RSSBytes
			}
			return ok(by)
		})
		return total, by
	}
	used, by := rss(func(by map[int]uint64) bool {
		// Slot 0's newest worker too must have grown to a worker's
		// base: sampled as it starts, it would leave tens of MiB out
		// of used, and the step below would overshoot into the high
		// watermark.
		for _, v := range by {
			if v < by[lp]*3/4 {
				return false
			}
		}
		return by[r3] > by[r1]+15<<20 && by[r1] > by[lp]+15<<20 && by[r2] > by[lp]+15<<20
	})
	low, high := uint64(budget*ipcluster.DefaultMemoryLowWatermark), uint64(budget*ipcluster.DefaultMemoryHighWatermark)
	t.Logf("used %d MiB: r1 %d, r2 %d, r3 %d, active %d MiB", used>>20, by[r1]>>20, by[r2]>>20, by[r3]>>20, by[lp]>>20)

	// Grow the active worker of slot 1 so that the total passes the low
	// watermark by r3 and half of r1: r3 and r1 must be asked, not r2.
	target := low + by[r3] + by[r1]/2
	if target < used+20<<20 {
		t.Fatalf("setup: %d MiB already used, over the %d MiB target", used>>20, target>>20)
	}
	if _, err := live.command("alloc " + itoa(int((target-used)>>20))); err != nil {
		t.Fatal(err)
	}
	// The master may sample while the ballast is being touched in, and
	// then asks in several steps: gather them.
	var asked, killed []int
	gather := func(e loggedEvent) {
		if e.Type == "EventMemoryPressure" {
			mp := decodeEvent[ipcluster.EventMemoryPressure](t, e)
			t.Logf("%+v", mp)
			asked, killed = append(asked, mp.Asked...), append(killed, mp.Killed...)
		}
	}
	seen := 0
	waitEvent(t, events, 10*time.Second, func(e loggedEvent) bool {
		seen++
		gather(e)
		return len(asked) >= 2
	})
	time.Sleep(500 * time.Millisecond) // any further asks
	for _, e := range readEvents(t, events)[seen:] {
		gather(e)
	}
	if len(asked) != 2 || asked[0] != r3 || asked[1] != r1 || len(killed) != 0 {
		t.Fatalf("low watermark: asked %v killed %v, want r3 %d then r1 %d asked to finish", asked, killed, r3, r1)
	}
	if err := probeAll(held2); err != nil || !netlab.Running(r2) {
		t.Fatalf("r2 %d after the low watermark: alive %v, %v", r2, netlab.Running(r2), err)
	}
	waitGone(t, []int{r3, r1}, 15*time.Second) // after StopTimeout

	// Now past the high watermark by half of r2 (and past the low one on
	// the way): r2 is killed.
	used, by = rss(func(by map[int]uint64) bool { _, ok1 := by[r1]; _, ok3 := by[r3]; return !ok1 && !ok3 })
	target = high + by[r2]/2
	if _, err := live.command("alloc " + itoa(int((target-used)>>20))); err != nil {
		t.Fatal(err)
	}
	e := waitEvent(t, events, 10*time.Second, func(e loggedEvent) bool {
		return e.Type == "EventMemoryPressure" && decodeEvent[ipcluster.EventMemoryPressure](t, e).Watermark == "high"
	})
	mp := decodeEvent[ipcluster.EventMemoryPressure](t, e)
	t.Logf("high: %+v", mp)
	if len(mp.Killed) != 1 || mp.Killed[0] != r2 || len(mp.Asked) != 0 {
		t.Fatalf("high watermark: %+v, want r2 %d killed", mp, r2)
	}
	e = waitEvent(t, events, 5*time.Second, func(e loggedEvent) bool {
		return e.Type == "EventWorkerExited" && decodeEvent[ipcluster.EventWorkerExited](t, e).PID == r2
	})
	if st := decodeEvent[ipcluster.EventWorkerExited](t, e).Status; !strings.Contains(st, "killed") {
		t.Errorf("r2 exit status %q, want killed", st)
	}
	// The active workers, over the budget's watermarks on their own,
	// still serve.
	if _, err := live.probe(); err != nil {
		t.Errorf("active worker of slot 1: %v", err)
	}
	if rep, err := ask(lab.Client, src0, dst); err != nil || rep.Slot != 0 {
		t.Errorf("slot 0: %+v %v", rep, err)
	}
}
