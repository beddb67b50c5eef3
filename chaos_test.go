//go:build linux

package ipcluster_test

// The chaos run: for a bounded time, under load from 64 addresses with
// long-lived connections on every slot, random faults (kill -9 of workers,
// SIGSTOP of a worker, kill -9 of the master and a new one started, deploys
// of new versions, retirements), with the invariants checked throughout and
// reported at the end. Off by default; CI runs it short:
//
//	sudo go test -run TestChaos -chaos 45s -v .

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

var (
	chaosFor  = flag.Duration("chaos", 0, "run TestChaos for this long (CI runs 45s)")
	chaosRate = flag.Int("chaos-rate", 1200, "TestChaos's new connections a second: a DNAT backend's conntrack table holds each for 120s; the bpf backend (IPCLUSTER_TEST_BACKEND=bpf) none")
)

// fault is one injected fault.
type fault struct {
	kind     string // kill, stop, master, deploy, retire
	slot     int    // for kill and stop
	pid      int
	at       time.Time
	recovery time.Duration // kill and stop: until the slot answered from another worker
}

// chaosFailure is one failed connection attempt.
type chaosFailure struct {
	at, end time.Time // the attempt began and failed
	slot    int       // the client address's slot
	err     string
}

func TestChaos(t *testing.T) {
	if *chaosFor == 0 {
		t.Skip("the chaos run is off; run it with -chaos 60s")
	}
	d := startDeployLab(t, 4, func(s *spec) {
		s.Config.PingTimeout = time.Second
		s.Config.CanaryPeriod = 300 * time.Millisecond
	})
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	t.Logf("chaos for %s", *chaosFor)

	// Load: short connections, every failure recorded with the time its
	// attempt began. Paced to -chaos-rate a second, 1,200 by default: on
	// a DNAT backend every connection leaves a conntrack entry for 120s
	// (TIME_WAIT), and a full table drops new connections (see the
	// README's conntrack sizing).
	var mu sync.Mutex
	var failures []chaosFailure
	attempts := 0
	ctx, stopLoad := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	loaders := max(4, *chaosRate/300)
	t.Logf("load: %d new connections a second from %d goroutines, backend %q", loaders*300, loaders, d.c.spec.Config.Backend)
	for g := range loaders {
		wg.Go(func() {
			pace := time.NewTicker(time.Second / 300)
			defer pace.Stop()
			for i := g; ctx.Err() == nil; i += loaders {
				<-pace.C
				src := d.lab.ClientAddrs4[i%len(d.lab.ClientAddrs4)]
				began := time.Now()
				_, err := attempt(ctx, d.lab.Client, src, d.dst)
				if ctx.Err() != nil {
					return
				}
				mu.Lock()
				attempts++
				if err != nil && len(failures) < 10000 {
					failures = append(failures, chaosFailure{at: began, end: time.Now(), slot: expectSlot(src, 4, 32), err: err.Error()})
				}
				mu.Unlock()
			}
		})
	}

	// Long-lived connections: probed every 200ms; one may fail only if
	// its worker was killed or stopped.
	var faults []*fault
	hurt := map[int]bool{} // pids killed or stopped
	var cut []string
	heldDone := make(chan struct{})
	go func() {
		defer close(heldDone)
		for ctx.Err() == nil {
			for _, h := range d.held {
				if _, err := h.probe(); err != nil {
					mu.Lock()
					if !hurt[h.first.PID] {
						cut = append(cut, fmt.Sprintf("worker %d (slot %d): %v", h.first.PID, h.first.Slot, err))
					}
					mu.Unlock()
				}
			}
			time.Sleep(200 * time.Millisecond)
		}
	}()

	status := func() *proto.Status {
		for range 100 {
			if st, err := d.c.status(); err == nil && st.Ready {
				return st
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("no ready master answers\n%s", d.c.log())
		return nil
	}
	// recover measures how long slot takes to answer from another worker
	// than pid, connecting every 2ms.
	recoverSlot := func(f *fault) {
		src := d.lab.ClientAddrs4[f.slot]
		for time.Since(f.at) < 20*time.Second {
			if rep, err := ask(d.lab.Client, src, d.dst); err == nil && rep.PID != f.pid {
				f.recovery = time.Since(f.at)
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
		f.recovery = -1
	}
	masters := []int{}
	version := 1
	deadline := time.Now().Add(*chaosFor)
	for time.Now().Before(deadline) {
		st := status()
		if !slices.Contains(masters, st.MasterPID) {
			masters = append(masters, st.MasterPID)
			stopMasterByPID(t, st.MasterPID)
		}
		f := &fault{at: time.Now()}
		switch k := rng.IntN(10); {
		case k < 4:
			f.kind, f.slot = "kill", rng.IntN(4)
			f.pid = activePID(st, f.slot)
			mu.Lock()
			hurt[f.pid] = true
			mu.Unlock()
			f.at = time.Now()
			_ = syscall.Kill(f.pid, syscall.SIGKILL)
			recoverSlot(f)
		case k < 5:
			f.kind, f.slot = "stop", rng.IntN(4)
			f.pid = activePID(st, f.slot)
			mu.Lock()
			hurt[f.pid] = true
			mu.Unlock()
			f.at = time.Now()
			_ = syscall.Kill(f.pid, syscall.SIGSTOP)
			recoverSlot(f)
		case k < 6:
			f.kind, f.pid = "master", st.MasterPID
			_ = syscall.Kill(st.MasterPID, syscall.SIGKILL)
			waitGone(t, []int{st.MasterPID}, 5*time.Second)
			time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond) // served with no master
			if h := holders(d.c.spec.Config.RunDir + "/t/lock"); len(h) > 0 {
				t.Errorf("lock still held after the master %d died: %v", st.MasterPID, h)
			}
			d.c = startClusterSpec(t, d.lab, d.c.spec.Config, func(s *spec) { *s = d.c.spec })
		case k < 8:
			version++
			f.kind, f.pid = "deploy", st.MasterPID
			d.setVersion("v" + strconv.Itoa(version))
			_ = syscall.Kill(st.MasterPID, syscall.SIGHUP)
			d.waitStatus("the deploy", func(s *proto.Status) bool {
				return s.MasterPID != st.MasterPID && s.Ready && s.DeployPhase != "started"
			})
		default:
			f.kind, f.slot = "retire", rng.IntN(4)
			f.pid = activePID(st, f.slot)
			_ = syscall.Kill(f.pid, syscall.SIGUSR1)
		}
		faults = append(faults, f)
		time.Sleep(time.Duration(300+rng.IntN(700)) * time.Millisecond)
	}
	time.Sleep(time.Second) // the last fault's dust
	stopLoad()
	wg.Wait()
	<-heldDone

	// Failures: only attempts on the slot of a killed or stopped worker
	// that were under way while its slot was down: begun before its
	// recovery ended, and failed after it died (an attempt in flight, or
	// one whose SYN, routed to the worker before it died, is retransmitted
	// to its dead port).
	explained := func(fl chaosFailure) string {
		for _, f := range faults {
			window := f.recovery + 50*time.Millisecond
			if f.kind == "stop" {
				window += time.Second
			}
			if (f.kind == "kill" || f.kind == "stop") && f.slot == fl.slot && !fl.end.Before(f.at) && fl.at.Sub(f.at) <= window {
				return f.kind
			}
		}
		return ""
	}
	// A killed worker's slot refuses nobody (the master holds its
	// sockets): only the connections the worker had accepted can fail.
	// A stopped one is retired after PingTimeout; its queue goes with it
	// (reset by a DNAT backend, moved to the new socket by bpf).
	byCause := map[string]int{}
	for _, fl := range failures {
		cause := explained(fl)
		if cause == "kill" && strings.Contains(fl.err, "connection refused") {
			cause = "refused after a kill"
			if byCause[cause] < 10 {
				t.Errorf("refused on the slot of a killed worker: slot %d, %s: %s", fl.slot, fl.at.Format("15:04:05.000"), fl.err)
			}
		}
		if cause == "" {
			cause = "unexplained"
			if byCause[cause] < 10 {
				t.Errorf("failed attempt outside any crash window: slot %d, %s to %s: %s", fl.slot, fl.at.Format("15:04:05.000"), fl.end.Format("15:04:05.000"), fl.err)
			}
		}
		byCause[cause]++
	}
	count := map[string]int{}
	var killRec, stopRec []time.Duration
	for _, f := range faults {
		count[f.kind]++
		switch {
		case f.recovery < 0 || f.recovery > 5*time.Second:
			t.Errorf("%s of worker %d: slot %d not answered again within 5s", f.kind, f.pid, f.slot)
		case f.kind == "kill":
			killRec = append(killRec, f.recovery)
		case f.kind == "stop":
			stopRec = append(stopRec, f.recovery)
		}
	}
	for _, c := range cut {
		t.Errorf("held connection cut: %s", c)
	}
	if t.Failed() {
		for _, f := range faults {
			t.Logf("fault %s %s slot %d pid %d, recovery %s", f.at.Format("15:04:05.000"), f.kind, f.slot, f.pid, f.recovery)
		}
	}
	t.Logf("faults: %v; %d attempts, failures by cause %v", count, attempts, byCause)
	t.Logf("kill -9 → slot answers again: %s", quantiles(killRec))
	t.Logf("SIGSTOP → slot answers again (PingTimeout 1s): %s", quantiles(stopRec))
	// The target is a p99 under 200ms; a timed assertion would flake on
	// a busy machine, so it is reported, and only the 5s bound fails.
	if p99 := quantile(killRec, 0.99); p99 > 200*time.Millisecond {
		t.Logf("p99 recovery from a crashed worker %s: over the 200ms target", p99)
	}

	// The end state: rules as believed, no stray processes or files.
	st := status()
	cur := &cluster{t: t, lab: d.lab, spec: d.c.spec, socket: d.c.socket}
	cur.checkKernelRules(t)
	ino, err := d.lab.Server.Inode()
	if err != nil {
		t.Fatal(err)
	}
	known := map[int]bool{st.MasterPID: true}
	for _, w := range st.Workers {
		known[w.PID] = true
	}
	for _, pid := range netlab.PIDsIn(ino) {
		if !known[pid] && netlab.Running(pid) {
			t.Errorf("stray process %d in the server namespace: %s", pid, cmdline(pid))
		}
	}
	ents, _ := os.ReadDir(d.c.spec.Config.RunDir + "/t")
	for _, e := range ents {
		switch e.Name() {
		case "control.sock", "lock", "generation", "routes", "ops":
		default:
			t.Errorf("stray file %s in the run directory", e.Name())
		}
	}
	checkOpsSockets(t, d.c.spec.Config.RunDir+"/t/ops", st)
	// After a stop, nothing at all.
	_ = syscall.Kill(st.MasterPID, syscall.SIGTERM)
	waitGone(t, []int{st.MasterPID}, 30*time.Second)
	checkNoRules(t, d.lab)
	for _, pid := range netlab.PIDsIn(ino) {
		if netlab.Running(pid) {
			t.Errorf("process %d left after the stop: %s", pid, cmdline(pid))
		}
	}
	if _, err := os.Stat(d.c.spec.Config.RunDir + "/t"); err == nil {
		t.Errorf("run directory left after the stop")
	}
}

func cmdline(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return strings.ReplaceAll(string(b), "\x00", " ")
}

func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

func quantiles(ds []time.Duration) string {
	if len(ds) == 0 {
		return "none"
	}
	return fmt.Sprintf("n=%d p50 %s p99 %s max %s", len(ds), quantile(ds, 0.5).Round(100*time.Microsecond),
		quantile(ds, 0.99).Round(100*time.Microsecond), quantile(ds, 1).Round(100*time.Microsecond))
}

// holders lists the processes with path open, and their state.
func holders(path string) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		fds, _ := os.ReadDir("/proc/" + e.Name() + "/fd")
		for _, fd := range fds {
			if l, _ := os.Readlink("/proc/" + e.Name() + "/fd/" + fd.Name()); l == path {
				stat, _ := os.ReadFile("/proc/" + e.Name() + "/stat")
				out = append(out, e.Name()+" "+string(stat[:min(len(stat), 60)]))
			}
		}
	}
	return out
}
