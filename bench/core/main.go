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
//   - the master's idle RSS and CPU with 4 workers;
//   - the slot re-point on a retirement: the master's own time for the
//     rule write that moves the slot (its debug line "rules written",
//     elapsed=), on a cluster of its own with one spare and -log-level
//     debug, so that the other figures are taken without debug logging;
//   - kill -9 under load: short connections from all the lab's client
//     addresses (16 goroutines) while a worker is killed -kills times, a
//     slot after another, each time once the slot was served again:
//     attempts, and failed attempts split into refused at dial and failed
//     after connect (the killed worker's accepted connections).
//
// -backend takes a Config.Backend, or several separated by commas, which
// are then measured in turn within every run and printed side by side.
//
// Run as root from the repository root:
//
//	sudo go run ./bench/core -runs 7
//	sudo go run ./bench/core -runs 7 -backend nftables,iptables,bpf
//
// It builds examples/echo (without its BGP speaker: -tags ipcluster_nobgp)
// and runs it as the cluster under test.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/procfs"
)

const (
	workers = 4
	port    = 7000
	clients = 64 // the lab's client addresses
)

type options struct {
	runs     int
	idle     time.Duration
	backends []string // "" for the library's choice
	kills    int
}

func main() {
	var o options
	flag.IntVar(&o.runs, "runs", 7, "measured runs")
	flag.DurationVar(&o.idle, "idle", 10*time.Second, "how long to sample the idle master's CPU")
	backends := flag.String("backend", "", `Config.Backend: "nftables", "iptables" or "bpf", or several separated by commas, measured in turn and printed side by side (default: the library's choice)`)
	flag.IntVar(&o.kills, "kills", 5, "workers killed with kill -9 under load, per backend (0: skip that figure)")
	flag.Parse()
	log.SetFlags(0)
	for _, b := range strings.Split(*backends, ",") {
		b = strings.TrimSpace(b)
		if b != "" && b != "nftables" && b != "iptables" && b != "bpf" {
			log.Fatalf(`-backend %q: use "nftables", "iptables" or "bpf", several separated by commas, or "" for the library's choice`, b)
		}
		o.backends = append(o.backends, b)
	}
	if o.runs < 1 || o.kills < 0 || o.kills > 1000 {
		log.Fatalf("need -runs ≥ 1 and 0 ≤ -kills ≤ 1000")
	}
	if err := run(o); err != nil {
		log.Fatal(err)
	}
}

type sample struct {
	startup, recovery, retire  time.Duration
	recoverySpare, retireSpare time.Duration // with one spare
	repoint                    time.Duration // the master's rule write on a retirement
	rss                        uint64
	cpu                        float64 // fraction of one core
	backend                    string  // the master's, from its "master starting" line
}

