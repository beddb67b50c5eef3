//go:build linux

package ipcluster_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// loadResult sums up a runLoad.
type loadResult struct {
	Attempts, Failures int
	Refused            int         // failures that were a refused dial (a RST to the SYN)
	Errors             []string    // the first 10 failures
	BySlot             map[int]int // successful attempts by the slot that answered
	ByPID              map[int]int // and by the worker
}

func (r loadResult) String() string {
	return fmt.Sprintf("%d attempts, %d failures %q, by slot %v, by pid %v", r.Attempts, r.Failures, r.Errors, r.BySlot, r.ByPID)
}

// runLoad makes connection attempts from ns to dst with conc goroutines,
// taking the source addresses round-robin from srcs: each dials (5s
// timeout), reads the worker's first line and closes. Any dial or read error
// is a failure. It stops when ctx is done or after maxAttempts attempts. An
// attempt that ctx interrupts is not counted at all.
func runLoad(ctx context.Context, ns *netlab.NS, srcs []netip.Addr, dst netip.AddrPort, conc int, maxAttempts int) loadResult {
	var next atomic.Int64
	var mu sync.Mutex
	res := loadResult{BySlot: map[int]int{}, ByPID: map[int]int{}}
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for ctx.Err() == nil {
				n := int(next.Add(1))
				if n > maxAttempts {
					return
				}
				src := srcs[(n-1)%len(srcs)]
				rep, err := attempt(ctx, ns, src, dst)
				if ctx.Err() != nil && err != nil {
					return // interrupted, not failed
				}
				mu.Lock()
				res.Attempts++
				if err != nil {
					res.Failures++
					if errors.Is(err, syscall.ECONNREFUSED) {
						res.Refused++
					}
					if len(res.Errors) < 10 {
						res.Errors = append(res.Errors, fmt.Sprintf("from %s: %v", src, err))
					}
				} else {
					res.BySlot[rep.Slot]++
					res.ByPID[rep.PID]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return res
}

// attempt is one connection of runLoad.
func attempt(ctx context.Context, ns *netlab.NS, src netip.Addr, dst netip.AddrPort) (reply, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := ns.Dial(dctx, "tcp", src, dst)
	if err != nil {
		return reply{}, err
	}
	// Stopping the load interrupts the read too.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	c, err := readFirst(conn) // closes conn on error
	if err != nil {
		return reply{}, err
	}
	c.Close()
	return c.first, nil
}

// startLoad runs runLoad in the background until stop, which returns its
// result (the same result on every call). It is also stopped when the test
// ends.
func startLoad(t testing.TB, ns *netlab.NS, srcs []netip.Addr, dst netip.AddrPort, conc, maxAttempts int) (stop func() loadResult) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan loadResult, 1)
	go func() { done <- runLoad(ctx, ns, srcs, dst, conc, maxAttempts) }()
	stop = sync.OnceValue(func() loadResult {
		cancel()
		return <-done
	})
	t.Cleanup(func() { stop() })
	return stop
}

// holdConns opens one connection from each of srcs, closed when the test
// ends.
func holdConns(t testing.TB, c *cluster, srcs []netip.Addr, dst netip.AddrPort) []*echoConn {
	t.Helper()
	conns := make([]*echoConn, 0, len(srcs))
	for _, src := range srcs {
		conn, err := c.dial(src, dst)
		if err != nil {
			t.Fatalf("hold a connection from %s to %s: %v", src, dst, err)
		}
		t.Cleanup(func() { conn.Close() })
		conns = append(conns, conn)
	}
	return conns
}

// probeAll probes each connection and returns the first error, or a reply
// from a worker other than the one that accepted the connection.
func probeAll(conns []*echoConn) error {
	for _, c := range conns {
		rep, err := c.probe()
		if err == nil && rep.PID != c.first.PID {
			err = fmt.Errorf("answered by pid %d", rep.PID)
		}
		if err != nil {
			return fmt.Errorf("connection from %s to worker pid %d slot %d: %w", c.LocalAddr(), c.first.PID, c.first.Slot, err)
		}
	}
	return nil
}

