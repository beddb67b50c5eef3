//go:build linux

package ipcluster_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ipcluster/ipcluster/internal/ctl"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// ctlRun runs ipclusterctl against the lab's cluster.
func (d *deployLab) ctl(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = ctl.Main(append([]string{"-rundir", d.c.spec.Config.RunDir, "-name", d.c.spec.Config.Name, "-timeout", "60s"}, args...), &out, &errb)
	d.t.Logf("ipclusterctl %s → %d\n%s%s", strings.Join(args, " "), code, out.String(), errb.String())
	return code, out.String(), errb.String()
}

// ipclusterctl against a real master: every command, a deploy that commits
// and one that rolls back (exit status 6), and the error without a master
// (exit status 3).
func TestCtl(t *testing.T) {
	d := startDeployLab(t, 4, func(s *spec) { s.VersionScenarios = map[string]string{"v3": "exit"} })

	code, out, _ := d.ctl("status")
	if code != 0 || strings.Count(out, "ACTIVE") != 4 || !strings.Contains(out, "rules in force") || !strings.Contains(out, "build v1") {
		t.Fatalf("status: %d\n%s", code, out)
	}
	code, out, _ = d.ctl("status", "--json")
	var st proto.Status
	if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil || len(st.Slots) != 4 {
		t.Fatalf("status --json: %d %v", code, err)
	}

	// A drain: not ready, and the deploy below keeps it; undrain after.
	if code, out, _ = d.ctl("drain"); code != 0 || !strings.Contains(out, "drained") {
		t.Errorf("drain: %d", code)
	}
	if s, _ := d.c.status(); s.Ready || !s.Drained || !strings.Contains(s.NotReady, "drained") {
		t.Errorf("after drain: ready %v, drained %v, %q", s.Ready, s.Drained, s.NotReady)
	}
	if _, out, _ = d.ctl("status"); !strings.Contains(out, "drained: out of the front tier") {
		t.Errorf("status does not say drained:\n%s", out)
	}

	if code, out, _ = d.ctl("retire", "1"); code != 0 || !strings.Contains(out, "now served by") {
		t.Errorf("retire 1: %d", code)
	}
	if s, _ := d.c.status(); activePID(s, 1) == activePID(&st, 1) {
		t.Errorf("slot 1 still served by %d after retire", activePID(&st, 1))
	}
	if code, _, _ = d.ctl("resize", "8"); code != 0 {
		t.Errorf("resize 8: %d", code)
	}
	if code, _, _ = d.ctl("resize", "4"); code != 0 {
		t.Errorf("resize 4: %d", code)
	}
	if code, out, _ = d.ctl("restart"); code != 0 || !strings.Contains(out, "committed") {
		t.Errorf("restart: %d", code)
	}

	d.setVersion("v2")
	code, out, _ = d.ctl("deploy")
	if code != 0 || !strings.Contains(out, "took over") || !strings.Contains(out, "committed v2") {
		t.Fatalf("deploy v2: %d", code)
	}
	s, _ := d.c.status()
	stopMasterByPID(t, s.MasterPID)
	if s, _ := d.c.status(); !s.Drained || s.Ready {
		t.Errorf("the deploy's new master dropped the drain: ready %v, drained %v", s.Ready, s.Drained)
	}
	if code, _, _ = d.ctl("undrain"); code != 0 {
		t.Errorf("undrain: %d", code)
	}
	if s, _ := d.c.status(); !s.Ready || s.Drained {
		t.Errorf("after undrain: ready %v (%s), drained %v", s.Ready, s.NotReady, s.Drained)
	}

	d.setVersion("v3") // its workers exit at start
	code, _, errOut := d.ctl("deploy")
	if code != 6 || !strings.Contains(errOut, "rolled back") {
		t.Errorf("deploy v3: exit %d, want 6 with the rollback named", code)
	}
	s, _ = d.c.status()
	stopMasterByPID(t, s.MasterPID)

	if code, out, _ = d.ctl("kill-retired"); code != 0 || !strings.Contains(out, "killed") {
		t.Errorf("kill-retired: %d", code)
	}
	if code, out, _ = d.ctl("stop"); code != 0 || !strings.Contains(out, "stopped") {
		t.Errorf("stop: %d", code)
	}

	var errb bytes.Buffer
	if code := ctl.Main([]string{"-rundir", t.TempDir(), "status"}, &bytes.Buffer{}, &errb); code != 3 || !strings.Contains(errb.String(), "no cluster under") {
		t.Errorf("without a master: exit %d: %s", code, errb.String())
	}
}

// A deploy whose new master fails before taking over (its Config is bad):
// ipclusterctl exits 7 and prints the new master's own error, which the old
// master read from the file the new one left (deployReporter); the old
// master serves on.
func TestCtlDeployFailedPrintsNewMasterError(t *testing.T) {
	d := startDeployLab(t, 4, func(s *spec) { s.VersionWorkers = map[string]int{"bad": 3} })
	st0, _ := d.c.status()
	d.setVersion("bad")
	code, _, errOut := d.ctl("deploy")
	const want = "Config.Workers: 3 is not a power of two"
	if code != 7 || !strings.Contains(errOut, "deploy failed: new master pid") || !strings.Contains(errOut, want) || strings.Contains(errOut, "failed: failed") {
		t.Errorf("deploy of a bad Config: exit %d, want 7 and the new master's error %q:\n%s", code, want, errOut)
	}
	st, err := d.c.status()
	if err != nil || st.MasterPID != st0.MasterPID || !strings.Contains(st.Deploy, want) {
		t.Errorf("after the failed deploy: %+v, %v; want master %d serving on, its status naming the error", st, err, st0.MasterPID)
	}
	if _, err := os.Stat(filepath.Join(d.c.spec.Config.RunDir, d.c.spec.Config.Name, "deploy-error")); !os.IsNotExist(err) {
		t.Errorf("the new master's report is left in the run directory: %v", err)
	}
}
