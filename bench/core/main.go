//go:build linux

// Command core measures the cluster's core figures end to end, inside a
// throwaway pair of network namespaces, and prints medians beside the
// figures measured for the Node.js original:
//
//   - time from starting the master until all 4 slots answer;
//   - after kill -9 of a worker, time until its slot answers again;
//   - after SIGUSR1 to a worker (it asks to be retired), time until its
//     slot is answered by another;
//   - the same two with one spare (Config.Spares);
//   - the master's idle RSS and CPU with 4 workers.
//
// Run as root from the repository root:
//
//	sudo go run ./bench/core -runs 7
//
// It builds examples/echo and runs it as the cluster under test.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/procfs"
)

const (
	workers = 4
	port    = 7000
)

func main() {
	runs := flag.Int("runs", 7, "measured runs")
	idle := flag.Duration("idle", 10*time.Second, "how long to sample the idle master's CPU")
	flag.Parse()
	log.SetFlags(0)
	if err := run(*runs, *idle); err != nil {
		log.Fatal(err)
	}
}

type sample struct {
	startup, recovery, retire  time.Duration
	recoverySpare, retireSpare time.Duration // with one spare
	rss                        uint64
	cpu                        float64 // fraction of one core
}

func run(runs int, idle time.Duration) error {
	tmp, err := os.MkdirTemp("", "ipcluster-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "echo")
	build := exec.Command("go", "build", "-o", bin, "./examples/echo")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build examples/echo (run from the repository root): %w", err)
	}
	lab, err := netlab.New(netlab.Options{Clients: 16})
	if err != nil {
		return fmt.Errorf("create lab: %w", err)
	}
	defer lab.Close()

	var samples []sample
	for i := 0; i < runs; i++ {
		s, err := once(lab, bin, tmp, idle, 0)
		if err != nil {
			return fmt.Errorf("run %d: %w", i+1, err)
		}
		sp, err := once(lab, bin, tmp, 0, 1)
		if err != nil {
			return fmt.Errorf("run %d with a spare: %w", i+1, err)
		}
		s.recoverySpare, s.retireSpare = sp.recovery, sp.retire
		fmt.Fprintf(os.Stderr, "run %d: startup %v, recovery %v (spare %v), retire %v (spare %v), rss %.1f MB, cpu %.3f%%\n",
			i+1, s.startup.Round(time.Microsecond), s.recovery.Round(time.Microsecond), s.recoverySpare.Round(time.Microsecond),
			s.retire.Round(time.Microsecond), s.retireSpare.Round(time.Microsecond), float64(s.rss)/1e6, s.cpu*100)
		samples = append(samples, s)
	}
	med := func(f func(sample) float64) float64 {
		v := make([]float64, len(samples))
		for i, s := range samples {
			v[i] = f(s)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	startup := med(func(s sample) float64 { return s.startup.Seconds() * 1000 })
	recovery := med(func(s sample) float64 { return s.recovery.Seconds() * 1000 })
	recoverySpare := med(func(s sample) float64 { return s.recoverySpare.Seconds() * 1000 })
	retire := med(func(s sample) float64 { return s.retire.Seconds() * 1000 })
	retireSpare := med(func(s sample) float64 { return s.retireSpare.Seconds() * 1000 })
	rss := med(func(s sample) float64 { return float64(s.rss) / 1e6 })
	cpu := med(func(s sample) float64 { return s.cpu * 100 })
	fmt.Printf("\nmedians of %d runs, %d workers, kernel %s\n\n", runs, workers, kernel())
	fmt.Printf("| figure | ipcluster (Go) | original (Node.js) | ratio |\n|---|---|---|---|\n")
	fmt.Printf("| master start → all %d slots answer | %.0f ms | 7900 ms | %.1fx faster |\n", workers, startup, 7900/startup)
	fmt.Printf("| kill -9 worker → its slot answers again | %.1f ms | 126 ms | %.1fx faster |\n", recovery, 126/recovery)
	fmt.Printf("| the same, with 1 spare | %.1f ms | 126 ms | %.1fx faster |\n", recoverySpare, 126/recoverySpare)
	fmt.Printf("| SIGUSR1 to worker → its slot answered by another | %.1f ms | | |\n", retire)
	fmt.Printf("| the same, with 1 spare | %.1f ms | | |\n", retireSpare)
	fmt.Printf("| master idle RSS | %.1f MB | 51.5 MB | %.1fx smaller |\n", rss, 51.5/rss)
	fmt.Printf("| master idle CPU | %.3f %% | 0.35 %% | %.0fx less |\n", cpu, 0.35/max(cpu, 0.001))
	return nil
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

// once starts a cluster with spares, measures it and stops it; idle 0
// skips the idle figures.
func once(lab *netlab.Lab, bin, tmp string, idle time.Duration, spares int) (sample, error) {
	var s sample
	logf, err := os.Create(filepath.Join(tmp, "master.log"))
	if err != nil {
		return s, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, "-name", "bench", "-workers", strconv.Itoa(workers), "-port", strconv.Itoa(port),
		"-addr", lab.ServerAddr4.String(), "-rundir", filepath.Join(tmp, "run"), "-spares", strconv.Itoa(spares))
	cmd.Stdout, cmd.Stderr = logf, logf
	t0 := time.Now()
	if err := lab.Server.Start(cmd); err != nil {
		return s, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}()
	dst := netip.AddrPortFrom(lab.ServerAddr4, port)
	// Client i's low two bits are i: one client per slot.
	pids := make([]int, workers)
	for slot := 0; slot < workers; slot++ {
		pid, err := poll(lab, lab.ClientAddrs4[slot], dst, 0, 15*time.Second)
		if err != nil {
			return s, fmt.Errorf("slot %d never answered: %w", slot, err)
		}
		pids[slot] = pid
	}
	s.startup = time.Since(t0)

	time.Sleep(500 * time.Millisecond) // let the start settle
	victim := pids[2]
	t1 := time.Now()
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		return s, fmt.Errorf("kill worker %d: %w", victim, err)
	}
	if _, err := poll(lab, lab.ClientAddrs4[2], dst, victim, 15*time.Second); err != nil {
		return s, fmt.Errorf("slot 2 never recovered: %w", err)
	}
	s.recovery = time.Since(t1)

	time.Sleep(500 * time.Millisecond) // a new spare, if any, is ready
	victim = pids[1]
	t2 := time.Now()
	if err := syscall.Kill(victim, syscall.SIGUSR1); err != nil {
		return s, fmt.Errorf("signal worker %d: %w", victim, err)
	}
	if _, err := poll(lab, lab.ClientAddrs4[1], dst, victim, 15*time.Second); err != nil {
		return s, fmt.Errorf("slot 1 never moved: %w", err)
	}
	s.retire = time.Since(t2)
	if idle == 0 {
		return s, nil
	}

	time.Sleep(2 * time.Second)
	c0, err := cpuTicks(cmd.Process.Pid)
	if err != nil {
		return s, err
	}
	w0 := time.Now()
	time.Sleep(idle)
	c1, err := cpuTicks(cmd.Process.Pid)
	if err != nil {
		return s, err
	}
	s.cpu = float64(c1-c0) / float64(time.Since(w0).Nanoseconds())
	st, err := procfs.ReadStatus(cmd.Process.Pid)
	if err != nil {
		return s, err
	}
	s.rss = st.RSSBytes
	return s, nil
}

// poll connects from src until a worker other than notPID answers, and
// returns that worker's pid.
func poll(lab *netlab.Lab, src netip.Addr, dst netip.AddrPort, notPID int, timeout time.Duration) (int, error) {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		pid, err := askPID(lab, src, dst)
		if err == nil && pid != notPID {
			return pid, nil
		}
		last = err
		time.Sleep(500 * time.Microsecond)
	}
	return 0, fmt.Errorf("timeout after %s: %v", timeout, last)
}

func askPID(lab *netlab.Lab, src netip.Addr, dst netip.AddrPort) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	conn, err := lab.Client.Dial(ctx, "tcp", src, dst)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return 0, err
	}
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, "pid="); ok {
			return strconv.Atoi(v)
		}
	}
	return 0, errors.New("no pid in reply " + strconv.Quote(line))
}

// cpuTicks returns the CPU time of all of a process's threads, in
// nanoseconds, from schedstat: utime/stime count 10 ms ticks, too coarse
// for an idle process.
func cpuTicks(pid int) (uint64, error) {
	tasks, err := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/schedstat")
	if err != nil || len(tasks) == 0 {
		return 0, fmt.Errorf("read threads of %d: %v", pid, err)
	}
	var total uint64
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // the thread exited
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse %s: %w", t, err)
		}
		total += v
	}
	return total, nil
}
