//go:build linux

package ipcluster

// The workers' operator endpoints on the master's Config.HTTPAddr:
// /workers/ (an index), /workers/<slot>/... and /workers/pid/<pid>/...
// proxied to a worker's operator socket (ops.go, worker_ops.go), and the
// workers' own /metrics folded into the master's (workerMetrics).
//
// Handlers find a worker's socket in a status snapshot, like every other
// handler (http.go), and dial it themselves, never from the loop: a worker
// that is stopped (SIGSTOP) or stuck holds up one request, for at most its
// timeout, and nothing else.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"google.golang.org/protobuf/proto"

	"github.com/prometheus/client_golang/prometheus"

	ipcproto "github.com/ipcluster/ipcluster/internal/proto"
)

const (
	// workerHeaderTimeout bounds the wait for a worker's answer to start
	// (a profile or trace: its seconds more), workerBodyTimeout the whole
	// answer after that.
	workerHeaderTimeout = 10 * time.Second
	workerBodyTimeout   = 60 * time.Second
	// workerScrapeTimeout bounds the fetch of one worker's /metrics for a
	// scrape of the master's; they are fetched at once.
	workerScrapeTimeout = 2 * time.Second
	// maxWorkerMetrics bounds what the master reads of one worker's
	// /metrics.
	maxWorkerMetrics = 16 << 20
)

// dialOperator connects to a worker's operator socket.
func dialOperator(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return d.DialContext(ctx, "unix", path)
}

// operatorTransport is an HTTP transport to one worker's operator socket.
func operatorTransport(path string, headerTimeout time.Duration) *http.Transport {
	return &http.Transport{
		DialContext:           func(ctx context.Context, _, _ string) (net.Conn, error) { return dialOperator(ctx, path) },
		DisableKeepAlives:     true, // one request per connection: nothing idles towards a worker that may exit
		ResponseHeaderTimeout: headerTimeout,
		DisableCompression:    true,
	}
}

// operatorTimeout is how long a request to a worker's operator endpoint
// may wait for its answer to start: a CPU profile or trace takes its
// seconds first.
func operatorTimeout(path string, q func(string) string) time.Duration {
	if strings.HasSuffix(path, "/debug/pprof/profile") || strings.HasSuffix(path, "/debug/pprof/trace") {
		secs := opsDefaultSeconds
		if n, err := strconv.Atoi(q("seconds")); err == nil && n >= 1 && n <= opsMaxSeconds {
			secs = n
		}
		return time.Duration(secs)*time.Second + workerHeaderTimeout
	}
	return workerHeaderTimeout
}

// workerIndexEntry is one worker in /workers/.
type workerIndexEntry struct {
	PID            int    `json:"pid"`
	Slot           int    `json:"slot"`
	State          string `json:"state"`
	Generation     int    `json:"generation"`
	Active         bool   `json:"active"`
	OperatorSocket string `json:"operator_socket,omitempty"`
	URL            string `json:"url,omitempty"`
}

func workerIndex(st *ipcproto.Status) []workerIndexEntry {
	active := map[int]bool{}
	for _, s := range st.Slots {
		active[s.Active] = s.Active != 0
	}
	out := []workerIndexEntry{}
	for _, ws := range st.Workers {
		e := workerIndexEntry{PID: ws.PID, Slot: ws.Slot, State: ws.State, Generation: ws.Generation, Active: active[ws.PID], OperatorSocket: ws.OperatorSocket}
		if ws.OperatorSocket != "" {
			e.URL = "/workers/pid/" + strconv.Itoa(ws.PID) + "/"
		}
		out = append(out, e)
	}
	return out
}

