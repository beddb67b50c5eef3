//go:build linux

package ipcluster

// The status page's pictures, drawn on the server as inline SVG from the
// snapshot's history (history.go): per slot, the open connections as a
// stacked area and the new connections per second as lines, the events as
// marks across both, the share of clients per slot and per worker as
// stacked bars, and each slot's progress while a deploy runs. Drawn here
// rather than by a script so the page shows them without JavaScript, with
// nothing to download (no chart library, no CDN), and from the same
// template escaping as the tables; the page's script swaps in a fresh copy
// every refresh.

import (
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

const (
	chartW, chartH = 760, 130 // a plot's size in SVG units
	chartPadL      = 48       // room for the axis labels
	chartPadT      = 8
	shareW         = 760
)

// slotColors: one per slot, repeating after ten.
var slotColors = []string{"#4263eb", "#f08c00", "#2f9e44", "#e64980", "#1098ad", "#7048e8", "#d9480f", "#66a80f", "#ae3ec9", "#495057"}

func slotColor(slot int) string {
	return slotColors[((slot%len(slotColors))+len(slotColors))%len(slotColors)]
}

// eventColors by HistoryEvent.Kind.
var eventColors = map[string]string{
	"crash": "#c92a2a", "exit": "#868e96", "retire": "#e8590c", "deploy": "#5f3dc4",
	"resize": "#0c8599", "unresponsive": "#a61e4d", "rules": "#adb5bd", "rules-failed": "#c92a2a",
}

func eventColor(kind string) string {
	if c, ok := eventColors[kind]; ok {
		return c
	}
	return "#495057"
}

type chartsView struct {
	W, H, PlotH, PadL, PlotW int
	Top, Bottom, ShareW      int
	Samples                  int    // samples drawn: each series has this many points
	Span                     string // the time the samples cover
	From, To                 string
	MaxConns                 int64
	MaxRate                  string
	Conns, Rates             []seriesView
	Marks                    []markView
	Legend                   []legendView
	SlotShare, WorkerShare   []shareView
	ShareOf                  string // what the shares count
	Deploy                   *deployView
	Timeline                 []timelineView
}

type seriesView struct {
	Slot          int
	Color, Points string
}

type markView struct {
	X                 float64
	Width             int
	Kind, Color, Text string
}

type legendView struct {
	Slot  int
	Color string
}

type shareView struct {
	Label, Color, Title string
	X, W                float64
	Pct                 int
}

type deployView struct {
	Phase, Text string
	Done, Total int
	Slots       []deploySlotView
}

type deploySlotView struct {
	Slot       int
	State      string // "new", "old" or "none"
	Color      string
	X          float64
	W          float64
	PID        int
	Build      string
	Generation int
}

type timelineView struct {
	Time, Kind, Color, Text string
	Slot                    int
}

// newChartsView draws st's history.
func newChartsView(st *proto.Status) *chartsView {
	v := &chartsView{W: chartW + chartPadL + 8, PlotH: chartH, PadL: chartPadL, PlotW: chartW}
	v.H = chartH + chartPadT + 18
	v.Top, v.Bottom, v.ShareW = chartPadT, chartPadT+chartH, shareW
	h := st.History
	if h == nil {
		h = &proto.History{}
	}
	slots := len(st.Slots)
	for i := range slots {
		v.Legend = append(v.Legend, legendView{Slot: i, Color: slotColor(i)})
	}
	v.Samples = len(h.Samples)
	var t0, t1 float64
	if v.Samples > 0 {
		t0, t1 = h.Samples[0].At, h.Samples[v.Samples-1].At
		v.From, v.To = clock(t0), clock(t1)
		v.Span = fmtSeconds(t1 - t0)
	}
	x := func(t float64) float64 {
		if t1 <= t0 {
			return float64(chartPadL + chartW)
		}
		return float64(chartPadL) + (t-t0)/(t1-t0)*chartW
	}
	y := func(val, top float64) float64 {
		if top <= 0 {
			return chartPadT + chartH
		}
		return chartPadT + chartH - val/top*chartH
	}
	conn := func(s proto.HistorySample, i int) float64 {
		if i < len(s.Conns) {
			return float64(s.Conns[i])
		}
		return 0
	}
	rate := func(s proto.HistorySample, i int) float64 {
		if i < len(s.NewPerSec) {
			return s.NewPerSec[i]
		}
		return 0
	}
	var maxRate float64
	for _, s := range h.Samples {
		var sum int64
		for i := range slots {
			sum += int64(conn(s, i))
			maxRate = math.Max(maxRate, rate(s, i))
		}
		v.MaxConns = max(v.MaxConns, sum)
	}
	topConns := float64(max(v.MaxConns, 1))
	topRate := niceCeil(maxRate)
	v.MaxRate = strconv.FormatFloat(topRate, 'f', -1, 64)
	if v.Samples > 0 {
		// The stacked area: slot i's band lies on the sum of slots 0..i-1.
		below := make([]float64, v.Samples)
		for i := range slots {
			var up, down strings.Builder
			for j, s := range h.Samples {
				top := below[j] + conn(s, i)
				pt(&up, x(s.At), y(top, topConns))
				below[j] = top
			}
			for j := v.Samples - 1; j >= 0; j-- {
				pt(&down, x(h.Samples[j].At), y(below[j]-conn(h.Samples[j], i), topConns))
			}
			v.Conns = append(v.Conns, seriesView{Slot: i, Color: slotColor(i), Points: up.String() + down.String()})
			var line strings.Builder
			for _, s := range h.Samples {
				pt(&line, x(s.At), y(rate(s, i), topRate))
			}
			v.Rates = append(v.Rates, seriesView{Slot: i, Color: slotColor(i), Points: strings.TrimSpace(line.String())})
		}
	}
	for i := len(h.Events) - 1; i >= 0; i-- {
		e := h.Events[i]
		v.Timeline = append(v.Timeline, timelineView{Time: clock(e.At), Kind: e.Kind, Color: eventColor(e.Kind), Text: e.Text, Slot: e.Slot})
		if v.Samples > 0 && e.At >= t0 && e.At <= t1+h.IntervalSec {
			mk := markView{X: math.Min(x(e.At), chartPadL+chartW), Kind: e.Kind, Color: eventColor(e.Kind), Text: clock(e.At) + " " + e.Text, Width: 2}
			if e.Kind == "rules" { // frequent and routine: a hairline
				mk.Width = 1
			}
			v.Marks = append(v.Marks, mk)
		}
	}
	v.shares(st, h)
	v.deploy(st)
	return v
}

// shares are of the open connections, or, with none open (short requests),
// of the connections accepted over the history's span.
func (v *chartsView) shares(st *proto.Status, h *proto.History) {
	slots := make([]float64, len(st.Slots))
	type wshare struct {
		pid, slot int
		n         float64
	}
	var workers []wshare
	var total float64
	for _, w := range st.Workers {
		if w.Stats == nil {
			continue
		}
		n := float64(w.Stats.Connections)
		total += n
		workers = append(workers, wshare{w.PID, w.Slot, n})
		if w.Slot >= 0 && w.Slot < len(slots) {
			slots[w.Slot] += n
		}
	}
	v.ShareOf = "open connections"
	if total == 0 {
		// Per worker, the rate is not kept: only the slots' shares.
		workers = nil
		for _, s := range h.Samples {
			for i := range min(len(slots), len(s.NewPerSec)) {
				n := s.NewPerSec[i] * h.IntervalSec
				slots[i] += n
				total += n
			}
		}
		v.ShareOf = "connections accepted in the last " + v.Span
	}
	if total == 0 {
		v.ShareOf = "no connections yet"
		return
	}
	var at float64
	for i, n := range slots {
		w := n / total * shareW
		v.SlotShare = append(v.SlotShare, shareView{Label: "slot " + strconv.Itoa(i), Color: slotColor(i), X: at, W: w, Pct: int(math.Round(n / total * 100)),
			Title: "slot " + strconv.Itoa(i) + ": " + strconv.FormatFloat(n, 'f', 0, 64)})
		at += w
	}
	at = 0
	for _, ws := range workers {
		w := ws.n / total * shareW
		label := "pid " + strconv.Itoa(ws.pid)
		v.WorkerShare = append(v.WorkerShare, shareView{Label: label, Color: slotColor(ws.slot), X: at, W: w, Pct: int(math.Round(ws.n / total * 100)),
			Title: label + " (slot " + strconv.Itoa(ws.slot) + "): " + strconv.FormatFloat(ws.n, 'f', 0, 64)})
		at += w
	}
}

// deploy shows, while a deploy rolls, which slots' active workers run the
// build being deployed (the master's).
func (v *chartsView) deploy(st *proto.Status) {
	if st.DeployPhase != proto.PhaseStarted {
		return
	}
	d := &deployView{Phase: st.DeployPhase, Text: st.Deploy, Total: len(st.Slots)}
	byPID := map[int]*proto.WorkerStatus{}
	for i := range st.Workers {
		byPID[st.Workers[i].PID] = &st.Workers[i]
	}
	w := float64(shareW) / float64(max(d.Total, 1))
	for _, s := range st.Slots {
		ds := deploySlotView{Slot: s.Slot, State: "none", Color: "#ced4da", X: float64(s.Slot) * w, W: w - 2, PID: s.Active}
		if ws := byPID[s.Active]; ws != nil {
			ds.Build, ds.Generation = ws.Build, ws.Generation
			ds.State, ds.Color = "old", "#868e96"
			if ws.Build == st.Build {
				ds.State, ds.Color = "new", "#2f9e44"
				d.Done++
			}
		}
		d.Slots = append(d.Slots, ds)
	}
	v.Deploy = d
}

func pt(b *strings.Builder, x, y float64) {
	b.WriteString(strconv.FormatFloat(x, 'f', 1, 64))
	b.WriteByte(',')
	b.WriteString(strconv.FormatFloat(y, 'f', 1, 64))
	b.WriteByte(' ')
}

// niceCeil rounds up to 1, 2 or 5 times a power of ten, for an axis.
func niceCeil(x float64) float64 {
	if x <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= x {
			return m * p
		}
	}
	return 10 * p
}

func clock(sec float64) string {
	return time.Unix(0, int64(sec*1e9)).Format("15:04:05")
}
