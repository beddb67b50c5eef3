//go:build linux

package ipcluster_test

// Deploys, takeover and master crashes under load: short connections from
// 64 client addresses over every slot, plus a long-lived connection held on
// every slot, and not one failed attempt.

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// deployLab is a cluster of 4 workers under load.
type deployLab struct {
	t       testing.TB
	lab     *netlab.Lab
	c       *cluster
	events  string
	version string // the version file
	dst     netip.AddrPort
	held    []*echoConn // one per slot at least
	stop    func() loadResult
	// crashSlot, if not -1, is the slot of a worker that crashes on
	// purpose: the connections it held when it died, and those refused
	// until its slot moved, fail, and only those.
	crashSlot int
}

// startDeployLab starts a cluster of version v1 and holds connections on
// every slot; edit adjusts the spec.
func startDeployLab(t testing.TB, workers int, edit func(*spec)) *deployLab {
	t.Helper()
	d := &deployLab{t: t, lab: netlab.NewT(t, netlab.Options{Clients: 64}), crashSlot: -1}
	d.events = filepath.Join(t.TempDir(), "events.jsonl")
	d.version = filepath.Join(t.TempDir(), "version")
	d.setVersion("v1")
	d.dst = netip.AddrPortFrom(d.lab.ServerAddr4, 8080)
	cfg := specConfig{Workers: workers, Ports: tcpPorts(8080), Addr: d.lab.ServerAddr4,
		HeartbeatInterval: 100 * time.Millisecond, MonitorInterval: 100 * time.Millisecond,
		ConnectTimeout: time.Second, CanaryPeriod: time.Second}
	d.c = startClusterSpec(t, d.lab, cfg, func(s *spec) {
		s.EventsLog, s.VersionFile = d.events, d.version
		if edit != nil {
			edit(s)
		}
	})
	d.c.waitReady()
	d.held = holdConns(t, d.c, d.lab.ClientAddrs4[:8], d.dst)
	return d
}

func (d *deployLab) setVersion(v string) {
	if err := os.WriteFile(d.version, []byte(v+"\n"), 0o600); err != nil {
		d.t.Fatal(err)
	}
}

// load starts short connections from all 64 addresses.
func (d *deployLab) load() {
	d.stop = startLoad(d.t, d.lab.Client, d.lab.ClientAddrs4, d.dst, 4, 1_000_000)
}

// finish stops the load and checks that no attempt failed and the held
// connections still reach the workers that accepted them.
func (d *deployLab) finish() loadResult {
	d.t.Helper()
	time.Sleep(500 * time.Millisecond) // load on the final workers too
	res := d.stop()
	d.t.Logf("load: %d attempts, %d failures %q", res.Attempts, res.Failures, res.Errors)
	switch {
	case res.Attempts == 0:
		d.t.Errorf("load: %v", res)
	case d.crashSlot < 0 && res.Failures != 0:
		d.t.Errorf("load: %v", res)
	case d.crashSlot >= 0:
		// The load's concurrency in flight on the crashing worker, and
		// the attempts refused (each at once) before the rollback's rule
		// write: a few milliseconds, more on a busy machine (60 seen
		// under a loaded CI). A slot that never came back would fail a
		// quarter of all attempts from then on: 1 in 20 tells the two
		// apart whatever the machine's speed.
		if res.Failures > 32 && res.Failures > res.Attempts/20 {
			d.t.Errorf("%d failures of %d attempts around one crash: %v", res.Failures, res.Attempts, res)
		}
		for _, e := range res.Errors {
			src, _, _ := strings.Cut(strings.TrimPrefix(e, "from "), ":")
			if a, err := netip.ParseAddr(src); err != nil || expectSlot(a, d.c.spec.Config.Workers, 32) != d.crashSlot {
				d.t.Errorf("failure outside the crashed worker's slot %d: %s", d.crashSlot, e)
			}
		}
	}
	if err := probeAll(d.held); err != nil {
		d.t.Errorf("held connections: %v", err)
	}
	return res
}

// heldPIDs are the workers holding the long-lived connections.
func (d *deployLab) heldPIDs() []int {
	var pids []int
	for _, h := range d.held {
		if !slices.Contains(pids, h.first.PID) {
			pids = append(pids, h.first.PID)
		}
	}
	return pids
}

// releaseHeld closes the held connections and waits for their workers to
// exit (they were retired).
func (d *deployLab) releaseHeld() {
	for _, h := range d.held {
		h.Close()
	}
	waitGone(d.t, d.heldPIDs(), 10*time.Second)
}

