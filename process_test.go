//go:build linux

package ipcluster

import (
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeProcess is the process of a worker in a test that builds its master
// by hand (newState): it records the signals the master sends it, so that
// a made-up pid is never signalled for real. It never ends on its own:
// tests call the loop's handlers themselves and never watch it.
type fakeProcess struct {
	id      int
	signals []syscall.Signal
	closed  bool
}

func (f *fakeProcess) pid() int      { return f.id }
func (f *fakeProcess) spawned() bool { return false } // as a worker of an earlier master: no capability check on /proc
func (f *fakeProcess) close()        { f.closed = true }

func (f *fakeProcess) signal(sig syscall.Signal) error {
	f.signals = append(f.signals, sig)
	return nil
}

func (f *fakeProcess) wait() string { panic("ipcluster test: waited for a fake process") }

// fakeProc is a worker whose process is a fakeProcess with pid.
func fakeProc(pid, slot, gen int) *proc {
	return newProc(&fakeProcess{id: pid}, slot, gen, "")
}

// signals are what the master sent p's fake process.
func signals(p *proc) []syscall.Signal { return p.process.(*fakeProcess).signals }

// sleeper starts a process of the test's own that waits for a signal.
func sleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	path, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep binary:", err)
	}
	cmd := exec.Command(path, "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return cmd
}

// waitFor runs wait in a goroutine and returns its status, or fails the
// test after a generous bound.
func waitFor(t *testing.T, pr process) string {
	t.Helper()
	c := make(chan string, 1)
	go func() { c <- pr.wait() }()
	select {
	case s := <-c:
		return s
	case <-time.After(time.Minute):
		t.Fatal("wait did not return within a minute")
		return ""
	}
}

// A spawned child is signalled through its os.Process, its wait gives
// the exit status, and a signal after its end is not an error.
func TestChildProcess(t *testing.T) {
	cmd := sleeper(t)
	var pr process = &childProcess{cmd}
	if pr.pid() != cmd.Process.Pid || !pr.spawned() {
		t.Fatalf("pid %d spawned %v; want %d and true", pr.pid(), pr.spawned(), cmd.Process.Pid)
	}
	if err := pr.signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if got := waitFor(t, pr); got != "signal: terminated" {
		t.Errorf("status %q, want signal: terminated", got)
	}
	if err := pr.signal(syscall.SIGKILL); err != nil {
		t.Errorf("signal after the end: %v, want nil", err)
	}
	pr.close()
}

// An adopted process is signalled through its pidfd, its wait ends with
// its exit, and a signal after its end is not an error.
func TestPidfdProcess(t *testing.T) {
	cmd := sleeper(t)
	pr, err := openPidfd(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer pr.close()
	if pr.pid() != cmd.Process.Pid || pr.spawned() {
		t.Fatalf("pid %d spawned %v; want %d and false", pr.pid(), pr.spawned(), cmd.Process.Pid)
	}
	if err := pr.signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if got := waitFor(t, pr); got != "exited" {
		t.Errorf("status %q, want exited", got)
	}
	if err := cmd.Wait(); err == nil || !strings.Contains(err.Error(), "terminated") {
		t.Errorf("the sleeper ended with %v, want terminated by our signal", err)
	}
	if err := pr.signal(syscall.SIGKILL); err != nil {
		t.Errorf("signal after the end: %v, want nil", err)
	}
}

// Closing an adopted process's pidfd (a handover's letGo) ends its wait
// while the process carries on.
func TestPidfdProcessCloseEndsWait(t *testing.T) {
	cmd := sleeper(t)
	pr, err := openPidfd(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	c := make(chan string, 1)
	go func() { c <- pr.wait() }()
	pr.close()
	pr.close() // safe more than once
	select {
	case s := <-c:
		if !strings.HasPrefix(s, "unknown: ") {
			t.Errorf("status %q, want unknown: <why>", s)
		}
	case <-time.After(time.Minute):
		t.Fatal("wait did not return within a minute of close")
	}
	if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the process did not carry on: %v", err)
	}
}

// A hand-made master's workers get only recorded signals.
func TestFakeProcessRecordsSignals(t *testing.T) {
	m, _ := policyMaster(t, Config{Workers: 2})
	p := fakeProc(1<<30, 0, 1)
	m.procs[p.pid] = p
	m.signal(p, syscall.SIGTERM)
	m.kill(p)
	if got := signals(p); !slices.Equal(got, []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL}) {
		t.Errorf("signals %v, want SIGTERM then SIGKILL", got)
	}
}
