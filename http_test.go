//go:build linux

package ipcluster_test

// The master's HTTP endpoints (Config.HTTPAddr), end to end: a master in a
// lab's server namespace, scraped and probed from inside that namespace,
// and its status page rendered by a headless Chromium started there too.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image"
	"image/png"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/ctl"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// httpPort is the endpoints' port on the lab's server address: each lab is
// a namespace of its own, so tests running at once never collide on it.
const httpPort = 9100

// httpClient makes requests from inside ns. It never uses a proxy from
// the environment: the lab's addresses are only reachable from the lab.
func httpClient(ns *netlab.NS) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				ap, err := netip.ParseAddrPort(addr)
				if err != nil {
					return nil, err
				}
				return ns.Dial(ctx, network, netip.Addr{}, ap)
			},
		},
	}
}

// get fetches path from the endpoints at addr, from the server namespace.
func get(lab *netlab.Lab, addr netip.AddrPort, path string) (int, string, error) {
	resp, err := httpClient(lab.Server).Get("http://" + addr.String() + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// mustGet is get, failing the test on a transport error.
func mustGet(t *testing.T, lab *netlab.Lab, addr netip.AddrPort, path string) (int, string) {
	t.Helper()
	code, body, err := get(lab, addr, path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return code, body
}

// scrape returns the samples of /metrics by series, as written:
// `name{label="value",...}` (labels in the exposition's order, which
// client_golang sorts by name) or bare `name`.
func scrape(t *testing.T, lab *netlab.Lab, addr netip.AddrPort) map[string]float64 {
	t.Helper()
	code, body := mustGet(t, lab, addr, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	samples := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if i < 0 || err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		samples[line[:i]] = v
	}
	return samples
}

// sum adds the samples of a metric whose labels include every one of
// labels (`pid="123"`), and says whether there was any.
func sum(samples map[string]float64, name string, labels ...string) (float64, bool) {
	var total float64
	found := false
	for series, v := range samples {
		n, rest, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(rest, l) {
				ok = false
			}
		}
		if ok {
			total, found = total+v, true
		}
	}
	return total, found
}

// waitMetrics scrapes until ok accepts the samples.
func waitMetrics(t *testing.T, lab *netlab.Lab, addr netip.AddrPort, what string, ok func(map[string]float64) bool) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		s := scrape(t, lab, addr)
		if ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last scrape:\n%s", what, dumpIPCluster(s))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// dumpIPCluster lists the ipcluster_ samples, for failure messages.
func dumpIPCluster(s map[string]float64) string {
	var b strings.Builder
	for k, v := range s {
		if strings.HasPrefix(k, "ipcluster_") {
			fmt.Fprintf(&b, "%s %g\n", k, v)
		}
	}
	return b.String()
}

func pidLabel(pid int) string { return `pid="` + strconv.Itoa(pid) + `"` }

// slotActive selects a slot's active worker in the per-worker series.
func slotActive(slot int) []string {
	return []string{`slot="` + strconv.Itoa(slot) + `"`, `state="active"`}
}

// checkWorkerLabels fails for a per-worker series with a pid label: one
// that every crash would replace. Only ipcluster_worker_info names pids.
func checkWorkerLabels(t *testing.T, s map[string]float64) {
	t.Helper()
	for series := range s {
		if strings.HasPrefix(series, "ipcluster_worker_") && !strings.HasPrefix(series, "ipcluster_worker_info{") &&
			strings.Contains(series, `pid="`) {
			t.Errorf("per-worker series with a pid label: %s", series)
		}
	}
}

// The endpoints of a running cluster: metrics with sane values (per-worker
// series by slot and state, the pid in one info series per worker, start
// times, deploy outcomes, the conntrack table of the lab's namespace, the
// rule backend), a retirement counted by cause and its worker's series
// gone once it exits, the probes, the status in JSON and HTML (with the
// backend, as in the start-up log), and /readyz turning 503 while the
// master stops (and /healthz staying 200).
func TestHTTPEndpoints(t *testing.T) {
	natBackendTest(t) // the conntrack gauges need the nat backends
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	// linger: a held connection keeps its worker, and so the stopping
	// master, alive until the test closes it.
	c := startScenario(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		HeartbeatInterval: 100 * time.Millisecond, MonitorInterval: 100 * time.Millisecond,
		HTTPAddr: addr.String()}, "linger")
	st := c.waitReady()
	active0, active1 := activePID(st, 0), activePID(st, 1)

	// A connection on slot 0 (198.18.1.0: low bit 0).
	held, err := c.dial(lab.ClientAddrs4[0], netip.AddrPortFrom(lab.ServerAddr4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	s := waitMetrics(t, lab, addr, "RSS and the held connection in the metrics", func(s map[string]float64) bool {
		rss0, _ := sum(s, "ipcluster_worker_rss_bytes", slotActive(0)...)
		rss1, _ := sum(s, "ipcluster_worker_rss_bytes", slotActive(1)...)
		conns, _ := sum(s, "ipcluster_worker_connections", slotActive(0)...)
		return rss0 > 0 && rss1 > 0 && conns == 1
	})
	now := float64(time.Now().Unix())
	for _, want := range []struct {
		name   string
		labels []string
		ok     func(float64) bool
		what   string
	}{
		{"ipcluster_ready", nil, eq(1), "1"},
		{"ipcluster_stopping", nil, eq(0), "0"},
		{"ipcluster_drained", nil, eq(0), "0"},
		{"ipcluster_slots", nil, eq(2), "2"},
		{"ipcluster_workers", []string{`state="active"`}, eq(2), "2"},
		{"ipcluster_workers", nil, eq(2), "2 in all"},
		{"ipcluster_worker_info", []string{pidLabel(active0), `slot="0"`, `state="active"`, `generation="1"`, `build="`}, eq(1), "1"},
		{"ipcluster_worker_info", []string{pidLabel(active1), `slot="1"`, `state="active"`, `generation="1"`}, eq(1), "1"},
		{"ipcluster_worker_info", nil, eq(2), "2: one per worker"},
		{"ipcluster_worker_lag_seconds", slotActive(0), between(0, 1), "0..1s"},
		{"ipcluster_worker_start_time_seconds", slotActive(0), between(now-60, now+1), "within the last minute"},
		{"ipcluster_worker_heap_bytes", slotActive(0), gt(0), "> 0"},
		{"ipcluster_worker_accepted_connections_total", slotActive(0), eq(1), "1"},
		{"ipcluster_slot_up", []string{`slot="1"`}, eq(1), "1"},
		{"ipcluster_slot_connections", []string{`slot="0"`}, eq(1), "1"},
		{"ipcluster_slot_connections", []string{`slot="1"`}, eq(0), "0"},
		{"ipcluster_slot_rss_bytes", []string{`slot="0"`}, gt(1 << 20), "> 1 MiB"},
		{"ipcluster_slot_generation", []string{`slot="0"`}, eq(1), "1"},
		{"ipcluster_master_generation", nil, eq(1), "1"},
		{"ipcluster_worker_spawns_total", nil, gt(1.5), ">= 2"},
		{"ipcluster_worker_crashes_total", nil, eq(0), "0"},
		{"ipcluster_retirements_total", []string{`cause="requested"`}, eq(0), "0"},
		{"ipcluster_deploys_total", []string{`outcome="committed"`}, eq(0), "0"},
		{"ipcluster_deploys_total", []string{`outcome="rolled-back"`}, eq(0), "0"},
		{"ipcluster_deploys_total", []string{`outcome="failed"`}, eq(0), "0"},
		{"ipcluster_deploys_total", nil, eq(0), "0 in all"},
		{"ipcluster_deploy_in_progress", nil, eq(0), "0"},
		{"ipcluster_rule_backend_info", []string{`backend="nftables"`, `config="nftables"`}, eq(1), "1"},
		// The held connection's entry at least: the lab's table, not the host's.
		{"ipcluster_nf_conntrack_entries", nil, between(1, 1e7), ">= 1"},
		{"ipcluster_nf_conntrack_entries_limit", nil, gt(1000), "> 1000"},
		{"process_start_time_seconds", nil, between(now-120, now+1), "within the last 2 minutes"},
		{"ipcluster_retire_holds_total", []string{`cause="memory"`}, eq(0), "0"},
		{"ipcluster_rule_writes_total", []string{`result="ok"`}, gt(0), "> 0"},
		{"ipcluster_rule_write_duration_seconds_count", nil, gt(0), "> 0"},
		{"ipcluster_rule_write_duration_seconds_sum", nil, between(1e-6, 10), "0..10s"},
		{"ipcluster_worker_ready_duration_seconds_count", nil, gt(1.5), ">= 2"},
		{"ipcluster_worker_ready_duration_seconds_sum", nil, between(1e-4, 20), "0..20s"},
		{"go_goroutines", nil, gt(0), "> 0"},
		{"process_resident_memory_bytes", nil, gt(1 << 20), "> 1 MiB"},
	} {
		v, ok := sum(s, want.name, want.labels...)
		if !ok {
			t.Errorf("no %s{%s}", want.name, strings.Join(want.labels, ","))
		} else if !want.ok(v) {
			t.Errorf("%s{%s} = %g, want %s", want.name, strings.Join(want.labels, ","), v, want.what)
		}
	}
	// Its workers serve no /metrics of their own (no operator handler):
	// not a failed fetch.
	if v, ok := sum(s, "ipcluster_worker_scrape_errors_total"); ok && v > 0 {
		t.Errorf("ipcluster_worker_scrape_errors_total %v for workers without an operator handler, want none", v)
	}
	checkWorkerLabels(t, s)
	if n, limit := s["ipcluster_nf_conntrack_entries"], s["ipcluster_nf_conntrack_entries_limit"]; n > limit {
		t.Errorf("conntrack entries %g above the limit %g", n, limit)
	} else {
		t.Logf("the lab's conntrack table: %g entries of %g", n, limit)
	}
	for _, gone := range []string{"ipcluster_worker_uptime_seconds", "ipcluster_worker_state", "ipcluster_worker_generation"} {
		if _, ok := sum(s, gone); ok {
			t.Errorf("%s still served", gone)
		}
	}
	for series := range s {
		if strings.HasPrefix(series, "ipcluster_deploys_total{") && !regexp.MustCompile(`outcome="(committed|rolled-back|failed)"`).MatchString(series) {
			t.Errorf("deploys_total with a phase that is not an outcome: %s", series)
		}
	}
	if log := c.log(); !regexp.MustCompile(`msg="master starting".* backend=nftables backend_reason=Config.Backend`).MatchString(log) {
		t.Errorf("the start-up log line does not name the backend and why:\n%s", log)
	}

	if code, body := mustGet(t, lab, addr, "/healthz"); code != 200 || strings.TrimSpace(body) != "ok" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := mustGet(t, lab, addr, "/readyz"); code != 200 {
		t.Errorf("/readyz of a ready cluster: %d %q", code, body)
	}
	code, body := mustGet(t, lab, addr, "/status.json")
	var js proto.Status
	if err := json.Unmarshal([]byte(body), &js); code != 200 || err != nil {
		t.Fatalf("/status.json: %d %v: %s", code, err, body)
	}
	if js.MasterPID != c.cmd.Process.Pid || len(js.Slots) != 2 || js.Slots[0].Active != active0 || len(js.Workers) != 2 {
		t.Errorf("/status.json: %+v", js)
	}
	if js.Backend != "nftables" || js.BackendReason != "Config.Backend" {
		t.Errorf("/status.json backend %q (%q), want nftables (Config.Backend)", js.Backend, js.BackendReason)
	}
	for _, w := range js.Workers {
		if w.StartTime < now-60 || w.StartTime > now+1 {
			t.Errorf("/status.json: worker %d started at %f, not within the last minute of %f", w.PID, w.StartTime, now)
		}
	}
	code, body = mustGet(t, lab, addr, "/status")
	if code != 200 || strings.Count(body, `class="slot-row`) != 2 {
		t.Fatalf("/status: %d, want 2 slot rows:\n%s", code, body)
	}
	if !strings.Contains(body, `<span id="backend">nftables</span> (<span id="backend-reason">Config.Backend</span>)`) {
		t.Errorf("/status does not show the backend and why:\n%s", body)
	}
	for i, pid := range []int{active0, active1} {
		if !strings.Contains(body, fmt.Sprintf(`data-slot="%d" data-pid="%d"`, i, pid)) {
			t.Errorf("/status has no row for slot %d, worker %d", i, pid)
		}
	}

	// A retirement asked for by the worker (SIGUSR1): counted by cause,
	// and once the worker has exited its series are gone.
	if err := syscall.Kill(active1, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	waitMetrics(t, lab, addr, "the retirement counted, and the retired worker's series gone", func(s map[string]float64) bool {
		n, _ := sum(s, "ipcluster_retirements_total", `cause="requested"`)
		_, old := sum(s, "ipcluster_worker_info", pidLabel(active1))
		_, retired := sum(s, "ipcluster_worker_rss_bytes", `state="retired"`)
		up, _ := sum(s, "ipcluster_slot_up", `slot="1"`)
		exits, _ := sum(s, "ipcluster_worker_exits_total", `state="retired"`)
		return n == 1 && !old && !retired && up == 1 && exits == 1
	})
	s = scrape(t, lab, addr)
	checkWorkerLabels(t, s)
	if n, _ := sum(s, "ipcluster_worker_info", `slot="1"`, `state="active"`); n != 1 {
		t.Errorf("slot 1's new worker: %g info series, want 1", n)
	}
	if n, _ := sum(s, "ipcluster_worker_spawns_total"); n != 3 {
		t.Errorf("spawns after one replacement: %g, want 3", n)
	}
	if n, _ := sum(s, "ipcluster_worker_crashes_total"); n != 0 {
		t.Errorf("a retirement counted as a crash: %g", n)
	}
	if n, _ := sum(s, "ipcluster_retirement_duration_seconds_count"); n != 1 {
		t.Errorf("retirement durations observed: %g, want 1", n)
	}

	// Stopping: routes withdrawn, so not ready; the held connection keeps
	// its worker and the master running meanwhile.
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, body := mustGet(t, lab, addr, "/readyz")
		if code == http.StatusServiceUnavailable && strings.Contains(body, "stopping") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz of a stopping master: %d %q", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if code, body := mustGet(t, lab, addr, "/healthz"); code != 200 {
		t.Errorf("/healthz of a stopping master: %d %q", code, body)
	}
	held.Close()
	if err := c.wait(15 * time.Second); err != nil {
		t.Fatalf("master after SIGTERM: %v\n%s", err, c.log())
	}
	if _, _, err := get(lab, addr, "/healthz"); err == nil {
		t.Errorf("the endpoints still answer after the master returned")
	}
}

// A backend set in Config: named as such in the status, ipclusterctl's
// status, /status.json, the metric and the start-up log.
func TestHTTPBackendConfigured(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		Backend: "iptables", HTTPAddr: addr.String()})
	st := c.waitReady()
	if st.Backend != "iptables" || st.BackendReason != "Config.Backend" {
		t.Errorf("status backend %q (%q), want iptables (Config.Backend)", st.Backend, st.BackendReason)
	}
	var out, errb bytes.Buffer
	if code := ctl.Main([]string{"-rundir", c.spec.Config.RunDir, "-name", c.spec.Config.Name, "status"}, &out, &errb); code != 0 ||
		!strings.Contains(out.String(), "\nbackend: iptables (Config.Backend)\n") {
		t.Errorf("ipclusterctl status: exit %d, want the backend named:\n%s%s", code, out.String(), errb.String())
	}
	code, body := mustGet(t, lab, addr, "/status.json")
	var js proto.Status
	if err := json.Unmarshal([]byte(body), &js); code != 200 || err != nil || js.Backend != "iptables" || js.BackendReason != "Config.Backend" {
		t.Errorf("/status.json: %d %v: backend %q (%q)", code, err, js.Backend, js.BackendReason)
	}
	s := scrape(t, lab, addr)
	if v, _ := sum(s, "ipcluster_rule_backend_info", `backend="iptables"`, `config="iptables"`); v != 1 {
		t.Errorf("ipcluster_rule_backend_info{backend=\"iptables\",config=\"iptables\"} = %g, want 1:\n%s", v, dumpIPCluster(s))
	}
	if n, _ := sum(s, "ipcluster_rule_backend_info"); n != 1 {
		t.Errorf("%g rule backends in force, want 1", n)
	}
	if log := c.log(); !regexp.MustCompile(`msg="master starting".* backend=iptables backend_reason=Config.Backend`).MatchString(log) {
		t.Errorf("the start-up log line does not name the backend and why:\n%s", log)
	}
}

// deploys_total counts outcomes: a deploy whose new master fails counts
// failed on the master that carries on; one that commits counts committed
// on the new master; neither counts a phase ("started", "handed-over").
func TestHTTPDeployOutcomes(t *testing.T) {
	exe := filepath.Join(t.TempDir(), "server")
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	ship := func(b []byte) {
		if err := os.WriteFile(exe+".new", b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(exe+".new", exe); err != nil {
			t.Fatal(err)
		}
	}
	ship(self)
	var addr netip.AddrPort
	d := startDeployLab(t, 2, func(s *spec) {
		s.Exe = exe
		s.Config.HTTPAddr = netip.AddrPortFrom(s.Config.Addr, httpPort).String()
		addr = netip.MustParseAddrPort(s.Config.HTTPAddr)
	})
	outcomes := func(s map[string]float64) map[string]float64 {
		m := map[string]float64{}
		for series, v := range s {
			if o, ok := strings.CutPrefix(series, `ipcluster_deploys_total{outcome="`); ok {
				m[strings.TrimSuffix(o, `"}`)] = v
			}
		}
		return m
	}
	check := func(s map[string]float64, want map[string]float64) {
		t.Helper()
		if got := outcomes(s); !maps.Equal(got, want) {
			t.Errorf("deploys_total by outcome: %v, want %v", got, want)
		}
	}

	ship([]byte("#!/bin/sh\necho broken build >&2\nexit 7\n"))
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, d.events, 10*time.Second, func(e loggedEvent) bool { return e.Type == "EventDeploy" })
	check(scrape(t, d.lab, addr), map[string]float64{"committed": 0, "rolled-back": 0, "failed": 1})

	ship(self)
	d.setVersion("v2")
	st0, _ := d.c.status()
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := d.c.wait(10 * time.Second); err != nil {
		t.Fatalf("old master after the handover: %v\n%s", err, d.c.log())
	}
	st := d.waitStatus("every slot on v2", func(st *proto.Status) bool {
		return servedBy(st, "v2", workerPIDs(st0)) && strings.HasPrefix(st.Deploy, "committed")
	})
	stopMasterByPID(t, st.MasterPID)
	s := waitMetrics(t, d.lab, addr, "the new master's metrics", func(s map[string]float64) bool {
		n, _ := sum(s, "ipcluster_deploys_total", `outcome="committed"`)
		return n == 1
	})
	check(s, map[string]float64{"committed": 1, "rolled-back": 0, "failed": 0})
	if v, ok := sum(s, "ipcluster_deploy_in_progress"); !ok || v != 0 {
		t.Errorf("ipcluster_deploy_in_progress after the commit: %g (present %v), want 0", v, ok)
	}
	d.releaseHeld()
}

func eq(want float64) func(float64) bool { return func(v float64) bool { return v == want } }
func gt(lo float64) func(float64) bool   { return func(v float64) bool { return v > lo } }
func between(lo, hi float64) func(float64) bool {
	return func(v float64) bool { return v >= lo && v <= hi }
}

// An HTTPAddr in use fails Run before anything is touched: no worker, no
// rule, no run directory.
func TestHTTPAddrInUse(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	ln, err := lab.Server.Listen("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := specConfig{Name: "t", Workers: 2, Ports: tcpPorts(8080), HTTPAddr: addr.String(),
		RunDir: filepath.Join(t.TempDir(), "run")}
	out, err := runHelper(t, lab, cfg, nil)
	if err == nil {
		t.Fatalf("master started with its HTTPAddr in use:\n%s", out)
	}
	if !strings.Contains(out, "Config.HTTPAddr") || !strings.Contains(out, "address already in use") {
		t.Errorf("error does not name the field and the problem:\n%s", out)
	}
	if strings.Contains(out, "spawned") || strings.Contains(out, "worker ready") {
		t.Errorf("workers started:\n%s", out)
	}
	if entries, err := os.ReadDir(cfg.RunDir); err == nil && len(entries) > 0 {
		t.Errorf("run directory left behind: %v", entries)
	}
	checkNoRules(t, lab)
}

// A second master takes the cluster over and binds the same HTTPAddr,
// which the first one closed as it returned.
func TestHTTPAfterTakeover(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 2})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	c1 := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, HTTPAddr: addr.String()})
	c1.waitReady()
	if code, body := mustGet(t, lab, addr, "/readyz"); code != 200 {
		t.Fatalf("/readyz before the takeover: %d %q", code, body)
	}
	c2 := startClusterSpec(t, lab, c1.spec.Config, func(s *spec) { *s = c1.spec })
	if err := c1.wait(10 * time.Second); err != nil {
		t.Fatalf("first master after the handover: %v\n%s", err, c1.log())
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, body, err := get(lab, addr, "/status.json")
		var st proto.Status
		if err == nil && code == 200 && json.Unmarshal([]byte(body), &st) == nil && st.MasterPID == c2.cmd.Process.Pid && st.Ready {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new master's endpoints: %d %v %s\n%s", code, err, body, c2.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code, body := mustGet(t, lab, addr, "/readyz"); code != 200 {
		t.Errorf("/readyz after the takeover: %d %q", code, body)
	}
}

