//go:build linux

package ipcluster_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/heapsnap"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// heapLeak is what leakHeapForSnapshots keeps.
var heapLeak struct {
	sync.Mutex
	blocks [][]byte
}

// heapLeakOnceWorker: if once, grows its Go heap by 2 MiB every 20ms in
// leakHeapForSnapshots, until retired or told to finish (at most 1 GiB);
// serves as echo.
func heapLeakOnceWorker(w *ipcluster.Worker) error {
	if once(w, helperSpec.OnceDir) {
		go func() {
			tick := time.NewTicker(20 * time.Millisecond)
			defer tick.Stop()
			for n := 0; n < 512; n++ {
				select {
				case <-w.Retired():
					return
				case <-w.Context().Done():
					return
				case <-tick.C:
				}
				leakHeapForSnapshots(2 << 20)
			}
		}()
	}
	return echoWorker(w)
}

// leakHeapForSnapshots allocates size bytes of Go heap, touches every page
// (so the RSS grows: the master's MemoryLimit reads it) and keeps them: the
// allocation site a heap diff must find.
//
//go:noinline
func leakHeapForSnapshots(size int) {
	b := make([]byte, size)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	heapLeak.Lock()
	heapLeak.blocks = append(heapLeak.blocks, b)
	heapLeak.Unlock()
}

// A worker that leaks is retired for memory and leaves a heap snapshot
// pair and its diff in HeapProfileDir, named by EventHeapSnapshot and the
// status; the diff's top entry by inuse_space is the leaking function.
// With its warm-up passed, the start was taken then; with a warm-up of an
// hour, at the retirement: either way a pair (the cold one's diff shows
// only what grew while it drained: the leak stops at the retirement). The
// drained worker exits once its end is written.
func TestHeapSnapshotsFindLeak(t *testing.T) {
	for _, tc := range []struct {
		name   string
		warmup time.Duration
		budget bool // a held connection keeps it from draining: the memory budget ends it
	}{{"warm", 300 * time.Millisecond, false}, {"cold", time.Hour, false}, {"budget", 300 * time.Millisecond, true}} {
		t.Run(tc.name, func(t *testing.T) {
			lab := netlab.NewT(t, netlab.Options{Clients: 1})
			once, heaps := t.TempDir(), t.TempDir()
			makeOnce(t, once, 0)
			events := filepath.Join(t.TempDir(), "events")
			cfg := specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
				MonitorInterval: 100 * time.Millisecond, MemoryLimit: 160 << 20, StartupGrace: -1,
				HeapProfileDir: heaps, HeapProfileWarmup: tc.warmup}
			if tc.budget {
				cfg.MemoryBudget = 180 << 20 // the retired leaker alone is over its low watermark
			}
			c := startClusterSpec(t, lab, cfg, func(s *spec) {
				s.Scenario, s.OnceDir, s.EventsLog = "heapleakonce", once, events
			})
			st := c.waitReady()
			leaker := activePID(st, 0)
			if tc.budget {
				held, err := c.dial(lab.ClientAddrs4[0], netip.AddrPortFrom(lab.ServerAddr4, 8080))
				if err != nil {
					t.Fatal(err)
				}
				defer held.Close()
				if held.first.PID != leaker {
					t.Fatalf("held connection on worker %d, want slot 0's %d", held.first.PID, leaker)
				}
			}
			e := waitEvent(t, events, 60*time.Second, func(e loggedEvent) bool { return e.Type == "EventHeapSnapshot" })
			ev := decodeEvent[struct {
				PID              int
				Cause            ipcluster.RetireCause
				Start, End, Diff string
				Err              any
			}](t, e)
			if ev.PID != leaker || ev.Cause != ipcluster.CauseMemory || ev.Err != nil || ev.Start == "" || ev.End == "" || ev.Diff == "" {
				t.Fatalf("EventHeapSnapshot %+v, want the leaking worker %d's pair and diff, retired for memory", ev, leaker)
			}
			for _, f := range []string{ev.Start, ev.End, ev.Diff} {
				if filepath.Dir(f) != heaps {
					t.Errorf("snapshot file %s is not in HeapProfileDir %s", f, heaps)
				}
			}
			if want := "t-slot0-pid" + itoa(leaker) + "-gen1-diff.pb.gz"; filepath.Base(ev.Diff) != want {
				t.Errorf("diff named %s, want %s", filepath.Base(ev.Diff), want)
			}
			diff, err := os.ReadFile(ev.Diff)
			if err != nil {
				t.Fatal(err)
			}
			top, err := heapsnap.Top(diff, "inuse_space", 3)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("top of the diff by inuse_space: %+v", top)
			if keep := os.Getenv("IPCLUSTER_TEST_KEEP_HEAPS"); keep != "" {
				// For reading with go tool pprof after the test: the
				// lab's directories go with it.
				for _, f := range []string{ev.Start, ev.End, ev.Diff} {
					b, err := os.ReadFile(f)
					if err == nil {
						err = os.WriteFile(filepath.Join(keep, tc.name+"-"+filepath.Base(f)), b, 0o644)
					}
					if err != nil {
						t.Errorf("keeping %s in IPCLUSTER_TEST_KEEP_HEAPS: %v", f, err)
					}
				}
			}
			if tc.warmup < time.Second && (len(top) == 0 || !strings.HasSuffix(top[0].Func, ".leakHeapForSnapshots") || top[0].Flat < 8<<20) {
				t.Errorf("the diff's top entry is %+v, want leakHeapForSnapshots, grown by at least 8 MiB", top)
			}
			c.waitStatus("the pair in the status", func(st *proto.Status) bool {
				for _, h := range st.HeapSnapshots {
					if h.PID == leaker && h.Diff == ev.Diff && h.Start == ev.Start && h.Cause == "memory" {
						return true
					}
				}
				return false
			})
			if tc.budget {
				// Ended for the budget only once its end was written.
				d := waitEvent(t, events, 30*time.Second, func(e loggedEvent) bool {
					return e.Type == "EventDismissed" && decodeEvent[ipcluster.EventDismissed](t, e).PID == leaker
				})
				if d.At.Before(e.At) {
					t.Errorf("worker %d dismissed at %s, before its heap snapshot end at %s", leaker, d.At, e.At)
				}
			}
			waitGone(t, []int{leaker}, 20*time.Second)
		})
	}
}
