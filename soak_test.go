//go:build linux

package ipcluster_test

// A short soak for CI: many spawns and retirements under a little load,
// with the master's goroutines, file descriptors and RSS sampled after a
// warm-up and at the end. A master that leaks a goroutine, a pidfd, a
// pipe or a timer per worker shows up here long before production.

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// masterFigures are what the soak watches in the master process.
type masterFigures struct {
	goroutines int
	fds        int
	rssKiB     int
}

func (f masterFigures) String() string {
	return "goroutines " + strconv.Itoa(f.goroutines) + ", fds " + strconv.Itoa(f.fds) + ", RSS " + strconv.Itoa(f.rssKiB) + " KiB"
}

// sampleMaster reads the master's goroutines (its /metrics go_goroutines),
// open fds and RSS (/proc).
func sampleMaster(t *testing.T, lab *netlab.Lab, metrics netip.AddrPort, pid int) masterFigures {
	t.Helper()
	var f masterFigures
	g, ok := scrape(t, lab, metrics)["go_goroutines"]
	if !ok {
		t.Fatal("no go_goroutines in /metrics")
	}
	f.goroutines = int(g)
	fds, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	f.fds = len(fds)
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f.rssKiB, _ = strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
		}
	}
	return f
}

// children returns the pids whose parent is pid, and which of them are
// zombies.
func children(pid int) (all, zombies []int) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(string(b[i+1:])) // state, ppid, ...
		if len(fields) < 2 || fields[1] != strconv.Itoa(pid) {
			continue
		}
		all = append(all, child)
		if fields[0] == "Z" {
			zombies = append(zombies, child)
		}
	}
	return all, zombies
}

// settled reports a cluster of n slots with exactly one active worker
// each and nothing else running.
func settled(n int) func(*proto.Status) bool {
	return func(st *proto.Status) bool {
		if !st.Ready || len(st.Slots) != n || len(st.Workers) != n {
			return false
		}
		for _, s := range st.Slots {
			if s.Active == 0 {
				return false
			}
		}
		for _, w := range st.Workers {
			if w.State != "active" {
				return false
			}
		}
		return true
	}
}

