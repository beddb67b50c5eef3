package main

// The worker's operator endpoints: its own Prometheus registry, served
// with Worker.SetOperatorHandler on a private socket of the worker's. The
// master's -http address then has it on /workers/<slot>/metrics, and its
// own /metrics carries echo_connections_total of every slot's active
// worker, labelled slot and pid; /workers/<slot>/debug/pprof/ comes with
// the library. Leave this file out when you copy the example, and the
// two lines that use it.

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ipcluster/ipcluster"
)

// connectionsTotal counts the connections this worker accepted. A
// registry of the worker's own, not the global one: nothing of the
// library's gets in.
var (
	registry         = prometheus.NewRegistry()
	connectionsTotal = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "echo_connections_total",
		Help: "Connections this echo worker accepted.",
	})
)

func init() { registry.MustRegister(connectionsTotal) }

// serveOperator sets the worker's operator handler: /metrics.
func serveOperator(w *ipcluster.Worker) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{}))
	w.SetOperatorHandler(mux)
}
