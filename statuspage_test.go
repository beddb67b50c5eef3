//go:build linux

package ipcluster_test

import (
	"encoding/json"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// The status page's pictures in a browser, after a worker is killed (-9)
// and a deploy (SIGHUP) hands the cluster to a new master: the charts
// have one series per slot with a point per sample the master kept, the
// crash and the deploy are in the event timeline (the crash from before
// the handover, handed to the new master) and marked on the curves, the
// page showed each slot's progress while the deploy rolled, and a
// screenshot shows the slots' colours.
func TestStatusPageHistoryChromium(t *testing.T) {
	bin := findChromium(t)
	var addr netip.AddrPort
	d := startDeployLab(t, 4, func(s *spec) {
		addr = netip.AddrPortFrom(s.Config.Addr, httpPort)
		s.Config.HTTPAddr = addr.String()
		s.Config.MonitorInterval = 250 * time.Millisecond // 300 samples: 75s, the whole test
	})
	d.load()
	stopped := false
	defer func() {
		if !stopped {
			d.stop()
		}
	}()

	history := func() *proto.History {
		t.Helper()
		code, body := mustGet(t, d.lab, addr, "/status.json")
		var js proto.Status
		if err := json.Unmarshal([]byte(body), &js); code != 200 || err != nil || js.History == nil {
			t.Fatalf("/status.json: %d %v: no history", code, err)
		}
		return js.History
	}
	// waitSamples waits until the master has taken n more samples: the
	// curves then have points on both sides of an event.
	waitSamples := func(n int) {
		t.Helper()
		want := len(history().Samples) + n
		deadline := time.Now().Add(30 * time.Second)
		for len(history().Samples) < want {
			if time.Now().After(deadline) {
				t.Fatalf("the master took no %d samples in 30s", n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitSamples(4)

	// A crash: slot 1's worker killed.
	st0, _ := d.c.status()
	victim := activePID(st0, 1)
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitStatus("slot 1 served again after the crash", func(st *proto.Status) bool {
		return st.Slots[1].Active != 0 && st.Slots[1].Active != victim && st.Ready
	})

	waitSamples(4)

	// A deploy; while it rolls the page shows each slot's progress.
	old := workerPIDs(st0)
	d.setVersion("v2")
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	var progress string
	deadline := time.Now().Add(30 * time.Second)
	for progress == "" && time.Now().Before(deadline) {
		if code, body, err := get(d.lab, addr, "/status"); err == nil && code == 200 {
			progress = regexp.MustCompile(`id="deploy-progress" data-done="\d+" data-total="\d+"`).FindString(body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.HasSuffix(progress, `data-total="4"`) {
		t.Errorf("the page never showed the deploy's progress over 4 slots (%q)", progress)
	}
	if err := d.c.wait(10 * time.Second); err != nil {
		t.Fatalf("old master after the handover: %v\n%s", err, d.c.log())
	}
	st := d.waitStatus("every slot on v2", func(st *proto.Status) bool {
		return servedBy(st, "v2", old) && strings.HasPrefix(st.Deploy, "committed")
	})
	stopMasterByPID(t, st.MasterPID)
	waitSamples(4)
	res := d.stop()
	stopped = true
	t.Logf("load: %d attempts, %d failures", res.Attempts, res.Failures)

	before := history()
	url := "http://" + addr.String() + "/status"
	dom := string(runChromium(t, d.lab.Server, bin, url, "--virtual-time-budget=3000", "--dump-dom"))
	after := history()
	if dst := os.Getenv("IPCLUSTER_KEEP_STATUS_HTML"); dst != "" {
		_ = os.WriteFile(dst, []byte(dom), 0o644)
	}

	if m := regexp.MustCompile(`<span id="updated">([^<]*)</span>`).FindStringSubmatch(dom); m == nil || m[1] == "" {
		t.Errorf("the page's script did not refresh it (no time in #updated)")
	}
	if m := regexp.MustCompile(`<span id="error">([^<]*)</span>`).FindStringSubmatch(dom); m == nil || m[1] != "" {
		t.Errorf("the page's refresh failed (#error: %q)", m)
	}
	for _, chart := range []string{"conns-chart", "rate-chart"} {
		m := regexp.MustCompile(`(?s)<svg id="` + chart + `"[^>]*data-samples="(\d+)"[^>]*>(.*?)</svg>`).FindStringSubmatch(dom)
		if m == nil {
			t.Fatalf("no chart %s in the rendered page:\n%s", chart, dom)
		}
		n, _ := strconv.Atoi(m[1])
		if n < len(before.Samples) || n > len(after.Samples) || n < 12 {
			t.Errorf("%s draws %d samples, want the master's: %d to %d", chart, n, len(before.Samples), len(after.Samples))
		}
		series := regexp.MustCompile(`class="series" data-slot="(\d+)" points="([^"]*)"`).FindAllStringSubmatch(m[2], -1)
		if len(series) != 4 {
			t.Errorf("%s has %d series, want one per slot (4)", chart, len(series))
		}
		for _, s := range series {
			want := n
			if chart == "conns-chart" {
				want = 2 * n // a band of the stacked area: its top, then its bottom
			}
			if got := len(strings.Fields(s[2])); got != want {
				t.Errorf("%s: slot %s's series has %d points, want %d", chart, s[1], got, want)
			}
		}
		t.Logf("%s: %d series of %d samples", chart, len(series), n)
	}
	rows := regexp.MustCompile(`<tr class="event-row" data-kind="([\w-]+)">(.*?)</tr>`).FindAllStringSubmatch(dom, -1)
	var crash, deployStarted, deployCommitted bool
	for _, r := range rows {
		switch {
		case r[1] == "crash" && strings.Contains(r[2], "worker "+strconv.Itoa(victim)+" "):
			crash = true
		case r[1] == "deploy" && strings.Contains(r[2], "deploy started"):
			deployStarted = true
		case r[1] == "deploy" && strings.Contains(r[2], "deploy committed"):
			deployCommitted = true
		}
	}
	if !crash || !deployStarted || !deployCommitted {
		t.Errorf("event timeline (%d rows): crash of %d %v, deploy started %v, committed %v:\n%s", len(rows), victim, crash, deployStarted, deployCommitted, dom)
	}
	marks := map[string]int{}
	for _, m := range regexp.MustCompile(`<line class="mark" data-kind="([\w-]+)"`).FindAllStringSubmatch(dom, -1) {
		marks[m[1]]++
	}
	if marks["crash"] < 2 || marks["deploy"] < 4 {
		t.Errorf("marks on the charts %v, want the crash and both deploy phases on each", marks)
	}
	t.Logf("event timeline: %d rows; marks %v", len(rows), marks)

	shot, b, colors := screenshot(t, d.lab.Server, bin, url, 1200, 1400)
	// The slots' colours (statuschart.go's slotColors) as drawn in the
	// legend and the share bars.
	var missing []string
	for _, c := range []string{"#4263eb", "#f08c00", "#2f9e44", "#e64980"} {
		v, _ := strconv.ParseUint(c[1:], 16, 32)
		if !colors[[3]uint32{uint32(v >> 16), uint32(v >> 8 & 0xff), uint32(v & 0xff)}] {
			missing = append(missing, c)
		}
	}
	t.Logf("screenshot %s: %dx%d, %d colours", shot, b.Dx(), b.Dy(), len(colors))
	if len(colors) < 64 || len(missing) > 0 {
		t.Errorf("screenshot has %d colours, slots' colours %v missing: not the charts", len(colors), missing)
	}
}
