//go:build linux

package ipcluster

// The master's HTTP endpoints (Config.HTTPAddr): Prometheus metrics,
// probes and a status page.
//
// The loop owns every field of master, so handlers never read them: they
// ask the loop for a status snapshot (evSnapshot, the same status a control
// client gets) and give up after snapshotTimeout. A loop that does not
// answer is exactly what /healthz must report. The metrics themselves are
// in metrics.go, and the status page's markup and script in status.html.

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ipcluster/ipcluster/internal/proto"
)

const (
	// snapshotTimeout bounds a handler's wait for the loop. A loop busy
	// for this long (a rule write stuck in the kernel, a deadlock) is
	// unhealthy, and a scrape must not pile up behind it.
	snapshotTimeout = 2 * time.Second
	// httpShutdownTimeout bounds the wait for requests in flight when run
	// returns. The listener closes first, at once, so a new master can
	// bind the address after a handover.
	httpShutdownTimeout = time.Second
	// httpTakeoverWait is how long a master that took the cluster over
	// retries to bind HTTPAddr: the old master closes it as its loop
	// returns, just after the handover.
	httpTakeoverWait = 5 * time.Second
)

// evSnapshot asks the loop for its status; reply has room for the answer,
// so the loop never waits for a handler that gave up.
type evSnapshot struct{ reply chan *proto.Status }

// errLoopGone: the loop returned (stopped, or handed the cluster over).
var errLoopGone = errors.New("the master's loop has returned")

// snapshot asks the loop for its status, from any goroutine.
func (m *master) snapshot(ctx context.Context) (*proto.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
	defer cancel()
	reply := make(chan *proto.Status, 1)
	select {
	case m.events <- evSnapshot{reply}:
	case <-m.done:
		return nil, errLoopGone
	case <-ctx.Done():
		return nil, fmt.Errorf("ask the master's loop for its status: %w", ctx.Err())
	}
	select {
	case st := <-reply:
		return st, nil
	case <-m.done:
		return nil, errLoopGone
	case <-ctx.Done():
		return nil, fmt.Errorf("wait for the master's loop to answer: %w", ctx.Err())
	}
}

// observer is the master's HTTP server and metrics. Its methods are safe
// on a nil observer (no HTTPAddr), so the loop calls them unconditionally.
type observer struct {
	log *slog.Logger
	ln  net.Listener
	srv *http.Server
	reg *prometheus.Registry

	spawns, crashes, unresponsive, rulesLost prometheus.Counter
	exits, retirements, retireHolds          *prometheus.CounterVec
	deploys, ruleWrites, dismissals          *prometheus.CounterVec
	memoryPressure, workerScrapeErrors       *prometheus.CounterVec
	handoffs                                 *prometheus.CounterVec
	autoscales                               *prometheus.CounterVec // by outcome: grow, shrink, refused
	backend                                  *prometheus.GaugeVec
	ruleWriteSeconds, readySeconds           prometheus.Histogram
	retireSeconds                            prometheus.Histogram
}

// listenHTTP binds cfg.HTTPAddr, if set, and prepares the metrics. It is
// called once the run directory is ours and before any worker is spawned:
// on error the caller undoes openRunDir and Run fails with nothing left
// behind. After a takeover the old master may still hold the address for
// a moment, so EADDRINUSE is retried then.
func listenHTTP(cfg *Config, log *slog.Logger, tookOver bool) (*observer, error) {
	if cfg.HTTPAddr == "" {
		return nil, nil
	}
	deadline := time.Now().Add(httpTakeoverWait)
	var ln net.Listener
	for {
		var err error
		ln, err = net.Listen("tcp", cfg.HTTPAddr)
		if err == nil {
			break
		}
		if !tookOver || !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return nil, fmt.Errorf("listen on Config.HTTPAddr %s for the metrics and health endpoints: %w; "+
				"pick a free address, or leave HTTPAddr empty", cfg.HTTPAddr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	o := newObserver(log)
	o.ln = ln
	return o, nil
}

// serve starts answering on the listener; the returned function shuts
// the server down. Call that after m.done is closed, so handlers waiting
// for the loop give up at once instead of after snapshotTimeout.
func (o *observer) serve(m *master) (shutdown func()) {
	if o == nil {
		return func() {}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) { o.metrics(m, w, r) })
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { healthz(m, w, r) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) { readyz(m, w, r) })
	mux.HandleFunc("GET /status.json", func(w http.ResponseWriter, r *http.Request) { statusJSON(m, w, r) })
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) { statusPage(m, w, r) })
	mux.Handle("GET /{$}", http.RedirectHandler("status", http.StatusFound))
	// The workers' operator endpoints (ops_http.go).
	mux.HandleFunc("GET /workers/{$}", func(w http.ResponseWriter, r *http.Request) { workersIndex(m, w, r) })
	mux.HandleFunc("/workers/{slot}/{path...}", func(w http.ResponseWriter, r *http.Request) { proxyWorker(m, w, r, false) })
	mux.HandleFunc("/workers/pid/{pid}/{path...}", func(w http.ResponseWriter, r *http.Request) { proxyWorker(m, w, r, true) })
	o.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(o.log.Handler(), slog.LevelWarn),
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		if err := o.srv.Serve(o.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			o.log.Error("HTTP endpoints stopped", "addr", o.ln.Addr().String(), "err", err)
		}
	}()
	o.log.Info("serving metrics and health endpoints", "addr", "http://"+o.ln.Addr().String())
	return func() {
		// Shutdown closes the listener before it waits for requests in
		// flight: the address is free for a new master from here on.
		ctx, cancel := context.WithTimeout(context.Background(), httpShutdownTimeout)
		defer cancel()
		if err := o.srv.Shutdown(ctx); err != nil {
			o.srv.Close()
		}
		<-served
	}
}

