package ipcluster_test

import (
	"context"
	"log"
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
			_, _ = rw.Write([]byte("hello from slot " + itoa(w.Slot()) + "\n"))
		})}
		go func() {
			<-w.Context().Done()
			_ = srv.Shutdown(context.Background())
		}()
		return srv.Serve(w.Listener(8080))
	})
	if err != nil {
		log.Fatal(err)
	}
}
