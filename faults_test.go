//go:build linux

package ipcluster_test

// Environment faults, with real processes in a lab: a missing, failing or
// hung iptables-restore, a held xtables lock, an unwritable run directory
// and a full port table. In each, the master says what is wrong, keeps the
// rules it last wrote (never a half-written table), keeps the other slots
// serving, retries, and recovers once the fault clears. Nothing here runs
// in the machine's own network namespace; the xtables lock is a private
// file (XTABLES_LOCKFILE), never /run/xtables.lock.

import (
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

// lookBin finds a binary the test needs, from the Debian package pkg, or
// skips (see netlab.Tool).
func lookBin(t *testing.T, pkg, name string) string {
	t.Helper()
	return netlab.Tool(t, pkg, name)
}

// writeScripts writes executable shell scripts (name → body) in a new
// directory and returns it.
func writeScripts(t *testing.T, scripts map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range scripts {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// slotSource returns a client address that the rules send to slot.
func slotSource(t *testing.T, lab *netlab.Lab, workers, slot int) netip.Addr {
	t.Helper()
	for _, a := range lab.ClientAddrs4 {
		if expectSlot(a, workers, 32) == slot {
			return a
		}
	}
	t.Fatalf("no client address for slot %d", slot)
	return netip.Addr{}
}

// checkSlotsAnswer checks each slot but skip answers a new connection from
// the client namespace, from the worker of that slot.
func checkSlotsAnswer(t *testing.T, lab *netlab.Lab, port uint16, workers int, skip ...int) {
	t.Helper()
	for slot := range workers {
		if slices.Contains(skip, slot) {
			continue
		}
		rep, err := ask(lab.Client, slotSource(t, lab, workers, slot), netip.AddrPortFrom(lab.ServerAddr4, port))
		if err != nil {
			t.Errorf("slot %d does not answer: %v", slot, err)
		} else if rep.Slot != slot {
			t.Errorf("a client of slot %d reached slot %d", slot, rep.Slot)
		}
	}
}

// rulesFailed waits for the n-th EventRulesFailed and returns its error.
func rulesFailed(t *testing.T, events string, n int, timeout time.Duration) string {
	t.Helper()
	seen := 0
	e := waitEvent(t, events, timeout, func(e loggedEvent) bool {
		if e.Type == "EventRulesFailed" {
			seen++
		}
		return seen == n
	})
	return decodeEvent[struct{ Err string }](t, e).Err
}

// masterFailsAtStart checks that a master exited with an error that the
// log explains (every string of want), before it touched anything: no
// workers started, no rules, no cluster directory.
func masterFailsAtStart(t *testing.T, c *cluster, lab *netlab.Lab, want ...string) {
	t.Helper()
	if err := c.wait(20 * time.Second); err == nil {
		t.Fatalf("master started:\n%s", c.log())
	}
	log := c.log()
	for _, w := range want {
		if !strings.Contains(log, w) {
			t.Errorf("master log lacks %q:\n%s", w, log)
		}
	}
	if strings.Contains(log, "master starting") || strings.Contains(log, "spawn") {
		t.Errorf("the master got as far as starting:\n%s", log)
	}
	checkNoRules(t, lab)
	if _, err := os.Stat(filepath.Join(c.spec.Config.RunDir, "t")); err == nil {
		t.Error("cluster directory left behind")
	}
	t.Logf("master log:\n%s", strings.TrimSpace(log))
}

// Without iptables-restore the master refuses to start, naming the
// binary, before anything is touched.
func TestFaultRestoreMissingAtStart(t *testing.T) {
	bin := t.TempDir()
	for _, name := range []string{"iptables", "iptables-save"} {
		if err := os.Symlink(lookBin(t, "iptables", name), filepath.Join(bin, name)); err != nil {
			t.Fatal(err)
		}
	}
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: "iptables"},
		func(s *spec) { s.Env = []string{"PATH=" + bin} })
	masterFailsAtStart(t, c, lab, "missing iptables binary", "iptables-restore not found on PATH", "install the iptables package")
}

// iptables-restore fails (exit 1, a message) or hangs while a worker is
// being replaced: the master reports it with iptables' words, keeps the
// rules it last wrote, keeps every slot serving (the slot on the worker
// being retired), retries, and once the fault clears routes the slot to
// the replacement.
func TestFaultRestoreWhileRunning(t *testing.T) {
	real := lookBin(t, "iptables", "iptables-restore")
	for _, tc := range []struct {
		fault    string
		failures int    // EventRulesFailed to wait for while faulty
		want     string // in the event's error
	}{
		{"fail", 2, "injected fault"},
		{"slow", 1, "context deadline exceeded"},
	} {
		t.Run(tc.fault, func(t *testing.T) {
			ctl := t.TempDir()
			wrap := writeScripts(t, map[string]string{"iptables-restore": `
if [ -e ` + ctl + `/fail ]; then echo "iptables-restore: injected fault" >&2; exit 1; fi
if [ -e ` + ctl + `/slow ]; then exec sleep 30; fi
exec ` + real + ` "$@"`})
			lab := netlab.NewT(t, netlab.Options{Clients: 16})
			events := filepath.Join(t.TempDir(), "events.jsonl")
			const workers = 4
			c := startClusterSpec(t, lab, specConfig{Workers: workers, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: "iptables"},
				func(s *spec) {
					s.EventsLog = events
					s.Env = []string{"PATH=" + wrap + ":" + os.Getenv("PATH")}
				})
			st := c.waitReady()
			c.checkKernelRules(t)
			before := clusterRules(nat(t, lab, false), "IPC-t")

			if err := os.WriteFile(filepath.Join(ctl, tc.fault), nil, 0o600); err != nil {
				t.Fatal(err)
			}
			// A retirement needs a rule write (a crash does not: the
			// replacement inherits the dead worker's sockets).
			victim := activePID(st, 1)
			if err := syscall.Kill(victim, syscall.SIGUSR1); err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			msg := rulesFailed(t, events, tc.failures, 30*time.Second)
			t.Logf("%d failed writes in %s; last: %s", tc.failures, time.Since(t0).Round(time.Millisecond), msg)
			if !strings.Contains(msg, tc.want) || !strings.Contains(msg, "iptables-restore --noflush --wait") || !strings.Contains(msg, "exit status") {
				t.Errorf("EventRulesFailed %q: want the command, its exit status and %q", msg, tc.want)
			}
			// The kernel holds exactly the rules written before the fault,
			// and the other slots serve on.
			if got := clusterRules(nat(t, lab, false), "IPC-t"); !slices.Equal(got, before) {
				t.Errorf("rules changed during the fault:\n%s\nbefore:\n%s", strings.Join(got, "\n"), strings.Join(before, "\n"))
			}
			checkSlotsAnswer(t, lab, 8080, workers) // slot 1 by the worker being retired

			if err := os.Remove(filepath.Join(ctl, tc.fault)); err != nil {
				t.Fatal(err)
			}
			t1 := time.Now()
			// Recovery: the replacement is routed, and the kernel holds
			// what the master believes.
			src := slotSource(t, lab, workers, 1)
			var rep reply
			deadline := time.Now().Add(20 * time.Second)
			for {
				var err error
				rep, err = ask(lab.Client, src, netip.AddrPortFrom(lab.ServerAddr4, 8080))
				if err == nil && rep.Slot == 1 && rep.PID != victim {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("slot 1 not routed to a replacement 20s after the fault cleared: %+v %v", rep, err)
				}
				time.Sleep(100 * time.Millisecond)
			}
			t.Logf("recovered %s after the fault cleared", time.Since(t1).Round(time.Millisecond))
			c.waitStatus("slot 1 replaced", func(st *ipStatus) bool { return activePID(st, 1) == rep.PID })
			c.checkKernelRules(t)
			checkSlotsAnswer(t, lab, 8080, workers)
			log := c.log()
			for _, w := range []string{"writing rules failed; previous rules stay in force", "rules written again after failed writes"} {
				if !strings.Contains(log, w) {
					t.Errorf("master log lacks %q", w)
				}
			}
		})
	}
}

// Another program holds the xtables lock (iptables-legacy; a private lock
// file through XTABLES_LOCKFILE, so the host's iptables never wait) while
// a slot changes: iptables-restore --wait waits for it, and the change is
// written once the lock is free, without a failure.
func TestFaultXtablesLockHeld(t *testing.T) {
	flock := lookBin(t, "util-linux", "flock")
	wrap := t.TempDir()
	for name, legacy := range map[string]string{"iptables": "iptables-legacy", "iptables-save": "iptables-legacy-save", "iptables-restore": "iptables-legacy-restore"} {
		if err := os.Symlink(lookBin(t, "iptables", legacy), filepath.Join(wrap, name)); err != nil {
			t.Fatal(err)
		}
	}
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	legacyRules := func() []string {
		return clusterRules(runIn(t, lab.Server, "iptables-legacy-save", "-t", "nat"), "IPC-t")
	}
	events := filepath.Join(t.TempDir(), "events.jsonl")
	const workers = 4
	c := startClusterSpec(t, lab, specConfig{Workers: workers, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: "iptables"},
		func(s *spec) {
			s.EventsLog = events
			s.Env = []string{"PATH=" + wrap + ":" + os.Getenv("PATH"), "XTABLES_LOCKFILE=" + lock}
		})
	st := c.waitReady()
	before := legacyRules()
	if len(before) == 0 || strings.Contains(nat(t, lab, false), "IPC-t") {
		t.Fatalf("the master did not write legacy rules: legacy %q", before)
	}

	const hold = 3 * time.Second
	holder := exec.Command(flock, lock, "sleep", "3")
	if err := lab.Server.Start(holder); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = holder.Process.Kill(); _ = holder.Wait() })
	if !waitLocked(lock, 5*time.Second) {
		t.Fatal("flock did not take the lock")
	}
	t0 := time.Now()
	victim := activePID(st, 1)
	if err := syscall.Kill(victim, syscall.SIGUSR1); err != nil { // a retirement: a rule write
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if got := legacyRules(); !slices.Equal(got, before) {
		t.Errorf("rules changed while the lock was held:\n%s", strings.Join(got, "\n"))
	}
	checkSlotsAnswer(t, lab, 8080, workers)
	st = c.waitStatus("slot 1 routed to a replacement", func(st *ipStatus) bool {
		p := activePID(st, 1)
		return p != 0 && p != victim && st.Ready && !slices.Equal(legacyRules(), before)
	})
	elapsed := time.Since(t0)
	t.Logf("slot 1 rerouted %s after the kill, with the lock held for %s", elapsed.Round(time.Millisecond), hold)
	if err := holder.Wait(); err != nil {
		t.Errorf("flock: %v", err)
	}
	if elapsed < hold-time.Second {
		t.Errorf("rules written %s after the kill, while the lock was held for %s", elapsed, hold)
	}
	if hasEvent(t, events, "EventRulesFailed") {
		t.Errorf("a held lock failed a write instead of waiting:\n%s", c.log())
	}
	want := []string{
		":IPC-t - [0:0]",
		`-A PREROUTING -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW -m comment --comment "ipcluster:t" -j IPC-t`,
		`-A OUTPUT -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW -m comment --comment "ipcluster:t" -j IPC-t`,
	}
	want = append(want, strings.Split(st.Rules["ipv4"], "\n")...)
	got := legacyRules()
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("kernel rules:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	checkSlotsAnswer(t, lab, 8080, workers)
	if err := c.stop(); err != nil {
		t.Errorf("master exit: %v", err)
	}
	if got := legacyRules(); len(got) != 0 {
		t.Errorf("legacy rules left after the stop:\n%s", strings.Join(got, "\n"))
	}
}

// waitLocked waits until someone holds an exclusive flock on path.
func waitLocked(path string, timeout time.Duration) bool {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		f.Close() // releases the lock if we got it
		if errors.Is(err, unix.EWOULDBLOCK) {
			return true
		}
	}
	return false
}

