//go:build linux

package ipcluster

// Every worker's operator endpoints: the worker's half of ops.go. The
// worker serves HTTP on the listening socket its master made
// (EnvOperator), never on a public port: /debug/pprof/ is the library's
// own, everything else the application's Worker.SetOperatorHandler.
//
// The profiles are served here without net/http/pprof, whose init
// registers its handlers on http.DefaultServeMux: an application serving
// the default mux on its public port would publish them.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"html"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"slices"
	"strconv"
	"strings"
	"time"
)

const (
	// opsDefaultSeconds and opsMaxSeconds bound a CPU profile or trace
	// (?seconds=N).
	opsDefaultSeconds = 30
	opsMaxSeconds     = 300
	// opsWriteTimeout bounds writing any other answer: a client that
	// stops reading cannot pin a goroutine of the worker.
	opsWriteTimeout = 30 * time.Second
)

// SetOperatorHandler sets the handler of the worker's operator endpoints:
// its Prometheus registry on /metrics, say, or anything an operator may
// ask a single worker. They are served on a private Unix socket the master
// made for this worker (under RunDir/<Name>/ops, named in the status),
// never on a public port, and the master's Config.HTTPAddr reaches them as
// /workers/<slot>/... (the slot's active worker) and
// /workers/pid/<pid>/... (any worker, retired and spare included), with
// the prefix stripped. The master's /metrics includes what h serves on
// /metrics for every active worker, labelled slot and pid.
//
// /debug/pprof/ is the library's own and never reaches h: the runtime's
// profiles (heap, goroutine, allocs, block, mutex, threadcreate, with
// debug=N, and gc=1 for heap), profile?seconds=N (CPU, default 30, at most
// 300) and trace?seconds=N. Without a handler, other paths answer 404.
// Safe to call at any time, from any goroutine; nil removes the handler.
func (w *Worker) SetOperatorHandler(h http.Handler) {
	if h == nil {
		w.opsHandler.Store(nil)
		return
	}
	w.opsHandler.Store(&h)
}

// serveOperator takes the operator socket EnvOperator names, if any, and
// serves on it until the returned function is called (as Run returns).
func (w *Worker) serveOperator() (stop func()) {
	v, ok := os.LookupEnv(EnvOperator)
	if !ok {
		return func() {}
	}
	fdText, path, _ := strings.Cut(v, ":")
	fd, err := strconv.Atoi(fdText)
	if err != nil || fd < 3 {
		w.log.Warn("bad operator socket in the environment; serving no operator endpoints", "env", EnvOperator, "value", v)
		return func() {}
	}
	f := os.NewFile(uintptr(fd), "operator socket")
	ln, err := net.FileListener(f)
	f.Close() // ln holds a duplicate (close-on-exec); the app's children get neither
	if err != nil {
		w.log.Warn("operator socket: serving no operator endpoints", "path", path, "err", err)
		return func() {}
	}
	w.opsPath = path
	srv := &http.Server{
		Handler:           w.operatorMux(),
		ReadHeaderTimeout: 10 * time.Second,
		WriteTimeout:      opsWriteTimeout, // profile and trace extend their own
		IdleTimeout:       30 * time.Second,
		ErrorLog:          slog.NewLogLogger(w.log.Handler(), slog.LevelDebug),
	}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			w.log.Warn("operator endpoints stopped", "path", path, "err", err)
		}
	}()
	return func() { srv.Close() }
}

// operatorMux routes /debug/pprof/ to the library and the rest to the
// application's handler.
func (w *Worker) operatorMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", w.pprofIndex)
	mux.HandleFunc("/debug/pprof/cmdline", pprofCmdline)
	mux.HandleFunc("/debug/pprof/profile", pprofCPU)
	mux.HandleFunc("/debug/pprof/trace", pprofTrace)
	mux.HandleFunc("/debug/pprof/symbol", pprofSymbol)
	mux.HandleFunc("/", func(rw http.ResponseWriter, r *http.Request) {
		if h := w.opsHandler.Load(); h != nil {
			(*h).ServeHTTP(rw, r)
			return
		}
		http.Error(rw, fmt.Sprintf("404: %s: this worker has no operator handler (the application sets one with Worker.SetOperatorHandler); "+
			"the library serves /debug/pprof/", r.URL.Path), http.StatusNotFound)
	})
	return mux
}

// pprofIndex lists the profiles, or serves the one named after the prefix.
func (w *Worker) pprofIndex(rw http.ResponseWriter, r *http.Request) {
	name, _ := strings.CutPrefix(r.URL.Path, "/debug/pprof/")
	if name != "" {
		pprofNamed(rw, r, name)
		return
	}
	profiles := pprof.Profiles()
	slices.SortFunc(profiles, func(a, b *pprof.Profile) int { return strings.Compare(a.Name(), b.Name()) })
	rw.Header().Set("Content-Type", "text/html; charset=utf-8")
	var b bytes.Buffer
	fmt.Fprintf(&b, "<html><head><title>/debug/pprof/ of worker pid %d slot %d</title></head><body>\n", os.Getpid(), w.slot)
	fmt.Fprintf(&b, "<p>worker pid %d, slot %d, generation %d</p>\n<table>\n", os.Getpid(), w.slot, w.gen)
	for _, p := range profiles {
		n := html.EscapeString(p.Name())
		fmt.Fprintf(&b, "<tr><td>%d</td><td><a href=\"%s?debug=1\">%s</a></td></tr>\n", p.Count(), n, n)
	}
	b.WriteString("<tr><td></td><td><a href=\"profile?seconds=30\">profile</a> (CPU, ?seconds=N)</td></tr>\n")
	b.WriteString("<tr><td></td><td><a href=\"trace?seconds=5\">trace</a> (?seconds=N)</td></tr>\n")
	b.WriteString("<tr><td></td><td><a href=\"cmdline\">cmdline</a></td></tr>\n</table></body></html>\n")
	_, _ = rw.Write(b.Bytes())
}

