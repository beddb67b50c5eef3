package ctl

import (
	"bytes"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// fakeWorker serves a worker's operator endpoints on a Unix socket, as a
// worker does on the one its master made, and records the paths asked.
func fakeWorker(t *testing.T, path string) *[]string {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var asked []string
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", func(w http.ResponseWriter, r *http.Request) {
		asked = append(asked, r.URL.RequestURI())
		w.Write([]byte("\x1f\x8bprofile " + r.URL.Path))
	})
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("# TYPE app_requests_total counter\napp_requests_total 7\n"))
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return &asked
}

// pprof and metrics reach a worker through the operator socket the status
// names, by slot (its active worker) or by pid:N (any worker, here a
// retired one); pprof writes the profile to the file it names, by default
// one named after the cluster, slot, pid and profile, and says where.
func TestPprofAndMetrics(t *testing.T) {
	dir := t.TempDir()
	sock0, sockR := filepath.Join(dir, "w0.sock"), filepath.Join(dir, "wr.sock")
	asked0, askedR := fakeWorker(t, sock0), fakeWorker(t, sockR)
	st := &proto.Status{Cluster: "t", MasterPID: 1, Ready: true, Slots: []proto.SlotStatus{{Slot: 0, Active: 10}},
		Workers: []proto.WorkerStatus{{PID: 10, Slot: 0, State: "active", OperatorSocket: sock0},
			{PID: 11, Slot: 0, State: "retired", OperatorSocket: sockR}, {PID: 12, Slot: -1, State: "spare"}}}
	f := startFake(t, &fakeMaster{statuses: []*proto.Status{st}})
	t.Chdir(t.TempDir())

	code, out := f.run("pprof", "0")
	if code != 0 || !strings.Contains(out, "wrote the heap profile of worker pid 10 (slot 0, active) to t-slot0-pid10-heap.pb.gz") ||
		!strings.Contains(out, "go tool pprof t-slot0-pid10-heap.pb.gz") {
		t.Errorf("pprof 0: exit %d:\n%s", code, out)
	}
	if b, err := os.ReadFile("t-slot0-pid10-heap.pb.gz"); err != nil || string(b) != "\x1f\x8bprofile /debug/pprof/heap" {
		t.Errorf("the profile written: %q, %v", b, err)
	}
	out2 := filepath.Join(t.TempDir(), "cpu.pb.gz")
	if code, out := f.run("pprof", "pid:11", "profile", "-seconds", "2", "-o", out2); code != 0 || !strings.Contains(out, out2) {
		t.Errorf("pprof pid:11 profile: exit %d:\n%s", code, out)
	}
	if strings.Join(*asked0, " ") != "/debug/pprof/heap" || strings.Join(*askedR, " ") != "/debug/pprof/profile?seconds=2" {
		t.Errorf("asked slot 0's worker %q and the retired one %q", *asked0, *askedR)
	}
	var mout, merr bytes.Buffer
	if code := Main([]string{"-rundir", f.runDir, "-name", "t", "metrics", "pid:10"}, &mout, &merr); code != 0 || mout.String() != "# TYPE app_requests_total counter\napp_requests_total 7\n" {
		t.Errorf("metrics pid:10: exit %d: %q %s", code, mout.String(), merr.String())
	}

	for _, tc := range []struct {
		args []string
		code int
		say  string
	}{
		{[]string{"pprof"}, exitUsage, "want <slot|pid:N> [profile]"},
		{[]string{"pprof", "x"}, exitUsage, `"x" is not a slot number nor pid:<pid>`},
		{[]string{"pprof", "0", "bogus"}, exitUsage, "unknown profile"},
		{[]string{"pprof", "0", "heap", "-seconds", "5"}, exitUsage, "-seconds is for profile (CPU) and trace"},
		{[]string{"pprof", "3"}, exitFailed, "no slot 3: the cluster has slots 0..0"},
		{[]string{"pprof", "pid:99"}, exitFailed, "no worker with pid 99; the workers are 10, 11, 12"},
		{[]string{"metrics", "pid:12"}, exitFailed, "worker pid 12 has no operator socket"},
		{[]string{"metrics"}, exitUsage, "want <slot|pid:N>"},
	} {
		if code, out := f.run(tc.args...); code != tc.code || !strings.Contains(out, tc.say) {
			t.Errorf("%s: exit %d, want %d saying %q:\n%s", strings.Join(tc.args, " "), code, tc.code, tc.say, out)
		}
	}
}

// status lists the heap snapshot pairs the master names, a failed one
// with its error.
func TestStatusHeapSnapshots(t *testing.T) {
	st := &proto.Status{Cluster: "t", Slots: []proto.SlotStatus{{Slot: 0, Active: 10}}, HeapSnapshots: []proto.HeapSnapshot{
		{PID: 9, Slot: 0, Cause: "memory", Start: "/h/s", End: "/h/e", Diff: "/h/t-slot0-pid9-gen1-diff.pb.gz"},
		{PID: 8, Slot: 1, Cause: "replaced", Error: "fetch the heap profile of worker pid 8: timeout"}}}
	var b bytes.Buffer
	writeStatus(&b, st, time.Now())
	for _, want := range []string{"heap snapshots", "pid 9 slot 0 (memory): /h/t-slot0-pid9-gen1-diff.pb.gz",
		"pid 8 slot 1 (replaced): failed: fetch the heap profile of worker pid 8: timeout"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("status without %q:\n%s", want, b.String())
		}
	}
}