func run(o options) error {
	tmp, err := os.MkdirTemp("", "ipcluster-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "echo")
	// Without its BGP speaker (GoBGP): the figures are the library's, what
	// a program that does not announce over BGP pays.
	build := exec.Command("go", "build", "-tags", "ipcluster_nobgp", "-o", bin, "./examples/echo")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build examples/echo (run from the repository root): %w", err)
	}
	lab, err := netlab.New(netlab.Options{Clients: clients})
	if err != nil {
		return fmt.Errorf("create lab: %w", err)
	}
	defer lab.Close()

	samples := make([][]sample, len(o.backends))
	for i := 0; i < o.runs; i++ {
		// The backends in turn within each run, so that drift hits them
		// alike.
		for bi, backend := range o.backends {
			s, err := once(lab, bin, tmp, onceOpts{backend: backend, idle: o.idle})
			if err != nil {
				return fmt.Errorf("run %d%s: %w", i+1, backendNote(backend), err)
			}
			sp, err := once(lab, bin, tmp, onceOpts{backend: backend, spares: 1})
			if err != nil {
				return fmt.Errorf("run %d%s with a spare: %w", i+1, backendNote(backend), err)
			}
			rp, err := once(lab, bin, tmp, onceOpts{backend: backend, spares: 1, repoint: true})
			if err != nil {
				return fmt.Errorf("run %d%s, re-point: %w", i+1, backendNote(backend), err)
			}
			s.recoverySpare, s.retireSpare, s.repoint = sp.recovery, sp.retire, rp.repoint
			fmt.Fprintf(os.Stderr, "run %d%s: startup %v, recovery %v (spare %v), retire %v (spare %v), re-point %v, rss %.1f MB, cpu %.3f%%\n",
				i+1, backendNote(backend), s.startup.Round(time.Microsecond), s.recovery.Round(time.Microsecond), s.recoverySpare.Round(time.Microsecond),
				s.retire.Round(time.Microsecond), s.retireSpare.Round(time.Microsecond), s.repoint, float64(s.rss)/1e6, s.cpu*100)
			samples[bi] = append(samples[bi], s)
		}
	}
	loads := make([]loadResult, len(o.backends))
	if o.kills > 0 {
		for bi, backend := range o.backends {
			if loads[bi], err = killUnderLoad(lab, bin, tmp, backend, o.kills); err != nil {
				return fmt.Errorf("kill -9 under load%s: %w", backendNote(backend), err)
			}
			l := loads[bi]
			fmt.Fprintf(os.Stderr, "kill -9 under load%s: %d kills, %d attempts, %d refused at dial, %d failed after connect\n",
				backendNote(backend), l.kills, l.attempts, l.refused, l.broken)
		}
	}
	printTable(os.Stdout, o, samples, loads)
	return nil
}

func backendNote(backend string) string {
	if backend == "" {
		return ""
	}
	return " (" + backend + ")"
}

// med is the median of f over samples (the upper one of an even count).
func med(samples []sample, f func(sample) float64) float64 {
	v := make([]float64, len(samples))
	for i, s := range samples {
		v[i] = f(s)
	}
	slices.Sort(v)
	return v[len(v)/2]
}

// figure is a row of the table: a value per backend, the original's, and
// with a single backend the ratio.
type figure struct {
	name     string
	values   []string
	original string
	ratio    string
}

