package ipcluster_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
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
		// Told to finish (the cluster stops): stop serving.
		go func() {
			<-w.Context().Done()
			_ = srv.Shutdown(context.Background())
		}()
		// Serve returns when the listener closes: when the worker is
		// retired (its slot moved to another worker) or told to finish.
		err := srv.Serve(w.Listener(8080))
		if w.Context().Err() == nil {
			// Retired: finish in-flight requests and close idle
			// keep-alive connections, so the worker drains and exits.
			_ = srv.Shutdown(context.Background())
		}
		if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
			return nil
		}
		return err
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
		return http.Serve(w.Listener(8080), mux)
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
		go func() {
			<-w.Context().Done()
			_ = srv.Shutdown(context.Background())
		}()
		w.Ready() // clients of this slot come here from now on
		err = srv.Serve(w.Listener(8080))
		if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
			return nil
		}
		return err
	})
	if err != nil {
		log.Fatal(err)
	}
}

// loadPrices stands for whatever an application loads before it serves.
func loadPrices(ctx context.Context) (map[string]string, error) {
	return map[string]string{"/tea": "3"}, ctx.Err()
}
