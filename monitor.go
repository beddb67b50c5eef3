//go:build linux

package ipcluster

// Health measurement. Workers report what only they can see (Go heap,
// goroutines, their connections); the master measures what it must not take
// on trust (RSS, from /proc) and how fresh each heartbeat is.

import (
	"runtime"
	"runtime/metrics"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// heapMetric is the Go heap in use, read without stopping the world (unlike
// runtime.ReadMemStats).
const heapMetric = "/memory/classes/heap/objects:bytes"

// stats samples the worker's own figures for a heartbeat.
func (w *Worker) stats() proto.Stats {
	sample := []metrics.Sample{{Name: heapMetric}}
	metrics.Read(sample)
	var heap uint64
	if sample[0].Value.Kind() == metrics.KindUint64 {
		heap = sample[0].Value.Uint64()
	}
	return proto.Stats{
		HeapBytes:   heap,
		Goroutines:  runtime.NumGoroutine(),
		Connections: w.conns.Load(),
		Accepted:    w.accepted.Load(),
		UptimeSec:   time.Since(w.started).Seconds(),
		Retired:     w.isRetired(),
	}
}