func printTable(w io.Writer, o options, samples [][]sample, loads []loadResult) {
	ms := func(f func(sample) time.Duration) []float64 {
		var v []float64
		for _, ss := range samples {
			v = append(v, med(ss, func(s sample) float64 { return f(s).Seconds() * 1000 }))
		}
		return v
	}
	each := func(v []float64, format string) []string {
		var out []string
		for _, x := range v {
			out = append(out, fmt.Sprintf(format, x))
		}
		return out
	}
	ratio := func(v []float64, f func(float64) string) string {
		if len(v) != 1 || v[0] <= 0 {
			return ""
		}
		return f(v[0])
	}
	startup := ms(func(s sample) time.Duration { return s.startup })
	recovery := ms(func(s sample) time.Duration { return s.recovery })
	recoverySpare := ms(func(s sample) time.Duration { return s.recoverySpare })
	retire := ms(func(s sample) time.Duration { return s.retire })
	retireSpare := ms(func(s sample) time.Duration { return s.retireSpare })
	var repoint, rss, cpu []float64
	for _, ss := range samples {
		repoint = append(repoint, med(ss, func(s sample) float64 { return float64(s.repoint) / 1e3 }))
		rss = append(rss, med(ss, func(s sample) float64 { return float64(s.rss) / 1e6 }))
		cpu = append(cpu, med(ss, func(s sample) float64 { return s.cpu * 100 }))
	}
	figs := []figure{
		{fmt.Sprintf("master start → all %d slots answer", workers), each(startup, "%.0f ms"), "7900 ms", ratio(startup, func(x float64) string { return fmt.Sprintf("%.1fx faster", 7900/x) })},
		{"kill -9 worker → its slot answers again", each(recovery, "%.1f ms"), "126 ms", ratio(recovery, func(x float64) string { return fmt.Sprintf("%.1fx faster", 126/x) })},
		{"the same, with 1 spare", each(recoverySpare, "%.1f ms"), "126 ms", ratio(recoverySpare, func(x float64) string { return fmt.Sprintf("%.1fx faster", 126/x) })},
		{"SIGUSR1 to worker → its slot answered by another", each(retire, "%.1f ms"), "", ""},
		{"the same, with 1 spare", each(retireSpare, "%.1f ms"), "", ""},
		{"slot re-point on a retirement (the master's rule write)", each(repoint, "%.1f µs"), "", ""},
		{"master idle RSS", each(rss, "%.1f MB"), "51.5 MB", ratio(rss, func(x float64) string { return fmt.Sprintf("%.1fx smaller", 51.5/x) })},
		{"master idle CPU", each(cpu, "%.3f %%"), "0.35 %", ratio(cpu, func(x float64) string { return fmt.Sprintf("%.0fx less", 0.35/max(x, 0.001)) })},
	}
	if o.kills > 0 {
		var att, ref, brk []string
		for _, l := range loads {
			att = append(att, fmt.Sprint(l.attempts))
			ref = append(ref, fmt.Sprint(l.refused))
			brk = append(brk, fmt.Sprint(l.broken))
		}
		figs = append(figs,
			figure{fmt.Sprintf("kill -9 under load (%d kills, %d addresses): attempts", o.kills, clients), att, "", ""},
			figure{"failed attempts: refused at dial", ref, "", ""},
			figure{"failed attempts: failed after connect", brk, "", ""},
		)
	}
	fmt.Fprintf(w, "\nmedians of %d runs, %d workers, kernel %s\n\n", o.runs, workers, kernel())
	hdr := []string{"figure"}
	for bi, b := range o.backends {
		if b == "" {
			hdr = append(hdr, "ipcluster (Go), auto: "+samples[bi][0].backend)
		} else {
			hdr = append(hdr, "ipcluster (Go), "+b)
		}
	}
	hdr = append(hdr, "original (Node.js)")
	if len(o.backends) == 1 {
		hdr = append(hdr, "ratio")
	}
	fmt.Fprintf(w, "| %s |\n|%s\n", strings.Join(hdr, " | "), strings.Repeat("---|", len(hdr)))
	for _, f := range figs {
		cells := append([]string{f.name}, f.values...)
		cells = append(cells, f.original)
		if len(o.backends) == 1 {
			cells = append(cells, f.ratio)
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
	}
	for bi, l := range loads {
		if l.firstErr != nil {
			fmt.Fprintf(w, "\nkill -9 under load%s, first failure: %v\n", backendNote(o.backends[bi]), l.firstErr)
		}
	}
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

// onceOpts say what a cluster of once is started with and measures.
type onceOpts struct {
	backend string        // Config.Backend
	spares  int           // Config.Spares
	idle    time.Duration // how long to sample the idle CPU; 0 skips the idle figures
	// repoint: measure only the rule write of a retirement, with the
	// master logging at debug level.
	repoint bool
}

// startEcho starts the example cluster in the lab's server namespace,
// logging to logPath, and returns it with a stop function.
func startEcho(lab *netlab.Lab, bin, tmp, logPath string, o onceOpts) (*exec.Cmd, func(), error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close() // the master and its workers hold their own copies
	level := "info"
	if o.repoint {
		level = "debug"
	}
	cmd := exec.Command(bin, "-name", "bench", "-workers", strconv.Itoa(workers), "-port", strconv.Itoa(port),
		"-addr", lab.ServerAddr4.String(), "-rundir", filepath.Join(tmp, "run"), "-spares", strconv.Itoa(o.spares),
		"-backend", o.backend, "-log-level", level)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := lab.Server.Start(cmd); err != nil {
		return nil, nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	return cmd, stop, nil
}

// slotPIDs waits until every slot answers and returns each one's worker.
// Client i's low two bits are i: one client per slot.
func slotPIDs(lab *netlab.Lab, dst netip.AddrPort) ([]int, error) {
	pids := make([]int, workers)
	for slot := 0; slot < workers; slot++ {
		pid, err := poll(lab, lab.ClientAddrs4[slot], dst, 0, 15*time.Second)
		if err != nil {
			return nil, fmt.Errorf("slot %d never answered: %w", slot, err)
		}
		pids[slot] = pid
	}
	return pids, nil
}

// once starts a cluster, measures it and stops it. A failure comes with
// the end of the cluster's log.
func once(lab *netlab.Lab, bin, tmp string, o onceOpts) (sample, error) {
	s, err := measure(lab, bin, tmp, o)
	if err != nil {
		b, _ := os.ReadFile(filepath.Join(tmp, "master.log"))
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		err = fmt.Errorf("%w; the cluster's log ends:\n%s", err, strings.Join(lines[max(0, len(lines)-40):], "\n"))
	}
	return s, err
}

func measure(lab *netlab.Lab, bin, tmp string, o onceOpts) (sample, error) {
	var s sample
	logPath := filepath.Join(tmp, "master.log")
	t0 := time.Now()
	cmd, stop, err := startEcho(lab, bin, tmp, logPath, o)
	if err != nil {
		return s, err
	}
	defer stop()
	dst := netip.AddrPortFrom(lab.ServerAddr4, port)
	pids, err := slotPIDs(lab, dst)
	if err != nil {
		return s, err
	}
	s.startup = time.Since(t0)
	s.backend = chosenBackend(logPath)
	if o.repoint {
		time.Sleep(500 * time.Millisecond) // let the start settle, the spare get ready
		s.repoint, err = repoint(lab, logPath, dst, pids[1])
		return s, err
	}

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
	if o.idle == 0 {
		return s, nil
	}

	time.Sleep(2 * time.Second)
	c0, err := cpuTicks(cmd.Process.Pid)
	if err != nil {
		return s, err
	}
	w0 := time.Now()
	time.Sleep(o.idle)
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

// repoint sends SIGUSR1 to victim, the worker of slot 1, waits until
// another answers that slot, and returns the elapsed time of the master's
// first rule write after the signal, from its debug line
// "rules written" ... elapsed=...: the write that moved the slot.
func repoint(lab *netlab.Lab, logPath string, dst netip.AddrPort, victim int) (time.Duration, error) {
	fi, err := os.Stat(logPath)
	if err != nil {
		return 0, err
	}
	from := fi.Size()
	if err := syscall.Kill(victim, syscall.SIGUSR1); err != nil {
		return 0, fmt.Errorf("signal worker %d: %w", victim, err)
	}
	if _, err := poll(lab, lab.ClientAddrs4[1], dst, victim, 15*time.Second); err != nil {
		return 0, fmt.Errorf("slot 1 never moved: %w", err)
	}
	// The master logs the line just after the write: it may come a
	// moment after the new worker's first answer.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		b, err := os.ReadFile(logPath)
		if err != nil {
			return 0, err
		}
		for _, line := range strings.Split(string(b[from:]), "\n") {
			if !strings.Contains(line, `msg="rules written"`) {
				continue
			}
			_, rest, ok := strings.Cut(line, " elapsed=")
			if !ok {
				return 0, fmt.Errorf("no elapsed= in the master's line %q", line)
			}
			v, _, _ := strings.Cut(rest, " ")
			d, err := time.ParseDuration(v)
			if err != nil {
				return 0, fmt.Errorf("parse elapsed= of the master's line %q: %w", line, err)
			}
			return d, nil
		}
	}
	return 0, fmt.Errorf(`no "rules written" line in %s within 5s of the retirement (does the master log at debug level?)`, logPath)
}

// loadResult is the kill -9 under load figure of one backend.
type loadResult struct {
	kills, attempts int
	refused         int // the dial failed
	broken          int // connected, but the worker's line never came
	firstErr        error
}

const (
	loadConns = 16 // load goroutines
	// maxLoad bounds the load: it stops by itself even if the kills
	// stall.
	maxLoad = 2 * time.Minute
)

// killUnderLoad starts a cluster and runs short connections from every
// lab client address (loadConns goroutines, each connecting, reading the
// worker's line and closing, over and over) while it kills a worker with
// SIGKILL kills times, slot after slot, each time once the previous
// victim's slot is served again and 300ms have passed.
func killUnderLoad(lab *netlab.Lab, bin, tmp, backend string, kills int) (l loadResult, err error) {
	_, stop, err := startEcho(lab, bin, tmp, filepath.Join(tmp, "master-load.log"), onceOpts{backend: backend})
	if err != nil {
		return l, err
	}
	defer stop()
	dst := netip.AddrPortFrom(lab.ServerAddr4, port)
	if _, err := slotPIDs(lab, dst); err != nil {
		return l, err
	}
	time.Sleep(500 * time.Millisecond) // let the start settle

	var (
		mu       sync.Mutex
		quit     = make(chan struct{})
		wg       sync.WaitGroup
		deadline = time.Now().Add(maxLoad)
	)
	for g := range loadConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var att, ref, brk int
			var first error
			stopped := func() bool {
				select {
				case <-quit:
					return true
				default:
					return time.Now().After(deadline)
				}
			}
			for i := g; !stopped(); i += loadConns {
				att++
				if dialed, err := askOnce(lab, lab.ClientAddrs4[i%len(lab.ClientAddrs4)], dst); err != nil {
					if dialed {
						brk++
					} else {
						ref++
					}
					if first == nil {
						first = err
					}
				}
			}
			mu.Lock()
			l.attempts += att
			l.refused += ref
			l.broken += brk
			if l.firstErr == nil {
				l.firstErr = first
			}
			mu.Unlock()
		}()
	}
	defer func() {
		close(quit)
		wg.Wait()
	}()
	time.Sleep(300 * time.Millisecond) // load before the first kill
	for k := range kills {
		slot := k % workers
		src := lab.ClientAddrs4[slot]
		victim, err := poll(lab, src, dst, 0, 15*time.Second)
		if err != nil {
			return l, fmt.Errorf("slot %d not answering before kill %d: %w", slot, k+1, err)
		}
		if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
			return l, fmt.Errorf("kill worker %d: %w", victim, err)
		}
		if _, err := poll(lab, src, dst, victim, 15*time.Second); err != nil {
			return l, fmt.Errorf("slot %d never recovered from kill %d: %w", slot, k+1, err)
		}
		l.kills++
		time.Sleep(300 * time.Millisecond)
	}
	return l, nil
}

// askOnce connects from src and reads the worker's line; dialed says
// whether the connection was made, when err is not nil.
func askOnce(lab *netlab.Lab, src netip.Addr, dst netip.AddrPort) (dialed bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	conn, err := lab.Client.Dial(ctx, "tcp", src, dst)
	if err != nil {
		return false, fmt.Errorf("dial from %s: %w", src, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := bufio.NewReader(conn).ReadString('\n'); err != nil {
		return true, fmt.Errorf("read the worker's line from %s: %w", src, err)
	}
	return true, nil
}

// chosenBackend reads the backend the master chose from its "master
// starting" line: with -backend "" the library's choice.
func chosenBackend(logPath string) string {
	b, _ := os.ReadFile(logPath)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, `msg="master starting"`) {
			if _, rest, ok := strings.Cut(line, " backend="); ok {
				v, _, _ := strings.Cut(rest, " ")
				return v
			}
		}
	}
	return "unknown"
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