// masterStatus polls the status through the socket, whoever the master is.
func (d *deployLab) waitStatus(what string, ok func(*proto.Status) bool) *proto.Status {
	d.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if st, err := d.c.status(); err == nil && ok(st) {
			return st
		}
		time.Sleep(20 * time.Millisecond)
	}
	d.t.Fatalf("timed out waiting for %s\n%s", what, d.c.log())
	return nil
}

// servedBy reports whether every slot is served by an active worker of
// version v, none of them one of old.
func servedBy(st *proto.Status, v string, old []int) bool {
	active := 0
	for _, w := range st.Workers {
		if w.State == "active" {
			if w.Build != v || slices.Contains(old, w.PID) {
				return false
			}
			active++
		}
	}
	return active == len(st.Slots) && st.Ready
}

// stopMasterByPID stops a master the harness did not start (a successor).
func stopMasterByPID(t testing.TB, pid int) {
	t.Cleanup(func() {
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
			return
		}
		waitGone(t, []int{pid}, 20*time.Second)
	})
}

// SIGHUP: the master starts the binary on disk, which takes the cluster
// over and rolls every slot to its version; the old master exits, the old
// workers drain, and no attempt fails.
func TestDeployBySIGHUP(t *testing.T) {
	d := startDeployLab(t, 4, nil)
	st0, _ := d.c.status()
	oldPIDs := workerPIDs(st0)
	d.load()
	d.setVersion("v2")
	t0 := time.Now()
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := d.c.wait(10 * time.Second); err != nil {
		t.Fatalf("old master after the handover: %v\n%s", err, d.c.log())
	}
	st := d.waitStatus("every slot on v2", func(st *proto.Status) bool {
		return servedBy(st, "v2", oldPIDs) && strings.HasPrefix(st.Deploy, "committed")
	})
	t.Logf("deploy of 4 workers: %s to commit (canary %s); %s", time.Since(t0).Round(time.Millisecond), time.Second, st.Deploy)
	stopMasterByPID(t, st.MasterPID)
	if st.MasterPID == st0.MasterPID || st.Generation <= st0.Generation {
		t.Errorf("master %d generation %d after the deploy, was %d generation %d", st.MasterPID, st.Generation, st0.MasterPID, st0.Generation)
	}
	d.finish()
	for _, w := range st.Workers {
		if slices.Contains(oldPIDs, w.PID) && w.State != "retired" {
			t.Errorf("old worker %d is %s, want retired", w.PID, w.State)
		}
	}
	d.releaseHeld()
	waitEvent(t, d.events, time.Second, func(e loggedEvent) bool {
		return e.Type == "EventDeploy" && decodeEvent[ipcluster.EventDeploy](t, e).Outcome == ipcluster.DeployHandedOver
	})
}

// A second master started by hand takes over the same way.
func TestSecondMasterTakesOver(t *testing.T) {
	d := startDeployLab(t, 4, nil)
	st0, _ := d.c.status()
	oldPIDs := workerPIDs(st0)
	d.load()
	d.setVersion("v2")
	c2 := startClusterSpec(t, d.lab, d.c.spec.Config, func(s *spec) { *s = d.c.spec })
	if err := d.c.wait(10 * time.Second); err != nil {
		t.Fatalf("old master after the handover: %v\n%s", err, d.c.log())
	}
	st := d.waitStatus("every slot on v2", func(st *proto.Status) bool {
		return servedBy(st, "v2", oldPIDs) && strings.HasPrefix(st.Deploy, "committed")
	})
	if st.MasterPID != c2.cmd.Process.Pid {
		t.Errorf("master pid %d, want the second master %d", st.MasterPID, c2.cmd.Process.Pid)
	}
	d.finish()
	d.releaseHeld()
}

// kill -9 of the master: the workers keep serving on the rules in the
// kernel; a new master of the same version adopts every one of them in its
// slot, without a duplicated or missing rule, and no attempt fails.
func TestMasterKilledWorkersAdopted(t *testing.T) {
	for _, backend := range backends {
		t.Run(string(backend), func(t *testing.T) {
			d := startDeployLab(t, 4, func(s *spec) { s.Config.Backend = backend })
			st0, _ := d.c.status()
			d.load()
			if err := d.c.cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			<-d.c.done
			time.Sleep(300 * time.Millisecond) // served with no master
			c2 := startClusterSpec(t, d.lab, d.c.spec.Config, func(s *spec) { *s = d.c.spec })
			st := c2.waitStatus("the old workers adopted", func(st *proto.Status) bool {
				if !st.Ready {
					return false
				}
				for slot := range st.Slots {
					if activePID(st, slot) != activePID(st0, slot) {
						return false
					}
				}
				return true
			})
			if st.Generation != st0.Generation+1 {
				t.Errorf("new master is generation %d, want %d", st.Generation, st0.Generation+1)
			}
			if len(st.Workers) != 4 {
				t.Errorf("%d workers after adoption, want the 4 adopted: %+v", len(st.Workers), st.Workers)
			}
			c2.checkKernelRules(t)
			d.finish()
		})
	}
}