// findChromium returns the headless browser's path, or skips (fails under
// IPCLUSTER_REQUIRE_TOOLS=1, as test.sh sets: see netlab.Tool).
func findChromium(t *testing.T) string {
	t.Helper()
	return netlab.Tool(t, "chromium", "chromium", "chromium-browser", "google-chrome")
}

// runChromium runs headless Chromium in ns with args and the page's URL,
// and returns its standard output.
func runChromium(t *testing.T, ns *netlab.NS, bin, url string, args ...string) []byte {
	t.Helper()
	home := t.TempDir()
	args = append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
		"--no-first-run", "--no-default-browser-check", "--no-proxy-server", "--disable-dev-shm-usage",
		"--user-data-dir=" + filepath.Join(home, "profile")}, append(args, url)...)
	var out, errb bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "HOME="+home)
	cmd.Stdout, cmd.Stderr = &out, &errb
	// Its own process group, so a hung browser is killed with its
	// renderers, and only them.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := ns.Start(cmd); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("chromium %v: %v\n%s", args, err, errb.String())
		}
	case <-time.After(90 * time.Second):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		t.Fatalf("chromium did not finish in 90s\n%s", errb.String())
	}
	return out.Bytes()
}

// The status page as a browser shows it: after its script has fetched
// /status.json and redrawn the tables, one row per slot with its worker's
// pid; and a screenshot that is a picture, not a blank page.
func TestStatusPageChromium(t *testing.T) {
	bin := findChromium(t)
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	c := startCluster(t, lab, specConfig{Workers: 4, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		HeartbeatInterval: 100 * time.Millisecond, MonitorInterval: 100 * time.Millisecond, HTTPAddr: addr.String()})
	c.waitReady()
	// Three connections, two on slot 0 and one on slot 1, for the bars.
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	for _, src := range []netip.Addr{lab.ClientAddrs4[0], lab.ClientAddrs4[0], lab.ClientAddrs4[1]} {
		conn, err := c.dial(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
	}
	st := c.waitStatus("the connections reported", func(st *proto.Status) bool {
		var n int64
		for _, w := range st.Workers {
			if w.Stats != nil {
				n += w.Stats.Connections
			}
		}
		return n == 3
	})
	url := "http://" + addr.String() + "/status"

	dom := string(runChromium(t, lab.Server, bin, url, "--virtual-time-budget=3000", "--dump-dom"))
	rows := regexp.MustCompile(`<tr class="slot-row[^"]*" data-slot="(\d+)" data-pid="(\d+)"`).FindAllStringSubmatch(dom, -1)
	if len(rows) != 4 {
		t.Fatalf("rendered page has %d slot rows, want 4:\n%s", len(rows), dom)
	}
	for _, r := range rows {
		slot, _ := strconv.Atoi(r[1])
		pid, _ := strconv.Atoi(r[2])
		if slot >= len(st.Slots) || pid != activePID(st, slot) {
			t.Errorf("row for slot %d shows pid %d, want %d", slot, pid, activePID(st, slot))
		}
	}
	if !strings.Contains(dom, `<span id="total-conns">3</span>`) {
		t.Errorf("rendered page does not count 3 connections:\n%s", dom)
	}
	// The server leaves "updated" empty: text there means the script
	// fetched /status.json and redrew the page.
	if m := regexp.MustCompile(`<span id="updated">([^<]*)</span>`).FindStringSubmatch(dom); m == nil || m[1] == "" {
		t.Errorf("the page's script did not refresh it (no time in #updated):\n%s", dom)
	}
	if m := regexp.MustCompile(`<span id="error">([^<]*)</span>`).FindStringSubmatch(dom); m == nil || m[1] != "" {
		t.Errorf("the page's refresh failed (#error: %q):\n%s", m, dom)
	}

	shot, b, colors := screenshot(t, lab.Server, bin, url, 1200, 800)
	t.Logf("screenshot %s: %dx%d, %d colours", shot, b.Dx(), b.Dy(), len(colors))
	if b.Dx() != 1200 || b.Dy() != 800 || len(colors) < 8 {
		t.Errorf("screenshot is %dx%d with %d colours: not the page", b.Dx(), b.Dy(), len(colors))
	}
}

// screenshot has headless Chromium in ns take a w×h screenshot of url
// once its script ran, and returns the file, its bounds and its colours
// (8 bits a channel). IPCLUSTER_KEEP_SCREENSHOT=<path> keeps a copy.
func screenshot(t *testing.T, ns *netlab.NS, bin, url string, w, h int) (string, image.Rectangle, map[[3]uint32]bool) {
	t.Helper()
	shot := filepath.Join(t.TempDir(), "status.png")
	runChromium(t, ns, bin, url, "--virtual-time-budget=3000", fmt.Sprintf("--window-size=%d,%d", w, h), "--screenshot="+shot)
	data, err := os.ReadFile(shot)
	if err != nil {
		t.Fatalf("no screenshot: %v", err)
	}
	if dst := os.Getenv("IPCLUSTER_KEEP_SCREENSHOT"); dst != "" {
		_ = os.WriteFile(dst, data, 0o644)
	}
	img, err := png.Decode(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("screenshot is not a PNG: %v", err)
	}
	b := img.Bounds()
	colors := map[[3]uint32]bool{}
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			r, g, bl, _ := img.At(x, y).RGBA()
			colors[[3]uint32{r >> 8, g >> 8, bl >> 8}] = true
		}
	}
	return shot, b, colors
}
