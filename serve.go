package ipcluster

// The HTTP idiom in one call. A plain http.Serve on a worker's listener
// returns when the library closes the listener, but the server's idle
// keep-alive connections stay open: each keeps a retired worker alive (and
// takes its client's next requests) until the client or IdleTimeout closes
// it, or DrainTimeout runs out. ServeHTTP adds the Shutdown that closes
// them, at the right moment: after the library has closed the listener
// (closing it earlier would reset the clients still in its accept queue).

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"
)

// ServeHTTP serves srv on the listeners of the given public TCP ports (by
// default every TCP port of Config.Ports) for as long as the worker serves,
// then shuts srv down gracefully, and returns nil once it has. Call it from
// the worker function and return what it returns.
//
// When the worker is retired, the library closes the listeners once their
// accept queues are empty; ServeHTTP then calls srv.Shutdown, which closes
// idle keep-alive connections at once and lets the requests in flight
// finish, each connection closing after its response, so the worker exits
// as soon as its last request is answered (DrainTimeout still bounds the
// wait). When the worker is told to finish (Context is cancelled, as when
// the cluster stops), in-flight requests get StopTimeout more; the
// connections still open then are closed, and ServeHTTP returns an error
// saying so.
//
// srv is served with TLS (ServeTLS, certificates from srv.TLSConfig) if
// srv.TLSConfig is set. Connections hijacked from srv (WebSockets) are the
// application's to close: watch Retired and Context for them. ServeHTTP
// panics, as Listener does, if a port is not one of Config.Ports, and
// returns an error if one is listed only as UDP.
func (w *Worker) ServeHTTP(srv *http.Server, ports ...uint16) error {
	if len(ports) == 0 {
		for _, p := range w.cfg.Ports {
			if p.Proto == TCP {
				ports = append(ports, p.Public)
			}
		}
	}
	var lns []net.Listener
	for _, p := range ports {
		ln := w.Listener(p)
		if ln == nil {
			return fmt.Errorf("ipcluster: Worker.ServeHTTP: public port %d is a UDP port; serve HTTP on a TCP port of Config.Ports", p)
		}
		lns = append(lns, ln)
	}
	if len(lns) == 0 {
		return errors.New("ipcluster: Worker.ServeHTTP: Config.Ports has no TCP port to serve HTTP on")
	}

	served := make(chan error, len(lns))
	for _, ln := range lns {
		go func() {
			if srv.TLSConfig != nil {
				served <- srv.ServeTLS(ln, "", "")
			} else {
				served <- srv.Serve(ln)
			}
		}()
	}
	// Serve returns once its listener is closed: by the library, on
	// retirement or when the worker is told to finish, or by the
	// application's own srv.Shutdown or srv.Close. Any other return is a
	// failure, and ends the others.
	var failed error
	for range lns {
		err := <-served
		if err == nil || errors.Is(err, net.ErrClosed) || errors.Is(err, http.ErrServerClosed) {
			continue
		}
		if failed == nil {
			failed = fmt.Errorf("ipcluster: serve HTTP: %w", err)
			go func() { _ = srv.Close() }() // the other Serve calls return
		}
	}
	if failed != nil {
		return failed
	}
	return w.shutdownHTTP(srv)
}

// shutdownHTTP shuts srv down once its listeners are closed: with no
// deadline while the worker drains (DrainTimeout bounds it), with
// StopTimeout once the worker is told to finish.
func (w *Worker) shutdownHTTP(srv *http.Server) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	select {
	case err := <-done:
		return shutdownErr(err)
	case <-w.ctx.Done():
	}
	t := time.NewTimer(w.cfg.StopTimeout)
	defer t.Stop()
	select {
	case err := <-done:
		return shutdownErr(err)
	case <-t.C:
	}
	cancel()
	<-done
	_ = srv.Close()
	return fmt.Errorf("ipcluster: HTTP requests still in flight StopTimeout (%s) after the worker was told to finish: their connections were closed", w.cfg.StopTimeout)
}

// shutdownErr drops the error of a Shutdown that closed a listener the
// library had closed already.
func shutdownErr(err error) error {
	if err == nil || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return fmt.Errorf("ipcluster: shut the HTTP server down: %w", err)
}