// SIGUSR2 rolls every worker, same version: new workers in every slot, the
// old ones drain.
func TestSIGUSR2RollsEveryWorker(t *testing.T) {
	d := startDeployLab(t, 4, nil)
	st0, _ := d.c.status()
	oldPIDs := workerPIDs(st0)
	d.load()
	if err := d.c.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	st := d.waitStatus("every slot rolled", func(st *proto.Status) bool {
		return servedBy(st, "v1", oldPIDs) && strings.HasPrefix(st.Deploy, "committed")
	})
	t.Logf("%s", st.Deploy)
	for _, pid := range oldPIDs {
		e := waitEvent(t, d.events, 5*time.Second, func(e loggedEvent) bool {
			return e.Type == "EventRetired" && decodeEvent[ipcluster.EventRetired](t, e).PID == pid
		})
		if ev := decodeEvent[ipcluster.EventRetired](t, e); ev.Cause != ipcluster.CauseDeploy || ev.Elapsed <= 0 || ev.Elapsed > time.Minute {
			t.Errorf("old worker %d retired with %+v, want cause deploy and the time since the deploy began", pid, ev)
		}
	}
	d.finish()
	d.releaseHeld()
}

// A deploy whose workers exit at start, never report ready, or crash 2s
// after (while the canary is watched) is rolled back: every slot is served
// by its old worker again. No attempt fails, but for a canary that crashes
// while serving: the connections it holds die with it.
func TestBadDeploysRolledBack(t *testing.T) {
	for _, bad := range []string{"exit", "noready", "crash2s"} {
		t.Run(bad, func(t *testing.T) {
			d := startDeployLab(t, 4, func(s *spec) {
				s.VersionScenarios = map[string]string{"v2": bad}
				s.Config.CanaryPeriod = 4 * time.Second
			})
			st0, _ := d.c.status()
			if bad == "crash2s" {
				d.crashSlot = 0 // the canary's
			}
			d.load()
			d.setVersion("v2")
			t0 := time.Now()
			if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			e := waitEvent(t, d.events, 30*time.Second, func(e loggedEvent) bool {
				if e.Type != "EventDeploy" {
					return false
				}
				o := decodeEvent[ipcluster.EventDeploy](t, e).Outcome
				return o == ipcluster.DeployRolledBack || o == ipcluster.DeployCommitted
			})
			ev := decodeEvent[ipcluster.EventDeploy](t, e)
			t.Logf("%s after %s: %s", ev.Outcome, time.Since(t0).Round(time.Millisecond), ev.Reason)
			if ev.Outcome != ipcluster.DeployRolledBack {
				t.Fatalf("deploy %+v, want rolled back", ev)
			}
			st := d.waitStatus("every slot back on its old worker", func(st *proto.Status) bool {
				if !st.Ready {
					return false
				}
				for slot := range st.Slots {
					if activePID(st, slot) != activePID(st0, slot) {
						return false
					}
				}
				return strings.HasPrefix(st.Deploy, "rolled back")
			})
			stopMasterByPID(t, st.MasterPID)
			t.Logf("%s", st.Deploy)
			d.finish()
		})
	}
}

