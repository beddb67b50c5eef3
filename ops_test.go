//go:build linux

package ipcluster_test

// Operator papercuts: what a deploy logs, what ps shows, what uptime an
// adopted worker reports.

import (
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// alarmLine matches a log line at WARN or ERROR, from the library's text
// handler.
var alarmLine = regexp.MustCompile(`(?m)^.*level=(WARN|ERROR).*$`)

// A deploy that goes as planned (SIGHUP, a new version, canary, rolling,
// commit, old workers drained) needs no human: it logs no WARN or ERROR,
// from either master or any worker, with spares or without.
func TestNormalDeployLogsNoWarning(t *testing.T) {
	for _, spares := range []int{0, 1} {
		t.Run("spares="+itoa(spares), func(t *testing.T) { testNormalDeployLogs(t, spares) })
	}
}

func testNormalDeployLogs(t *testing.T, spares int) {
	d := startDeployLab(t, 4, func(s *spec) { s.Config.Spares = spares })
	st0, _ := d.c.status()
	oldPIDs := workerPIDs(st0)
	d.load()
	d.setVersion("v2")
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := d.c.wait(10 * time.Second); err != nil {
		t.Fatalf("old master after the handover: %v\n%s", err, d.c.log())
	}
	st := d.waitStatus("every slot on v2", func(st *proto.Status) bool {
		return servedBy(st, "v2", oldPIDs) && strings.HasPrefix(st.Deploy, "committed")
	})
	stopMasterByPID(t, st.MasterPID)
	d.finish()
	d.releaseHeld()
	if lines := alarmLine.FindAllString(d.c.log(), -1); len(lines) > 0 {
		t.Errorf("a normal deploy logged %d WARN/ERROR lines:\n%s", len(lines), strings.Join(lines, "\n"))
	}
}
