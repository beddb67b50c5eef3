//go:build linux

package ipcluster

import (
	"context"
	"fmt"
	"testing"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

// Rule-engine benchmarks against the real iptables binaries, inside a lab
// namespace. Run with:
//
//	sudo go test -run '^$' -bench 'Rule' -count 5 .
//
// procs/op is the number of iptables processes per operation.
func benchWriter(b *testing.B, workers, families int) (*ruleWriter, []slotTarget) {
	lab := netlab.NewT(b, netlab.Options{Clients: 1})
	cfg := Config{Name: "bench", Workers: workers, Ports: []Port{{Public: 8080}, {Public: 8443}}}
	if families == 1 {
		cfg.Addr = lab.ServerAddr4
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		b.Fatal(err)
	}
	return newRuleWriter(cfg.routing(), execRunner{start: lab.Server.Start}), targetsFor(workers)
}

type benchCase struct{ workers, families int }

func (c benchCase) String() string {
	return fmt.Sprintf("slots=%d/ports=2/families=%d", c.workers, c.families)
}

var benchCases = []benchCase{{4, 1}, {4, 2}, {256, 2}}

func BenchmarkRuleInstall(b *testing.B) {
	for _, c := range benchCases {
		b.Run(c.String(), func(b *testing.B) {
			w, ts := benchWriter(b, c.workers, c.families)
			ctx := context.Background()
			procs := 0
			for i := 0; i < b.N; i++ {
				before := w.restores + w.saves
				if err := w.apply(ctx, ts); err != nil {
					b.Fatal(err)
				}
				procs += w.restores + w.saves - before
				b.StopTimer()
				if err := w.remove(ctx); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(procs)/float64(b.N), "procs/op")
		})
	}
}

func BenchmarkRuleSwapOneSlot(b *testing.B) {
	for _, c := range benchCases {
		b.Run(c.String(), func(b *testing.B) {
			w, ts := benchWriter(b, c.workers, c.families)
			ctx := context.Background()
			if err := w.apply(ctx, ts); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = w.remove(ctx) })
			before := w.restores + w.saves
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				ts[1] = slotTarget{tcp8080: uint16(20000 + i%2), tcp8443: uint16(30000 + i%2)}
				if err := w.apply(ctx, ts); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(w.restores+w.saves-before)/float64(b.N), "procs/op")
		})
	}
}

func BenchmarkRuleRemove(b *testing.B) {
	w, ts := benchWriter(b, 4, 2)
	ctx := context.Background()
	procs := 0
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		if err := w.apply(ctx, ts); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		before := w.restores + w.saves
		if err := w.remove(ctx); err != nil {
			b.Fatal(err)
		}
		procs += w.restores + w.saves - before
	}
	b.ReportMetric(float64(procs)/float64(b.N), "procs/op")
}
