//go:build linux

package ipcluster

import (
	"bytes"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// fakeHistoryStatus is a status of four slots with n samples, a crash in
// slot 2 halfway and a deploy that has rolled two slots.
func fakeHistoryStatus(n int) *proto.Status {
	h := newHistory()
	t0 := time.Unix(1_700_000_000, 0)
	for i := range n {
		var ws []histWorker
		for s := range 4 {
			ws = append(ws, histWorker{pid: 100 + s, slot: s, conns: int64(1 + s + i%5), accepted: uint64(i * (s + 1)), ok: true})
		}
		h.sample(t0.Add(time.Duration(i)*time.Second), 4, ws)
		if i == n/2 {
			h.note(t0.Add(time.Duration(i)*time.Second), EventWorkerExited{PID: 102, Slot: 2, State: "active", Status: "signal: killed"})
		}
	}
	h.note(t0.Add(time.Duration(n-2)*time.Second), EventDeploy{Outcome: DeployStarted, From: "v1", To: "v2", Reason: "SIGHUP"})
	st := &proto.Status{Cluster: "t", Build: "v2", Deploy: "v1 → v2", DeployPhase: proto.PhaseStarted, History: h.view(time.Second)}
	for s := range 4 {
		st.Slots = append(st.Slots, proto.SlotStatus{Slot: s, Active: 100 + s})
		build := "v1"
		if s < 2 {
			build = "v2"
		}
		st.Workers = append(st.Workers, proto.WorkerStatus{PID: 100 + s, Slot: s, State: "active", Build: build, Stats: &proto.Stats{Connections: int64(s + 1)}})
	}
	return st
}

// TestStatusChartsRender: the page drawn on the server has, per slot, one
// band of the connections' stacked area and one line of the rate, each
// with a point per sample; a mark per event on both; the share bars; and
// the deploy's progress per slot.
func TestStatusChartsRender(t *testing.T) {
	const n = 40
	var b bytes.Buffer
	if err := statusTemplate.Execute(&b, newStatusView(fakeHistoryStatus(n))); err != nil {
		t.Fatal(err)
	}
	page := b.String()
	if dst := os.Getenv("IPCLUSTER_KEEP_STATUS_HTML"); dst != "" {
		_ = os.WriteFile(dst, b.Bytes(), 0o644)
	}
	for _, chart := range []string{"conns-chart", "rate-chart"} {
		series := chartSeries(t, page, chart)
		if len(series) != 4 {
			t.Fatalf("%s has %d series, want one per slot (4):\n%s", chart, len(series), page)
		}
		for slot, pts := range series {
			want := n
			if chart == "conns-chart" {
				want = 2 * n // a band: its top, then its bottom
			}
			if pts != want {
				t.Errorf("%s: slot %d's series has %d points, want %d", chart, slot, pts, want)
			}
		}
	}
	kinds := regexp.MustCompile(`<line class="mark" data-kind="(\w+)"`).FindAllStringSubmatch(page, -1)
	if len(kinds) != 4 || kinds[0][1] != "deploy" || kinds[1][1] != "crash" {
		t.Errorf("marks %v, want the deploy and the crash on each chart", kinds)
	}
	if c := strings.Count(page, `<tr class="event-row"`); c != 2 {
		t.Errorf("%d rows in the event timeline, want 2", c)
	}
	if c := strings.Count(page, `<rect class="share"`); c != 8 {
		t.Errorf("%d share segments, want 4 slots and 4 workers", c)
	}
	if !strings.Contains(page, `id="deploy-progress" data-done="2" data-total="4"`) || strings.Count(page, `data-state="new"`) != 2 {
		t.Errorf("deploy progress is not 2 of 4 slots:\n%s", page)
	}
}

// chartSeries returns, for the SVG element with id chart in page, each
// series' point count by slot.
func chartSeries(t *testing.T, page, chart string) map[int]int {
	t.Helper()
	m := regexp.MustCompile(`(?s)<svg id="` + chart + `"[^>]*>(.*?)</svg>`).FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no chart %s in the page:\n%s", chart, page)
	}
	out := map[int]int{}
	for _, s := range regexp.MustCompile(`class="series" data-slot="(\d+)" points="([^"]*)"`).FindAllStringSubmatch(m[1], -1) {
		var slot int
		for _, c := range s[1] {
			slot = slot*10 + int(c-'0')
		}
		out[slot] = len(strings.Fields(s[2]))
	}
	return out
}