// BenchmarkDeploy measures deploys by SIGHUP, each to a new version, under
// load from 64 addresses: from the signal to every slot served by the new
// version, with no canary. It reports failed connection attempts.
//
//	sudo go test -run '^$' -bench Deploy -benchtime 5x .
func BenchmarkDeploy(b *testing.B) {
	for _, workers := range []int{4, 16} {
		b.Run("workers="+itoa(workers), func(b *testing.B) {
			d := startDeployLab(b, workers, func(s *spec) { s.Config.CanaryPeriod = -1 })
			d.load()
			var old []int
			var total time.Duration
			b.ResetTimer()
			for i := range b.N {
				st, err := d.c.status()
				if err != nil {
					b.Fatal(err)
				}
				old = workerPIDs(st)
				v := "v" + itoa(i+2)
				d.setVersion(v)
				t0 := time.Now()
				if err := syscall.Kill(st.MasterPID, syscall.SIGHUP); err != nil {
					b.Fatal(err)
				}
				st = d.waitStatus(v+" everywhere", func(st *proto.Status) bool {
					return servedBy(st, v, old) && strings.HasPrefix(st.Deploy, "committed")
				})
				total += time.Since(t0)
				if st.MasterPID != d.c.cmd.Process.Pid {
					stopMasterByPID(b, st.MasterPID)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(total.Microseconds())/1e3/float64(b.N), "ms/deploy")
			res := d.stop()
			b.ReportMetric(float64(res.Failures), "failed")
			b.ReportMetric(float64(res.Attempts)/b.Elapsed().Seconds(), "conn/s")
			if res.Failures != 0 {
				b.Errorf("load: %v", res)
			}
		})
	}
}

// resize asks the master for a new slot count.
func (c *cluster) resize(t testing.TB, workers int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cl, err := proto.Dial(ctx, c.socket, c.spec.Config.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.Resize(ctx, workers); err != nil {
		t.Fatal(err)
	}
}

// owners asks from every address which worker serves it.
func owners(t *testing.T, d *deployLab, workers int) map[netip.Addr]int {
	t.Helper()
	out := map[netip.Addr]int{}
	for _, a := range d.lab.ClientAddrs4 {
		rep, err := ask(d.lab.Client, a, d.dst)
		if err != nil {
			t.Fatalf("from %s: %v", a, err)
		}
		if want := expectSlot(a, workers, 32); rep.Slot != want {
			t.Fatalf("%s reached slot %d, want %d of %d", a, rep.Slot, want, workers)
		}
		out[a] = rep.PID
	}
	return out
}

// Live resize under load, both ways. Growing from 2 to 4 slots: clients
// whose new bit is 0 keep their worker, the others move to the 2 new
// workers. Shrinking back: slots 2 and 3 merge into 0 and 1, whose workers
// take their clients back, and their workers retire. No established
// connection is cut and no attempt fails.
func TestLiveResize(t *testing.T) {
	for _, backend := range backends {
		t.Run(string(backend), func(t *testing.T) {
			d := startDeployLab(t, 2, func(s *spec) { s.Config.Backend = backend })
			before := owners(t, d, 2)
			d.load()

			d.c.resize(t, 4)
			st := d.waitStatus("4 slots served", func(st *proto.Status) bool {
				return len(st.Slots) == 4 && activePID(st, 2) != 0 && activePID(st, 3) != 0 && hasEvent(t, d.events, "EventResized")
			})
			grown := owners(t, d, 4)
			moved := 0
			for a, pid := range grown {
				switch slot := expectSlot(a, 4, 32); {
				case slot < 2 && pid != before[a]:
					t.Errorf("%s (slot %d) moved from worker %d to %d", a, slot, before[a], pid)
				case slot >= 2 && (pid == before[a] || pid != activePID(st, slot)):
					t.Errorf("%s (slot %d) served by %d, want the new worker %d", a, slot, pid, activePID(st, slot))
				case slot >= 2:
					moved++
				}
			}
			t.Logf("grow 2 → 4: %d of %d clients moved to the new workers", moved, len(grown))
			if err := probeAll(d.held); err != nil {
				t.Fatalf("held connections after growing: %v", err)
			}
			// Connections to the workers about to be merged away.
			d.held = append(d.held, holdConns(t, d.c, d.lab.ClientAddrs4[2:4], d.dst)...)
			merged := []int{activePID(st, 2), activePID(st, 3)}

			d.c.resize(t, 2)
			// EventResized comes once the rules route the new slot
			// mask: clients are asked where they land only then.
			st = d.waitStatus("2 slots again", func(st *proto.Status) bool {
				if len(st.Slots) != 2 || countEvents(t, d.events, "EventResized") < 2 {
					return false
				}
				for _, w := range st.Workers {
					if slices.Contains(merged, w.PID) && w.State != "retired" {
						return false
					}
				}
				return true
			})
			shrunk := owners(t, d, 2)
			for a, pid := range shrunk {
				if pid != before[a] {
					t.Errorf("%s back on worker %d after the shrink, want its first worker %d", a, pid, before[a])
				}
			}
			d.finish()
			for _, h := range d.held {
				h.Close()
			}
			waitGone(t, merged, 10*time.Second) // retired, drained
			_ = st
		})
	}
}

// SIGHUP when the binary on disk is broken: the new master exits at once,
// the running one reports the failed deploy and carries on, untouched.
func TestDeployOfBrokenBinaryFails(t *testing.T) {
	exe := filepath.Join(t.TempDir(), "server")
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, self, 0o755); err != nil {
		t.Fatal(err)
	}
	d := startDeployLab(t, 4, func(s *spec) { s.Exe = exe })
	st0, _ := d.c.status()
	d.load()
	// Ship a broken build the way a deploy ships any: over the old path.
	broken := exe + ".new"
	if err := os.WriteFile(broken, []byte("#!/bin/sh\necho broken build >&2\nexit 7\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(broken, exe); err != nil {
		t.Fatal(err)
	}
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	e := waitEvent(t, d.events, 10*time.Second, func(e loggedEvent) bool { return e.Type == "EventDeploy" })
	ev := decodeEvent[ipcluster.EventDeploy](t, e)
	t.Logf("%s: %s", ev.Outcome, ev.Reason)
	if ev.Outcome != ipcluster.DeployFailed || !strings.Contains(ev.Reason, "exit status 7") {
		t.Errorf("deploy event %+v, want failed with the new master's exit status", ev)
	}
	st, err := d.c.status()
	if err != nil || st.MasterPID != st0.MasterPID || !slices.Equal(workerPIDs(st), workerPIDs(st0)) {
		t.Fatalf("after the failed deploy: %+v %v", st, err)
	}
	if !strings.HasPrefix(st.Deploy, "failed") {
		t.Errorf("status deploy %q", st.Deploy)
	}
	d.finish()
	// A crash now brings the worker back as the code it was: spawned
	// from the master's own executable, not the broken file on disk.
	if err := syscall.Kill(activePID(st, 2), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitStatus("slot 2 back", func(s *proto.Status) bool {
		return activePID(s, 2) != 0 && activePID(s, 2) != activePID(st, 2)
	})
	if rep, err := ask(d.lab.Client, d.lab.ClientAddrs4[2], d.dst); err != nil || rep.Slot != 2 {
		t.Fatalf("slot 2 after the crash: %+v %v", rep, err)
	}
}

// With WorkerReady, a deploy's new workers take their slots only once the
// application calls Ready: a build whose workers never do rolls back after
// three failed starts, having moved no slot, so no attempt fails; a build
// whose workers do commits.
func TestDeployWaitsForAppReady(t *testing.T) {
	d := startDeployLab(t, 4, func(s *spec) {
		s.Scenario = "readyecho"
		s.VersionScenarios = map[string]string{"v2": "gated"} // whose gates no one opens
		s.ReportDir = t.TempDir()
		s.Config.WorkerReady, s.Config.ReadyTimeout = true, 2*time.Second
	})
	st0, _ := d.c.status()
	oldPIDs := workerPIDs(st0)
	d.load()
	d.setVersion("v2")
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	e := waitEvent(t, d.events, 60*time.Second, func(e loggedEvent) bool {
		if e.Type != "EventDeploy" {
			return false
		}
		o := decodeEvent[ipcluster.EventDeploy](t, e).Outcome
		return o == ipcluster.DeployRolledBack || o == ipcluster.DeployCommitted
	})
	if ev := decodeEvent[ipcluster.EventDeploy](t, e); ev.Outcome != ipcluster.DeployRolledBack || !strings.Contains(ev.Reason, "failed to start") {
		t.Fatalf("deploy of workers that never call Ready: %+v, want rolled back after failed starts", ev)
	}
	if log := d.c.log(); !strings.Contains(log, "the work function must call Worker.Ready") {
		t.Errorf("the log does not say what to do about workers that never call Ready:\n%s", log)
	}
	st := d.waitStatus("every slot back on its old worker", func(st *proto.Status) bool {
		for slot := range st.Slots {
			if activePID(st, slot) != activePID(st0, slot) {
				return false
			}
		}
		return st.Ready && strings.HasPrefix(st.Deploy, "rolled back")
	})
	stopMasterByPID(t, st.MasterPID)

	d.setVersion("v3")
	if err := syscall.Kill(st.MasterPID, syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	st = d.waitStatus("every slot on v3", func(st *proto.Status) bool {
		return servedBy(st, "v3", oldPIDs) && strings.HasPrefix(st.Deploy, "committed")
	})
	stopMasterByPID(t, st.MasterPID)
	d.finish()
}