// A run directory the master cannot write (a file, a read-only mount):
// a clear error naming the path and the fix, before any worker or rule.
func TestFaultRunDirUnwritable(t *testing.T) {
	t.Run("file", func(t *testing.T) {
		lab := netlab.NewT(t, netlab.Options{Clients: 4})
		file := filepath.Join(t.TempDir(), "run")
		if err := os.WriteFile(file, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: "iptables", RunDir: file})
		masterFailsAtStart(t, c, lab, "create run directory "+file, "not a directory", "Config.RunDir must be a directory the master can write")
	})
	t.Run("readonly", func(t *testing.T) {
		unshare := lookBin(t, "util-linux", "unshare")
		lab := netlab.NewT(t, netlab.Options{Clients: 4})
		dir := t.TempDir()
		// The master runs in a mount namespace of its own where dir is
		// read-only: the host's mounts are never changed.
		exe := filepath.Join(writeScripts(t, map[string]string{"master": `exec ` + unshare + ` --mount --propagation private sh -c 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"' sh ` +
			dir + ` ` + os.Args[0] + ` "$@"`}), "master")
		c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: "iptables", RunDir: dir},
			func(s *spec) { s.Exe = exe })
		masterFailsAtStart(t, c, lab, "create cluster directory "+filepath.Join(dir, "t"), "read-only file system", "Config.RunDir must be a directory the master can write")
	})
}