func workersIndex(m *master, w http.ResponseWriter, r *http.Request) {
	st := snapshotOr503(m, w, r, "no workers")
	if st == nil {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(workerIndex(st))
}

// knownWorkers names what /workers/ can reach, for a 404.
func knownWorkers(st *ipcproto.Status) string {
	var b strings.Builder
	fmt.Fprintf(&b, "slots 0..%d; workers:", len(st.Slots)-1)
	for _, e := range workerIndex(st) {
		fmt.Fprintf(&b, " pid %d (slot %d, %s)", e.PID, e.Slot, e.State)
	}
	b.WriteString("; see /workers/")
	return b.String()
}

// proxyWorker answers /workers/<slot>/... and /workers/pid/<pid>/...
// from the worker's operator socket, the prefix stripped.
func proxyWorker(m *master, w http.ResponseWriter, r *http.Request, byPID bool) {
	st := snapshotOr503(m, w, r, "no workers")
	if st == nil {
		return
	}
	var ws *ipcproto.WorkerStatus
	if byPID {
		pid, err := strconv.Atoi(r.PathValue("pid"))
		if i := slices.IndexFunc(st.Workers, func(x ipcproto.WorkerStatus) bool { return x.PID == pid }); err == nil && i >= 0 {
			ws = &st.Workers[i]
		} else {
			http.Error(w, fmt.Sprintf("404: no worker with pid %q; %s", r.PathValue("pid"), knownWorkers(st)), http.StatusNotFound)
			return
		}
	} else {
		slot, err := strconv.Atoi(r.PathValue("slot"))
		if err != nil || slot < 0 || slot >= len(st.Slots) || st.Slots[slot].Active == 0 {
			http.Error(w, fmt.Sprintf("404: no active worker in slot %q (a slot number, or pid/<pid> for any worker); %s", r.PathValue("slot"), knownWorkers(st)), http.StatusNotFound)
			return
		}
		i := slices.IndexFunc(st.Workers, func(x ipcproto.WorkerStatus) bool { return x.PID == st.Slots[slot].Active })
		if i < 0 {
			http.Error(w, "404: slot "+strconv.Itoa(slot)+"'s worker is gone; "+knownWorkers(st), http.StatusNotFound)
			return
		}
		ws = &st.Workers[i]
	}
	if ws.OperatorSocket == "" {
		http.Error(w, fmt.Sprintf("404: worker pid %d has no operator socket (spawned by a master of an earlier release, or its socket could not be made: see the master's log)", ws.PID), http.StatusNotFound)
		return
	}
	path := "/" + r.PathValue("path")
	headerTimeout := operatorTimeout(path, r.URL.Query().Get)
	deadline := time.Now().Add(headerTimeout + workerBodyTimeout)
	// The master's own WriteTimeout is shorter than a long profile.
	_ = http.NewResponseController(w).SetWriteDeadline(deadline.Add(time.Second))
	ctx, cancel := context.WithDeadline(r.Context(), deadline)
	defer cancel()
	who := fmt.Sprintf("worker pid %d (slot %d, %s)", ws.PID, ws.Slot, ws.State)
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host, pr.Out.Host = "http", "worker", "worker"
			pr.Out.URL.Path, pr.Out.URL.RawPath = path, ""
		},
		// A worker's redirect (to /debug/pprof/, say) stays under its
		// prefix here.
		ModifyResponse: func(resp *http.Response) error {
			if loc := resp.Header.Get("Location"); strings.HasPrefix(loc, "/") && !strings.HasPrefix(loc, "//") {
				resp.Header.Set("Location", strings.TrimSuffix(r.URL.Path, path)+loc)
			}
			return nil
		},
		Transport: operatorTransport(ws.OperatorSocket, headerTimeout),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			code := http.StatusBadGateway
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, context.DeadlineExceeded) {
				code = http.StatusGatewayTimeout
			}
			http.Error(w, fmt.Sprintf("%d: %s at %s did not answer %s: %v", code, who, ws.OperatorSocket, path, err), code)
		},
	}
	rp.ServeHTTP(w, r.WithContext(ctx))
}

// ---- the workers' metrics in the master's /metrics ----

