// Command chat is a WebSocket chat on ipcluster, over TLS, whose clients
// talk across workers: a master and -workers worker processes, each client
// pinned to one worker by the low bits of its address, its session
// (nickname, rooms, cursor) in that worker's memory, and every message
// published to a pub/sub (NATS JetStream) that every worker follows, so
// two clients of different slots share a room.
//
//	GET /        the HTML client (index.html)
//	GET /ws      the WebSocket (ws.go says its protocol)
//	GET /whoami  slot, worker pid and version, and the address the worker sees
//
// The parts:
//
//	main.go     the cluster: flags, the master's pub/sub, serving a worker
//	hub.go      a worker's sessions and its copy of the stream
//	ws.go       the page, the WebSocket protocol, reconnecting on retirement
//	pubsub.go   NATS: the embedded server (in the master) and the stream
//	handoff.go  sessions to the slot's next worker on a deploy
//	certs.go    TLS in the worker, the certificate reloaded when its files change
//
// Run it as root (the master steers clients to workers in the kernel):
//
//	sudo go run ./examples/chat -port 8443 -cert cert.pem -key key.pem
//
// or try it in a throwaway network namespace, with a certificate made for
// it and two addresses to open in a browser, with -sandbox (sandbox.go,
// which you can leave out when you copy this example); or without root,
// on any OS, in development mode (one worker in this process, no rules):
//
//	go run ./examples/chat -dev -port 8080
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/ipcluster/ipcluster"
)

var dev = flag.Bool("dev", false, "development mode: one worker in this process on the public port, no rules, no root (IPCLUSTER_DEV=1 too)")

// options are the flags a worker needs.
type options struct {
	port     uint16
	certFile string
	keyFile  string
	natsURL  string
	spread   time.Duration
}

func main() {
	if dir := os.Getenv(envSidecar); dir != "" { // sidecar.go: this process is the cluster's NATS
		os.Exit(runSidecar(dir))
	}
	name := flag.String("name", "chat", "cluster name")
	workers := flag.Int("workers", 4, "worker processes: a power of two from 1 to 256")
	port := flag.Uint("port", 8443, "public port (HTTPS with -cert and -key, else HTTP)")
	addr := flag.String("addr", "", "public address clients connect to (default any local address)")
	runDir := flag.String("rundir", "", "directory for the control socket and lock (default "+ipcluster.DefaultRunDir+")")
	backend := flag.String("backend", "", `rule backend: "bpf", "nftables" or "iptables" (default: the best this machine allows)`)
	spares := flag.Int("spares", 0, "standby workers kept ready to take over a slot")
	cert := flag.String("cert", "", "TLS certificate (PEM, with its chain); reloaded when the file changes")
	key := flag.String("key", "", "TLS private key (PEM) of -cert")
	natsURL := flag.String("nats", "", "URL of a NATS server with JetStream to publish messages through (default: one the master runs)")
	spread := flag.Duration("reconnect-spread", 2*time.Second, "a retiring worker closes its sockets at random moments within this, so their clients do not reconnect at once")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	slog.SetDefault(logger)

	if *sandbox { // sandbox.go; drop this when you copy the example
		os.Exit(runSandbox(*workers, *port))
	}
	opts := options{certFile: *cert, keyFile: *key, natsURL: *natsURL, spread: *spread}
	if err := run(*name, *workers, *spares, *port, *addr, *runDir, ipcluster.Backend(*backend), opts, logger); err != nil {
		logger.Error("chat", "err", err)
		os.Exit(1)
	}
}

