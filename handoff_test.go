//go:build linux

package ipcluster_test

// State handoff between a slot's old and new worker (handoff.go), in a lab:
// the "handoff" scenarios take their slot's state with Worker.Handoff
// before Worker.Ready, report what they got to ReportDir, and register an
// OnHandoff that writes a state naming their pid and slot, followed by a
// payload whose every byte the receiver checks.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/proto"
)

const (
	handoffPayload    = 300 << 10 // the "handoff" scenario's state: several stream chunks
	handoffBigPayload = 3 << 20   // "handoffbig": over the tests' HandoffMaxBytes
)

// handoffReport is what a handoff scenario worker took, in
// ReportDir/handoff-<pid>.json.
type handoffReport struct {
	PID, Slot      int
	Bytes          int
	From, FromSlot int  // as the state says; 0 and -1 for none
	Valid          bool // every payload byte as written
	Err            string
	// Owns: which of 198.18.1.0 to 198.18.1.7 Worker.Owns claims.
	Owns []string
}

// handoffState is the state a handoff scenario worker writes.
func handoffState(pid, slot, n int) []byte {
	b := fmt.Appendf(nil, "pid=%d slot=%d\n", pid, slot)
	for i := range n {
		b = append(b, byte(i*7+pid))
	}
	return b
}

// handoffWorker is the "handoff", "handoffblock", "handoffbig" and
// "handoffslow" scenarios: take the state, report it, offer its own
// (blocking forever in handoffblock, too large in handoffbig, after a
// second in handoffslow), call Ready, serve as echo.
func handoffWorker(mode string) func(*ipcluster.Worker) error {
	return func(w *ipcluster.Worker) error {
		rep := handoffReport{PID: os.Getpid(), Slot: w.Slot(), FromSlot: -1}
		state, err := io.ReadAll(w.Handoff())
		rep.Bytes = len(state)
		if err != nil {
			rep.Err = err.Error()
		}
		if line, payload, ok := strings.Cut(string(state), "\n"); ok {
			fmt.Sscanf(line, "pid=%d slot=%d", &rep.From, &rep.FromSlot)
			want := handoffState(rep.From, rep.FromSlot, len(payload))
			rep.Valid = string(want) == string(state)
		}
		for i := range 8 {
			a := netip.AddrFrom4([4]byte{198, 18, 1, byte(i)})
			if w.Owns(a) {
				rep.Owns = append(rep.Owns, a.String())
			}
		}
		b, _ := json.Marshal(rep)
		path := filepath.Join(helperSpec.ReportDir, "handoff-"+itoa(os.Getpid())+".json")
		if err := os.WriteFile(path+".tmp", b, 0o644); err == nil {
			os.Rename(path+".tmp", path)
		}
		w.OnHandoff(func(out io.Writer) error {
			switch mode {
			case "block":
				// Never returns while the worker lives: the handoff must
				// end, and the slot move, without it.
				os.WriteFile(filepath.Join(helperSpec.ReportDir, "blocked-"+itoa(os.Getpid())), nil, 0o644)
				select {}
			case "big":
				_, err := out.Write(handoffState(os.Getpid(), w.Slot(), handoffBigPayload))
				return err
			case "slow":
				// Long after a retired worker with nothing open would
				// have exited (some 300ms).
				time.Sleep(time.Second)
			}
			_, err := out.Write(handoffState(os.Getpid(), w.Slot(), handoffPayload))
			return err
		})
		w.Ready()
		return echoWorker(w)
	}
}

