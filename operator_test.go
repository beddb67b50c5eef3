//go:build linux

package ipcluster_test

// The workers' operator endpoints: each worker's private socket, the
// master's /workers/ proxy and the workers' metrics in the master's.

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/ctl"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// opsWorker serves as echo, with an operator handler serving a registry
// of its own on /metrics: helper_ops_slot_total is slot+1, and its
// helper_ops_labelled carries labels slot and pid of the application's own.
// Its SetStats object has two numbers and a string.
func opsWorker(w *ipcluster.Worker) error {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "helper_ops_slot_total", Help: "slot+1"})
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "helper_ops_labelled", Help: "labelled by the app"}, []string{"slot", "pid"})
	reg.MustRegister(c, g)
	c.Add(float64(w.Slot() + 1))
	g.WithLabelValues("app-slot", "app-pid").Set(1)
	w.SetOperatorHandler(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	w.SetStats(func() any { return map[string]any{"sessions": 3 + w.Slot(), "ratio": 0.5, "name": "x"} })
	return echoWorker(w)
}

// opsDir is the cluster's operator socket directory.
func opsDir(c *cluster) string {
	return filepath.Join(c.spec.Config.RunDir, c.spec.Config.Name, "ops")
}

// Every worker, spare included, has an operator socket in the cluster's
// ops directory, named in the status: the master's /workers/ lists them,
// /workers/<slot>/ and /workers/pid/<pid>/ reach the library's
// /debug/pprof/ and the application's handler (a worker without one says
// how to set it), unknown workers are 404s naming the known, the master's
// /metrics carries every active worker's metrics labelled slot and pid and
// their SetStats numbers; a new master (takeover) reaches the adopted
// workers by the path in their hello; an exited worker's socket is
// removed, and a stop removes the directory.
func TestOperatorEndpoints(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	c := startScenario(t, lab, specConfig{Workers: 2, Spares: 1, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		HeartbeatInterval: 100 * time.Millisecond, HTTPAddr: addr.String()}, "ops")
	st := c.waitStatus("2 slots and a spare ready", func(st *proto.Status) bool {
		n := 0
		for _, w := range st.Workers {
			if w.State == "spare" || w.State == "active" {
				n++
			}
		}
		return st.Ready && n == 3
	})
	var spare int
	for _, w := range st.Workers {
		if w.State == "spare" {
			spare = w.PID
		}
		if filepath.Dir(w.OperatorSocket) != opsDir(c) {
			t.Errorf("worker %d: operator socket %q, want one in %s", w.PID, w.OperatorSocket, opsDir(c))
			continue
		}
		fi, err := os.Stat(w.OperatorSocket)
		if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
			t.Errorf("worker %d: operator socket %s: %v, %v; want a socket, mode 0600", w.PID, w.OperatorSocket, fi, err)
		}
	}
	if fi, err := os.Stat(opsDir(c)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("ops directory: %v, %v; want mode 0700", fi, err)
	}

	code, body := mustGet(t, lab, addr, "/workers/")
	var index []struct {
		PID            int    `json:"pid"`
		State          string `json:"state"`
		OperatorSocket string `json:"operator_socket"`
		URL            string `json:"url"`
	}
	if err := json.Unmarshal([]byte(body), &index); code != 200 || err != nil || len(index) != 3 {
		t.Errorf("/workers/: %d %v\n%s", code, err, body)
	}
	for _, tc := range []struct {
		path string
		code int
		say  string
	}{
		{"/workers/0/debug/pprof/", 200, "goroutine"},
		{"/workers/0/debug/pprof", 200, "goroutine"}, // the worker's redirect, kept under /workers/0/
		{"/workers/1/debug/pprof/heap?debug=1", 200, "heap profile:"},
		{"/workers/1/debug/pprof/goroutine?debug=2", 200, "goroutine "},
		{"/workers/0/debug/pprof/cmdline", 200, "-test.run"},
		{"/workers/pid/" + itoa(spare) + "/debug/pprof/goroutine?debug=1", 200, "goroutine profile:"},
		{"/workers/1/metrics", 200, "helper_ops_slot_total 2"},
		{"/workers/pid/" + itoa(spare) + "/metrics", 404, "Worker.SetOperatorHandler"},
		{"/workers/0/debug/pprof/profile?seconds=0", 400, "from 1 to 300"},
		{"/workers/0/debug/pprof/nosuch", 404, `unknown profile "nosuch"`},
		{"/workers/7/debug/pprof/", 404, "slots 0..1; workers: pid"},
		{"/workers/pid/1/debug/pprof/", 404, `no worker with pid "1"`},
	} {
		code, body := mustGet(t, lab, addr, tc.path)
		if code != tc.code || !strings.Contains(body, tc.say) {
			t.Errorf("GET %s: %d, want %d containing %q:\n%.400s", tc.path, code, tc.code, tc.say, body)
		}
	}
	// A CPU profile, through the master: gzipped protobuf.
	if code, body := mustGet(t, lab, addr, "/workers/0/debug/pprof/profile?seconds=1"); code != 200 || !strings.HasPrefix(body, "\x1f\x8b") {
		t.Errorf("CPU profile: %d, %d bytes, want gzip", code, len(body))
	}

	s := scrape(t, lab, addr)
	for slot := range 2 {
		pid := activePID(st, slot)
		series := `helper_ops_slot_total{pid="` + itoa(pid) + `",slot="` + itoa(slot) + `"}`
		if s[series] != float64(slot+1) {
			t.Errorf("master's /metrics: %s = %v, want %d", series, s[series], slot+1)
		}
		lab := `helper_ops_labelled{exported_pid="app-pid",exported_slot="app-slot",pid="` + itoa(pid) + `",slot="` + itoa(slot) + `"}`
		if s[lab] != 1 {
			t.Errorf("master's /metrics: %s = %v, want 1: the application's slot and pid labels kept as exported_", lab, s[lab])
		}
		stat := `ipcluster_worker_app_stat{slot="` + itoa(slot) + `",stat="sessions"}`
		if s[stat] != float64(3+slot) {
			t.Errorf("master's /metrics: %s = %v, want %d", stat, s[stat], 3+slot)
		}
		if _, ok := s[`ipcluster_worker_app_stat{slot="`+itoa(slot)+`",stat="name"}`]; ok {
			t.Errorf("a string of SetStats exported as a gauge")
		}
	}
	// A figure, not a check: a scrape with the workers' metrics.
	var took []time.Duration
	for range 20 {
		t0 := time.Now()
		mustGet(t, lab, addr, "/metrics")
		took = append(took, time.Since(t0))
	}
	slices.Sort(took)
	t.Logf("GET /metrics with 2 workers' metrics: median %s, max %s", took[len(took)/2], took[len(took)-1])
	if _, ok := s["go_goroutines"]; !ok {
		t.Errorf("the master's own go_goroutines is gone from its /metrics")
	}
	if _, ok := sum(s, "go_goroutines", `slot="0"`); ok {
		t.Errorf("go_goroutines of a worker in the master's /metrics: the helper's registry has none")
	}

	// ipclusterctl reaches the same sockets without HTTPAddr.
	dir := t.TempDir()
	prof := filepath.Join(dir, "heap.pb.gz")
	if code, out := c.ctl(t, "pprof", "0", "heap", "-o", prof); code != 0 || !strings.Contains(out, "wrote the heap profile of worker pid "+itoa(activePID(st, 0))) {
		t.Errorf("ipclusterctl pprof 0 heap: exit %d", code)
	}
	if b, err := os.ReadFile(prof); err != nil || !bytes.HasPrefix(b, []byte("\x1f\x8b")) {
		t.Errorf("the heap profile written: %d bytes, %v; want gzip", len(b), err)
	}
	t.Chdir(dir)
	if code, _ := c.ctl(t, "pprof", "pid:"+itoa(spare), "goroutine"); code != 0 {
		t.Errorf("ipclusterctl pprof pid:%d goroutine: exit %d", spare, code)
	}
	if _, err := os.Stat("t-spare-pid" + itoa(spare) + "-goroutine.pb.gz"); err != nil {
		t.Errorf("the default file of a spare's goroutine profile: %v", err)
	}
	if code, out := c.ctl(t, "metrics", "1"); code != 0 || !strings.Contains(out, "helper_ops_slot_total 2") {
		t.Errorf("ipclusterctl metrics 1: exit %d", code)
	}

	// A new master (a takeover, same build) adopts the workers and
	// reaches them by the paths in their hellos.
	c2 := startClusterSpec(t, lab, c.spec.Config, func(s *spec) { *s = c.spec })
	if err := c.wait(10 * time.Second); err != nil {
		t.Fatalf("old master after the handover: %v", err)
	}
	st2 := c2.waitStatus("the workers adopted", func(st2 *proto.Status) bool {
		return st2.Ready && st2.MasterPID == c2.cmd.Process.Pid && activePID(st2, 0) == activePID(st, 0)
	})
	for _, w := range st2.Workers {
		if w.PID == activePID(st, 0) && !strings.HasPrefix(filepath.Base(w.OperatorSocket), "g"+itoa(st.Generation)+"-") {
			t.Errorf("adopted worker %d: operator socket %q, want its own, of generation %d", w.PID, w.OperatorSocket, st.Generation)
		}
	}
	waitMetrics(t, lab, addr, "the new master's /metrics with the adopted worker's", func(s map[string]float64) bool {
		return s[`helper_ops_slot_total{pid="`+itoa(activePID(st, 0))+`",slot="0"}`] == 1
	})

	// A retired worker's socket is removed once it exits.
	old := activePID(st, 0)
	var oldSock string
	for _, w := range st2.Workers {
		if w.PID == old {
			oldSock = w.OperatorSocket
		}
	}
	c2.ctl(t, "retire", "0")
	waitGone(t, []int{old}, 20*time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for _, err := os.Stat(oldSock); err == nil && time.Now().Before(deadline); _, err = os.Stat(oldSock) {
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := os.Stat(oldSock); !os.IsNotExist(err) {
		t.Errorf("exited worker %d's operator socket %s: %v, want it removed", old, oldSock, err)
	}
	if err := c2.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if _, err := os.Stat(opsDir(c)); !os.IsNotExist(err) {
		t.Errorf("after a stop, the ops directory: %v, want it removed", err)
	}
}

// ctl runs ipclusterctl against the cluster.
func (c *cluster) ctl(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var out bytes.Buffer
	code := ctl.Main(append([]string{"-rundir", c.spec.Config.RunDir, "-name", c.spec.Config.Name, "-timeout", "60s"}, args...), &out, &out)
	t.Logf("ipclusterctl %s → %d\n%s", strings.Join(args, " "), code, out.String())
	return code, out.String()
}

// A stopped worker (SIGSTOP) holds up only the requests for it: a request
// through /workers/ fails with a gateway error after its timeout, the
// master's /metrics answers meanwhile with the other slot's metrics and
// counts the failed fetch, and /healthz stays 200.
func TestOperatorStoppedWorker(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	c := startScenario(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		PingTimeout: 5 * time.Minute, HTTPAddr: addr.String()}, "ops")
	st := c.waitReady()
	stopped := activePID(st, 0)
	if err := syscall.Kill(stopped, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(stopped, syscall.SIGCONT)

	type answer struct {
		code int
		body string
		err  error
	}
	slow := make(chan answer, 1)
	go func() {
		cl := httpClient(lab.Server)
		cl.Timeout = 45 * time.Second // the master's own bound is 10s
		resp, err := cl.Get("http://" + addr.String() + "/workers/0/debug/pprof/goroutine?debug=1")
		if err != nil {
			slow <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		slow <- answer{resp.StatusCode, string(b), err}
	}()
	s := scrape(t, lab, addr)
	if s[`helper_ops_slot_total{pid="`+itoa(activePID(st, 1))+`",slot="1"}`] != 2 {
		t.Errorf("the master's /metrics while slot 0's worker is stopped lacks slot 1's metrics:\n%s", dumpIPCluster(s))
	}
	if _, ok := sum(s, "helper_ops_slot_total", `slot="0"`); ok {
		t.Errorf("the stopped worker's metrics in the master's /metrics")
	}
	if s[`ipcluster_worker_scrape_errors_total{slot="0"}`] < 1 {
		t.Errorf("ipcluster_worker_scrape_errors_total{slot=\"0\"} = %v, want the failed fetch counted", s[`ipcluster_worker_scrape_errors_total{slot="0"}`])
	}
	if code, _ := mustGet(t, lab, addr, "/healthz"); code != 200 {
		t.Errorf("/healthz while a worker is stopped: %d", code)
	}
	var a answer
	select {
	case a = <-slow:
	case <-time.After(60 * time.Second):
		t.Fatal("a request to a stopped worker through the master still waits after 60s")
	}
	if a.err != nil || a.code != http.StatusGatewayTimeout || !strings.Contains(a.body, "worker pid "+strconv.Itoa(stopped)) {
		t.Errorf("request to the stopped worker: %d %q %v, want 504 naming it", a.code, a.body, a.err)
	}
}

// Workers spawned as Config.WorkerUser serve their operator endpoints on
// the socket the master made (0600, the master's): they got the
// descriptor, and never need the path.
func TestOperatorWorkerUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the master spawns workers as nobody")
	}
	lab := netlab.NewT(t, netlab.Options{})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	c := startScenario(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		RunDir: openTempDir(t, 0o755), WorkerUser: "nobody", HTTPAddr: addr.String()}, "ops")
	st := c.waitReady()
	for slot := range 2 {
		if code, body := mustGet(t, lab, addr, "/workers/"+itoa(slot)+"/debug/pprof/goroutine?debug=1"); code != 200 || !strings.Contains(body, "goroutine profile:") {
			t.Errorf("slot %d's goroutine profile: %d %.200s", slot, code, body)
		}
	}
	s := scrape(t, lab, addr)
	if s[`helper_ops_slot_total{pid="`+itoa(activePID(st, 1))+`",slot="1"}`] != 2 {
		t.Errorf("master's /metrics lacks slot 1's metrics")
	}
}

