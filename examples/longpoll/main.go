// Command longpoll is an HTTP chat on ipcluster, with long-polling and
// server-sent events, whose sessions live only in worker memory: a master
// and -workers worker processes, each client pinned to one worker by the
// low bits of its address, so the worker that holds a client's session,
// unread backlog and open long-poll is the one its next request reaches.
//
//	POST /join?nick=ann&room=lobby   start a session (cookies), or join another room
//	POST /send?room=lobby&text=hi    say something
//	GET  /poll?cursor=N              messages after N; waits up to 25s for one
//	GET  /events                     the same as server-sent events
//	GET  /whoami                     slot, worker pid and version, the session
//	GET  /                           a small HTML client
//
// Rooms are per worker: clients of different slots do not see each other
// (README.md says what a real deployment adds). The chat is in chat.go and
// index.html; this file is the part about the cluster: serving on the
// worker's listener, and draining gracefully when the worker is retired
// (a deploy, a health policy) or told to finish.
//
// Run it as root (the master writes nat rules):
//
//	sudo go run ./examples/longpoll -port 8080
//
// or try it in a throwaway network namespace with -sandbox (sandbox.go,
// which you can leave out when you copy this example), or without root,
// on any OS, in development mode (one worker in this process on the
// public port, no rules):
//
//	go run ./examples/longpoll -dev    # or IPCLUSTER_DEV=1 go run ./examples/longpoll
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"time"

	"github.com/ipcluster/ipcluster"
)

// dev is -dev: development mode (Config.Dev). IPCLUSTER_DEV=1 does the
// same without the flag.
var dev = flag.Bool("dev", false, "development mode: one worker in this process on the public port, no rules, no root (IPCLUSTER_DEV=1 too)")

func main() {
	name := flag.String("name", "longpoll", "cluster name")
	workers := flag.Int("workers", 4, "worker processes: a power of two from 1 to 256")
	port := flag.Uint("port", 8080, "public HTTP port")
	addr := flag.String("addr", "", "public address clients connect to (default any local address)")
	runDir := flag.String("rundir", "", "directory for the control socket and lock (default "+ipcluster.DefaultRunDir+")")
	backend := flag.String("backend", "", `rule backend: "bpf", "nftables" or "iptables" (default: bpf where the master may load BPF programs, else nftables where the kernel has it)`)
	spares := flag.Int("spares", 0, "standby workers kept ready to take over a slot")
	grace := flag.Duration("sse-grace", 30*time.Second, "how long a retired worker keeps its SSE streams before closing them (each at a random time in the second half)")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	slog.SetDefault(logger)

	if *sandbox { // sandbox.go; drop this when you copy the example
		os.Exit(runSandbox(*workers, *port))
	}
	if err := run(*name, *workers, *spares, *port, *addr, *runDir, ipcluster.Backend(*backend), *grace, logger); err != nil {
		logger.Error("longpoll", "err", err)
		os.Exit(1)
	}
}

func run(name string, workers, spares int, port uint, addr, runDir string, backend ipcluster.Backend, grace time.Duration, logger *slog.Logger) error {
	if port == 0 || port > 65535 {
		return fmt.Errorf("-port %d: use a port from 1 to 65535", port)
	}
	if grace < 0 {
		return fmt.Errorf("-sse-grace %s: use a positive duration, or 0 to close streams at once", grace)
	}
	cfg := ipcluster.Config{
		Name:    name,
		Workers: workers,
		Spares:  spares,
		Ports:   []ipcluster.Port{{Public: uint16(port)}},
		RunDir:  runDir,
		Backend: backend,
		Logger:  logger,
		// The worker takes its slot's sessions from the previous worker
		// before it calls Ready (handoff.go): only then does the slot
		// move to it.
		WorkerReady: true,
	}
	cfg.Dev = *dev
	if addr != "" {
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return fmt.Errorf("parse -addr: %w", err)
		}
		cfg.Addr = a
	}
	// The master blocks here until SIGINT or SIGTERM; each worker process
	// (this binary, re-executed by the master) runs serve instead.
	return ipcluster.Run(context.Background(), cfg, func(w *ipcluster.Worker) error {
		return serve(w, uint16(port), grace)
	})
}

// serve runs the chat on the worker's listener until the worker is done.
//
// A worker's life ends in one of two ways. Retired (its slot now points at
// another worker): the library closes the listener once its accept queue
// is empty, open connections stay, and the worker exits when the last one
// closes. Told to finish (the cluster stops, or a retired worker's
// DrainTimeout ran out): w.Context() is cancelled and the worker is killed
// StopTimeout later if still there.
func serve(w *ipcluster.Worker, port uint16, grace time.Duration) error {
	log := w.Logger()
	chat := newServer(workerInfo{Slot: w.Slot(), PID: os.Getpid(), Generation: w.Generation(), Version: w.Version()}, log, grace)
	// Sessions survive a deploy: take the previous worker's, offer ours
	// to the next, then take the slot (handoff.go).
	takeHandoff(w, chat.hub, log)
	w.OnHandoff(chat.hub.writeState)
	w.Ready()
	// Reported in every heartbeat: the master's status and EventStats
	// (App) show sessions, open streams and polls, and messages.
	w.SetStats(func() any { return chat.stats() })
	defer w.SetStats(nil)

	srv := &http.Server{
		Handler:           chat.handler(),
		ReadHeaderTimeout: 10 * time.Second,
		// No WriteTimeout: long-polls and streams are long on purpose
		// (events sets a deadline per flush instead).
		IdleTimeout: 2 * time.Minute,
		ErrorLog:    slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}

	go func() {
		select {
		case <-w.Retired():
			// SSE streams start their grace period now; open long-polls
			// go on and answer within 25s (see server.drain).
			log.Info("retired: draining", "streams", chat.streams.Load(), "polls", chat.polls.Load(), "sse_grace", grace)
			chat.drain()
		case <-w.Context().Done():
		}
	}()
	// Told to finish: polls answer and streams close at once.
	stopChat := context.AfterFunc(w.Context(), chat.stop)
	defer stopChat()
	stopExpiry := expireSessions(w.Context(), chat.hub, log)
	defer stopExpiry()

	log.Info("worker serving", "port", port, "listen", w.Listener(port).Addr().String(), "version", w.Version())
	// ServeHTTP serves until the worker is retired or told to finish,
	// then shuts the server down: idle keep-alive connections close at
	// once (each would keep the worker alive, and take its client's next
	// requests, until IdleTimeout), and the requests in progress finish:
	// long-polls, which end within 25s, and SSE streams, closed by the
	// end of their grace period. Their connections close as they end,
	// without keep-alive, so the clients' next requests reach the new
	// worker. Told to finish, chat.stop has every poll and stream end at
	// once, and ServeHTTP cuts what is left after StopTimeout.
	if err := w.ServeHTTP(srv, port); err != nil {
		return fmt.Errorf("serve HTTP on public port %d: %w", port, err)
	}
	log.Info("worker done", "messages", chat.hub.messages.Load())
	return nil
}

// expireSessions drops idle sessions every minute until ctx is done. The
// returned function stops it.
func expireSessions(ctx context.Context, h *hub, log *slog.Logger) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(time.Minute)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if n := h.expire(sessionTTL); n > 0 {
					log.Debug("expired idle sessions", "count", n)
				}
			}
		}
	}()
	return cancel
}