// fetchWorkerMetrics gets one worker's /metrics, text or protobuf.
func fetchWorkerMetrics(ctx context.Context, sock string) ([]*dto.MetricFamily, error) {
	ctx, cancel := context.WithTimeout(ctx, workerScrapeTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://worker/metrics", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", string(expfmt.NewFormat(expfmt.TypeProtoDelim))+";q=0.7,"+string(expfmt.NewFormat(expfmt.TypeTextPlain))+";q=0.3")
	resp, err := (&http.Client{Transport: operatorTransport(sock, workerScrapeTimeout)}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		return nil, nil // no operator handler, or no /metrics in it: nothing to add, and no error
	default:
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	dec := expfmt.NewDecoder(io.LimitReader(resp.Body, maxWorkerMetrics), expfmt.ResponseFormat(resp.Header))
	var fams []*dto.MetricFamily
	for {
		mf := &dto.MetricFamily{}
		if err := dec.Decode(mf); err != nil {
			if errors.Is(err, io.EOF) {
				return fams, nil
			}
			return nil, fmt.Errorf("parse /metrics: %w", err)
		}
		fams = append(fams, mf)
	}
}

// workerMetrics fetches every serving worker's /metrics at once and
// returns their families with each sample labelled slot and pid (an
// application label of either name is kept as exported_slot or
// exported_pid, as Prometheus does with honor_labels false). A worker
// that fails or times out adds nothing and counts in
// ipcluster_worker_scrape_errors_total; one that serves no /metrics (404)
// adds nothing either.
func (o *observer) workerMetrics(ctx context.Context, st *ipcproto.Status) []*dto.MetricFamily {
	type result struct {
		slot, pid int
		fams      []*dto.MetricFamily
	}
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		results []result
	)
	for _, s := range st.Slots {
		i := slices.IndexFunc(st.Workers, func(x ipcproto.WorkerStatus) bool { return x.PID == s.Active })
		if s.Active == 0 || i < 0 || st.Workers[i].OperatorSocket == "" {
			continue
		}
		ws := st.Workers[i]
		wg.Add(1)
		go func() {
			defer wg.Done()
			fams, err := fetchWorkerMetrics(ctx, ws.OperatorSocket)
			if err != nil {
				o.workerScrapeErrors.WithLabelValues(strconv.Itoa(s.Slot)).Inc()
				o.log.Debug("scrape worker metrics", "slot", s.Slot, "pid", ws.PID, "err", err)
				return
			}
			mu.Lock()
			results = append(results, result{s.Slot, ws.PID, fams})
			mu.Unlock()
		}()
	}
	wg.Wait()
	slices.SortFunc(results, func(a, b result) int { return a.slot - b.slot })
	byName := map[string]*dto.MetricFamily{}
	for _, res := range results {
		slot, pid := strconv.Itoa(res.slot), strconv.Itoa(res.pid)
		for _, mf := range res.fams {
			into := byName[mf.GetName()]
			if into == nil {
				into = &dto.MetricFamily{Name: mf.Name, Help: mf.Help, Type: mf.Type, Unit: mf.Unit}
				byName[mf.GetName()] = into
			} else if into.GetType() != mf.GetType() {
				continue // another build's family of another type (a deploy); the first stands
			}
			for _, mt := range mf.Metric {
				mt.Label = withWorkerLabels(mt.Label, slot, pid)
				into.Metric = append(into.Metric, mt)
			}
		}
	}
	return slices.Collect(maps.Values(byName))
}

// withWorkerLabels adds slot and pid to a sample's labels, renaming the
// application's own of those names, sorted by name.
func withWorkerLabels(labels []*dto.LabelPair, slot, pid string) []*dto.LabelPair {
	out := make([]*dto.LabelPair, 0, len(labels)+2)
	for _, l := range labels {
		if n := l.GetName(); n == "slot" || n == "pid" {
			l = &dto.LabelPair{Name: proto.String("exported_" + n), Value: l.Value}
		}
		out = append(out, l)
	}
	out = append(out, &dto.LabelPair{Name: proto.String("slot"), Value: proto.String(slot)},
		&dto.LabelPair{Name: proto.String("pid"), Value: proto.String(pid)})
	sort.Slice(out, func(i, j int) bool { return out[i].GetName() < out[j].GetName() })
	return out
}

// fitToMaster makes the workers' families consistent with the master's
// own: a family of a name the master has takes its help, and is dropped
// if its type differs (a worker's go_goroutines joins the master's,
// labelled).
func fitToMaster(master, workers []*dto.MetricFamily) []*dto.MetricFamily {
	own := map[string]*dto.MetricFamily{}
	for _, mf := range master {
		own[mf.GetName()] = mf
	}
	out := workers[:0]
	for _, mf := range workers {
		if m := own[mf.GetName()]; m != nil {
			if m.GetType() != mf.GetType() {
				continue
			}
			mf.Help = m.Help
		}
		out = append(out, mf)
	}
	return out
}

// staticGatherer serves families gathered before.
type staticGatherer []*dto.MetricFamily

func (g staticGatherer) Gather() ([]*dto.MetricFamily, error) { return g, nil }

var _ prometheus.Gatherer = staticGatherer(nil)

// ---- the application's SetStats figures as gauges ----

// maxAppStats bounds the gauges one worker's SetStats object gives.
const maxAppStats = 32

var descAppStat = prometheus.NewDesc("ipcluster_worker_app_stat",
	"A numeric top-level field (stat) of the application's Worker.SetStats object, for each slot's active worker (at most 32 per worker, by name).",
	[]string{"slot", "stat"}, nil)

// appStatCollector turns the SetStats objects of a snapshot's active
// workers into gauges.
type appStatCollector struct{ st *ipcproto.Status }

func (c appStatCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descAppStat }

func (c appStatCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.st.Slots {
		i := slices.IndexFunc(c.st.Workers, func(x ipcproto.WorkerStatus) bool { return x.PID == s.Active })
		if s.Active == 0 || i < 0 || c.st.Workers[i].Stats == nil || len(c.st.Workers[i].Stats.App) == 0 {
			continue
		}
		var obj map[string]json.RawMessage
		if json.Unmarshal(c.st.Workers[i].Stats.App, &obj) != nil {
			continue // not an object
		}
		n := 0
		for _, k := range slices.Sorted(maps.Keys(obj)) {
			var v float64
			if json.Unmarshal(obj[k], &v) != nil {
				continue // not a number
			}
			if n++; n > maxAppStats {
				break
			}
			ch <- prometheus.MustNewConstMetric(descAppStat, prometheus.GaugeValue, v, strconv.Itoa(s.Slot), k)
		}
	}
}
