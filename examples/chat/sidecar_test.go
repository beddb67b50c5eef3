//go:build linux

package main

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestMain runs the sidecar when ensureSidecar starts this test binary as
// one, as main does for the example's binary.
func TestMain(m *testing.M) {
	if dir := os.Getenv(envSidecar); dir != "" {
		os.Exit(runSidecar(dir))
	}
	os.Exit(m.Run())
}

// Every master of a cluster finds the one sidecar its first master
// started, with its stream; a dead one is replaced; a stop ends it.
func TestSidecarReused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "chat.nats")
	log := testLogger(t)
	first, err := ensureSidecar(dir, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(first.PID, syscall.SIGKILL) })
	again, err := ensureSidecar(dir, log)
	if err != nil {
		t.Fatal(err)
	}
	if again != first {
		t.Fatalf("a second master started sidecar %+v, want the first's %+v", again, first)
	}
	w := newTestWorker(t, first.URL, 0, nil)
	ann := dialChat(t, w, hello{Nick: "ann"})
	seq := ann.say("lobby", "kept", "1").Seq

	// The stream is the sidecar's: a new worker (of a new master) reads it.
	h := newHub()
	newTestWorker(t, again.URL, 0, h)
	if !h.caughtUp(seq) {
		t.Fatalf("a new worker on the sidecar has seq %d, want %d", h.stats().Seq, seq)
	}

	if err := syscall.Kill(first.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, first.PID)
	next, err := ensureSidecar(dir, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(next.PID, syscall.SIGKILL) })
	if next.PID == first.PID {
		t.Fatalf("a dead sidecar (pid %d) was taken for alive", first.PID)
	}
	stopSidecar(next, log)
	waitGone(t, next.PID)
	if _, err := os.Stat(dir); err == nil {
		t.Errorf("a stopped sidecar left %s behind", dir)
	}
}

// waitGone waits for a process of ours to exit (ensureSidecar reaps it).
func waitGone(t *testing.T, pid int) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if syscall.Kill(pid, 0) != nil {
			return
		}
	}
	t.Fatalf("pid %d still running", pid)
}
