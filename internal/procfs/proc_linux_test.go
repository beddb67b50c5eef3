package procfs

import (
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The start time of a process started now is now, to within the clocks'
// granularity and a generous bound for a busy machine.
func TestStartTime(t *testing.T) {
	before := time.Now()
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Skip(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	got, err := StartTime(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if got.Before(before.Add(-time.Second)) || got.After(time.Now().Add(time.Second)) {
		t.Errorf("start time %s, want between %s and now", got, before)
	}
	if _, err := StartTime(0x7fffffff); err == nil {
		t.Error("start time of a pid that cannot exist")
	}
}

// SetComm renames every thread, those the runtime made before and those
// it makes after, and cuts the name to the kernel's 15 bytes.
func TestSetComm(t *testing.T) {
	if err := SetComm("procfs-test-a-long-name"); err != nil {
		t.Fatal(err)
	}
	// Threads made after: goroutines locked to threads, each held.
	var wg sync.WaitGroup
	release := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			runtime.LockOSThread()
			wg.Done()
			<-release
		}()
	}
	wg.Wait()
	defer close(release)
	names := threadNames(t, os.Getpid())
	if len(names) < 5 {
		t.Fatalf("%d threads: %q", len(names), names)
	}
	for _, n := range names {
		if n != "procfs-test-a-l" {
			t.Errorf("thread named %q, want procfs-test-a-l (all: %q)", n, names)
		}
	}
}

func threadNames(t *testing.T, pid int) []string {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range tasks {
		b, err := os.ReadFile(dir + "/" + e.Name() + "/comm")
		if err == nil {
			names = append(names, strings.TrimSpace(string(b)))
		}
	}
	return names
}

func TestParseStatStartTime(t *testing.T) {
	// A command with spaces and a parenthesis, as a thread may name itself.
	line := "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 98765 1000000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
	v, err := parseStatStartTime([]byte(line))
	if err != nil || v != 98765 {
		t.Errorf("starttime %d, %v; want 98765", v, err)
	}
	if _, err := parseStatStartTime([]byte("4242 (x) S 1 2\n")); err == nil {
		t.Error("short stat line accepted")
	}
}