// waitHandoffReport waits for worker pid's report.
func waitHandoffReport(t testing.TB, dir string, pid int) handoffReport {
	t.Helper()
	path := filepath.Join(dir, "handoff-"+itoa(pid)+".json")
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, err := os.ReadFile(path)
		if err == nil {
			var r handoffReport
			if err := json.Unmarshal(b, &r); err != nil {
				t.Fatalf("report %s: %v", path, err)
			}
			return r
		}
		if !errors.Is(err, fs.ErrNotExist) || time.Now().After(deadline) {
			t.Fatalf("no handoff report from worker %d: %v", pid, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// handoffEvent waits for the EventHandoff of the worker to.
func handoffEvent(t testing.TB, events string, to int) ipcluster.EventHandoff {
	t.Helper()
	e := waitEvent(t, events, 10*time.Second, func(e loggedEvent) bool {
		return e.Type == "EventHandoff" && decodeEvent[ipcluster.EventHandoff](t, e).To == to
	})
	return decodeEvent[ipcluster.EventHandoff](t, e)
}

// startHandoffLab is a deploy lab of workers running a handoff scenario,
// with WorkerReady: each reads its state before it takes its slot.
func startHandoffLab(t *testing.T, workers int, scenario string, edit func(*spec)) (*deployLab, string) {
	t.Helper()
	reports := t.TempDir()
	d := startDeployLab(t, workers, func(s *spec) {
		s.Scenario, s.ReportDir = scenario, reports
		s.Config.WorkerReady, s.Config.ReadyTimeout = true, 10*time.Second
		if edit != nil {
			edit(s)
		}
	})
	return d, reports
}

// rolled waits for a restart or deploy to commit every slot to version v,
// away from the workers of before, and returns the status.
func rolled(d *deployLab, v string, before *proto.Status) *proto.Status {
	return d.waitStatus("every slot rolled to "+v, func(st *proto.Status) bool {
		return servedBy(st, v, workerPIDs(before)) && strings.HasPrefix(st.Deploy, "committed")
	})
}

// A restart (SIGUSR2) and then a deploy (SIGHUP, a new master adopting the
// workers) each hand every slot's state, byte for byte, from its old
// worker to its new one; the first workers found none. No attempt of the
// load fails.
func TestHandoffOnRestartAndDeploy(t *testing.T) {
	d, reports := startHandoffLab(t, 2, "handoff", nil)
	st0, _ := d.c.status()
	for slot := range st0.Slots {
		if r := waitHandoffReport(t, reports, activePID(st0, slot)); r.Bytes != 0 || r.Err != "" {
			t.Errorf("first worker of slot %d took %+v, want an empty state", slot, r)
		}
	}
	d.load()
	check := func(what string, before, after *proto.Status) {
		t.Helper()
		for slot := range after.Slots {
			old, nw := activePID(before, slot), activePID(after, slot)
			r := waitHandoffReport(t, reports, nw)
			if r.From != old || r.FromSlot != slot || !r.Valid || r.Err != "" || r.Bytes != len(handoffState(old, slot, handoffPayload)) {
				t.Errorf("%s: new worker %d of slot %d took %+v, want worker %d's whole state", what, nw, slot, r, old)
			}
			ev := handoffEvent(t, d.events, nw)
			if ev.From != old || ev.Slot != slot || ev.Bytes != int64(r.Bytes) || ev.Err != "" || ev.Elapsed <= 0 {
				t.Errorf("%s: %+v, want slot %d from %d, %d bytes", what, ev, slot, old, r.Bytes)
			}
			t.Logf("%s: slot %d, %d → %d: %d bytes in %s", what, slot, old, nw, ev.Bytes, ev.Elapsed)
		}
	}
	if err := d.c.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	st1 := rolled(d, "v1", st0)
	check("restart", st0, st1)

	d.setVersion("v2")
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	st2 := rolled(d, "v2", st1)
	stopMasterByPID(t, st2.MasterPID)
	check("deploy", st1, st2)
	d.finish()
}

// A worker that replaces a crashed one finds no state, at once and
// without an error, and no handoff is reported for it.
func TestHandoffAfterCrashIsEmpty(t *testing.T) {
	d, reports := startHandoffLab(t, 2, "handoff", nil)
	st0, _ := d.c.status()
	dead := activePID(st0, 1)
	if err := syscall.Kill(dead, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st := d.waitStatus("slot 1 served again", func(st *proto.Status) bool {
		return activePID(st, 1) != 0 && activePID(st, 1) != dead
	})
	nw := activePID(st, 1)
	if r := waitHandoffReport(t, reports, nw); r.Bytes != 0 || r.Err != "" || r.From != 0 {
		t.Errorf("crash replacement %d took %+v, want an empty state and no error", nw, r)
	}
	for _, e := range readEvents(t, d.events) {
		if e.Type == "EventHandoff" {
			t.Errorf("handoff reported for a crash: %s", e.Event)
		}
	}
}

// A handoff that fails, because the old worker's OnHandoff never returns
// (handoffblock, against a HandoffTimeout of 1s) or writes more than
// HandoffMaxBytes (handoffbig), is reported with an error naming the
// field to raise, and the restart still moves every slot: in the first
// case while the old workers' callbacks are still blocked.
func TestHandoffFailures(t *testing.T) {
	for _, tc := range []struct{ scenario, field string }{
		{"handoffblock", "HandoffTimeout"},
		{"handoffbig", "HandoffMaxBytes"},
	} {
		t.Run(tc.scenario, func(t *testing.T) {
			d, reports := startHandoffLab(t, 2, tc.scenario, func(s *spec) {
				s.Config.HandoffTimeout, s.Config.HandoffMaxBytes = time.Second, 1<<20
			})
			st0, _ := d.c.status()
			if err := d.c.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
				t.Fatal(err)
			}
			st := rolled(d, "v1", st0)
			for slot := range st.Slots {
				old, nw := activePID(st0, slot), activePID(st, slot)
				r := waitHandoffReport(t, reports, nw)
				ev := handoffEvent(t, d.events, nw)
				t.Logf("slot %d: %s", slot, ev.Err)
				if !strings.Contains(r.Err, tc.field) || r.Bytes != 0 {
					t.Errorf("new worker %d of slot %d took %+v, want no state and an error naming %s", nw, slot, r, tc.field)
				}
				if ev.From != old || !strings.Contains(ev.Err, tc.field) {
					t.Errorf("%+v, want the handoff from %d reported failed, naming %s", ev, old, tc.field)
				}
				if tc.scenario == "handoffblock" {
					if _, err := os.Stat(filepath.Join(reports, "blocked-"+itoa(old))); err != nil {
						t.Errorf("old worker %d's OnHandoff was not called: %v", old, err)
					}
				}
			}
		})
	}
}

// A growth from 2 to 4 slots: the new workers of slots 2 and 3 take the
// state of the workers of slots 0 and 1, which they split from, and Owns
// names the clients that are theirs under 4 slots.
func TestHandoffResizeSplit(t *testing.T) {
	d, reports := startHandoffLab(t, 2, "handoff", nil)
	st0, _ := d.c.status()
	d.c.resize(t, 4)
	st := d.waitStatus("4 slots served", func(st *proto.Status) bool {
		return len(st.Slots) == 4 && activePID(st, 2) != 0 && activePID(st, 3) != 0 && hasEvent(t, d.events, "EventResized")
	})
	for slot := 2; slot < 4; slot++ {
		from, nw := activePID(st0, slot-2), activePID(st, slot)
		r := waitHandoffReport(t, reports, nw)
		if r.From != from || r.FromSlot != slot-2 || !r.Valid || r.Err != "" {
			t.Errorf("new worker %d of slot %d took %+v, want the state of %d (slot %d)", nw, slot, r, from, slot-2)
		}
		var want []string
		for i := range 8 {
			if a := netip.AddrFrom4([4]byte{198, 18, 1, byte(i)}); expectSlot(a, 4, 32) == slot {
				want = append(want, a.String())
			}
		}
		if strings.Join(r.Owns, ",") != strings.Join(want, ",") {
			t.Errorf("slot %d's worker owns %v, want %v", slot, r.Owns, want)
		}
		ev := handoffEvent(t, d.events, nw)
		t.Logf("split: slot %d from %d (slot %d): %d bytes in %s", slot, from, slot-2, ev.Bytes, ev.Elapsed)
	}
	for slot := range 2 {
		if activePID(st, slot) != activePID(st0, slot) {
			t.Errorf("slot %d's worker changed from %d to %d", slot, activePID(st0, slot), activePID(st, slot))
		}
	}
}

// With a spare, an operator's retirement of slot 0 gives the slot to the
// spare, which takes the retired worker's state once assigned.
func TestHandoffToSpare(t *testing.T) {
	d, reports := startHandoffLab(t, 2, "handoff", func(s *spec) { s.Config.Spares = 1 })
	st0 := d.waitStatus("a spare ready", func(st *proto.Status) bool {
		for _, w := range st.Workers {
			if w.State == "spare" {
				return st.Ready
			}
		}
		return false
	})
	spare := 0
	for _, w := range st0.Workers {
		if w.State == "spare" {
			spare = w.PID
		}
	}
	old := activePID(st0, 0)
	retireSlot(t, d, 0)
	d.waitStatus("slot 0 on the spare", func(st *proto.Status) bool { return activePID(st, 0) == spare })
	r := waitHandoffReport(t, reports, spare)
	if r.From != old || r.FromSlot != 0 || r.Slot != 0 || !r.Valid || r.Err != "" {
		t.Errorf("spare %d given slot 0 took %+v, want the state of %d", spare, r, old)
	}
	if ev := handoffEvent(t, d.events, spare); ev.From != old || ev.Err != "" {
		t.Errorf("%+v, want the handoff from %d", ev, old)
	}
}

// retireSlot has the master retire slot's active worker, as ipclusterctl
// retire does.
func retireSlot(t *testing.T, d *deployLab, slot int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cl, err := proto.Dial(ctx, d.c.socket, d.c.spec.Config.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if _, err := cl.Do(ctx, proto.TypeRetireOne, &proto.RetireOne{Slot: slot}); err != nil {
		t.Fatal(err)
	}
}

// Without WorkerReady the slot moves as soon as the new worker listens,
// and the old one, retired with nothing open, would exit at once: it
// waits for the handoff it is writing (handoffslow: a second late), and
// the new worker gets the whole state.
func TestHandoffWithoutWorkerReady(t *testing.T) {
	d, reports := startHandoffLab(t, 2, "handoffslow", func(s *spec) {
		s.Config.WorkerReady, s.Config.ReadyTimeout = false, 0
	})
	for _, h := range d.held {
		h.Close() // nothing open: the old worker can exit as soon as it is retired
	}
	st0, _ := d.c.status()
	old := activePID(st0, 0)
	retireSlot(t, d, 0)
	st := d.waitStatus("slot 0 moved", func(st *proto.Status) bool { return activePID(st, 0) != 0 && activePID(st, 0) != old })
	nw := activePID(st, 0)
	if r := waitHandoffReport(t, reports, nw); r.From != old || !r.Valid || r.Err != "" {
		t.Errorf("new worker %d of slot 0 took %+v, want the whole state of %d", nw, r, old)
	}
	waitGone(t, []int{old}, 10*time.Second) // and then it exits
}
