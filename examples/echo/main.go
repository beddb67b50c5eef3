// Command echo is a TCP echo server on ipcluster: a master and -workers
// worker processes, each client pinned to one worker by the low bits of its
// address.
//
// On connect a worker writes one line naming itself and the client address
// it sees,
//
//	slot=2 pid=4242 generation=1 client=198.18.1.6:51234
//
// and answers every line it reads with that same line, so a long-lived
// connection can be probed to see which worker holds it.
//
// Run it as root (the master writes nat rules):
//
//	sudo go run ./examples/echo -port 7000
//
// or try it in a throwaway network namespace with -sandbox (sandbox.go,
// which you can leave out when you copy this file), or without root, on
// any OS, in development mode (one worker in this process, listening on
// the public port itself, no rules):
//
//	go run ./examples/echo -dev    # or IPCLUSTER_DEV=1 go run ./examples/echo
//
// Behind routers, one cluster per host, it announces its address over BGP
// while it serves (bgp.go; the README's "Beyond one host"):
//
//	sudo go run ./examples/echo -addr 198.19.100.1 -bgp-peer 198.18.16.1,65000 -bgp-asn 65001 -bgp-router-id 198.18.16.2
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"

	"github.com/ipcluster/ipcluster"
)

func main() {
	cfg := ipcluster.Config{}
	flag.StringVar(&cfg.Name, "name", "echo", "cluster name")
	flag.IntVar(&cfg.Workers, "workers", 4, "worker processes: a power of two from 1 to 256")
	port := flag.Uint("port", 7000, "public TCP port")
	addr := flag.String("addr", "", "public address clients connect to (default any local address)")
	flag.StringVar(&cfg.RunDir, "rundir", "", "directory for the control socket and lock (default "+ipcluster.DefaultRunDir+")")
	backend := flag.String("backend", "", `rule backend: "bpf", "nftables" or "iptables" (default: bpf where the master may load BPF programs, else nftables where the kernel has it)`)
	flag.IntVar(&cfg.Spares, "spares", 0, "standby workers kept ready to take over a slot")
	flag.BoolVar(&cfg.Dev, "dev", false, "development mode: one worker in this process on the public port, no rules, no root (IPCLUSTER_DEV=1 too)")
	flag.StringVar(&cfg.HTTPAddr, "http", "", `address for /metrics, /healthz, /readyz and /status, e.g. "127.0.0.1:9100" (default none)`)
	logLevel := flag.String("log-level", "info", `least level logged: "debug", "info", "warn" or "error"`)
	setBGP := bgpFlags() // bgp.go
	flag.Parse()
	if err := setBGP(&cfg); err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		os.Exit(2)
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "-log-level %q: %v; use debug, info, warn or error\n", *logLevel, err)
		os.Exit(2)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(cfg.Logger)
	cfg.Backend = ipcluster.Backend(*backend)

	if *sandbox { // sandbox.go; drop this when you copy the example
		os.Exit(runSandbox(cfg.Workers, *port))
	}
	if err := run(cfg, *port, *addr); err != nil {
		cfg.Logger.Error("echo", "err", err)
		os.Exit(1)
	}
}

func run(cfg ipcluster.Config, port uint, addr string) error {
	if port == 0 || port > 65535 {
		return fmt.Errorf("-port %d: use a port from 1 to 65535", port)
	}
	cfg.Ports = []ipcluster.Port{{Public: uint16(port)}}
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
		return serve(w, uint16(port))
	})
}

// serve accepts connections until the listener closes: when the worker is
// retired (its slot moved to another worker) or told to finish. It must
// return then, so the worker can exit once its connections are done.
func serve(w *ipcluster.Worker, port uint16) error {
	serveOperator(w) // operator.go: this worker's /metrics
	ln := w.Listener(port)
	stop := context.AfterFunc(w.Context(), func() { ln.Close() })
	defer stop()
	w.Logger().Info("worker serving", "port", port, "listen", ln.Addr().String())
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("accept on public port %d: %w", port, err)
		}
		go handle(w, c)
	}
}

// handle writes the worker's line on connect and again for every line read.
// A retired worker keeps its connections; one told to finish closes them.
func handle(w *ipcluster.Worker, c net.Conn) {
	defer c.Close()
	connectionsTotal.Inc() // operator.go
	stop := context.AfterFunc(w.Context(), func() { c.Close() })
	defer stop()
	line := fmt.Sprintf("slot=%d pid=%d generation=%d client=%s\n",
		w.Slot(), os.Getpid(), w.Generation(), c.RemoteAddr())
	if _, err := io.WriteString(c, line); err != nil {
		return
	}
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		if _, err := io.WriteString(c, line); err != nil {
			return
		}
	}
	if err := sc.Err(); err != nil && w.Context().Err() == nil && !errors.Is(err, net.ErrClosed) {
		w.Logger().Debug("connection ended", "client", c.RemoteAddr().String(), "err", err)
	}
}
