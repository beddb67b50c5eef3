package ipcluster_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/netip"

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