// unavailable answers 503 with a one-line reason, for probes and people.
func unavailable(w http.ResponseWriter, reason string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusServiceUnavailable)
	fmt.Fprintln(w, reason)
}

// snapshotOr503 asks the loop for a handler's status snapshot. When the
// loop does not answer, it answers 503 itself, what and then why ("not
// ready: ..."), and returns nil: the handler just returns.
func snapshotOr503(m *master, w http.ResponseWriter, r *http.Request, what string) *proto.Status {
	st, err := m.snapshot(r.Context())
	if err != nil {
		unavailable(w, what+": "+err.Error())
		return nil
	}
	return st
}

func plainOK(w http.ResponseWriter, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	fmt.Fprintln(w, body)
}

// healthz: the master's loop answers. A stopping master is still healthy;
// /readyz is what turns traffic away.
func healthz(m *master, w http.ResponseWriter, r *http.Request) {
	if snapshotOr503(m, w, r, "unhealthy") == nil {
		return
	}
	plainOK(w, "ok")
}

// readyz: the master's own notion of ready (master.notReady, carried by
// the status): every slot is served and the rules are installed, so a
// balancer may send this host clients. Stopping is not ready: that is how
// a draining host tells its balancer.
func readyz(m *master, w http.ResponseWriter, r *http.Request) {
	st := snapshotOr503(m, w, r, "not ready")
	if st == nil {
		return
	}
	if !st.Ready {
		unavailable(w, "not ready: "+st.NotReady)
		return
	}
	plainOK(w, "ready")
}