// The port table is full (the server namespace's ephemeral range narrowed
// to two ports, both taken): a replacement worker cannot listen, says so,
// and is respawned with a backoff, while the rules stay and the old worker
// serves its slot. Once the range is widened, the replacement takes over.
func TestFaultPortTableFull(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	events := filepath.Join(t.TempDir(), "events.jsonl")
	const workers = 2
	c := startClusterSpec(t, lab, specConfig{Workers: workers, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, Backend: "iptables"},
		func(s *spec) { s.EventsLog = events })
	st := c.waitReady()
	before := clusterRules(nat(t, lab, false), "IPC-t")
	hostRange, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Fatal(err)
	}
	const sysctl = "net/ipv4/ip_local_port_range"
	labRange := strings.Join(strings.Fields(runIn(t, lab.Server, "cat", "/proc/sys/"+sysctl)), " ")
	if err := lab.Server.Sysctl(sysctl, "61000 61001"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lab.Server.Sysctl(sysctl, labRange) })
	var holders []interface{ Close() error }
	for _, addr := range []string{"0.0.0.0:61000", "0.0.0.0:61001"} {
		ln, err := lab.Server.Listen("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		holders = append(holders, ln)
	}
	if got := strings.Fields(runIn(t, lab.Server, "cat", "/proc/sys/"+sysctl)); strings.Join(got, " ") != "61000 61001" {
		t.Fatalf("lab range %v", got)
	}
	if now, _ := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); string(now) != string(hostRange) {
		t.Fatalf("the host's port range changed: %q, was %q", now, hostRange)
	}

	old := activePID(st, 1)
	if err := syscall.Kill(old, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	// Give the replacements time to fail a few times (100ms, 200ms, 400ms,
	// ... apart), well within the old worker's wait for one (7s).
	time.Sleep(2500 * time.Millisecond)
	log := c.log()
	fails := strings.Count(log, "respawning worker")
	t.Logf("%d failed starts of a replacement while the port table was full", fails)
	for _, w := range []string{"open the socket for public port", "address already in use", "respawning worker"} {
		if !strings.Contains(log, w) {
			t.Errorf("master log lacks %q", w)
		}
	}
	if fails < 2 || fails > 6 {
		t.Errorf("%d respawns in 2.5s: want a few, backing off", fails)
	}
	if got := clusterRules(nat(t, lab, false), "IPC-t"); !slices.Equal(got, before) {
		t.Errorf("rules changed while no replacement could start:\n%s", strings.Join(got, "\n"))
	}
	checkSlotsAnswer(t, lab, 8080, workers)
	if hasEvent(t, events, "EventRulesFailed") {
		t.Error("EventRulesFailed while the port table was full")
	}

	for _, h := range holders {
		h.Close()
	}
	if err := lab.Server.Sysctl(sysctl, labRange); err != nil {
		t.Fatal(err)
	}
	st = c.waitStatus("slot 1 replaced", func(st *ipStatus) bool {
		p := activePID(st, 1)
		return p != 0 && p != old
	})
	waitGone(t, []int{old}, 10*time.Second)
	c.checkKernelRules(t)
	checkSlotsAnswer(t, lab, 8080, workers)
	rep, err := ask(lab.Client, slotSource(t, lab, workers, 1), netip.AddrPortFrom(lab.ServerAddr4, 8080))
	if err != nil || rep.PID != activePID(st, 1) {
		t.Errorf("slot 1 reached pid %d (%v), want the replacement %d", rep.PID, err, activePID(st, 1))
	}
}
