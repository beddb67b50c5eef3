//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/ipcluster/ipcluster"
)

// serve is the -serve role: the cluster under test. Started by the bench
// (inside the server namespace) it is the master; the master re-executes
// this binary with the same arguments for every slot, and there
// ipcluster.Run runs the worker function instead.
func serve(name, runDir string, workers int, backend string, port uint16, allowDirect bool) error {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfg := ipcluster.Config{
		Name:    name,
		Workers: workers,
		Ports:   []ipcluster.Port{{Public: port}},
		Addr:    serverAddr,
		RunDir:  runDir,
		// 256 workers starting at once on 2 cores take a while to
		// report ready; the default 3s would kill and respawn them.
		ConnectTimeout: 60 * time.Second,
		// The bench stops the cluster between parts; nothing needs
		// draining by then.
		StopTimeout: 2 * time.Second,
		Logger:      logger,
		Backend:     ipcluster.Backend(backend),
		AllowDirect: allowDirect,
	}
	return ipcluster.Run(context.Background(), cfg, func(w *ipcluster.Worker) error {
		body := []byte(fmt.Sprintf("ok slot=%d\n", w.Slot()))
		clen := strconv.Itoa(len(body))
		srv := &http.Server{
			Handler: http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
				rw.Header().Set("Content-Length", clen)
				_, _ = rw.Write(body)
			}),
			ReadHeaderTimeout: 10 * time.Second,
			// Aborted connections are expected under load; a log line
			// each would cost more than the request.
			ErrorLog: log.New(io.Discard, "", 0),
		}
		errc := make(chan error, 1)
		go func() { errc <- srv.Serve(w.Listener(port)) }()
		select {
		case <-w.Context().Done():
			srv.Close()
			<-errc
			return nil
		case err := <-errc:
			if errors.Is(err, net.ErrClosed) || errors.Is(err, http.ErrServerClosed) {
				return nil // retired: the library closed the listener
			}
			return fmt.Errorf("serve http on slot %d: %w", w.Slot(), err)
		}
	})
}