func statusJSON(m *master, w http.ResponseWriter, r *http.Request) {
	st := snapshotOr503(m, w, r, "no status")
	if st == nil {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if err := json.NewEncoder(w).Encode(st); err != nil {
		m.log.Debug("writing /status.json", "err", err)
	}
}

// metrics serves the registry's metrics together with those of a snapshot
// taken for this scrape (gauges are read at scrape time, so a worker's
// series disappear with the worker instead of lingering in a GaugeVec),
// and every active worker's own /metrics, fetched now (ops_http.go).
func (o *observer) metrics(m *master, w http.ResponseWriter, r *http.Request) {
	st := snapshotOr503(m, w, r, "no metrics")
	if st == nil {
		return
	}
	// First: a worker that fails counts in this scrape's errors.
	workers := o.workerMetrics(r.Context(), st)
	snap := prometheus.NewRegistry()
	if err := snap.Register(statusCollector{st}); err != nil {
		http.Error(w, "register status metrics: "+err.Error(), http.StatusInternalServerError)
		return
	}
	snap.MustRegister(appStatCollector{st})
	own, err := prometheus.Gatherers{o.reg, snap}.Gather()
	if err != nil {
		http.Error(w, "gather the master's metrics: "+err.Error(), http.StatusInternalServerError)
		return
	}
	// The workers' families merge with the master's of the same name;
	// what still clashes (a family name that is a histogram's suffix of
	// another, say) is left out and logged, never the whole scrape.
	all, err := prometheus.Gatherers{staticGatherer(own), staticGatherer(fitToMaster(own, workers))}.Gather()
	if err != nil {
		o.log.Debug("workers' metrics left out of the scrape", "err", err)
	}
	promhttp.HandlerFor(staticGatherer(all), promhttp.HandlerOpts{
		ErrorLog:      slog.NewLogLogger(o.log.Handler(), slog.LevelWarn),
		ErrorHandling: promhttp.HTTPErrorOnError,
	}).ServeHTTP(w, r)
}

// ---- the status page ----

// statusPage renders the slot and worker tables on the server, so the page
// works without JavaScript; its script then redraws them from /status.json
// every 2s with the same markup (textContent only: names and builds come
// from the host program and the workers).
func statusPage(m *master, w http.ResponseWriter, r *http.Request) {
	st := snapshotOr503(m, w, r, "no status")
	if st == nil {
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if err := statusTemplate.Execute(w, newStatusView(st)); err != nil {
		m.log.Debug("writing /status", "err", err)
	}
}

type statusView struct {
	St        *proto.Status
	State     string // ready, starting, stopping
	Slots     []slotView
	Workers   []workerView
	Rules     []rulesView
	TotalConn int64
	Charts    *chartsView // statuschart.go
}

type slotView struct {
	Slot, PID, Generation int
	Build, State          string
	Uptime, RSS, Lag      string
	Connections, BarPct   int64
	HasWorker             bool
}

type workerView struct {
	PID, Slot, Generation int
	Build, State          string
	Uptime, RSS, Lag, Age string
	Connections, BarPct   int64
	Unresponsive          bool
}

type rulesView struct{ Family, Text string }

func newStatusView(st *proto.Status) *statusView {
	v := &statusView{St: st, State: "starting", Charts: newChartsView(st)}
	switch {
	case st.Stopping:
		v.State = "stopping"
	case st.Ready:
		v.State = "ready"
	}
	byPID := map[int]*proto.WorkerStatus{}
	slotConns := make([]int64, len(st.Slots))
	for i := range st.Workers {
		ws := &st.Workers[i]
		byPID[ws.PID] = ws
		if ws.Stats != nil {
			v.TotalConn += ws.Stats.Connections
			if ws.Slot >= 0 && ws.Slot < len(slotConns) {
				slotConns[ws.Slot] += ws.Stats.Connections
			}
		}
	}
	pct := func(n int64) int64 {
		if v.TotalConn == 0 {
			return 0
		}
		return n * 100 / v.TotalConn
	}
	for _, s := range st.Slots {
		sv := slotView{Slot: s.Slot, PID: s.Active, Connections: slotConns[s.Slot], BarPct: pct(slotConns[s.Slot]), State: "no worker"}
		if ws := byPID[s.Active]; ws != nil {
			sv.HasWorker = true
			sv.Generation, sv.Build, sv.State = ws.Generation, ws.Build, ws.State
			sv.Uptime, sv.RSS, sv.Lag = fmtSeconds(ws.UptimeSec), fmtBytes(ws.RSSBytes), "-"
			if ws.Stats != nil {
				sv.Lag = fmtSeconds(ws.Stats.LagSec)
			}
		}
		v.Slots = append(v.Slots, sv)
	}
	for _, ws := range st.Workers {
		wv := workerView{PID: ws.PID, Slot: ws.Slot, Generation: ws.Generation, Build: ws.Build, State: ws.State,
			Uptime: fmtSeconds(ws.UptimeSec), RSS: fmtBytes(ws.RSSBytes), Lag: "-", Age: "-", Unresponsive: ws.Unresponsive}
		if s := ws.Stats; s != nil {
			wv.Lag, wv.Age = fmtSeconds(s.LagSec), fmtSeconds(ws.HeartbeatAgeSec)
			wv.Connections, wv.BarPct = s.Connections, pct(s.Connections)
		}
		v.Workers = append(v.Workers, wv)
	}
	for _, fam := range slices.Sorted(maps.Keys(st.Rules)) {
		v.Rules = append(v.Rules, rulesView{Family: fam, Text: st.Rules[fam]})
	}
	return v
}

// fmtSeconds and fmtBytes match fmtSec and fmtBytes in the page's script.
func fmtSeconds(s float64) string {
	switch {
	case s < 0.001:
		return strconv.FormatFloat(s*1e6, 'f', 0, 64) + "µs"
	case s < 1:
		return strconv.FormatFloat(s*1e3, 'f', 1, 64) + "ms"
	case s < 120:
		return strconv.FormatFloat(s, 'f', 1, 64) + "s"
	case s < 7200:
		return strconv.FormatFloat(s/60, 'f', 1, 64) + "m"
	default:
		return strconv.FormatFloat(s/3600, 'f', 1, 64) + "h"
	}
}

func fmtBytes(b uint64) string {
	switch {
	case b == 0:
		return "-"
	case b < 1<<20:
		return strconv.FormatFloat(float64(b)/(1<<10), 'f', 0, 64) + " KiB"
	case b < 1<<30:
		return strconv.FormatFloat(float64(b)/(1<<20), 'f', 1, 64) + " MiB"
	default:
		return strconv.FormatFloat(float64(b)/(1<<30), 'f', 2, 64) + " GiB"
	}
}

var statusTemplate = template.Must(template.New("status").Funcs(template.FuncMap{
	"short": func(build string) string {
		if len(build) > 16 {
			return build[:16] + "…"
		}
		return build
	},
}).Parse(statusHTML))

// statusHTML is the page's template: markup, style and the script that
// redraws it.
//
//go:embed status.html
var statusHTML string
