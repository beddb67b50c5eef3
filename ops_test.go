//go:build linux

package ipcluster_test

// Operator papercuts: what a deploy logs, what ps shows, what uptime an
// adopted worker reports.

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// alarmLine matches a log line at WARN or ERROR, from the library's text
// handler.
var alarmLine = regexp.MustCompile(`(?m)^.*level=(WARN|ERROR).*$`)

// A deploy that goes as planned (SIGHUP, a new version, canary, rolling,
// commit, old workers drained) needs no human: it logs no WARN or ERROR,
// from either master or any worker, with spares or without. Nor does a
// restart (SIGUSR2), the same roll inside one master.
func TestNormalDeployLogsNoWarning(t *testing.T) {
	for _, tc := range []struct {
		name   string
		spares int
		sig    syscall.Signal
	}{
		{"deploy", 0, syscall.SIGHUP},
		{"deploy with a spare", 1, syscall.SIGHUP},
		{"restart", 0, syscall.SIGUSR2},
	} {
		t.Run(tc.name, func(t *testing.T) { testNormalDeployLogs(t, tc.spares, tc.sig) })
	}
}

func testNormalDeployLogs(t *testing.T, spares int, sig syscall.Signal) {
	d := startDeployLab(t, 4, func(s *spec) {
		s.Config.Spares = spares
		// What a busy machine may take, so that only the deploy itself
		// could log a warning.
		s.Config.ConnectTimeout = 10 * time.Second
	})
	st0, _ := d.c.status()
	oldPIDs := workerPIDs(st0)
	d.load()
	version := "v1"
	if sig == syscall.SIGHUP {
		version = "v2"
		d.setVersion(version)
	}
	if err := d.c.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	if sig == syscall.SIGHUP {
		if err := d.c.wait(10 * time.Second); err != nil {
			t.Fatalf("old master after the handover: %v\n%s", err, d.c.log())
		}
	}
	st := d.waitStatus("every slot on "+version, func(st *proto.Status) bool {
		return servedBy(st, version, oldPIDs) && strings.HasPrefix(st.Deploy, "committed")
	})
	if st.MasterPID != st0.MasterPID {
		stopMasterByPID(t, st.MasterPID)
	}
	d.finish()
	d.releaseHeld()
	if lines := alarmLine.FindAllString(d.c.log(), -1); len(lines) > 0 {
		t.Errorf("a normal deploy logged %d WARN/ERROR lines:\n%s", len(lines), strings.Join(lines, "\n"))
	}
}

// Workers keep the program's name in ps, top and ss (the kernel's comm of
// every thread) and as argv[0], though the master execs them through
// /proc/self/exe: after a start, and after a crash and respawn; as the
// master's user and as WorkerUser.
func TestWorkersKeepProgramName(t *testing.T) {
	for _, user := range []string{"", "nobody"} {
		t.Run("user="+user, func(t *testing.T) { testWorkersKeepProgramName(t, user) })
	}
}

func testWorkersKeepProgramName(t *testing.T, user string) {
	lab := netlab.NewT(t, netlab.Options{})
	cfg := specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, WorkerUser: user}
	if user != "" {
		cfg.RunDir = openTempDir(t, 0o755) // the workers reach the socket
	}
	c := startCluster(t, lab, cfg)
	st := c.waitReady()
	name := filepath.Base(os.Args[0])
	comm := name[:min(len(name), 15)]
	check := func(pids []int) {
		t.Helper()
		for _, pid := range pids {
			dir := "/proc/" + strconv.Itoa(pid)
			cmdline, err := os.ReadFile(dir + "/cmdline")
			if err != nil {
				t.Fatal(err)
			}
			argv0, _, _ := bytes.Cut(cmdline, []byte{0})
			if filepath.Base(string(argv0)) != name {
				t.Errorf("worker %d: argv[0] %q, want %s", pid, argv0, name)
			}
			tasks, err := os.ReadDir(dir + "/task")
			if err != nil {
				t.Fatal(err)
			}
			for _, task := range tasks {
				b, err := os.ReadFile(dir + "/task/" + task.Name() + "/comm")
				if err != nil {
					continue // a thread that ended
				}
				if got := strings.TrimSpace(string(b)); got != comm {
					t.Errorf("worker %d thread %s is named %q, want %q", pid, task.Name(), got, comm)
				}
			}
		}
	}
	check(workerPIDs(st))
	old := activePID(st, 1)
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st = c.waitStatus("slot 1 respawned", func(st *proto.Status) bool {
		return st.Ready && activePID(st, 1) != 0 && activePID(st, 1) != old
	})
	check([]int{activePID(st, 1)})
}

// kill -9 of the master, and a new master adopts the workers: their uptime
// goes on from the processes' start, not from the adoption.
func TestAdoptedWorkerKeepsUptime(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{})
	cfg := specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, ConnectTimeout: 2 * time.Second}
	c := startCluster(t, lab, cfg)
	c.waitReady()
	time.Sleep(2 * time.Second) // an uptime the adoption cannot reach by itself
	st0 := c.waitReady()
	t0 := time.Now()
	if err := c.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-c.done
	c2 := startClusterSpec(t, lab, c.spec.Config, func(s *spec) { *s = c.spec })
	// since is a lower bound of the time from st0 to st: from the kill to
	// the request that got st.
	var st *proto.Status
	var since float64
	for deadline := time.Now().Add(15 * time.Second); st == nil; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the old workers not adopted in 15s\n%s", c2.log())
		}
		asked := time.Now()
		if s, err := c2.status(); err == nil && s.Ready && activePID(s, 0) == activePID(st0, 0) && activePID(s, 1) == activePID(st0, 1) {
			st, since = s, asked.Sub(t0).Seconds()
		}
	}
	for _, w0 := range st0.Workers {
		for _, w := range st.Workers {
			// The start time is good to a clock tick; the old master
			// counted from a moment after the fork.
			if w.PID == w0.PID && w.UptimeSec < w0.UptimeSec+since-0.02 {
				t.Errorf("adopted worker %d: uptime %.2fs, want at least %.2fs (%.2fs before the master was killed, %.2fs since)",
					w.PID, w.UptimeSec, w0.UptimeSec+since, w0.UptimeSec, since)
			}
		}
	}
}