// checkOpsSockets fails for a file in the ops directory that is not the
// operator socket of a worker in st: one left by a worker that exited.
func checkOpsSockets(t testing.TB, dir string, st *proto.Status) {
	t.Helper()
	known := map[string]bool{}
	for _, w := range st.Workers {
		known[w.OperatorSocket] = true
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if !known[filepath.Join(dir, e.Name())] {
			t.Errorf("stray file %s in the operator socket directory %s", e.Name(), dir)
		}
	}
}

// A worker that dies while no master runs (after a kill -9 of the master)
// leaves its operator socket; the next master removes it once the
// surviving workers have said hello, and keeps theirs.
func TestOperatorSocketsSweptAfterMasterCrash(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	c := startScenario(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4}, "ops")
	st := c.waitReady()
	var dead string
	for _, w := range st.Workers {
		if w.PID == activePID(st, 1) {
			dead = w.OperatorSocket
		}
	}
	if err := c.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-c.done
	if err := syscall.Kill(activePID(st, 1), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, []int{activePID(st, 1)}, 10*time.Second)
	if _, err := os.Stat(dead); err != nil {
		t.Fatalf("the dead worker's socket is already gone, with no master: %v", err)
	}
	c2 := startClusterSpec(t, lab, c.spec.Config, func(s *spec) { *s = c.spec })
	c2.waitStatus("slot 0's worker adopted, slot 1 served", func(st2 *proto.Status) bool {
		return st2.Ready && activePID(st2, 0) == activePID(st, 0)
	})
	deadline := time.Now().Add(15 * time.Second)
	for _, err := os.Stat(dead); err == nil && time.Now().Before(deadline); _, err = os.Stat(dead) {
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := os.Stat(dead); !os.IsNotExist(err) {
		t.Errorf("the socket of a worker that died with no master, %s: %v; want it removed", dead, err)
	}
	st2, err := c2.status()
	if err != nil {
		t.Fatal(err)
	}
	checkOpsSockets(t, opsDir(c), st2)
	if len(st2.Workers) < 2 {
		t.Errorf("workers after the restart: %+v", st2.Workers)
	}
	for _, w := range st2.Workers {
		if _, err := os.Stat(w.OperatorSocket); err != nil {
			t.Errorf("worker %d's operator socket: %v", w.PID, err)
		}
	}
}
