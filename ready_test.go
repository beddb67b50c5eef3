//go:build linux

package ipcluster_test

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/ipcluster/ipcluster/internal/ctl"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// One notion of ready: when a slot loses its worker (and its replacements
// fail), the status (and so ipclusterctl's header), /readyz, /status.json
// and the ipcluster_ready metric all say not ready, for the same reason.
func TestReadyAgreesEverywhere(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 2})
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	fail := filepath.Join(t.TempDir(), "fail")
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: []uint16{8080}, Addr: lab.ServerAddr4.String(),
		HTTPAddr: addr.String()}, func(s *spec) { s.FailFile = fail })
	st := c.waitReady()
	checkReadyEverywhere(t, c, lab, addr, "")

	// From now on every worker exits at start.
	if err := os.WriteFile(fail, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(activePID(st, 0), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	c.waitStatus("slot 0 without a worker", func(st *proto.Status) bool { return activePID(st, 0) == 0 })
	checkReadyEverywhere(t, c, lab, addr, "slot 0 has no active worker")
}

// checkReadyEverywhere checks that every view of the cluster's readiness
// says ready (why is "") or not ready because of why.
func checkReadyEverywhere(t *testing.T, c *cluster, lab *netlab.Lab, addr netip.AddrPort, why string) {
	t.Helper()
	ready := why == ""
	st, err := c.status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Ready != ready || st.NotReady != why {
		t.Errorf("status: ready %v (%q), want %v (%q)", st.Ready, st.NotReady, ready, why)
	}
	var out, errb bytes.Buffer
	ctl.Main([]string{"-rundir", c.spec.Config.RunDir, "-name", c.spec.Config.Name, "status"}, &out, &errb)
	header, _, _ := strings.Cut(out.String(), "\n")
	want := "  ready"
	if !ready {
		want = "  not ready: " + why
	}
	if !strings.HasSuffix(header, want) {
		t.Errorf("ipclusterctl status header %q, want it to end with %q (stderr %q)", header, want, errb.String())
	}
	code, body := mustGet(t, lab, addr, "/readyz")
	if ready && code != 200 || !ready && (code != 503 || strings.TrimSpace(body) != "not ready: "+why) {
		t.Errorf("/readyz: %d %q, want ready %v (%q)", code, body, ready, why)
	}
	if code, body := mustGet(t, lab, addr, "/status.json"); code != 200 || strings.Contains(body, `"ready":true`) != ready {
		t.Errorf("/status.json: %d %s, want ready %v", code, body, ready)
	}
	v, ok := sum(scrape(t, lab, addr), "ipcluster_ready")
	if !ok || (v == 1) != ready {
		t.Errorf("ipcluster_ready = %g (%v), want ready %v", v, ok, ready)
	}
}