// pprofNamed serves a runtime/pprof profile: debug=0 (the default) is
// the gzipped protobuf go tool pprof reads; gc=1 runs a GC first (heap).
func pprofNamed(rw http.ResponseWriter, r *http.Request, name string) {
	p := pprof.Lookup(name)
	if p == nil {
		http.Error(rw, fmt.Sprintf("404: unknown profile %q; see /debug/pprof/", name), http.StatusNotFound)
		return
	}
	debug, _ := strconv.Atoi(r.FormValue("debug"))
	if name == "heap" && r.FormValue("gc") != "" && r.FormValue("gc") != "0" {
		runtime.GC()
	}
	var b bytes.Buffer
	if err := p.WriteTo(&b, debug); err != nil {
		http.Error(rw, "write profile "+name+": "+err.Error(), http.StatusInternalServerError)
		return
	}
	rw.Header().Set("X-Content-Type-Options", "nosniff")
	if debug != 0 {
		rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
	} else {
		rw.Header().Set("Content-Type", "application/octet-stream")
		rw.Header().Set("Content-Disposition", `attachment; filename="`+name+`"`)
	}
	_, _ = rw.Write(b.Bytes())
}

// profileSeconds reads ?seconds=N, bounded, and extends the answer's write
// deadline past it.
func profileSeconds(rw http.ResponseWriter, r *http.Request) (time.Duration, bool) {
	secs := opsDefaultSeconds
	if v := r.FormValue("seconds"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > opsMaxSeconds {
			http.Error(rw, fmt.Sprintf("seconds=%q: want a whole number of seconds from 1 to %d", v, opsMaxSeconds), http.StatusBadRequest)
			return 0, false
		}
		secs = n
	}
	d := time.Duration(secs) * time.Second
	_ = http.NewResponseController(rw).SetWriteDeadline(time.Now().Add(d + opsWriteTimeout))
	return d, true
}

// sleepCtx waits d, or less if the client goes away.
func sleepCtx(r *http.Request, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.Context().Done():
	}
}

func pprofCPU(rw http.ResponseWriter, r *http.Request) {
	d, ok := profileSeconds(rw, r)
	if !ok {
		return
	}
	var b bytes.Buffer
	if err := pprof.StartCPUProfile(&b); err != nil {
		http.Error(rw, "start the CPU profile: "+err.Error()+" (one at a time)", http.StatusConflict)
		return
	}
	sleepCtx(r, d)
	pprof.StopCPUProfile()
	rw.Header().Set("Content-Type", "application/octet-stream")
	rw.Header().Set("Content-Disposition", `attachment; filename="profile"`)
	_, _ = rw.Write(b.Bytes())
}

func pprofTrace(rw http.ResponseWriter, r *http.Request) {
	d, ok := profileSeconds(rw, r)
	if !ok {
		return
	}
	var b bytes.Buffer
	if err := trace.Start(&b); err != nil {
		http.Error(rw, "start the trace: "+err.Error()+" (one at a time)", http.StatusConflict)
		return
	}
	sleepCtx(r, d)
	trace.Stop()
	rw.Header().Set("Content-Type", "application/octet-stream")
	rw.Header().Set("Content-Disposition", `attachment; filename="trace"`)
	_, _ = rw.Write(b.Bytes())
}

func pprofCmdline(rw http.ResponseWriter, _ *http.Request) {
	rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprint(rw, strings.Join(os.Args, "\x00"))
}

// pprofSymbol answers go tool pprof's symbol lookups: GET says symbols
// are available; POST (or a GET query) of "+"-separated hex addresses
// gets "addr name" lines.
func pprofSymbol(rw http.ResponseWriter, r *http.Request) {
	rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
	var b bytes.Buffer
	fmt.Fprintln(&b, "num_symbols: 1")
	var in io.Reader = strings.NewReader(r.URL.RawQuery)
	if r.Method == http.MethodPost {
		in = io.LimitReader(r.Body, 1<<20)
	}
	br := bufio.NewReader(in)
	for {
		word, err := br.ReadString('+')
		word = strings.TrimSuffix(word, "+")
		if pc, perr := strconv.ParseUint(strings.TrimSpace(word), 0, 64); perr == nil && pc != 0 {
			if f := runtime.FuncForPC(uintptr(pc)); f != nil {
				fmt.Fprintf(&b, "%#x %s\n", pc, f.Name())
			}
		}
		if err != nil {
			break
		}
	}
	_, _ = rw.Write(b.Bytes())
}
