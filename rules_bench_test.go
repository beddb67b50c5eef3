//go:build linux

package ipcluster

import (
	"context"
	"fmt"
	"testing"

	"github.com/google/nftables"

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
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		b.Fatal(err)
	}
	if backend == BackendIPTables {
		return newRuleWriter(cfg.routing(), execRunner{start: lab.Server.Start}), targetsFor(workers)
	}
	var conn *nftables.Conn
	if err := lab.Server.Do(func() (err error) {
		conn, err = nftables.New(nftables.AsLasting())
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = conn.CloseLasting() })
	return newNFTWriter(cfg.routing(), conn), targetsFor(workers)
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
