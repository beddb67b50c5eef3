package ipcluster_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"net/netip"
	"time"

	"github.com/ipcluster/ipcluster"
)

// A web server with four workers, each client pinned to one of them.
func Example() {
	err := ipcluster.Run(context.Background(), ipcluster.Config{
		Name:    "web",
		Workers: 4,
		Ports:   []ipcluster.Port{{Public: 8080}},
		Addr:    netip.MustParseAddr("198.18.0.1"),
	}, func(w *ipcluster.Worker) error {
		// Runs only in worker processes.
		srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(rw, "hello %s from slot %d\n", r.RemoteAddr, w.Slot())
		})}
		// Serves until the worker is retired or told to finish, then
		// shuts the server down gracefully.
		return w.ServeHTTP(srv)
	})
	if err != nil {
		log.Fatal(err)
	}
}

// Serving HTTP: ServeHTTP serves until the worker is retired (its slot moved
// to another worker) or told to finish (the cluster stops), then shuts the
// server down: idle keep-alive connections close at once, so the worker
// exits as soon as its requests in flight are answered, instead of when
// its clients or DrainTimeout close them. Here it serves one of two ports;
// the other carries a line protocol.
func ExampleWorker_ServeHTTP() {
	cfg := ipcluster.Config{
		Name:  "web",
		Ports: []ipcluster.Port{{Public: 8080}, {Public: 7000}},
	}
	err := ipcluster.Run(context.Background(), cfg, func(w *ipcluster.Worker) error {
		go func() {
			ln := w.Listener(7000) // closed with the worker's service
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "slot %d\n", w.Slot())
				c.Close()
			}
		}()
		srv := &http.Server{
			Handler:           http.FileServer(http.Dir("/srv/www")),
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
		}
		return w.ServeHTTP(srv, 8080)
	})
	if err != nil {
		log.Fatal(err)
	}
}

// Health policies: tighter limits than the defaults, a spare ready to take
// over a slot, and an HTTP check of each worker by the master. The check
// reaches the worker's own port, not whichever worker the routes pick, so
// it dials with DialWorker, which the nftables guard lets through.
func ExampleConfig_health() {
	addr := netip.MustParseAddr("198.18.0.1")
	public := ipcluster.Port{Public: 8080}
	check := func(ctx context.Context, ws ipcluster.WorkerStats) error {
		client := &http.Client{Transport: &http.Transport{DialContext: ipcluster.DialWorker}}
		url := fmt.Sprintf("http://%s/healthz", netip.AddrPortFrom(addr, ws.Ports[public]))
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		return nil
	}
	cfg := ipcluster.Config{
		Name:         "web",
		Ports:        []ipcluster.Port{public},
		Addr:         addr,
		MemoryLimit:  256 << 20, // retire a worker past 256 MiB of RSS
		LagLimit:     50 * time.Millisecond,
		DrainTimeout: 30 * time.Minute, // long-polling clients get half an hour
		Spares:       1,
		HealthCheck:  check,
		OnEvent: func(ev ipcluster.Event) {
			if r, ok := ev.(ipcluster.EventRetired); ok {
				log.Printf("worker %d retired (%s): %s", r.PID, r.Cause, r.Reason)
			}
		},
	}
	err := ipcluster.Run(context.Background(), cfg, func(w *ipcluster.Worker) error {
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(rw http.ResponseWriter, r *http.Request) { fmt.Fprintln(rw, "ok") })
		return w.ServeHTTP(&http.Server{Handler: mux})
	})
	if err != nil {
		log.Fatal(err)
	}
}

// A worker that must load data before it serves says so with Ready: its
// slot moves to it only then, at start, after a crash, a retirement or a
// deploy, and until then the slot keeps its previous worker (or, at the
// first start, no route). A worker that does not call Ready within
// ReadyTimeout is killed and started again with backoff.
func ExampleWorker_Ready() {
	cfg := ipcluster.Config{
		Name:         "web",
		Ports:        []ipcluster.Port{{Public: 8080}},
		WorkerReady:  true,
		ReadyTimeout: time.Minute, // loading the data takes a while
	}
	err := ipcluster.Run(context.Background(), cfg, func(w *ipcluster.Worker) error {
		prices, err := loadPrices(w.Context())
		if err != nil {
			return err // before Ready: a failed start, retried with backoff
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			fmt.Fprintln(rw, prices[r.URL.Path])
		})}
		w.Ready() // clients of this slot come here from now on
		return w.ServeHTTP(srv)
	})
	if err != nil {
		log.Fatal(err)
	}
}

// loadPrices stands for whatever an application loads before it serves.
func loadPrices(ctx context.Context) (map[string]string, error) {
	return map[string]string{"/tea": "3"}, ctx.Err()
}
