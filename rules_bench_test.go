//go:build linux

package ipcluster

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

// Rule-engine benchmarks against the real kernel, inside a lab namespace:
// both backends, the iptables one through the real iptables binaries. Run
// with:
//
//	sudo go test -run '^$' -bench 'Rule' -count 20 .
//
// ops/op is the number of kernel operations per operation: iptables
// processes, or nf_tables netlink transactions.
func benchBackend(b *testing.B, backend Backend, workers, families int) (ruleBackend, []slotTarget) {
	lab := netlab.NewT(b, netlab.Options{Clients: 1})
	cfg := Config{Name: "bench", Workers: workers, Ports: []Port{{Public: 8080}, {Public: 8443}}}
	if families == 1 {
		cfg.Addr = lab.ServerAddr4
	}
	return backendIn(b, lab, backend, cfg), targetsFor(workers)
}

// backendIn returns a rule backend for cfg that writes into the lab's
// server namespace.
func backendIn(b *testing.B, lab *netlab.Lab, backend Backend, cfg Config) ruleBackend {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		b.Fatal(err)
	}
	if backend == BackendIPTables {
		for _, bin := range []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"} {
			netlab.Tool(b, "iptables", bin)
		}
		return newRuleWriter(cfg.routing(), execRunner{start: lab.Server.Start})
	}
	conn, err := lab.Server.NFTables()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = conn.CloseLasting() })
	return newNFTWriter(cfg.routing(), conn)
}

type benchCase struct {
	backend           Backend
	workers, families int
}

func (c benchCase) String() string {
	return fmt.Sprintf("%s/slots=%d/ports=2/families=%d", c.backend, c.workers, c.families)
}

var benchCases = []benchCase{
	{BackendIPTables, 4, 1}, {BackendIPTables, 4, 2}, {BackendIPTables, 256, 2},
	{BackendNFTables, 4, 1}, {BackendNFTables, 4, 2}, {BackendNFTables, 256, 2},
}

// BenchmarkRuleInstall: a full install from an empty namespace.
func BenchmarkRuleInstall(b *testing.B) {
	for _, c := range benchCases {
		b.Run(c.String(), func(b *testing.B) {
			w, ts := benchBackend(b, c.backend, c.workers, c.families)
			ctx := context.Background()
			ops := 0
			for i := 0; i < b.N; i++ {
				before := w.changes()
				if err := w.apply(ctx, ts, ts); err != nil {
					b.Fatal(err)
				}
				ops += w.changes() - before
				b.StopTimer()
				if err := w.remove(ctx); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(ops)/float64(b.N), "ops/op")
		})
	}
}

// BenchmarkRuleSwapOneSlot: point one slot (both ports) at a new worker.
func BenchmarkRuleSwapOneSlot(b *testing.B) {
	for _, c := range benchCases {
		b.Run(c.String(), func(b *testing.B) {
			w, ts := benchBackend(b, c.backend, c.workers, c.families)
			ctx := context.Background()
			if err := w.apply(ctx, ts, ts); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = w.remove(ctx) })
			before := w.changes()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				ts[1] = slotTarget{tcp8080: uint16(20000 + i%2), tcp8443: uint16(30000 + i%2)}
				if err := w.apply(ctx, ts, ts); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(w.changes()-before)/float64(b.N), "ops/op")
		})
	}
}

// BenchmarkRuleRemove: removal on stop.
func BenchmarkRuleRemove(b *testing.B) {
	for _, c := range benchCases {
		b.Run(c.String(), func(b *testing.B) {
			w, ts := benchBackend(b, c.backend, c.workers, c.families)
			ctx := context.Background()
			ops := 0
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				if err := w.apply(ctx, ts, ts); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				before := w.changes()
				if err := w.remove(ctx); err != nil {
					b.Fatal(err)
				}
				ops += w.changes() - before
			}
			b.ReportMetric(float64(ops)/float64(b.N), "ops/op")
		})
	}
}

// BenchmarkNewConnection measures what the routes cost a new connection:
// connect, through the cluster's rules, to a listener in the server
// namespace, and close, one connection after another. Every slot routes to
// the same listener, so the rules are all that differs between slot
// counts. "any" rotates the client over 256 addresses (every slot; the
// average walk for iptables), "last" uses addresses of the last slot only
// (the longest walk). Run with:
//
//	sudo go test -run '^$' -bench NewConnection -count 10 .
func BenchmarkNewConnection(b *testing.B) {
	for _, backend := range []Backend{BackendNFTables, BackendIPTables} {
		for _, slots := range []int{1, 16, 256} {
			for _, from := range []string{"any", "last"} {
				if slots == 1 && from == "last" {
					continue
				}
				b.Run(fmt.Sprintf("%s/slots=%d/from=%s", backend, slots, from), func(b *testing.B) {
					benchNewConnection(b, backend, slots, from == "last")
				})
			}
		}
	}
}

func benchNewConnection(b *testing.B, backend Backend, slots int, last bool) {
	lab := netlab.NewT(b, netlab.Options{Clients: 256})
	w := backendIn(b, lab, backend, Config{Name: "bench", Workers: slots, Ports: []Port{tcp8080, tcp8443}, Addr: lab.ServerAddr4})
	// As in bench/datapath: one client address must not run out of ports
	// on its own TIME_WAIT sockets.
	for _, kv := range [][2]string{{"net/ipv4/ip_local_port_range", "1024 65535"}, {"net/ipv4/tcp_tw_reuse", "1"}} {
		if err := lab.Client.Sysctl(kv[0], kv[1]); err != nil {
			b.Fatal(err)
		}
	}
	ln, err := lab.Server.Listen("tcp", ":0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	ts := make([]slotTarget, slots)
	for s := range ts {
		ts[s] = slotTarget{tcp8080: port, tcp8443: port}
	}
	ctx := context.Background()
	if err := w.apply(ctx, ts, ts); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = w.remove(ctx) })
	var srcs []*net.TCPAddr
	for i, a := range lab.ClientAddrs4 {
		// Client i is in slot i mod slots (netlab's addresses count up).
		if !last || i%slots == slots-1 {
			srcs = append(srcs, net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, 0)))
		}
	}
	// 8443 is each slot's second rule: for iptables the last slot's is
	// the chain's very last.
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8443).String()
	b.ResetTimer()
	// One loop on one thread in the client namespace: a goroutine started
	// from here would run on another thread, in another namespace.
	err = lab.Client.Do(func() error {
		for i := 0; i < b.N; i++ {
			d := net.Dialer{LocalAddr: srcs[i%len(srcs)], Timeout: 2 * time.Second}
			c, err := d.Dial("tcp", dst)
			if err != nil {
				return fmt.Errorf("connection %d from %s: %w", i, d.LocalAddr, err)
			}
			c.Close()
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}