func TestSoakLeaks(t *testing.T) {
	if testing.Short() {
		t.Skip("soak")
	}
	lab := netlab.NewT(t, netlab.Options{Clients: 32})
	metrics := netip.AddrPortFrom(lab.ServerAddr4, 9464)
	const workers = 4
	c := startCluster(t, lab, specConfig{Workers: workers, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		HTTPAddr: metrics.String()})
	c.waitReady()
	master := c.cmd.Process.Pid
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)

	seen := map[int]bool{} // every worker pid the status ever showed
	status := func(what string, ok func(*proto.Status) bool) *proto.Status {
		t.Helper()
		st := c.waitStatus(what, ok)
		for _, w := range st.Workers {
			seen[w.PID] = true
		}
		return st
	}

	// A little load: short connections from every client address.
	var asked, failed atomic.Int64
	stopLoad := make(chan struct{})
	var load sync.WaitGroup
	for range 2 {
		load.Add(1)
		go func() {
			defer load.Done()
			for {
				select {
				case <-stopLoad:
					return
				case <-time.After(10 * time.Millisecond):
				}
				src := lab.ClientAddrs4[rand.IntN(len(lab.ClientAddrs4))]
				asked.Add(1)
				if _, err := ask(lab.Client, src, dst); err != nil {
					failed.Add(1)
				}
			}
		}()
	}
	defer func() {
		select {
		case <-stopLoad:
		default:
			close(stopLoad)
		}
		load.Wait()
	}()

	round := func(i int) {
		t.Helper()
		st := status("settled", settled(workers))
		// A worker asks to be retired.
		slot := rand.IntN(workers)
		old := activePID(st, slot)
		if err := syscall.Kill(old, syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
		st = status("retirement", func(st *proto.Status) bool { p := activePID(st, slot); return p != 0 && p != old })
		// A worker crashes.
		slot = rand.IntN(workers)
		old = activePID(st, slot)
		if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		status("crash replaced", func(st *proto.Status) bool { p := activePID(st, slot); return p != 0 && p != old })
		if i%2 == 0 { // every worker rolled
			prev := workerPIDs(status("settled", settled(workers)))
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			cl, err := proto.Dial(ctx, c.socket, "t")
			if err != nil {
				t.Fatal(err)
			}
			if err := cl.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			cl.Close()
			cancel()
			status("restart", func(st *proto.Status) bool {
				for _, s := range st.Slots {
					if s.Active == 0 || slices.Contains(prev, s.Active) {
						return false
					}
				}
				return settled(workers)(st)
			})
		}
		if i%3 == 0 {
			c.resize(t, 2*workers)
			status("grown", settled(2*workers))
			c.resize(t, workers)
		}
		// SIGUSR1 to the master: any retired worker still draining goes.
		if err := syscall.Kill(master, syscall.SIGUSR1); err != nil {
			t.Fatal(err)
		}
		status("settled", settled(workers))
	}

	// Warm-up: one round of everything, then the baseline.
	round(0)
	time.Sleep(time.Second)
	base := sampleMaster(t, lab, metrics, master)
	t0 := time.Now()
	rounds := 0
	for i := 1; time.Since(t0) < 25*time.Second; i++ {
		round(i)
		rounds++
	}
	close(stopLoad)
	load.Wait()
	st := status("settled", settled(workers))

	// Transient goroutines (a finishing peer reader, an HTTP handler) may
	// take a moment to end: sample until flat or 10s have passed.
	var end masterFigures
	flat := func(f masterFigures) bool {
		return abs(f.goroutines-base.goroutines) <= 10 && abs(f.fds-base.fds) <= 5 && f.rssKiB-base.rssKiB <= 8<<10
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		end = sampleMaster(t, lab, metrics, master)
		if flat(end) || time.Now().After(deadline) {
			break
		}
	}
	t.Logf("%d rounds in %s, %d worker processes, %d connections (%d failed, during kills)",
		rounds, time.Since(t0).Round(time.Second), len(seen), asked.Load(), failed.Load())
	t.Logf("master after warm-up: %s", base)
	t.Logf("master at the end:    %s (goroutines %+d, fds %+d, RSS %+d KiB)", end,
		end.goroutines-base.goroutines, end.fds-base.fds, end.rssKiB-base.rssKiB)
	if !flat(end) {
		t.Errorf("the master grew: %s after warm-up, %s at the end (tolerance: goroutines ±10, fds ±5, RSS +8 MiB)", base, end)
	}
	if failed.Load() > asked.Load()/4 {
		t.Errorf("%d of %d connections failed", failed.Load(), asked.Load())
	}

	// No zombie, no orphan: the master's children are exactly its
	// workers, and every other worker ever started is gone.
	current := workerPIDs(st)
	kids, zombies := children(master)
	slices.Sort(kids)
	slices.Sort(current)
	if len(zombies) > 0 || !slices.Equal(kids, current) {
		t.Errorf("master's children %v (zombies %v), want its workers %v", kids, zombies, current)
	}
	var gone []int
	for pid := range seen {
		if !slices.Contains(current, pid) {
			gone = append(gone, pid)
		}
	}
	waitGone(t, gone, 5*time.Second)

	dir := filepath.Dir(c.socket)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !slices.Contains([]string{"control.sock", "lock", "generation", "workers", "routes", "ops"}, e.Name()) {
			t.Errorf("run directory holds %s", e.Name())
		}
	}
	checkOpsSockets(t, filepath.Join(dir, "ops"), st)

	// A graceful stop leaves nothing at all.
	if err := c.stop(); err != nil {
		t.Fatalf("master exit: %v\n%s", err, c.log())
	}
	checkNoRules(t, lab)
	waitGone(t, current, 5*time.Second)
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		left, _ := os.ReadDir(dir)
		t.Errorf("run directory %s left behind (%v): %v", dir, err, left)
	}
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}