// makeOnce creates the markers of the once scenarios for slots in dir.
func makeOnce(t testing.TB, dir string, slots ...int) {
	t.Helper()
	for _, slot := range slots {
		if err := os.WriteFile(filepath.Join(dir, "slot-"+itoa(slot)), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// workerStatus finds a worker in a status.
func workerStatus(st *proto.Status, pid int) (proto.WorkerStatus, bool) {
	for _, w := range st.Workers {
		if w.PID == pid {
			return w, true
		}
	}
	return proto.WorkerStatus{}, false
}

// waitRSS polls the status until the worker's measured RSS satisfies ok.
func (c *cluster) waitRSS(t *testing.T, pid int, timeout time.Duration, what string, ok func(rss uint64) bool) uint64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last uint64
	for {
		if st, err := c.status(); err == nil {
			if w, found := workerStatus(st, pid); found && w.RSSBytes > 0 {
				last = w.RSSBytes
				if ok(last) {
					return last
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker %d: %s: not within %s (last RSS %d MiB)", pid, what, timeout, last>>20)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The test infrastructure itself: load from many clients, commands on a
// held connection, and the events log.
func TestLoadAndCommands(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	events := filepath.Join(t.TempDir(), "events.jsonl")
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		MonitorInterval: 100 * time.Millisecond}, func(s *spec) { s.EventsLog = events })
	c.waitReady()
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)

	stop := startLoad(t, lab.Client, lab.ClientAddrs4, dst, 4, 2000)
	time.Sleep(time.Second)
	res := stop()
	t.Logf("load: %v", res)
	if res.Failures != 0 || res.Attempts == 0 || res.BySlot[0] == 0 || res.BySlot[1] == 0 {
		t.Errorf("load: %v", res)
	}
	if res.Attempts > 2000 {
		t.Errorf("%d attempts, capped at 2000", res.Attempts)
	}

	held := holdConns(t, c, lab.ClientAddrs4[:1], dst)[0]
	pid := held.first.PID
	if held.first.Slot != 0 {
		t.Fatalf("%s reached slot %d", lab.ClientAddrs4[0], held.first.Slot)
	}
	before := c.waitRSS(t, pid, 5*time.Second, "first RSS sample", func(uint64) bool { return true })
	if rep, err := held.command("alloc 32"); err != nil || rep.PID != pid {
		t.Fatalf("alloc: %+v %v", rep, err)
	}
	after := c.waitRSS(t, pid, 5*time.Second, "RSS 30 MiB above "+itoa(int(before>>20))+" MiB",
		func(rss uint64) bool { return rss >= before+30<<20 })
	t.Logf("worker %d: RSS %d MiB, %d MiB after alloc 32", pid, before>>20, after>>20)

	if rep, err := held.command("retire"); err != nil || rep.PID != pid {
		t.Fatalf("retire: %+v %v", rep, err)
	}
	e := waitEvent(t, events, 5*time.Second, func(e loggedEvent) bool {
		return e.Type == "EventRetired" && decodeEvent[ipcluster.EventRetired](t, e).PID == pid
	})
	ev := decodeEvent[ipcluster.EventRetired](t, e)
	if ev.Slot != 0 || ev.Replacement == 0 || ev.Replacement == pid || e.At.IsZero() {
		t.Errorf("retired: %+v at %s", ev, e.At)
	}
	if err := probeAll([]*echoConn{held}); err != nil {
		t.Errorf("held connection after its worker was retired: %v", err)
	}
	for _, typ := range []string{"EventReady", "EventWorkerReady", "EventStats"} {
		if !hasEvent(t, events, typ) {
			t.Errorf("no %s in the events log: %s", typ, summarizeEvents(readEvents(t, events)))
		}
	}
}

// The leakonce scenario: slot 0's first worker grows until retired; its
// replacement finds no marker and does not.
func TestLeakOnceScenario(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	dir := t.TempDir()
	makeOnce(t, dir, 0)
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		MonitorInterval: 100 * time.Millisecond}, func(s *spec) {
		s.SlotScenarios = map[int]string{0: "leakonce"}
		s.OnceDir = dir
	})
	st := c.waitReady()
	leaker := activePID(st, 0)
	const limit = 40 << 20
	rss := c.waitRSS(t, leaker, 5*time.Second, "RSS above 40 MiB", func(rss uint64) bool { return rss > limit })
	t.Logf("leaking worker %d: RSS %d MiB", leaker, rss>>20)
	if _, err := os.Stat(filepath.Join(dir, "slot-0")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("slot 0's marker still there: %v", err)
	}

	held := holdConns(t, c, lab.ClientAddrs4[:1], netip.AddrPortFrom(lab.ServerAddr4, 8080))[0]
	if held.first.PID != leaker {
		t.Fatalf("held connection reached pid %d, not the leaking worker %d", held.first.PID, leaker)
	}
	if _, err := held.command("retire"); err != nil {
		t.Fatal(err)
	}
	st = c.waitStatus("slot 0 replaced", func(st *ipStatus) bool {
		p := activePID(st, 0)
		return p != 0 && p != leaker
	})
	repl := activePID(st, 0)
	c.waitRSS(t, repl, 5*time.Second, "first RSS sample", func(uint64) bool { return true })
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		st, err := c.status()
		if err != nil {
			t.Fatal(err)
		}
		if w, _ := workerStatus(st, repl); w.RSSBytes >= limit {
			t.Fatalf("replacement %d of the leaking worker: RSS %d MiB", repl, w.RSSBytes>>20)
		}
	}
	if err := probeAll([]*echoConn{held}); err != nil {
		t.Errorf("held connection to the retired leaker: %v", err)
	}
}