func run(name string, workers, spares int, port uint, addr, runDir string, backend ipcluster.Backend, opts options, logger *slog.Logger) error {
	if port == 0 || port > 65535 {
		return fmt.Errorf("-port %d: use a port from 1 to 65535", port)
	}
	opts.port = uint16(port)
	if (opts.certFile == "") != (opts.keyFile == "") {
		return errors.New("-cert and -key go together: give both for HTTPS, or neither for plain HTTP")
	}
	if opts.spread < 0 {
		return fmt.Errorf("-reconnect-spread %s: use a positive duration, or 0 to close sockets at once", opts.spread)
	}
	cfg := ipcluster.Config{
		Name:    name,
		Workers: workers,
		Spares:  spares,
		Ports:   []ipcluster.Port{{Public: opts.port}},
		RunDir:  runDir,
		Backend: backend,
		Logger:  logger,
		Dev:     *dev,
		// The worker takes its slot's sessions from the previous worker
		// and catches up with the stream before it calls Ready: only
		// then does the slot move to it.
		WorkerReady: true,
	}
	if addr != "" {
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return fmt.Errorf("parse -addr: %w", err)
		}
		cfg.Addr = a
	}
	if !ipcluster.IsWorker() {
		// The master: check the configuration and the certificate
		// before starting anything, then run the pub/sub unless -nats
		// names one.
		if err := cfg.Validate(); err != nil {
			return err
		}
		if opts.certFile != "" {
			if _, err := loadPair(opts.certFile, opts.keyFile); err != nil {
				return err
			}
		}
		if opts.natsURL == "" {
			// sidecar.go: the cluster's NATS, in a process that outlives
			// this master (a deploy replaces it), found again by the
			// next one.
			pubsub, err := ensureSidecar(pubsubDir(runDir, name), logger)
			if err != nil {
				return err
			}
			// The workers, this binary re-executed by the master,
			// inherit it.
			if err := os.Setenv(envNATS, pubsub.URL); err != nil {
				return fmt.Errorf("set %s: %w", envNATS, err)
			}
			var handedOver atomic.Bool
			cfg.OnEvent = func(e ipcluster.Event) {
				if d, ok := e.(ipcluster.EventDeploy); ok && d.Outcome == ipcluster.DeployHandedOver {
					handedOver.Store(true)
				}
			}
			defer func() {
				// The cluster stopped (no master took it over, none
				// answers on its control socket): so does its pub/sub.
				if !handedOver.Load() && !controlAnswers(runDir, name) {
					stopSidecar(pubsub, logger)
				}
			}()
		}
	}
	// The master blocks here until SIGINT or SIGTERM; each worker process
	// runs serve instead.
	return ipcluster.Run(context.Background(), cfg, func(w *ipcluster.Worker) error {
		return serve(w, opts)
	})
}

// serve runs the chat on the worker's listener until the worker is done:
// retired (its slot moved to another worker), it asks its sockets to
// reconnect there and returns when the last has closed; told to finish
// (the cluster stops), it closes them at once.
func serve(w *ipcluster.Worker, opts options) error {
	log := w.Logger()
	url := natsURL(opts.natsURL)
	if url == "" {
		return fmt.Errorf("no pub/sub: %s is not set (the master sets it when it runs one) and no -nats", envNATS)
	}
	ctx := w.Context()
	info := WorkerInfo{Slot: w.Slot(), PID: os.Getpid(), Generation: w.Generation(), Version: w.Version()}
	b, err := dialBus(ctx, url, fmt.Sprintf("chat slot %d pid %d", info.Slot, info.PID), log)
	if err != nil {
		return err
	}
	defer b.close()
	h := newHub()
	// Sessions survive a deploy: take the previous worker's, offer ours to
	// the next (handoff.go); catch up with the stream; then take the slot.
	takeHandoff(w, h, log)
	w.OnHandoff(h.writeState)
	if err := b.follow(ctx, h, 30*time.Second); err != nil {
		return err
	}
	w.Ready()
	w.SetStats(func() any { return h.stats() })
	defer w.SetStats(nil)

	chat := &server{info: info, hub: h, bus: b, log: log}
	srv := &http.Server{
		Handler:           chat.handler(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	if opts.certFile != "" {
		certs, err := newCertReloader(opts.certFile, opts.keyFile, log)
		if err != nil {
			return err
		}
		srv.TLSConfig = certs.tlsConfig()
	} else {
		log.Warn("serving plain HTTP: give -cert and -key for HTTPS")
	}
	go func() {
		select {
		case <-w.Retired():
			log.Info("retired: asking sockets to reconnect", "sockets", h.stats().Sockets, "spread", opts.spread)
			h.retire(opts.spread, jitter)
		case <-ctx.Done():
		}
	}()
	stopExpiry := expireSessions(ctx, h)
	defer stopExpiry()

	log.Info("worker serving", "port", opts.port, "tls", srv.TLSConfig != nil, "version", w.Version())
	// ServeHTTP returns once the listener is closed and the plain
	// requests are answered; the WebSockets, hijacked, are ours to wait
	// for.
	err = w.ServeHTTP(srv, opts.port)
	select {
	case <-ctx.Done():
		<-h.closeAll()
	case <-h.retire(opts.spread, jitter):
	case <-time.After(opts.spread + writeTimeout + 5*time.Second):
		<-h.closeAll()
	}
	if err != nil {
		return fmt.Errorf("serve on public port %d: %w", opts.port, err)
	}
	log.Info("worker done", "seq", h.stats().Seq)
	return nil
}

// controlAnswers reports whether a master answers on the cluster's
// control socket.
func controlAnswers(runDir, name string) bool {
	if runDir == "" {
		runDir = ipcluster.DefaultRunDir
	}
	c, err := net.DialTimeout("unix", ipcluster.ControlSocket(runDir, name), time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// jitter returns a random duration in [0, d].
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return time.Duration(mrand.Int64N(int64(d) + 1))
}

// expireSessions drops sessions idle for sessionTTL, every minute, until
// ctx is done. The returned function stops it.
func expireSessions(ctx context.Context, h *hub) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(time.Minute)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				h.expire(sessionTTL, now)
			}
		}
	}()
	return cancel
}
