//go:build linux

package ipcluster_test

import (
	"bytes"
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/ctl"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// openGate lets the gated worker pid call Ready (see gatedWorker).
func openGate(t testing.TB, dir string, pid int) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "ready-"+itoa(pid)), nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

func mustStatus(t testing.TB, c *cluster) *proto.Status {
	t.Helper()
	st, err := c.status()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// starting returns the pid of a worker starting for slot, or 0.
func starting(st *proto.Status, slot int) int {
	for _, w := range st.Workers {
		if w.State == "starting" && w.Slot == slot {
			return w.PID
		}
	}
	return 0
}

// With WorkerReady, no slot moves to a worker before the application calls
// Ready: not at start, not to a spare after a crash, not to a retiring
// worker's replacement. Until then the slot keeps its route: none at
// start or after a crash, the retiring worker's during a retirement.
func TestWorkerReady(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	gates := t.TempDir()
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	// 198.18.1.0 is slot 0's, 198.18.1.1 slot 1's.
	client := lab.ClientAddrs4[:2]
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		WorkerReady: true, ReadyTimeout: time.Minute, Spares: 1}, func(s *spec) {
		s.Scenario, s.ReportDir = "gated", gates
	})

	// Start: both workers run their function, the spare is ready (it
	// runs none), and nothing is routed.
	c.waitStatus("two workers starting and a spare", func(st *proto.Status) bool {
		spares := 0
		for _, w := range st.Workers {
			if w.State == "spare" {
				spares++
			}
		}
		return starting(st, 0) != 0 && starting(st, 1) != 0 && spares == 1
	})
	time.Sleep(time.Second) // time enough to move a slot, were it allowed to
	st := mustStatus(t, c)
	if st.Ready || activePID(st, 0) != 0 || activePID(st, 1) != 0 {
		t.Fatalf("slots served before any worker called Ready: %+v", st)
	}
	if _, err := ask(lab.Client, client[0], dst); err == nil {
		t.Fatal("a client was served before any worker called Ready")
	}
	pid0, pid1 := starting(st, 0), starting(st, 1)
	openGate(t, gates, pid0)
	c.waitStatus("slot 0 on its worker", func(st *proto.Status) bool { return activePID(st, 0) == pid0 })
	if st = mustStatus(t, c); st.Ready || activePID(st, 1) != 0 {
		t.Fatalf("slot 1 served before its worker called Ready: %+v", st)
	}
	openGate(t, gates, pid1)
	c.waitReady()
	for slot, pid := range []int{pid0, pid1} {
		if rep, err := ask(lab.Client, client[slot], dst); err != nil || rep.PID != pid {
			t.Fatalf("slot %d's client: %+v %v, want worker %d", slot, rep, err, pid)
		}
	}

	// Crash: the spare is given slot 1, runs the function, and takes the
	// route only once it calls Ready.
	if err := syscall.Kill(pid1, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st = c.waitStatus("the spare starting in slot 1", func(st *proto.Status) bool { return starting(st, 1) != 0 })
	spare := starting(st, 1)
	time.Sleep(time.Second)
	if st = mustStatus(t, c); activePID(st, 1) != 0 || st.Ready {
		t.Fatalf("slot 1 moved to the spare before it called Ready: %+v", st)
	}
	openGate(t, gates, spare)
	c.waitStatus("slot 1 on the spare", func(st *proto.Status) bool { return activePID(st, 1) == spare && st.Ready })
	if rep, err := ask(lab.Client, client[1], dst); err != nil || rep.PID != spare {
		t.Fatalf("slot 1's client: %+v %v, want the spare %d", rep, err, spare)
	}

	// Retirement: slot 0 keeps its worker, and its clients reach it, until
	// the replacement (the new spare) calls Ready.
	c.waitStatus("a new spare", func(st *proto.Status) bool {
		for _, w := range st.Workers {
			if w.State == "spare" {
				return true
			}
		}
		return false
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cl, err := proto.Dial(ctx, c.socket, c.spec.Config.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if _, err := cl.Do(ctx, proto.TypeRetireOne, &proto.RetireOne{Slot: 0}); err != nil {
		t.Fatal(err)
	}
	st = c.waitStatus("a replacement starting in slot 0", func(st *proto.Status) bool { return starting(st, 0) != 0 })
	repl := starting(st, 0)
	time.Sleep(time.Second)
	if st = mustStatus(t, c); activePID(st, 0) != pid0 || !st.Ready {
		t.Fatalf("slot 0 left its worker %d before the replacement %d called Ready: %+v", pid0, repl, st)
	}
	if rep, err := ask(lab.Client, client[0], dst); err != nil || rep.PID != pid0 {
		t.Fatalf("slot 0's client during the retirement: %+v %v, want the retiring worker %d", rep, err, pid0)
	}
	openGate(t, gates, repl)
	c.waitStatus("slot 0 on its replacement", func(st *proto.Status) bool { return activePID(st, 0) == repl })
	if rep, err := ask(lab.Client, client[0], dst); err != nil || rep.PID != repl {
		t.Fatalf("slot 0's client after the retirement: %+v %v, want %d", rep, err, repl)
	}
	waitGone(t, []int{pid0}, 10*time.Second)
}

// One notion of ready: when a slot loses its worker (and its replacements
// fail), the status (and so ipclusterctl's header), /readyz, /status.json
// and the ipcluster_ready metric all say not ready, for the same reason.
func TestReadyAgreesEverywhere(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 2})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	fail := filepath.Join(t.TempDir(), "fail")
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		HTTPAddr: addr.String()}, func(s *spec) { s.FailFile = fail })
	st := c.waitReady()
	checkReadyEverywhere(t, c, lab, addr, "")

	// From now on every worker exits at start.
	if err := os.WriteFile(fail, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(activePID(st, 0), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	c.waitStatus("slot 0 without a worker", func(st *proto.Status) bool { return activePID(st, 0) == 0 })
	checkReadyEverywhere(t, c, lab, addr, "slot 0 has no active worker")
}

// checkReadyEverywhere checks that every view of the cluster's readiness
// says ready (why is "") or not ready because of why.
func checkReadyEverywhere(t *testing.T, c *cluster, lab *netlab.Lab, addr netip.AddrPort, why string) {
	t.Helper()
	ready := why == ""
	st, err := c.status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Ready != ready || st.NotReady != why {
		t.Errorf("status: ready %v (%q), want %v (%q)", st.Ready, st.NotReady, ready, why)
	}
	var out, errb bytes.Buffer
	ctl.Main([]string{"-rundir", c.spec.Config.RunDir, "-name", c.spec.Config.Name, "status"}, &out, &errb)
	header, _, _ := strings.Cut(out.String(), "\n")
	want := "  ready"
	if !ready {
		want = "  not ready: " + why
	}
	if !strings.HasSuffix(header, want) {
		t.Errorf("ipclusterctl status header %q, want it to end with %q (stderr %q)", header, want, errb.String())
	}
	code, body := mustGet(t, lab, addr, "/readyz")
	if ready && code != 200 || !ready && (code != 503 || strings.TrimSpace(body) != "not ready: "+why) {
		t.Errorf("/readyz: %d %q, want ready %v (%q)", code, body, ready, why)
	}
	if code, body := mustGet(t, lab, addr, "/status.json"); code != 200 || strings.Contains(body, `"ready":true`) != ready {
		t.Errorf("/status.json: %d %s, want ready %v", code, body, ready)
	}
	v, ok := sum(scrape(t, lab, addr), "ipcluster_ready")
	if !ok || (v == 1) != ready {
		t.Errorf("ipcluster_ready = %g (%v), want ready %v", v, ok, ready)
	}
}
